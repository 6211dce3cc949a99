"""What the map functions of prompt-level methods share: the towers with intermediates, text features
(one prompt or a template ensemble per text) and the class-token-first token layout.

Every function takes the static model (`tclip_jax.model.CLIP`, i.e. config and matmul dtype) and its
parameters; methods that re-run part of a block reach the model's own pieces through
`model.bind({"params": params})` (see `tclip_jax.model.clip`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tclip_jax.model import CLIP, ImageOutput, TextOutput, l2_normalize

Array = jax.Array


def causal_length_groups(eot_indices: Sequence[int], context_length: int) -> dict[int, list[int]]:
    """{length: the positions in `eot_indices` of the token rows cut to it}, shortest first. A row is cut after its
    end-of-text token, rounded up to a multiple of 8 (fewer shapes to compile), at most `context_length`: the text
    tower is causal, so positions after the end-of-text token change no embedding up to it."""
    groups: dict[int, list[int]] = {}
    for i, eot in enumerate(eot_indices):
        groups.setdefault(min(context_length, -(-(eot + 1) // 8) * 8), []).append(i)
    return dict(sorted(groups.items()))


def in_chunks(function, rows: np.ndarray, chunk: int):
    """`function` (jitted) on `rows` [N, ...], `chunk` rows a call (the last chunk padded with copies of the first
    row), its outputs' first N rows as numpy: one compiled program per row shape, whatever N. Bit for bit the call
    on all rows at once, where a row's result does not depend on the rows with it (text features, token
    embeddings). Every chunk is dispatched before any is fetched."""
    rows = np.asarray(rows)
    padded = np.concatenate([rows, np.repeat(rows[:1], -len(rows) % chunk, axis=0)])
    outs = jax.device_get([function(padded[c:c + chunk]) for c in range(0, len(padded), chunk)])
    return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts)[:len(rows)], *outs)


def encode_image(model: CLIP, params: dict, images: Array,
                 probs_offsets: Optional[Sequence[Array]] = None) -> ImageOutput:
    """The image tower with intermediates (residual stream, attention probabilities)."""
    return model.apply({"params": params}, images, True, probs_offsets, method="encode_image")


def encode_text(model: CLIP, params: dict, token_ids: Array,
                probs_offsets: Optional[Sequence[Array]] = None) -> TextOutput:
    return model.apply({"params": params}, token_ids, True, probs_offsets, method="encode_text")


def text_features(model: CLIP, params: dict, texts: Array) -> Array:
    """L2-normalized text embeddings [n_texts, embed_dim].

    `texts` as token ids: [n_texts, context] gives one prompt per text; [n_texts, n_templates, context] gives
    CLIP Surgery's prompt ensemble (`encode_text_with_prompt_ensemble`): every templated prompt's embedding is
    normalized, the templates are averaged, and the mean is normalized again. `texts` as floats
    [n_texts, embed_dim] are features this function already returned; they pass through, so that texts are
    encoded once for any number of image batches.
    """
    embed_dim = model.config.embed_dim
    if jnp.issubdtype(texts.dtype, jnp.floating):
        if texts.shape[-1:] != (embed_dim,) or texts.ndim != 2:
            raise ValueError(f"text features must be [n_texts, {embed_dim}], got shape {texts.shape}")
        return texts
    token_ids = texts
    if token_ids.ndim == 2:
        return l2_normalize(model.apply({"params": params}, token_ids, method="encode_text").embeds)
    if token_ids.ndim != 3:
        raise ValueError(f"token ids must be [n_texts, context] or [n_texts, n_templates, context], "
                         f"got shape {token_ids.shape}")
    n_texts, n_templates, context = token_ids.shape
    embeds = model.apply({"params": params}, token_ids.reshape(n_texts * n_templates, context),
                         method="encode_text").embeds
    embeds = l2_normalize(embeds).reshape(n_texts, n_templates, -1)
    return l2_normalize(embeds.mean(axis=1))


def check_block_index(name: str, index: int, num_layers: int, tower: str) -> None:
    """A block index, Python-style (negative counts from the top), must name a block of the tower; checked when a
    method is built on a model, before any image."""
    if not -num_layers <= index < num_layers:
        raise ValueError(f"{name} must be in [{-num_layers}, {num_layers}) for this {num_layers}-block {tower} tower, "
                         f"got {index}")


def minmax(x: Array, axis: int | tuple[int, ...] = (-2, -1)) -> Array:
    """(x - min) / (max - min) over ``axis``, with no epsilon, so it equals the reference formula exactly.

    A constant slice (max == min) maps to all zeros rather than NaN. A slice with a NaN or an infinite value maps
    to all NaN, which the host step refuses ("contains NaN or infinite values"): a NaN spread made it all zeros, a
    blank map that was boxed and scored, and XLA's min and max do not always propagate a NaN (on CPU, those of a
    224 x 224 map with NaNs in it came out finite). A finite slice whose spread is past 1 / the dtype's smallest
    normal number (2^126 in float32) is computed as (x/8 - min/8) / (max/8 - min/8): XLA on CPU divides by the
    spread's reciprocal, which there flushed to zero (a map of ±1e38 was all zeros), and a spread that overflows
    (±3e38) made the slice partly NaN, refused as if it held NaN. Any other slice is multiplied by 1: its result is
    the formula's as XLA computes it, bit for bit.
    """
    x = jnp.asarray(x)  # the dtype JAX computes in (numpy's float64 is float32 without x64), for finfo
    if not jnp.issubdtype(x.dtype, jnp.inexact):  # an integer map is divided as floats, as `/` divides it
        x = x.astype(jnp.float32)
    low, high = jnp.min(x, axis=axis, keepdims=True), jnp.max(x, axis=axis, keepdims=True)
    # Dividing by 8 is exact but near zero, far below such a spread's precision; a NaN spread is refused below.
    scale = jnp.where(high - low <= 1 / jnp.finfo(x.dtype).tiny, 1, 0.125)
    low, spread = low * scale, high * scale - low * scale
    scaled = jnp.where(spread > 0, (x * scale - low) / jnp.where(spread > 0, spread, 1), 0)
    return jnp.where(jnp.isfinite(x).all(axis=axis, keepdims=True), scaled, jnp.nan)


def patch_grid(maps: Array, grid: tuple[int, int]) -> Array:
    """[..., 1 + gh*gw] token values (class token first) -> [..., gh, gw] patch grid, row-major."""
    return maps[..., 1:].reshape(*maps.shape[:-1], *grid)
