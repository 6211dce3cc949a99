"""Text-independent attention maps: raw class-token attention and attention rollout."""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from tclip_jax.methods import common
from tclip_jax.methods.base import UPSAMPLE_THEN_NORMALIZE, PromptMethod, QueryArrays
from tclip_jax.methods.settings import MethodSettings
from tclip_jax.model import CLIP
from tclip_jax.settings import setting

Array = jax.Array


@flax.struct.dataclass
class AttentionOutput:
    maps: Array     # [n_images, n_texts, gh, gw] the class-token row over the patches, the same for every text
    matrix: Array   # [n_images, n, n] head-mean attention (raw) or the rolled-out joint attention (rollout)


def _broadcast_to_texts(matrix: Array, grid: tuple[int, int], n_texts: int) -> Array:
    maps = common.patch_grid(matrix[:, 0], grid)
    return jnp.broadcast_to(maps[:, None], (maps.shape[0], n_texts, *grid))


def _check_layer(layer: int, num_layers: int) -> None:
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"layer must index one of the {num_layers} blocks, got {layer}")


@functools.partial(jax.jit, static_argnames=("model", "layer"))
def raw_attention_map(model: CLIP, params: dict, images: Array, texts: Array, *,
                      layer: int = -1) -> AttentionOutput:
    """The class token's attention over the patches in block `layer` (default the last), mean over heads.

    Text-independent: `texts` (token ids or features) only sets n_texts. Protocol: center-crop
    preprocessing; maps upsampled, then min-max normalized (as Chefer et al.'s attention baselines).
    """
    _check_layer(layer, model.config.vision_layers)
    image = common.encode_image(model, params, images)
    matrix = image.attention_probs[layer].mean(axis=1)
    return AttentionOutput(_broadcast_to_texts(matrix, image.grid, texts.shape[0]), matrix)


@functools.partial(jax.jit, static_argnames=("model", "start_layer"))
def rollout_map(model: CLIP, params: dict, images: Array, texts: Array, *,
                start_layer: int = 0) -> AttentionOutput:
    """Attention rollout (Abnar & Zuidema 2020) from block `start_layer` to the last.

    Per block: A = mean_heads(probs) + I (the residual connection), rows renormalized to sum to 1; the
    joint attention is A_last @ ... @ A_start, and the map is its class-token row over the patches.
    Text-independent; protocol and post-processing as `raw_attention_map`.
    """
    _check_layer(start_layer, model.config.vision_layers)
    image = common.encode_image(model, params, images)
    identity = jnp.eye(image.attention_probs[0].shape[-1], dtype=image.attention_probs[0].dtype)
    joint = None
    for probs in image.attention_probs[start_layer:]:
        mixed = probs.mean(axis=1) + identity
        mixed = mixed / mixed.sum(axis=-1, keepdims=True)
        joint = mixed if joint is None else mixed @ joint
    return AttentionOutput(_broadcast_to_texts(joint, image.grid, texts.shape[0]), joint)


@dataclasses.dataclass(frozen=True)
class AttentionSettings(MethodSettings):
    layer: int = setting(-1, "the block whose class-token attention is the map (-1: the last)", flag=False)


@dataclasses.dataclass(frozen=True)
class RolloutSettings(MethodSettings):
    start_layer: int = setting(0, "the first block of the rollout", flag=False)


class ClassTokenAttention(PromptMethod):
    """A class-token attention map of the image tower; the same map for every prompt. Each method of the family
    names its one setting, a block index (`block_setting`, checked against the image tower when it is built), and
    its `grid_maps`."""

    image_encoder_passes = ("1", "0")
    input_protocol = "center_crop"
    heatmap = UPSAMPLE_THEN_NORMALIZE
    prompt_free = True
    block_setting: ClassVar[str]

    def __init__(self, clip, settings=None):
        super().__init__(clip, settings)
        common.check_block_index(self.block_setting, getattr(self.settings, self.block_setting),
                                 clip.config.vision_layers, "image")


class RawAttention(ClassTokenAttention):
    """The class token's attention in one block (`raw_attention_map`); the same map for every prompt."""

    name = "attention"
    Settings = AttentionSettings
    block_setting = "layer"

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        return raw_attention_map(self.clip.model, params, pixels, queries.per_query, layer=self.settings.layer).maps


class Rollout(ClassTokenAttention):
    """Attention rollout (`rollout_map`); the same map for every prompt."""

    name = "rollout"
    Settings = RolloutSettings
    block_setting = "start_layer"

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        return rollout_map(self.clip.model, params, pixels, queries.per_query,
                           start_layer=self.settings.start_layer).maps
