"""Bilinear resampling of maps with torch's conventions (``F.interpolate(mode='bilinear', align_corners=False)``).

Half-pixel centres, clamped edges and no antialiasing (unlike ``jax.image.resize``), also when shrinking; the
taps are computed in float32 as torch computes them, so upsampled maps agree with the official code to float32
rounding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames="size")
def upsample_bilinear(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize the last two axes of ``maps`` [..., gh, gw] to ``size`` = (H, W)."""
    if maps.ndim < 2:
        raise ValueError(f"maps must have at least 2 axes [..., gh, gw], got shape {maps.shape}")
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"size must be (H, W) of positive ints, got {size!r}")
    grid_hw = maps.shape[-2:]
    rows = bilinear_taps(int(size[0]), grid_hw[0], np.float32(grid_hw[0]) / np.float32(size[0]), 0.0)
    cols = bilinear_taps(int(size[1]), grid_hw[1], np.float32(grid_hw[1]) / np.float32(size[1]), 0.0)
    return resample(maps, rows, cols)


def bilinear_taps(out_size: int, in_size: int, scale: float, shift: float) -> tuple[np.ndarray, ...]:
    """Indices and weights for output pixels whose centres c map to input coordinate ``scale * c + shift``.

    Mirrors torch's float32 ``area_pixel_compute_source_index`` (compiled as one fused multiply-add, hence the
    single rounding from float64, exact here) and ``guard_index_and_lambda``.
    """
    centres = np.arange(out_size, dtype=np.float64) + 0.5
    source = (np.float64(np.float32(scale)) * centres + np.float64(np.float32(shift)) - 0.5).astype(np.float32)
    source = np.maximum(source, np.float32(0.0))
    index0 = np.minimum(source.astype(np.int32), in_size - 1)
    index1 = np.where(index0 < in_size - 1, index0 + 1, index0)
    weight1 = np.clip(source - index0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return index0, index1, np.float32(1.0) - weight1, weight1


def resample(maps: jax.Array | np.ndarray, rows: tuple[np.ndarray, ...], cols: tuple[np.ndarray, ...]) -> jax.Array:
    """Applies `bilinear_taps` along the last axis (cols), then the one before (rows): in numpy for a numpy array
    (`geometry.to_original`, a host step: nothing is compiled for the shape; the same float32 operations, whose
    results differ from jitted fused multiply-adds in the last bit, 2e-7 relative), else in jax
    (`upsample_bilinear`)."""
    # Width first, then height: the same order of operations as torch's bilinear kernel.
    c0, c1, cw0, cw1 = cols
    r0, r1, rw0, rw1 = rows
    if not isinstance(maps, np.ndarray):
        maps = jnp.asarray(maps, dtype=jnp.float32)
        maps = jnp.take(maps, c0, axis=-1) * cw0 + jnp.take(maps, c1, axis=-1) * cw1
        return jnp.take(maps, r0, axis=-2) * rw0[:, None] + jnp.take(maps, r1, axis=-2) * rw1[:, None]
    # One map at a time, in place: the temporaries of a whole stack (109 maps to 640 x 480: five of 134 MB) made
    # numpy several times slower than this loop, whose temporaries stay in cache; the arithmetic is the same.
    maps = np.asarray(maps, dtype=np.float32)
    resampled = np.empty(maps.shape[:-2] + (len(r0), len(c0)), np.float32)
    count = int(np.prod(maps.shape[:-2]))  # not -1: a stack of no maps has no size to infer
    for source, target in zip(maps.reshape(count, *maps.shape[-2:]), resampled.reshape(count, len(r0), len(c0))):
        across = source[:, c0] * cw0
        across += source[:, c1] * cw1
        upper = across[r0]
        upper *= rw0[:, None]
        lower = across[r1]
        lower *= rw1[:, None]
        np.add(upper, lower, out=target)
    return resampled
