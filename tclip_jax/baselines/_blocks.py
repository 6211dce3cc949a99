"""Functional pieces of the CLIP ViT, for explanation methods that re-run part of a block differently.

Everything reads the parameter tree of `tclip_jax.model.CLIP` (`params["visual"]["transformer"]["block_i"]`
...). The forward passes themselves come from the model (`encode_image` / `encode_text` with intermediates);
only the pieces a method changes (v-v attention, value path, a single-head last block) are rebuilt here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from tclip_jax.model import CLIP, CLIPConfig, ImageOutput, TextOutput, l2_normalize
from tclip_jax.model.clip import ACTIVATION_FNS, LayerNorm

Array = jax.Array


def encode_image(params: dict, config: CLIPConfig, images: Array,
                 probs_offsets: Optional[Sequence[Array]] = None) -> ImageOutput:
    """The model's image tower with intermediates (residual stream, attention probabilities)."""
    return CLIP(config).apply({"params": params}, images, True, probs_offsets, method="encode_image")


def encode_text(params: dict, config: CLIPConfig, token_ids: Array,
                probs_offsets: Optional[Sequence[Array]] = None) -> TextOutput:
    return CLIP(config).apply({"params": params}, token_ids, True, probs_offsets, method="encode_text")


def text_features(params: dict, config: CLIPConfig, texts: Array) -> Array:
    """L2-normalised text embeddings [n_texts, embed_dim].

    `texts` as token ids: [n_texts, context] gives one prompt per text; [n_texts, n_templates, context] gives
    CLIP Surgery's prompt ensemble (`encode_text_with_prompt_ensemble`): every templated prompt's embedding is
    normalised, the templates are averaged, and the mean is normalised again. `texts` as floats
    [n_texts, embed_dim] are features this function already returned; they pass through, so that texts are
    encoded once for any number of image batches.
    """
    if jnp.issubdtype(texts.dtype, jnp.floating):
        if texts.shape[-1:] != (config.embed_dim,) or texts.ndim != 2:
            raise ValueError(f"text features must be [n_texts, {config.embed_dim}], got shape {texts.shape}")
        return texts
    token_ids = texts
    if token_ids.ndim == 2:
        return l2_normalize(encode_text(params, config, token_ids).embeds)
    if token_ids.ndim != 3:
        raise ValueError(f"token ids must be [n_texts, context] or [n_texts, n_templates, context], "
                         f"got shape {token_ids.shape}")
    n_texts, n_templates, context = token_ids.shape
    embeds = encode_text(params, config, token_ids.reshape(n_texts * n_templates, context)).embeds
    embeds = l2_normalize(embeds).reshape(n_texts, n_templates, -1)
    return l2_normalize(embeds.mean(axis=1))


def vision_block(params: dict, index: int) -> dict:
    return params["visual"]["transformer"][f"block_{index}"]


def layer_norm(ln_params: dict, config: CLIPConfig, x: Array) -> Array:
    return LayerNorm(config.layer_norm_eps, None).apply({"params": ln_params}, x)


def dense(dense_params: dict, x: Array) -> Array:
    return x @ dense_params["kernel"] + dense_params["bias"]


def split_heads(x: Array, num_heads: int) -> Array:
    """[..., n, width] -> [..., n, heads, head_dim]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def softmax_attention(q: Array, k: Array, v: Array, num_heads: int) -> tuple[Array, Array]:
    """Scaled dot-product attention of [..., n, width] inputs.

    Returns the head outputs before the output projection, [..., n, width] (heads concatenated), and the
    probabilities [..., heads, n_query, n_key].
    """
    q, k, v = (split_heads(t, num_heads) for t in (q, k, v))
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(logits, axis=-1)
    mixed = jnp.einsum("...hqk,...khd->...qhd", probs, v)
    return mixed.reshape(*mixed.shape[:-2], -1), probs


def values(block: dict, config: CLIPConfig, x: Array) -> Array:
    """The value projection of ln_1(x) (bias included): [..., n, width]."""
    return dense(block["attn"]["value"], layer_norm(block["ln_1"], config, x))


def mlp(block: dict, config: CLIPConfig, x: Array) -> Array:
    """The MLP branch of a pre-norm block, mlp(ln_2(x)), without the residual."""
    h = dense(block["fc"], layer_norm(block["ln_2"], config, x))
    return dense(block["proj"], ACTIVATION_FNS[config.activation](h))


def project_tokens(params: dict, config: CLIPConfig, x: Array) -> Array:
    """Residual-stream tokens into the joint space: ln_post, then proj."""
    return layer_norm(params["visual"]["ln_post"], config, x) @ params["visual"]["proj"]


@flax.struct.dataclass
class BlockTrace:
    """One re-computed vision block, for a single image (no batch axis)."""

    q: Array           # [n, width] query projection of ln_1(x) (bias included, unscaled)
    k: Array           # [n, width]
    v: Array           # [n, width]
    probs: Array       # [heads, n, n]
    output: Array      # [n, width] residual stream after the block


def run_block(block: dict, config: CLIPConfig, x: Array, num_heads: int, cls_offset: Array) -> BlockTrace:
    """A vision block on one image's stream x [n, width] with `num_heads` attention heads.

    `cls_offset` [width] is added to the class token's head outputs before the output projection: zeros
    change nothing, and the gradient w.r.t. it is the gradient w.r.t. that attention output (Grad-ECLIP).
    """
    h = layer_norm(block["ln_1"], config, x)
    q, k, v = (dense(block["attn"][name], h) for name in ("query", "key", "value"))
    mixed, probs = softmax_attention(q, k, v, num_heads)
    mixed = mixed.at[0].add(cls_offset)
    x = x + dense(block["attn"]["out"], mixed)
    output = x + mlp(block, config, x)
    return BlockTrace(q, k, v, probs, output)


def patch_grid(maps: Array, grid: tuple[int, int]) -> Array:
    """[..., 1 + gh*gw] token values (class token first) -> [..., gh, gw] patch grid, row-major."""
    return maps[..., 1:].reshape(*maps.shape[:-1], *grid)
