"""The TCLIP explainer: images and prompts in; per-word maps, soft maps, thresholds and boxes out.

Device work (the batched pass over translated copies and the aggregation) is jitted; GMM, Otsu and
connected components run on the host. Maps are returned at the original image's size.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from tclip_jax.image import INPUT_PROTOCOLS, Geometry, ImageLike, InputProtocol, load_image, prepare, to_original
from tclip_jax.checkpoints.load import LoadedClip, load_clip
from tclip_jax.method.relevance import aggregate_maps, token_embeddings, translated_patch_embeddings
from tclip_jax.method.translations import DEFAULT_SCALE_FRACTIONS, DEFAULT_TRIM, translation_offsets
from tclip_jax.postprocess import BOX_RULES, Box, BoxRule, GmmFit, heatmap_box, soft_map
from tclip_jax.model.tokenizer import TokenizedPrompt, Word

@dataclasses.dataclass(frozen=True)
class Settings:
    """How TCLIP is run. `translations=1` turns the multi-scale translation off."""

    translations: int = 25
    scale_fractions: tuple[float, ...] = DEFAULT_SCALE_FRACTIONS  # shift lengths, fractions of the patch size
    trim: float = DEFAULT_TRIM          # trimmed-mean proportion cut from each end, per pixel
    protocol: InputProtocol = "whole"   # how the image becomes the model input (tclip_jax.image.protocols)
    sigma: Optional[float] = None       # soft-map Gaussian sigma in pixels (None: 2% of the longer side)
    box_rule: BoxRule = "component"     # 'component' (largest connected component) or 'contour' (gScoreCAM)
    truncate: bool = False              # truncate prompts longer than the context (with a warning) or fail
    gmm_seed: int = 0

    def __post_init__(self):
        if self.protocol not in INPUT_PROTOCOLS:
            raise ValueError(f"protocol must be one of {INPUT_PROTOCOLS}, got {self.protocol!r}")
        if self.box_rule not in BOX_RULES:
            raise ValueError(f"box_rule must be one of {BOX_RULES}, got {self.box_rule!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class MapResult:
    """One word (or a whole prompt's phrase) on one image, at the original image's size."""

    text: str
    aggregated: np.ndarray   # [H, W] trimmed mean over translated copies of the cosine relevance
    soft: np.ndarray         # [H, W] GMM-thresholded, Gaussian-filtered map
    gmm: GmmFit              # gmm.tau is the threshold τ
    box: Box                 # xyxy pixels, exclusive end, from Otsu + the largest component

    @property
    def tau(self) -> float:
        return self.gmm.tau


@dataclasses.dataclass(frozen=True, eq=False)
class PromptResult:
    prompt: str
    tokens: TokenizedPrompt
    words: tuple[Word, ...]          # the explained words (punctuation dropped), in prompt order
    word_maps: tuple[MapResult, ...]  # one per word
    phrase: MapResult                # the mean of the prompt's words (a multi-word class name)
    similarity: np.ndarray           # raw S [n_pieces, gh*gw] of the untranslated image, row i = pieces[i]


@dataclasses.dataclass(frozen=True, eq=False)
class ImageResult:
    image: np.ndarray                # uint8 [H, W, 3] as loaded
    geometry: Geometry
    grid: tuple[int, int]
    prompts: tuple[PromptResult, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedPrompts:
    """Prompts reduced to query embeddings: each word, then each prompt's phrase."""

    tokens: tuple[TokenizedPrompt, ...]
    words: tuple[tuple[Word, ...], ...]
    token_embeds: np.ndarray          # [P, L, D] unit rows, L >= every prompt's end-of-text position + 1
    queries: np.ndarray               # [sum(words) + P, D]


class TCLIP:
    def __init__(self, clip: LoadedClip, settings: Settings = Settings()):
        self.clip = clip
        self.settings = settings
        self.offsets = translation_offsets(clip.config.patch_size, settings.scale_fractions, settings.translations)

    @classmethod
    def from_pretrained(cls, name_or_path: Optional[str | os.PathLike] = None, **settings) -> "TCLIP":
        """Loads any model `load_clip` accepts (None: the embedded default)."""
        return cls(load_clip(name_or_path), Settings(**settings))

    def preprocess(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """(uint8 image, model input [h, w, 3], geometry) under the configured protocol."""
        rgb = load_image(image)
        config = self.clip.config
        return rgb, *prepare(rgb, self.settings.protocol, config.image_size, config.patch_size)

    def encode_prompts(self, prompts: Sequence[str]) -> EncodedPrompts:
        """Tokenises and encodes prompts once; the result serves any number of images."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        tokens = tuple(self.clip.tokenizer.tokenize_words(p, self.clip.config.context_length,
                                                          self.settings.truncate) for p in prompts)
        words = tuple(tuple(w for w in t.words if not w.is_punctuation) for t in tokens)
        for prompt, prompt_words in zip(prompts, words):
            if not prompt_words:
                raise ValueError(f"prompt {prompt!r} has no words to explain")
        # The text tower is causal: positions after the last end-of-text token change nothing before it,
        # so rows are cut there (rounded up to a multiple of 8 to bound recompilation).
        length = min(self.clip.config.context_length, -(-(max(t.eot_position for t in tokens) + 1) // 8) * 8)
        embeds = np.asarray(token_embeddings(self.clip.model, self.clip.params,
                                             np.stack([t.token_ids[:length] for t in tokens])))
        word_queries = [[embeds[p, list(w.piece_positions)].mean(0) for w in ws] for p, ws in enumerate(words)]
        queries = [q for qs in word_queries for q in qs] + [np.mean(qs, axis=0) for qs in word_queries]
        return EncodedPrompts(tokens, words, embeds, np.stack(queries).astype(np.float32))

    def explain(self, image: ImageLike, prompts: str | Sequence[str] | EncodedPrompts) -> ImageResult:
        return next(self.explain_batch([image], prompts))

    def explain_batch(self, images: Sequence[ImageLike], prompts: str | Sequence[str] | EncodedPrompts,
                      batch_size: int = 4) -> Iterator[ImageResult]:
        """Yields one ImageResult per image; the prompts are encoded once for all images."""
        encoded = prompts if isinstance(prompts, EncodedPrompts) else self.encode_prompts(prompts)
        # Equal queries (a one-word prompt's word and phrase, a word in several prompts) are mapped once.
        distinct, query_to_distinct = np.unique(encoded.queries, axis=0, return_inverse=True)
        query_to_distinct = query_to_distinct.ravel()  # numpy 2.0.0 returned it with the input's rank
        for start in range(0, len(images), batch_size):
            loaded = [self.preprocess(image) for image in images[start:start + batch_size]]
            patch_embeds, maps = self.device_maps(np.stack([pixels for _, pixels, _ in loaded]), distinct)
            for (rgb, _, geometry), patches, image_maps in zip(loaded, patch_embeds, maps):
                yield self._image_result(rgb, geometry, encoded, patches[0], image_maps, query_to_distinct)

    def device_maps(self, pixels: np.ndarray, queries: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """The device part: patch embeddings [B, K, N, D] and aggregated maps [B, Q, h, w] at input size."""
        model, params = self.clip.model, self.clip.params
        patch_embeds = translated_patch_embeddings(model, params, pixels, self.offsets)
        patch = self.clip.config.patch_size
        size_hw = pixels.shape[1:3]
        aggregate = functools.partial(aggregate_maps, offsets=self.offsets,
                                      grid_hw=(size_hw[0] // patch, size_hw[1] // patch),
                                      size_hw=size_hw, trim=self.settings.trim)
        return patch_embeds, jax.vmap(aggregate, in_axes=(0, None))(patch_embeds, queries)

    def _image_result(self, rgb, geometry, encoded: EncodedPrompts, identity_patches, distinct_maps,
                      query_to_distinct: np.ndarray) -> ImageResult:
        distinct_maps = list(to_original(np.asarray(distinct_maps), geometry))  # equal queries share one array
        post = self.postprocess(distinct_maps)

        def map_result(text: str, query: int) -> MapResult:
            return MapResult(text, distinct_maps[query_to_distinct[query]], *post[query_to_distinct[query]])

        identity_patches = np.asarray(identity_patches)
        n_words = sum(len(ws) for ws in encoded.words)
        prompts, word_index = [], 0
        for p, (tokens, words) in enumerate(zip(encoded.tokens, encoded.words)):
            word_maps = tuple(map_result(w.text, word_index + i) for i, w in enumerate(words))
            word_index += len(words)
            pieces = encoded.token_embeds[p, list(tokens.piece_positions)]
            prompts.append(PromptResult(tokens.text, tokens, words, word_maps, map_result(tokens.text, n_words + p),
                                        pieces @ identity_patches.T))
        grid = tuple(s // self.clip.config.patch_size for s in geometry.input_hw)
        return ImageResult(rgb, geometry, grid, tuple(prompts))

    def postprocess(self, aggregated_maps: Sequence[np.ndarray]) -> list[tuple[np.ndarray, GmmFit, Box]]:
        """The host part: (soft map, GMM fit, box) of each aggregated map, in MapResult's field order.

        Maps run in parallel on threads: sorting and blurring release the GIL (scikit-learn's EM only partly).
        """
        def one(aggregated: np.ndarray) -> tuple[np.ndarray, GmmFit, Box]:
            soft, gmm = soft_map(aggregated, sigma=self.settings.sigma, seed=self.settings.gmm_seed)
            return soft, gmm, heatmap_box(aggregated, rule=self.settings.box_rule)

        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(aggregated_maps), os.cpu_count() or 1))) as pool:
            return list(pool.map(one, aggregated_maps))
