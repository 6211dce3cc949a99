"""Functional resizing of a ViT's learned positional embedding to another patch grid.

Hugging Face's `interpolate_pos_encoding` (and timm, DINO) resize the grid with PyTorch's bicubic
`F.interpolate(..., align_corners=False)`: Keys cubic with a = -0.75, half-pixel centres and clamped
border taps. `jax.image.resize` uses a = -0.5 and antialiases when shrinking, so it would not reproduce
checkpoints evaluated that way; the weights are built here as small constant matrices instead.

OpenCLIP's `resize_pos_embed`, which resizes a checkpoint's embedding to the grid its config names before loading
it, is the other resize (`resize_positional_embedding_open_clip`): torch's bicubic with antialias=True (its default
since January 2023), i.e. Keys' a = -0.5, widened when it shrinks, which is `jax.image.resize`'s antialiased bicubic.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """The four Keys-cubic tap weights for fractional offsets `t` (shape [n] -> [n, 4])."""
    a = _CUBIC_A
    d = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=-1)  # distances to taps at -1, 0, +1, +2
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    return np.where(d <= 1.0, near, far)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Matrix M [out, in] with `M @ v` equal to torch's 1-D bicubic resize (align_corners=False)."""
    scale = in_size / out_size
    source = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(source)
    weights = _cubic_weights(source - base)
    matrix = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        index = np.clip(base.astype(np.int64) + tap - 1, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), index), weights[:, tap])
    return matrix.astype(np.float32)


def resize_positional_embedding(posemb: jnp.ndarray, old_grid: tuple[int, int],
                                new_grid: tuple[int, int]) -> jnp.ndarray:
    """Resizes `[1 + gh*gw, width]` (class position first) to `new_grid`; identity when equal."""
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    (old_h, old_w), (new_h, new_w) = old_grid, new_grid
    grid = posemb[1:].reshape(old_h, old_w, -1)
    rows, cols = bicubic_matrix(old_h, new_h), bicubic_matrix(old_w, new_w)
    resized = jnp.einsum("Hh,Ww,hwc->HWc", rows, cols, grid, precision="highest")
    return jnp.concatenate([posemb[:1], resized.reshape(new_h * new_w, -1)], axis=0)


def resize_positional_embedding_open_clip(posemb: np.ndarray, old_grid: int, new_grid: int) -> np.ndarray:
    """OpenCLIP's config-driven resize of `[1 + old_grid**2, width]` (class position first) to `new_grid` x
    `new_grid` (`resize_pos_embed`: antialiased bicubic, see the module docstring), in float32 on the host."""
    posemb = np.asarray(posemb, np.float32)
    grid = jax.image.resize(posemb[1:].reshape(old_grid, old_grid, -1), (new_grid, new_grid, posemb.shape[-1]),
                            "bicubic", antialias=True)
    return np.concatenate([posemb[:1], np.asarray(grid, np.float32).reshape(new_grid * new_grid, -1)])
