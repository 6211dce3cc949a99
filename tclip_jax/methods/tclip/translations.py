"""Multi-scale translation: shifted copies of the model input, and mapping their maps back.

Copy k shows the input moved by (dy, dx) pixels: `copy[y, x] = input[y - dy, x - dx]`. Pixels that
the shift brings in from outside are zero in the normalized input, i.e. the CLIP mean colour
(padding, never wrap-around). A copy's map is brought back into the original frame by reading it
at `(y + dy, x + dx)`; original pixels whose partner falls outside the copy have no value from
that copy and are excluded from the pixel-wise trimmed mean.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tclip_jax.image import upsample_bilinear
from tclip_jax.methods.tclip.settings import DEFAULT_SCALE_FRACTIONS

DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def translation_offsets(patch_size: int, scale_fractions=DEFAULT_SCALE_FRACTIONS,
                        count: int = 25) -> tuple[tuple[int, int], ...]:
    """(dy, dx) pixel offsets: identity first, then the 8 directions at each scale.

    `count=1` turns translation off; otherwise it must equal 1 + 8 * len(scale_fractions). A shift is the
    fraction of the patch rounded to whole pixels, a half to the even pixel (Python's `round`): at patch 14 the
    default fractions 0.25, 0.5, 0.75 give 4, 7 and 10 pixels, symmetric about half a patch.
    """
    if count == 1:
        return ((0, 0),)
    scales = [int(round(f * patch_size)) for f in scale_fractions]
    if count != 1 + 8 * len(scales):
        raise ValueError(f"{count} translations do not fit {len(scales)} scale{'s' if len(scales) != 1 else ''}: "
                         f"expected 1 or {1 + 8 * len(scales)}")
    if any(s <= 0 for s in scales):
        raise ValueError(f"scale fractions {scale_fractions} give non-positive shifts at patch size {patch_size}")
    if len(set(scales)) < len(scales):  # the same copies twice would count twice in the trimmed mean
        raise ValueError(f"scale fractions {scale_fractions} give the same shift twice at patch size {patch_size} "
                         f"({scales} pixels); give fractions whose shifts differ")
    return ((0, 0),) + tuple((dy * s, dx * s) for s in scales for dy, dx in DIRECTIONS)


def shift_image(image: jax.Array, offset: jax.Array, max_shift: int) -> jax.Array:
    """`image` [h, w, c] moved by `offset` = (dy, dx) with zero padding; |dy|, |dx| <= max_shift."""
    padded = jnp.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    # every index of one dtype: a Python 0 would be int64 under JAX's x64 mode beside int32 offsets, which
    # dynamic_slice refuses
    start = (max_shift - offset[0], max_shift - offset[1], jnp.zeros_like(offset[0]))
    return jax.lax.dynamic_slice(padded, start, image.shape)


def translated_copies(image: jax.Array, offsets: tuple[tuple[int, int], ...]) -> jax.Array:
    """[K, h, w, c]: one shifted copy per offset, built with vmap."""
    max_shift = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    return jax.vmap(lambda o: shift_image(image, o, max_shift))(jnp.asarray(offsets, jnp.int32))


@functools.lru_cache(maxsize=32)
def _upsampling_matrix(grid: int, size: int) -> np.ndarray:
    """M [size, grid] with `M @ v` = the bilinear upsampling of `upsample_bilinear` along one axis."""
    basis = np.eye(grid, dtype=np.float32)[:, :, None]           # [grid, grid, 1]
    with jax.ensure_compile_time_eval():  # a constant, also when first needed inside a jit trace
        return np.asarray(upsample_bilinear(basis, (size, 1)))[:, :, 0].T


def shift_back_operators(offsets, grid_hw: tuple[int, int], size_hw: tuple[int, int]):
    """Per-copy row/column operators that upsample a grid map and shift it back, and validity masks.

    Returns rows [K, H, gh], cols [K, W, gw], valid [K, H, W] (bool), so that the back-shifted map
    of copy k is `rows[k] @ grid_map @ cols[k].T`, meaningful where `valid[k]`.
    """
    (grid_h, grid_w), (height, width) = grid_hw, size_hw
    up_rows, up_cols = _upsampling_matrix(grid_h, height), _upsampling_matrix(grid_w, width)
    rows, cols, valid = [], [], []
    for dy, dx in offsets:
        y, x = np.arange(height) + dy, np.arange(width) + dx
        rows.append(up_rows[np.clip(y, 0, height - 1)])
        cols.append(up_cols[np.clip(x, 0, width - 1)])
        valid.append(((y >= 0) & (y < height))[:, None] & ((x >= 0) & (x < width))[None, :])
    return np.stack(rows), np.stack(cols), np.stack(valid)


@functools.lru_cache(maxsize=8)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort on n inputs as (low, high) compare-exchange pairs, in order.

    Built for the next power of two; pairs that touch the padding are dropped, which is valid because
    the padding (+inf at the end) never moves.
    """
    size = 1 << max(n - 1, 0).bit_length()
    pairs, span = [], 1
    while span < size:
        step = span
        while step >= 1:
            for start in range(step % span, size - step, 2 * step):
                for i in range(min(step, size - start - step)):
                    low, high = start + i, start + i + step
                    if low // (2 * span) == high // (2 * span) and high < n:
                        pairs.append((low, high))
            step //= 2
        span *= 2
    return tuple(pairs)


def trimmed_mean(values: jax.Array, valid: np.ndarray, proportion: float) -> jax.Array:
    """Mean over axis 0 of the valid values after cutting floor(proportion * n) from each end.

    `n` is the number of valid values at that position (as `scipy.stats.trim_mean` on them); `valid`
    is a concrete (numpy) mask with at least one valid value everywhere. The values are sorted by a
    sorting network of elementwise min/max over whole [H, W] slices, which XLA fuses into a few
    loops; a sort or reduction along the short copy axis is many times slower on XLA:CPU.
    Derivatives (forward and reverse) are those of the mean of the kept values, ties ranked in copy order as a
    stable sort ranks them: differentiated through, the network's min/max steps made a gradient of 25 maps of
    224 px about 60x slower than this rule on the kept values' mask (benchmarks/map_gradient.py).
    """
    if not 0.0 <= proportion < 0.5:
        raise ValueError(f"trim proportion must be in [0, 0.5), got {proportion}")
    valid = np.asarray(valid, bool)
    count = valid.sum(axis=0, dtype=np.int32)
    cut = np.floor(proportion * count).astype(np.int32)

    @jax.custom_jvp
    def kept_mean(values):
        return sorted_trimmed_mean(values, valid, cut, count)

    @kept_mean.defjvp
    def kept_mean_jvp(primals, tangents):
        (values,), (tangent,) = primals, tangents
        ranks = jnp.argsort(jnp.argsort(jnp.where(valid, values, jnp.inf), axis=0, stable=True), axis=0)
        kept = (ranks >= cut) & (ranks < count - cut)
        return kept_mean(values), jnp.where(kept, tangent, 0.0).sum(axis=0) / (count - 2 * cut)

    return kept_mean(values)


def sorted_trimmed_mean(values: jax.Array, valid: np.ndarray, cut: np.ndarray, count: np.ndarray) -> jax.Array:
    """`trimmed_mean`'s values: the valid values sorted by the network, ranks [cut, count - cut) averaged."""
    rows = [jnp.where(valid[k], values[k], jnp.inf) for k in range(values.shape[0])]
    for low, high in sorting_network(len(rows)):
        rows[low], rows[high] = jnp.minimum(rows[low], rows[high]), jnp.maximum(rows[low], rows[high])
    kept = [jnp.where((rank >= cut) & (rank < count - cut), row, 0.0) for rank, row in enumerate(rows)]
    return functools.reduce(jnp.add, kept) / (count - 2 * cut)
