"""Pointing game with TorchRay's semantics (``torchray/benchmark/pointing_game.py``).

Conventions:
- The point is the map's flat argmax, the first maximum in row-major order, given as ``(u, v) = (col, row)``.
- A point hits when some mask pixel lies at a distance strictly below ``tolerance`` pixels:
  ``(row - v)^2 + (col - u)^2 < tolerance^2``.
- The default ``tolerance=1`` means "the argmax pixel is inside the mask", the plain pointing game.
  TorchRay's benchmark default is ``TORCHRAY_TOLERANCE = 15``; ``tolerance=0`` never hits
  (kept here, as TorchRay has it; a sweep's `EvalOptions` refuses it).
- An empty mask is a miss, as in TorchRay.
"""
from __future__ import annotations

import numpy as np

from tclip_jax.evaluation.metrics.maps import finite_map

DEFAULT_TOLERANCE = 1
TORCHRAY_TOLERANCE = 15


def argmax_point(saliency: np.ndarray) -> tuple[int, int]:
    """``(u, v) = (col, row)`` of the first maximum of a 2-D map in row-major order."""
    values = finite_map(saliency, "saliency")
    row, col = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(col), int(row)


def pointing_hit(mask: np.ndarray, point: tuple[int, int], tolerance: int = DEFAULT_TOLERANCE) -> bool:
    """True when a mask pixel lies strictly closer than ``tolerance`` pixels to ``point = (u, v)``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():  # a label map's ignore pixels would count as hits
        raise ValueError(f"mask must be boolean or 0/1, got values {np.unique(mask)[:5]}")
    u, v = point
    rows, cols = np.nonzero(mask)
    return bool(((rows - v) ** 2 + (cols - u) ** 2 < tolerance**2).any())


def pointing_game(saliency: np.ndarray, mask: np.ndarray, tolerance: int = DEFAULT_TOLERANCE) -> bool:
    """Pointing-game hit of a saliency map against a ground-truth mask of the same shape."""
    if np.shape(saliency) != np.shape(mask):
        raise ValueError(f"saliency shape {np.shape(saliency)} differs from mask shape {np.shape(mask)}")
    return pointing_hit(mask, argmax_point(saliency), tolerance)
