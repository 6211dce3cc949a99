"""Binary segmentation metrics of a relevance map, as in Chefer et al.'s ImageNet-segmentation evaluation
(the version in ``clip_text_span/compute_segmentations.py`` and ``utils/segmentation_utils.py``).

Conventions:
- ``normalize_relevance`` prepares the map: negative values are clipped to 0, then min-max scaled to
  [0, 1]. A map that is constant after clipping carries no relevance and becomes all zeros. The reference
  produces NaN there and zeroes both of AP's channels (below), so it predicts all background, as here, and scores
  every pixel alike: AP of a constant map is the share of positives among the channels' pixels, 0.5, not what
  scoring zeros as ``1 - relevance`` and ``relevance`` would give.
- Foreground is ``relevance > threshold``; the threshold is the map's mean (``"mean"``, Chefer et al.),
  Otsu's threshold on the uint8 min-max map (``"otsu"``, as the zero-shot boxes use), or a given float.
- Labels are 0 (background), 1 (foreground) or ``IGNORE_LABEL = -1`` (excluded from every count).
- Pixel accuracy = correct / labeled; IoU per class (index 0 = background, 1 = foreground)
  = intersection / union, both with ``np.spacing(1)`` added to the denominator.
- AP is scikit-learn's ``average_precision_score`` over both one-hot channels flattened together: every
  labeled pixel twice, scored ``1 - relevance`` against "is background" and ``relevance`` against "is
  foreground" (a constant map: every score alike, as above); NaN becomes 0.
  Scores stay in the input's dtype (as the reference's float32 tensors), since ties decide AP.
- Over a dataset (``summarize_segmentation``), counts are summed before the ratios are taken and AP is
  averaged over images.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
from sklearn.metrics import average_precision_score

from tclip_jax.evaluation.metrics.maps import finite_map
from tclip_jax.postprocess.boxes import covered_window, foreground

IGNORE_LABEL = -1
Threshold = Literal["mean", "otsu"] | float

_EPS = np.spacing(1.0)


@dataclasses.dataclass(frozen=True)
class SegmentationCounts:
    """Per-image counts; ``area_inter`` and ``area_union`` are int64 [2] (background, foreground)."""

    pixel_correct: int
    pixel_labeled: int
    area_inter: np.ndarray
    area_union: np.ndarray
    ap: float

    @property
    def pixel_accuracy(self) -> float:
        return float(self.pixel_correct / (_EPS + self.pixel_labeled))

    @property
    def iou(self) -> np.ndarray:
        return self.area_inter / (_EPS + self.area_union)

    @property
    def miou(self) -> float:
        return float(self.iou.mean())


def normalize_relevance(heatmap: np.ndarray) -> np.ndarray:
    """Clip negatives to 0 and min-max scale to [0, 1], keeping a floating dtype (see module doc)."""
    values = finite_map(heatmap, "heatmap")
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    clipped = np.clip(values, 0, None)
    low, high = clipped.min(), clipped.max()
    if high == low:
        return np.zeros_like(clipped)
    return (clipped - low) / (high - low)


def foreground_mask(relevance: np.ndarray, threshold: Threshold = "mean") -> np.ndarray:
    """Boolean foreground of a [0, 1] relevance map under the chosen threshold."""
    values = np.asarray(relevance)
    if threshold == "otsu":
        return foreground(values)[0]
    if threshold == "mean":
        return values > values.mean(dtype=np.float64)
    if isinstance(threshold, str):
        raise ValueError(f"threshold must be 'mean', 'otsu' or a number, got {threshold!r}")
    return values > threshold


def segmentation_scores(relevance: np.ndarray, labels: np.ndarray, threshold: Threshold = "mean",
                        covered: tuple[slice, slice] | None = None) -> SegmentationCounts:
    """Pixel accuracy, per-class intersection/union (``iou[1]`` is the mask IoU) and AP of one map.

    ``covered`` (`Geometry.covered`): the part of the image a centre-cropped model saw; the threshold splits it
    alone and nothing outside it is foreground (every labeled pixel still counts, and AP reads the relevance given).
    """
    relevance, labels = _check_pair(relevance, labels)
    valid = labels != IGNORE_LABEL
    window = covered_window(relevance.shape, covered)
    if window is None:
        predicted = foreground_mask(relevance, threshold)
    else:
        predicted = np.zeros(relevance.shape, bool)
        predicted[window] = foreground_mask(relevance[window], threshold)
    pred = predicted.astype(np.int64)[valid]
    target = labels[valid]
    inter = np.array([np.sum((pred == c) & (target == c)) for c in (0, 1)], dtype=np.int64)
    union = np.array([np.sum(pred == c) + np.sum(target == c) for c in (0, 1)], dtype=np.int64) - inter
    return SegmentationCounts(
        pixel_correct=int(np.sum(pred == target)),
        pixel_labeled=int(target.size),
        area_inter=inter,
        area_union=union,
        ap=_average_precision(relevance, valid, target),
    )


def average_precision(relevance: np.ndarray, labels: np.ndarray) -> float:
    """AP over the background (score 1 - relevance) and foreground (score relevance) channels together."""
    relevance, labels = _check_pair(relevance, labels)
    valid = labels != IGNORE_LABEL
    return _average_precision(relevance, valid, labels[valid])


def summarize_segmentation(results: Sequence[SegmentationCounts]) -> dict[str, float]:
    """Dataset scores: ``pixel_accuracy`` and ``miou`` from summed counts, ``map`` the mean AP."""
    if not results:
        raise ValueError("results is empty")
    correct = sum(r.pixel_correct for r in results)
    labeled = sum(r.pixel_labeled for r in results)
    inter = np.sum([r.area_inter for r in results], axis=0)
    union = np.sum([r.area_union for r in results], axis=0)
    return {
        "pixel_accuracy": float(correct / (_EPS + labeled)),
        "miou": float((inter / (_EPS + union)).mean()),
        "map": float(np.mean([r.ap for r in results])),
    }


def _average_precision(relevance: np.ndarray, valid: np.ndarray, target: np.ndarray) -> float:
    """AP of the labeled pixels (`valid`; `target` their labels); constancy is the whole map's, as the reference
    normalizes the whole map before leaving ignored pixels out."""
    scored = relevance[valid]
    if relevance.min() == relevance.max():  # the reference's NaN map, zeroed in both channels
        scores = np.zeros(2 * scored.size, scored.dtype)
    else:
        scores = np.concatenate([1 - scored, scored])
    targets = np.concatenate([target == 0, target == 1])
    return float(np.nan_to_num(average_precision_score(targets, scores)))


def _check_pair(relevance: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    relevance, labels = finite_map(relevance, "relevance"), np.asarray(labels)
    if labels.shape != relevance.shape:
        raise ValueError(f"labels shape {labels.shape} differs from relevance shape {relevance.shape}")
    if not np.isin(labels, (IGNORE_LABEL, 0, 1)).all():
        raise ValueError(f"labels must be 0, 1 or {IGNORE_LABEL} (ignore), got values {np.unique(labels)}")
    if labels.size and (labels == IGNORE_LABEL).all():
        raise ValueError(f"every pixel's label is {IGNORE_LABEL} (ignore): nothing to score")
    return relevance, labels.astype(np.int64)
