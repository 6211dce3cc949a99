"""The seed papers' segmentation metrics (ECLIP, CLIP Surgery): score contrast and mIoU at grid-searched or fixed
thresholds, on the relevance map min-max normalized as `normalize_relevance` does (negatives clipped to 0).

Per unit (an image and a category present, with its binary mask; ignore pixels left out):
- score contrast = mean normalized relevance on the mask minus mean on the rest, in [-1, 1]: negative for an
  "opposite" visualisation that lights the background;
- foreground intersection and union with the mask at every threshold of GRID (0.00, 0.01, ..., 0.99;
  foreground is ``relevance > t``, as `foreground_mask`), so that any grid threshold can be chosen later.
Over a dataset (`summarize_seed`):
- mSC = mean over categories of their units' mean score contrast;
- mIoU (grid-searched) = each image takes the grid threshold that maximises the mean IoU of its units (the
  categories present), ties to the lowest; intersections and unions at the chosen thresholds are summed per
  category over the dataset, and mIoU is the mean over categories of their ratio;
- mIoU (fixed) = the same with one threshold for every image (`FIXED_THRESHOLD`, 0.5, unless given).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np

from tclip_jax.evaluation.metrics.segmentation import normalize_relevance

GRID = np.round(np.arange(100) * 0.01, 2)
FIXED_THRESHOLD = 0.5


def seed_unit_scores(relevance_map: np.ndarray, mask: np.ndarray, ignore: np.ndarray | None = None) -> dict:
    """{"score_contrast", "grid_inter", "grid_union"} of one unit (JSON-ready)."""
    relevance = normalize_relevance(relevance_map)
    if relevance.shape != mask.shape:
        raise ValueError(f"relevance map {relevance.shape} and mask {mask.shape} differ in shape")
    valid = np.ones(mask.shape, bool) if ignore is None else ~ignore
    values, target = relevance[valid], mask[valid].astype(bool)
    inside, outside = values[target], values[~target]
    contrast = (inside.mean() if inside.size else 0.0) - (outside.mean() if outside.size else 0.0)
    order = np.sort(values)
    inside_order = np.sort(inside)
    grid = GRID.astype(values.dtype)  # `relevance > t` compares in the map's precision, as foreground_mask does
    predicted = values.size - np.searchsorted(order, grid, side="right")       # count(relevance > t)
    inter = inside.size - np.searchsorted(inside_order, grid, side="right")    # ... on the mask
    union = predicted + inside.size - inter
    return {"score_contrast": float(contrast), "grid_inter": inter.tolist(), "grid_union": union.tolist()}


def summarize_seed(images: Sequence[Sequence[tuple[Hashable, dict]]], fixed: float = FIXED_THRESHOLD) -> dict:
    """mSC, grid-searched and fixed-threshold mIoU (see the module doc) of `images`, each a list of its units'
    (category, seed_unit_scores)."""
    on_grid = np.flatnonzero(np.isclose(GRID, fixed, rtol=0, atol=1e-9))
    if not on_grid.size:
        raise ValueError(f"the fixed threshold must be a grid point (0.00 to 0.99 in steps of 0.01), got {fixed}")
    contrast = defaultdict(list)
    searched = defaultdict(lambda: np.zeros(2))
    at_fixed = defaultdict(lambda: np.zeros(2))
    for units in images:
        if not units:
            continue
        inter = np.array([u["grid_inter"] for _, u in units], np.float64)
        union = np.array([u["grid_union"] for _, u in units], np.float64)
        ious = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        best = int(np.argmax(ious.mean(axis=0)))
        for k, (category, unit) in enumerate(units):
            contrast[category].append(unit["score_contrast"])
            searched[category] += (inter[k, best], union[k, best])
            at_fixed[category] += (inter[k, on_grid[0]], union[k, on_grid[0]])

    def miou(totals) -> float:
        return float(np.mean([i / u if u else 0.0 for i, u in totals.values()])) if totals else 0.0

    return {"categories": len(contrast), "msc": float(np.mean([np.mean(v) for v in contrast.values()])) if contrast
            else 0.0, "miou_grid": miou(searched), "miou_fixed": miou(at_fixed), "fixed_threshold": float(fixed)}
