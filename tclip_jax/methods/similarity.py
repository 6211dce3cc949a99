"""Dense image-text similarity maps: plain CLIP patch tokens, RCLIP, and MaskCLIP's value path."""
from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from tclip_jax.methods import common
from tclip_jax.methods.base import NORMALIZE_THEN_UPSAMPLE_TO_ORIGINAL, PromptMethod, QueryArrays
from tclip_jax.methods.settings import MethodSettings
from tclip_jax.model import CLIP, l2_normalize
from tclip_jax.settings import setting

Array = jax.Array


@flax.struct.dataclass
class SimilarityOutput:
    maps: Array           # [n_images, n_texts, gh, gw]
    similarity: Array     # [n_images, 1 + gh*gw, n_texts] cosine of every token (class token first) with each text
    text_features: Array  # [n_texts, embed_dim] L2-normalized


def token_similarity(tokens: Array, text_features: Array) -> Array:
    """Cosine of joint-space tokens [B, n, D] with normalized texts [T, D] -> [B, n, T]."""
    return l2_normalize(tokens) @ text_features.T


def similarity_to_maps(similarity: Array, grid: tuple[int, int]) -> Array:
    """[B, 1 + gh*gw, T] token scores -> [B, T, gh, gw] patch maps (class token dropped)."""
    return common.patch_grid(jnp.swapaxes(similarity, 1, 2), grid)


@functools.partial(jax.jit, static_argnames="model")
def similarity_map(model: CLIP, params: dict, images: Array, texts: Array) -> SimilarityOutput:
    """Raw CLIP similarity map: cosine of each text embedding with every patch token after ln_post and proj.

    Protocol of CLIP Surgery's demo for plain CLIP: whole image resized to the model size; one prompt per
    text ([n_texts, context]) or a prompt ensemble ([n_texts, n_templates, context]); maps min-max
    normalized over the patches, then upsampled (`get_similarity_map`).
    """
    image = common.encode_image(model, params, images)
    texts = common.text_features(model, params, texts)
    similarity = token_similarity(image.tokens, texts)
    return SimilarityOutput(similarity_to_maps(similarity, image.grid), similarity, texts)


@functools.partial(jax.jit, static_argnames="model")
def rclip_map(model: CLIP, params: dict, images: Array, texts: Array) -> SimilarityOutput:
    """RCLIP: the reversed raw similarity map, |1 - minmax(map)| (CLIP's patch similarity is often inverted,
    foreground scoring lowest). Same inputs and post-processing as `similarity_map`."""
    plain = similarity_map(model, params, images, texts)
    return plain.replace(maps=jnp.abs(1 - common.minmax(plain.maps)))


@functools.partial(jax.jit, static_argnames=("model", "residual_and_mlp"))
def maskclip_map(model: CLIP, params: dict, images: Array, texts: Array, *,
                 residual_and_mlp: bool = True) -> SimilarityOutput:
    """MaskCLIP (Zhou et al. 2022): patch tokens of the last block's value path, without attention mixing.

    Official ViT backbone (`TransformerEncoderLayer.forward(return_qkv=True)`, `skip_last_attn`): the value
    projection of ln_1(x) goes through the output projection, then the residual (+ x) and the block's MLP,
    then ln_post and proj; the class token keeps the normal path. `residual_and_mlp=False` skips the MLP and keeps
    the residual, ln_post(x + out_proj(value(ln_1(x)))) -> proj: CLIP Surgery's variant commented "mask_clip"
    (xmed-lab/CLIP_Surgery clip/clip_surgery_model.py, `Attention.forward`'s `#x = v...  # mask_clip` with the
    surgery on the last block only, "maskclip 2"; `ResidualAttentionBlock.forward`'s new path is `x += x_res  # skip
    ffn for the new path`). Maps are cosines with the normalized texts; post-processing as `similarity_map`.
    """
    image = common.encode_image(model, params, images)
    vision = model.bind({"params": params}).visual
    block = vision.blocks[-1]
    stream = image.residual_stream[-2]
    x = stream + block.attn.out(block.attn.value(block.ln_1(stream)))
    if residual_and_mlp:
        x = x + block.mlp(x)
    tokens = vision.project(x).at[:, 0].set(image.tokens[:, 0])
    texts = common.text_features(model, params, texts)
    similarity = token_similarity(tokens, texts)
    return SimilarityOutput(similarity_to_maps(similarity, image.grid), similarity, texts)


class Similarity(PromptMethod):
    """The raw CLIP similarity map (`similarity_map`)."""

    name = "similarity"
    image_encoder_passes = ("1", "0")
    heatmap = NORMALIZE_THEN_UPSAMPLE_TO_ORIGINAL
    maps_version = 2

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        return similarity_map(self.clip.model, params, pixels, queries.per_query).maps


class RCLIP(PromptMethod):
    """The reversed raw similarity map (`rclip_map`)."""

    name = "rclip"
    image_encoder_passes = ("1", "0")
    heatmap = NORMALIZE_THEN_UPSAMPLE_TO_ORIGINAL
    maps_version = 2

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        return rclip_map(self.clip.model, params, pixels, queries.per_query).maps


@dataclasses.dataclass(frozen=True)
class MaskCLIPSettings(MethodSettings):
    residual_and_mlp: bool = setting(True, "keep the last block's residual and MLP on the value path (official); "
                                     "false: the residual only, x + out_proj(value(ln_1(x))), MLP skipped (CLIP "
                                     "Surgery's \"mask_clip\" variant)", flag=False)


class MaskCLIP(PromptMethod):
    """MaskCLIP's value path (`maskclip_map`)."""

    name = "maskclip"
    image_encoder_passes = ("1", "0")
    Settings = MaskCLIPSettings
    heatmap = NORMALIZE_THEN_UPSAMPLE_TO_ORIGINAL

    @property
    def maps_version(self) -> int:
        """`Method.maps_version`: 2 (upsampled once, 2026-12-05); 3 under residual_and_mlp=False, whose value path
        kept no residual before 2026-12-07."""
        return 2 if self.settings.residual_and_mlp else 3

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        return maskclip_map(self.clip.model, params, pixels, queries.per_query,
                            residual_and_mlp=self.settings.residual_and_mlp).maps
