"""Energy-based pointing game (Score-CAM): the share of a saliency map's energy inside the object.

Conventions:
- ``energy_pointing_game`` (default, corrected): the map is min-max scaled to [0, 1] so that energy is
  non-negative and independent of the map's offset; the box ``(x1, y1, x2, y2)`` covers rows ``y1:y2``
  and columns ``x1:x2`` (clipped to the map). A constant map carries no localisation and counts every
  pixel equally, so its energy share is the box's share of the map's area.
- ``energy_in_mask``: the same with a ground-truth mask instead of a box.
- ``energy_pointing_game_scorecam``: Score-CAM's ``utils/energyPointGame.py`` as written: the raw map,
  ``w, h = map.shape`` and the box laid over ``[x1:x2, y1:y2]``, i.e. x indexes rows. The box is
  transposed, and on non-square maps silently clipped; use it only to reproduce published numbers.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tclip_jax.evaluation.metrics.maps import finite_map


def energy_pointing_game(saliency: np.ndarray, box: Sequence[int]) -> float:
    """Share of the min-max scaled map's energy inside ``box = (x1, y1, x2, y2)`` (rows y1:y2, cols x1:x2)."""
    energy = _minmax_energy(saliency)
    h, w = energy.shape
    x1, y1, x2, y2 = _int_box(box)
    inside = energy[min(max(y1, 0), h) : min(max(y2, 0), h), min(max(x1, 0), w) : min(max(x2, 0), w)]
    return float(inside.sum() / energy.sum())


def energy_in_mask(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the min-max scaled map's energy on the pixels of a boolean mask of the same shape."""
    energy = _minmax_energy(saliency)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != energy.shape:
        raise ValueError(f"mask shape {mask.shape} differs from saliency shape {energy.shape}")
    return float(energy[mask].sum() / energy.sum())


def energy_pointing_game_scorecam(saliency: np.ndarray, box: Sequence[int]) -> float:
    """Score-CAM's original energy pointing game on the raw map, with its transposed box (see module doc)."""
    values = _finite_map(saliency)
    total = values.sum()
    if total == 0:
        raise ValueError("saliency sums to zero: the energy share is undefined")
    x1, y1, x2, y2 = _int_box(box)
    return float(values[x1:x2, y1:y2].sum() / total)


def _minmax_energy(saliency: np.ndarray) -> np.ndarray:
    values = _finite_map(saliency)
    low, high = values.min(), values.max()
    if high == low:
        return np.ones_like(values)
    return (values - low) / (high - low)


def _finite_map(saliency: np.ndarray) -> np.ndarray:
    return finite_map(saliency, "saliency").astype(np.float64)


def _int_box(box: Sequence[int]) -> tuple[int, int, int, int]:
    if len(box) != 4:
        raise ValueError(f"a box has 4 coordinates (x1, y1, x2, y2), got {len(box)}")
    x1, y1, x2, y2 = (int(v) for v in box)
    return x1, y1, x2, y2
