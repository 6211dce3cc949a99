"""Box IoU and box accuracy (BoxAcc) as in gScoreCAM's evaluation (``tools/iou_tool.py``).

Conventions (gScoreCAM's, kept so that numbers are comparable with published ones):
- Boxes are ``(x1, y1, x2, y2)``; predicted boxes are exclusive-end ``[x, y, x+w, y+h]``, yet areas are
  counted inclusively as ``(x2-x1+1) * (y2-y1+1)``.
- A box (or intersection) with ``x2 <= x1`` or ``y2 <= y1`` has area 0.
- IoU = intersection / (union + 1e-6).
- A prediction hits when its IoU with any ground-truth box is >= 0.5.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HIT_IOU = 0.5
_IOU_EPS = 1e-6

BoxLike = Sequence[float]


def box_iou(box_a: BoxLike, box_b: BoxLike) -> float:
    """gScoreCAM IoU of two ``(x1, y1, x2, y2)`` boxes."""
    a, b = _box(box_a), _box(box_b)
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = _area(a) + _area(b) - inter
    return inter / (union + _IOU_EPS)


def box_ious(pred_box: BoxLike, gt_boxes: Sequence[BoxLike]) -> np.ndarray:
    """IoU of one predicted box with each ground-truth box, float64 [len(gt_boxes)]."""
    return np.array([box_iou(pred_box, gt) for gt in gt_boxes], dtype=np.float64)


def box_hit(pred_box: BoxLike, gt_boxes: Sequence[BoxLike], iou_threshold: float = HIT_IOU) -> bool:
    """True when the prediction reaches ``iou_threshold`` with at least one ground-truth box."""
    if len(gt_boxes) == 0:
        raise ValueError("gt_boxes is empty: a hit needs at least one ground-truth box")
    return bool((box_ious(pred_box, gt_boxes) >= iou_threshold).any())


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (x1, y1, x2, y2) box of a non-empty [H, W] boolean mask, end exclusive."""
    rows, cols = np.flatnonzero(np.any(mask, axis=1)), np.flatnonzero(np.any(mask, axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _box(box: BoxLike) -> tuple[float, float, float, float]:
    values = tuple(float(v) for v in box)
    if len(values) != 4:
        raise ValueError(f"a box has 4 coordinates (x1, y1, x2, y2), got {len(values)}")
    return values


def _area(box: tuple[float, float, float, float]) -> float:
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return 0.0
    return (x2 - x1 + 1) * (y2 - y1 + 1)
