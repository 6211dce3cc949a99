"""CLIP Surgery (Li et al. 2023): architecture surgery (v-v attention path) and feature surgery.

Follows xmed-lab/CLIP_Surgery (`clip_surgery_model.py`, `clip.py`, `demo.py`).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tclip_jax.methods import common
from tclip_jax.methods.base import (NORMALIZE_THEN_UPSAMPLE_TO_ORIGINAL, PromptMethod, Query, QueryArrays,
                                    label_set_mean)
from tclip_jax.methods.settings import MethodSettings
from tclip_jax.methods.similarity import similarity_to_maps
from tclip_jax.methods.templates import CLIP_SURGERY_TEMPLATES
from tclip_jax.model import CLIP, ImageOutput, attend, l2_normalize
from tclip_jax.settings import parse_optional, setting

Array = jax.Array

# The official code replaces the attention of `resblocks[-i]` for i in 1..6, whatever the depth.
DEFAULT_SURGERY_BLOCKS = 6


@flax.struct.dataclass
class SurgeryOutput:
    maps: Array                           # [n_images, n_texts, gh, gw]
    similarity: Array                     # [n_images, 1 + gh*gw, n_texts] after feature surgery (if on)
    image_features: Array                 # [n_images, 1 + gh*gw, embed_dim] L2-normalized tokens
    text_features: Array                  # [n_texts, embed_dim]
    redundant_features: Optional[Array]   # [1, embed_dim] when given by prompts, else None


def check_surgery_blocks(surgery_blocks: int, layers: int) -> None:
    """The surgery path's block count must lie in [1, layers] (checked when a method is built and where the path
    is traced)."""
    if not 1 <= surgery_blocks <= layers:
        raise ValueError(f"surgery_blocks must be in [1, {layers}] for this {layers}-block model, got {surgery_blocks}")


def surgery_image_features(model: CLIP, params: dict, images: Array, surgery_blocks: int,
                           architecture_surgery: bool) -> tuple[Array, tuple[int, int]]:
    """(L2-normalized image tokens [B, n, D], the patch grid): the surgery path's tokens (`surgery_tokens`), or
    the model's own without architecture surgery."""
    image = common.encode_image(model, params, images)
    tokens = surgery_tokens(model, params, image, surgery_blocks) if architecture_surgery else image.tokens
    return l2_normalize(tokens), image.grid


def surgery_tokens(model: CLIP, params: dict, image: ImageOutput, surgery_blocks: int) -> Array:
    """Joint-space tokens [B, n, D] of the architecture-surgery path.

    From the stream entering the first surgery block, the new path adds, per surgery block, only the v-v
    self-attention (q = k = v = value projection, per head, scale head_dim**-0.5) of ln_1 of the *original*
    stream, through the block's output projection (no MLP). The class token comes from the original path.
    """
    layers = model.config.vision_layers
    check_surgery_blocks(surgery_blocks, layers)
    vision = model.bind({"params": params}).visual
    stream = image.residual_stream
    x = stream[layers - surgery_blocks]
    for index in range(layers - surgery_blocks, layers):
        attention = vision.blocks[index].attn
        v = attention.value(vision.blocks[index].ln_1(stream[index]))
        mixed, _ = attend(v, v, v, attention.num_heads, dtype=model.dtype)
        x = x + attention.out(mixed)
    x = x.at[:, 0].set(stream[layers][:, 0])
    return vision.project(x)


def feature_surgery_scores(image_features: Array, text_features: Array, redundant_features: Optional[Array] = None,
                           valid: Optional[Array] = None) -> Array:
    """`clip_feature_surgery`: token-text scores [B, n, T] with the features shared by all texts removed.

    With `redundant_features` [1, D] (e.g. the empty-string prompt ensemble): image @ (text - redundant).
    Otherwise the redundancy is the mean over the label set of the element-wise products f * t_j, each
    weighted by w_j = softmax(2 * cls . t)_j / mean_j(...) from the image's class token; per image (the
    official code only supports batch size 1). Summing over channels first gives the same scores:
    w_j (f . t_j) - mean_j' w_j' (f . t_j'). `valid` [T] bool marks the label set's texts among padded ones
    (`Method.label_set_arrays`): the softmax and the means run over those alone; the padded texts' scores are junk.
    """
    if redundant_features is not None:
        return image_features @ (text_features - redundant_features).T
    if text_features.shape[0] < 2:
        raise ValueError("feature surgery over the label set needs at least 2 texts; for a single text pass "
                         "redundant features (CLIP Surgery's demo uses the empty-string prompt ensemble)")
    if valid is None:
        valid = jnp.ones(text_features.shape[0], bool)
    prob = jax.nn.softmax(2 * image_features[:, :1] @ text_features.T, axis=-1, where=valid)   # [B, 1, T]
    weights = prob / label_set_mean(prob, valid, axis=-1)
    weighted = weights * (image_features @ text_features.T)
    return weighted - label_set_mean(weighted, valid, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "surgery_blocks", "architecture_surgery",
                                             "feature_surgery"))
