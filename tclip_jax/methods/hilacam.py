"""HilaCAM: Chefer et al. 2021, generic attention-model explainability, as in the official CLIP notebook.

hila-chefer/Transformer-MM-Explainability, `CLIP_explainability.ipynb` (`interpret`).

`start_layer` counts blocks Python-style: -k is the last k blocks. The notebook resolves only -1 (to the last
block) and reads any other negative value as 0, all blocks; -1 and 0..n-1 agree with it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from tclip_jax.methods import common
from tclip_jax.methods.base import UPSAMPLE_THEN_NORMALIZE, PromptMethod, QueryArrays
from tclip_jax.methods.settings import MethodSettings
from tclip_jax.model import CLIP, eot_positions, l2_normalize
from tclip_jax.settings import setting

Array = jax.Array


@flax.struct.dataclass
class HilaCAMOutput:
    maps: Array             # [n_images, n_texts, gh, gw] relevance of each patch for the class token, R[0, 1:]
    image_relevance: Array  # [n_images, n_texts, n, n] the accumulated image relevance R
    text_relevance: Array   # [n_images, n_texts, context, context] the accumulated text relevance R_text
    text_scores: Array      # [n_images, n_texts, context] R_text[eot, 1:eot] / sum, zero elsewhere
    logits: Array           # [n_images, n_texts] logit_scale * cosine


def resolve_start_layer(start_layer: int, num_layers: int, name: str, tower: str) -> int:
    """The first block used, Python-style: the official -1 is the last block only, and -k the last k blocks."""
    common.check_block_index(name, start_layer, num_layers, tower)
    return start_layer % num_layers


def accumulate_relevance(grads: Sequence[Array], probs: Sequence[Array], start_layer: int | Array) -> Array:
    """R = I; for each block from start_layer: R += mean_heads(clamp(grad * probs, min=0)) @ R.

    grads, probs: per block [heads, n, n] (one example). Returns R [n, n]. `start_layer` may be traced
    (earlier blocks add exactly zero), so one compilation serves every start layer.
    """
    relevance = jnp.eye(probs[0].shape[-1], dtype=probs[0].dtype)
    for layer, (grad, prob) in enumerate(zip(grads, probs)):
        cam = jnp.maximum(grad * prob, 0).mean(axis=0)
        relevance = relevance + jnp.where(layer >= start_layer, cam @ relevance, 0)
    return relevance


def _embedding_and_vjp(encode, inputs: Array, num_layers: int, num_heads: int, length: int):
    """One example through a tower: its normalized embedding [D], the attention probabilities (per block
    [heads, n, n]) and the vjp from an embedding cotangent to the gradients w.r.t. those probabilities.

    `encode(batch, probs_offsets)` is a tower's encode function; zero offsets change nothing, so their
    gradient is the gradient w.r.t. the attention probabilities.
    """
    def embed(offsets):
        out = encode(inputs[None], offsets)
        return l2_normalize(out.embeds[0]), tuple(p[0] for p in out.attention_probs)

    zeros = tuple(jnp.zeros((1, num_heads, length, length), jnp.float32) for _ in range(num_layers))
    embedding, vjp, probs = jax.vjp(embed, zeros, has_aux=True)
    return embedding, lambda cotangent: tuple(g[0] for g in vjp(cotangent)[0]), probs


def text_scores(text_relevance: Array, eot_index: Array) -> Array:
    """The notebook's word scores: R_text[eot, 1:eot] / sum, placed at positions 1..eot-1 of [..., context]
    (`eot_index`: each text's end-of-text position, `eot_positions`)."""
    eot = jnp.broadcast_to(eot_index, text_relevance.shape[:-2])
    row = jnp.take_along_axis(text_relevance, eot[..., None, None], axis=-2)[..., 0, :]
    positions = jnp.arange(text_relevance.shape[-1])
    row = jnp.where((positions >= 1) & (positions < eot[..., None]), row, 0)
    return row / row.sum(axis=-1, keepdims=True)


def hilacam_map(model: CLIP, params: dict, images: Array, token_ids: Array, *,
                start_layer: int = -1, start_layer_text: int = -1) -> HilaCAMOutput:
    """Relevance of image patches and text tokens for each (image, text) logit.

    Objective: logit_scale * cos(image, text) of the pair (the notebook sums the diagonal of the logits of
    the image repeated once per text, so each pair gets its own gradient). For every block from
    `start_layer` (-1: the last block only, the notebook default; 0: all blocks) the attention
    probabilities A and their gradient G give R += mean_heads(clamp(G * A, min=0)) @ R, from R = I.

    Protocol of the notebook: center-crop preprocessing (`center_crop`); one prompt per text
    ([n_texts, context]); maps upsampled to the input size, then min-max normalized.
    """
    if jnp.issubdtype(token_ids.dtype, jnp.floating):
        raise ValueError("HilaCAM needs token ids, not text features: it differentiates the text tower too")
    if token_ids.ndim != 2:
        raise ValueError(f"HilaCAM explains single prompts: token_ids must be [n_texts, context], "
                         f"got shape {token_ids.shape}")
    config = model.config
    return _hilacam(model, params, images, token_ids,
                    resolve_start_layer(start_layer, config.vision_layers, "start_layer", "image"),
                    resolve_start_layer(start_layer_text, config.text_layers, "start_layer_text", "text"))


@functools.partial(jax.jit, static_argnames="model")
def _hilacam(model: CLIP, params: dict, images: Array, token_ids: Array, image_start: Array,
             text_start: Array) -> HilaCAMOutput:
    config = model.config
    scale = jnp.exp(params["logit_scale"])
    grid = (images.shape[1] // config.patch_size, images.shape[2] // config.patch_size)
    encode_image = functools.partial(common.encode_image, model, params)
    encode_text = functools.partial(common.encode_text, model, params)
    texts = common.text_features(model, params, token_ids)

    def image_side(image):
        embedding, vjp, probs = _embedding_and_vjp(encode_image, image, config.vision_layers,
                                                   config.vision_heads, 1 + grid[0] * grid[1])
        relevance = jax.vmap(lambda text: accumulate_relevance(vjp(scale * text), probs, image_start))(texts)
        return embedding, relevance

    def text_side(ids):
        _, vjp, probs = _embedding_and_vjp(encode_text, ids, config.text_layers, config.text_heads,
                                           token_ids.shape[1])
        return jax.vmap(lambda image: accumulate_relevance(vjp(scale * image), probs, text_start))(image_embeds)

    image_embeds, image_relevance = jax.vmap(image_side)(images)          # [B, D], [B, T, n, n]
    text_relevance = jnp.swapaxes(jax.vmap(text_side)(token_ids), 0, 1)   # [B, T, context, context]
    maps = common.patch_grid(image_relevance[..., 0, :], grid)
    scores = text_scores(text_relevance, eot_positions(token_ids, config.eot_token_id))
    return HilaCAMOutput(maps, image_relevance, text_relevance, scores,
                         scale * image_embeds @ texts.T)


@dataclasses.dataclass(frozen=True)
class HilaCAMSettings(MethodSettings):
    start_layer: int = setting(-1, "first image block of the relevance, Python-style (-1: the last only, the "
                               "notebook's; -k: the last k blocks, where the notebook reads any negative but -1 as "
                               "all blocks)", flag=False)
    # For `hilacam_map`'s text relevance and scores, which the notebook computes beside the image's: the method's
    # maps (the image relevance) do not depend on it.
    start_layer_text: int = setting(-1, "first text block of the text relevance, Python-style as start_layer (-1: "
                                    "the last only); the maps do not depend on it", flag=False)


class HilaCAM(PromptMethod):
    """HilaCAM differentiates the text tower too, so its queries are token ids, not features."""

    name = "hilacam"
    image_encoder_passes = ("1", "T")
    Settings = HilaCAMSettings
    input_protocol = "center_crop"
    heatmap = UPSAMPLE_THEN_NORMALIZE

    def __init__(self, clip, settings=None):
        super().__init__(clip, settings)
        common.check_block_index("start_layer", self.settings.start_layer, clip.config.vision_layers, "image")
        common.check_block_index("start_layer_text", self.settings.start_layer_text, clip.config.text_layers, "text")

    def encode(self, queries, label_set=None) -> QueryArrays:
        return QueryArrays(self.text_token_ids([q.prompt for q in queries]))

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        return hilacam_map(self.clip.model, params, pixels, queries.per_query, start_layer=self.settings.start_layer,
                           start_layer_text=self.settings.start_layer_text).maps
