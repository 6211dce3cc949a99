"""TCLIP as a `Method`: per-word maps from token–patch cosine relevance over translated copies of the image.

Device (jitted): the K translated copies of every image of a batch go through the ViT as one batch; each query's
relevance grid is upsampled, shifted back and combined by a pixel-wise trimmed mean (`relevance`). Host: a
2-component GMM on each aggregated map gives τ and the soft map; Otsu and the largest connected component give
the box (`tclip_jax.postprocess`). A query is a unit token embedding averaged over a word's BPE pieces, and over
the words that overlap a query's span (a multi-word class name; the whole prompt for its phrase map), or, with a
`token_weighting`, the span's pieces weighted by the end-of-text token's attention (`token_weights`).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tclip_jax.checkpoints.load import LoadedClip
from tclip_jax.image import InputProtocol
from tclip_jax.methods.base import (
    EncodedPrompts,
    HostMaps,
    MapOutput,
    Method,
    Query,
    QueryArrays,
    distinct_queries,
    prompt_list,
)
from tclip_jax.methods.common import causal_length_groups, in_chunks
from tclip_jax.methods.tclip.relevance import (PROMPT_CHUNK, aggregate_maps, token_embeddings,
                                              translated_patch_embeddings)
from tclip_jax.methods.tclip.settings import Settings
from tclip_jax.methods.tclip.token_weights import eot_weights, token_embeddings_and_attention
from tclip_jax.methods.tclip.translations import translation_offsets
from tclip_jax.model.tokenizer import TokenizedPrompt
from tclip_jax.postprocess.soft import soft_maps_and_boxes


class TCLIP(Method):
    name = "tclip"
    # its 25 translated copies (the default K), forward only
    image_encoder_passes = ("25", "0")
    Settings = Settings
    explains_words = True

    def __init__(self, clip, settings=None):
        super().__init__(clip, settings)
        self.offsets  # shifts of this model's patch size, checked before any image

    @functools.cached_property
    def offsets(self) -> tuple[tuple[int, int], ...]:
        return translation_offsets(self.clip.config.patch_size, self.settings.scale_fractions,
                                   self.settings.translations)

    @property
    def input_protocol(self) -> InputProtocol:
        return self.settings.input_protocol

    # ------------------------------------------------------------------------------------------ encode
    def embed_prompts(self, tokens: Sequence[TokenizedPrompt]) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """([P, L, D] unit embeddings of every text position up to each prompt's end-of-text token (zeros after),
        [P, L] token weights of the settings' `token_weighting`, or None for "none").

        Each prompt's row is cut after its end-of-text token (`causal_length_groups`); prompts of one length go
        through together, in chunks of one shape (`common.in_chunks`, PROMPT_CHUNK rows a call: one program per length,
        whatever the prompt count), so a prompt's embeddings are the same whichever prompts come with it.
        """
        groups = causal_length_groups([t.eot_position for t in tokens], self.clip.config.context_length)
        embeds = np.zeros((len(tokens), max(groups), self.clip.config.embed_dim), np.float32)
        weighting = self.settings.token_weighting
        weights = None if weighting == "none" else np.zeros((len(tokens), max(groups)))
        params = self.default_device_params()
        for length, group in groups.items():
            ids = np.stack([tokens[i].token_ids[:length] for i in group])
            if weights is None:
                embeds[group, :length] = in_chunks(lambda chunk: token_embeddings(self.clip.model, params, chunk),
                                                   ids, PROMPT_CHUNK)
                continue
            group_embeds, attention = in_chunks(
                lambda chunk: token_embeddings_and_attention(self.clip.model, params, chunk), ids, PROMPT_CHUNK)
            embeds[group, :length] = group_embeds
            for i, probs in zip(group, attention):
                weights[i, :length] = eot_weights(probs, tokens[i].eot_position, weighting)
        return embeds, weights

    def encode(self, queries: Sequence[Query], label_set: Optional[Sequence[str]] = None) -> QueryArrays:
        """[Q, D] queries: the mean over the words that overlap each query's span of the mean of their pieces."""
        tokens = self.tokenize(list(dict.fromkeys(q.prompt for q in queries)))
        return _queries(tokens, *self.embed_prompts(tokens), queries)

    def encode_prompts(self, prompts: str | Sequence[str]) -> EncodedPrompts:
        """As `Method.encode_prompts`, keeping the token embeddings for the raw similarity S."""
        tokens = self.tokenize(prompt_list(prompts))
        embeds, weights = self.embed_prompts(tokens)
        words, queries = self.explained_queries(tokens)
        encoded = distinct_queries(tokens, words, _queries(tokens, embeds, weights, queries), self.encoder)
        return dataclasses.replace(encoded, extras=embeds, mapped_ends=tuple(self.mapped_ends(t) for t in tokens))

    # ------------------------------------------------------------------------------------------ device
    @functools.cached_property
    def jitted_maps(self):
        """`Method.jitted_maps`, one program for every TCLIP of one model (architecture and matmul dtype) and
        settings: `maps` reads the weights only as its `params` argument, so a TCLIP built again for other weights
        (each validation of a training run, a loop over checkpoints) is not traced and compiled again. A subclass
        compiles its own, once per instance: state of its own that its `maps` may read is not in the key."""
        if type(self) is not TCLIP:
            return super().jitted_maps
        return _maps_program(self.clip.model, self.settings)

    def maps(self, params, pixels, queries: QueryArrays, rows) -> MapOutput:
        """Aggregated maps [B, K, h, w] at the model-input size; extras: the untranslated copy's unit patch
        embeddings [B, gh*gw, D]."""
        patch_embeds = translated_patch_embeddings(self.clip.model, params, pixels, self.offsets)
        patch = self.clip.config.patch_size
        size_hw = pixels.shape[1:3]
        aggregate = functools.partial(aggregate_maps, offsets=self.offsets,
                                      grid_hw=(size_hw[0] // patch, size_hw[1] // patch),
                                      size_hw=size_hw, trim=self.settings.trim)
        selected = jnp.take(queries.per_query, rows, axis=0)                     # [B, K, D]; rows may be traced
        return MapOutput(jax.vmap(aggregate)(patch_embeds, selected), patch_embeds[:, 0])

    # -------------------------------------------------------------------------------------------- host
    def postprocess(self, heatmaps: Sequence[np.ndarray], soft_maps: bool = True,
                    covered: Optional[tuple[slice, slice]] = None) -> list[HostMaps]:
        """Soft map, GMM fit and box of each aggregated map (boxes only without `soft_maps`), all maps of the
        image in one batched call (`postprocess.soft_maps_and_boxes`), fitted within `covered`."""
        if not soft_maps:
            return super().postprocess(heatmaps, covered=covered)
        soft, fits, boxes = soft_maps_and_boxes(heatmaps, sigma=self.settings.sigma, rule=self.settings.box_rule,
                                                covered=covered)
        return [HostMaps(s, fit, box) for s, fit, box in zip(soft, fits, boxes)]

    def prompt_similarity(self, encoded: EncodedPrompts, prompt: int, extras: Any) -> np.ndarray:
        """Raw S [n_pieces, gh*gw] of the untranslated image; row i is piece i of the prompt."""
        pieces = encoded.extras[prompt, list(encoded.tokens[prompt].piece_positions)]
        return pieces @ extras.T


@functools.lru_cache(maxsize=16)  # a grid of settings compiles each while it runs
def _maps_program(model, settings: Settings):
    """`jax.jit` of `maps_per_image` of a TCLIP without weights (`params` None): nothing of one model's weights is
    kept here, and a `maps` that read them other than as its argument would fail, not reuse them."""
    return jax.jit(TCLIP(LoadedClip(model, None, None, "", ""), settings).maps_per_image)


def _queries(tokens: Sequence[TokenizedPrompt], embeds: np.ndarray, weights: Optional[np.ndarray],
             queries: Sequence[Query]) -> QueryArrays:
    index = {t.text: i for i, t in enumerate(tokens)}
    rows = [_span_query(tokens[i], embeds[i], None if weights is None else weights[i], q.span)
            for q, i in ((q, index[q.prompt]) for q in queries)]
    return QueryArrays(np.stack(rows).astype(np.float32))


def _span_query(tokens: TokenizedPrompt, embeds: np.ndarray, weights: Optional[np.ndarray],
                span: Optional[tuple[int, int]]) -> np.ndarray:
    """Mean over the words that overlap `span` (all words if None) of each word's mean piece embedding; with
    `weights` and several words, the weighted mean of their pieces instead. Overlap, not inclusion: a class name
    glued to template letters ("a {}'s photo" -> "retriever's") is part of a longer word, which it takes whole."""
    words = [w for w in tokens.words if not w.is_punctuation
             and (span is None or (w.start < span[1] and w.end > span[0]))]
    if not words:
        where = "" if span is None else f" that overlap characters [{span[0]}, {span[1]})"
        raise ValueError(f"prompt {tokens.text!r} has no words to explain{where}")
    if weights is not None and len(words) > 1:
        pieces = [p for w in words for p in w.piece_positions]
        return weights[pieces] @ embeds[pieces] / weights[pieces].sum()
    return np.mean([embeds[list(w.piece_positions)].mean(0) for w in words], axis=0)