def clip_surgery_map(model: CLIP, params: dict, images: Array, texts: Array,
                     redundant_texts: Optional[Array] = None, *,
                     surgery_blocks: int = DEFAULT_SURGERY_BLOCKS, architecture_surgery: bool = True,
                     feature_surgery: bool = True) -> SurgeryOutput:
    """CLIP Surgery similarity maps.

    Protocol of the official demo: whole image resized to the model size (`whole_image`); texts as the
    85-template prompt ensemble, token ids [n_texts, n_templates, context] (`CLIP_SURGERY_TEMPLATES`; 2-D
    token ids give one raw prompt per text), or their features (`text_features`); features L2-normalized over
    channels; maps min-max normalized over the patches, then bilinearly upsampled (`get_similarity_map`).

    redundant_texts: [1, n_templates, context] (or [1, context]) prompts, or their features [1, embed_dim],
      whose normalized embedding is subtracted from every text (the demo's single-text case uses the
      empty-string ensemble); None uses the label-set feature surgery, which needs >= 2 texts.
    surgery_blocks: the last blocks given the v-v path; the official default 6 is every block of a 6-layer
      model and the second half of ViT-B.
    architecture_surgery / feature_surgery: switch either surgery off (both off = plain CLIP tokens).
    """
    image_features, grid = surgery_image_features(model, params, images, surgery_blocks, architecture_surgery)
    texts = common.text_features(model, params, texts)
    redundant = None
    if redundant_texts is not None:
        redundant = common.text_features(model, params, redundant_texts)
        if redundant.shape[0] != 1:
            raise ValueError(f"redundant_texts must hold one text (a leading axis of 1), "
                             f"got shape {redundant_texts.shape}")
    if feature_surgery:
        similarity = feature_surgery_scores(image_features, texts, redundant)
    else:
        similarity = image_features @ texts.T
    return SurgeryOutput(similarity_to_maps(similarity, grid), similarity, image_features, texts, redundant)


@dataclasses.dataclass(frozen=True)
class CLIPSurgerySettings(MethodSettings):
    surgery_blocks: Optional[int] = setting(
        None, "the last blocks given the v-v path (None: the official 6, or every block of a shallower model)",
        parse=parse_optional(int), flag=False)
    architecture_surgery: bool = setting(True, "the v-v attention path (false: the model's own tokens)", flag=False)
    feature_surgery: bool = setting(True, "remove the features shared by the label set (false: plain cosines)",
                                    flag=False)


class CLIPSurgery(PromptMethod):
    """CLIP Surgery as its demo runs it: the 85-template ensemble per prompt; feature surgery over the label set
    (the prompts of an explain call, a sweep's class prompts); a prompt outside a label set of at least 2, or a
    single prompt, gets the empty-string ensemble as its redundant features, as the demo does for one prompt."""

    name = "clip_surgery"
    image_encoder_passes = ("1 (dual path)", "0")
    Settings = CLIPSurgerySettings
    heatmap = NORMALIZE_THEN_UPSAMPLE_TO_ORIGINAL
    maps_version = 2
    templates = CLIP_SURGERY_TEMPLATES
    uses_label_set = True

    def __init__(self, clip, settings=None):
        super().__init__(clip, settings)
        layers = clip.config.vision_layers
        blocks = self.settings.surgery_blocks
        if blocks is None:
            blocks = min(DEFAULT_SURGERY_BLOCKS, layers)
            if layers < DEFAULT_SURGERY_BLOCKS:
                covered = "it" if layers == 1 else "all of them"
                warnings.warn(f"CLIP Surgery: the model has {layers} block{'s' * (layers != 1)}, fewer than the "
                              f"official {DEFAULT_SURGERY_BLOCKS}; the surgery path covers {covered} (set "
                              "surgery_blocks to choose)", stacklevel=2)
        check_surgery_blocks(blocks, layers)
        self.surgery_blocks = blocks
        self.uses_label_set = self.settings.feature_surgery  # plain cosines do not depend on the other prompts

    def encode(self, queries: list[Query], label_set=None) -> QueryArrays:
        labels = self.distinct_texts(label_set or ())
        if len(labels) < 2 or not self.uses_label_set:
            labels = {}
        keys = list(labels)
        member = np.array([keys.index(key) if key in labels else -1
                           for key in self.text_keys([q.prompt for q in queries])], np.int32)
        shared = {"redundant": self.text_features([""])}
        if labels:
            shared.update(self.label_set_arrays(list(labels.values())))
        return QueryArrays({"features": self.text_features([q.prompt for q in queries]), "member": member}, shared)

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        settings = self.settings
        image_features, grid = surgery_image_features(self.clip.model, params, pixels, self.surgery_blocks,
                                                      settings.architecture_surgery)
        features, member = queries.per_query["features"], queries.per_query["member"]
        if not settings.feature_surgery:
            return similarity_to_maps(image_features @ features.T, grid)
        similarity = feature_surgery_scores(image_features, features, queries.shared["redundant"])
        if "label_set" in queries.shared:
            in_set = feature_surgery_scores(image_features, queries.shared["label_set"],
                                            valid=queries.shared["label_valid"])
            similarity = jnp.where(member >= 0, jnp.take(in_set, jnp.maximum(member, 0), axis=-1), similarity)
        return similarity_to_maps(similarity, grid)
