"""ImageNet-S semantic-segmentation evaluation, with the semantics of ``LUSSeg/ImageNet-S``
``evaluation/evaluator.py`` (with its ``metric.py`` and ``data/data.py``).

Conventions:
- Label maps hold class ids: 0 = background, 1..num_classes, ``IGNORE_ID = 1000`` = ignore; PNG label
  files encode ``id = R + 256 * G`` (``decode_label_png``).
- Per image, boundary maps are computed first on the full maps: for each class, the mask minus its erosion
  by ``round(dilation_ratio * diagonal)`` (at least 1) 3x3 steps, with the image border counting as
  outside (Boundary IoU's ``mask_to_boundary``). Then pixels whose GT is ``IGNORE_ID`` are dropped.
- Counts are histograms over ids 0..num_classes; predicted ids outside that range are not counted (but a
  non-zero prediction still counts as foreground for the F-measure).
- IoU per class = summed intersection / (summed union + 1e-10) over all images; ``mIoU`` averages all
  num_classes + 1 entries (background included, a class absent everywhere counts as 0). The boundary
  versions (``BIoUs``, ``mBIoU``) use the boundary maps.
- Size buckets: each GT class of an image (not background) is bucketed by ``ceil(100 * its pixels / valid
  pixels)`` into S (<= 5), MS (<= 25), ML (<= 50), L (> 50); a bucket's counts use the background pixels
  plus the pixels of its classes. Bucket mIoU averages only classes with GT pixels in that bucket (NaN
  for a bucket no image used). The percentage is computed as the evaluator's
  ``math.ceil(100.0 * counts[c] / sum(counts))`` on int64 torch tensors computes it, in float32 (the count and the
  total rounded to float32, the product and the quotient each rounded; ``_size_percent``): a class of exactly half
  the valid pixels can land in L (1,342,182 valid pixels, a class of 671,091: 50.0000038 -> 51), not ML.
- ``Acc``: an image counts when the non-background class with the most predicted pixels (first on ties)
  is present in both the prediction and the GT.
- ``FMeasure``: per image, foreground (id > 0) F-score ``(1 + b) P R / (b P + R + 1e-20)`` with b = 0.3,
  P and R computed with 1e-20 in their denominators; averaged over images.
- All summary values are percentages, as the evaluator logs them.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

IGNORE_ID = 1000
BOUNDARY_DILATION_RATIO = 0.03
FMEASURE_BETA = 0.3
SIZE_BUCKETS = ("S", "MS", "ML", "L")
_BUCKET_UPPER_PERCENT = (5, 25, 50)  # L is everything above 50
_IOU_EPS = 1e-10
_F_EPS = 1e-20


@dataclasses.dataclass(frozen=True)
class AreaCounts:
    """Per-class pixel counts, int64 [num_classes + 1] each."""

    intersection: np.ndarray
    pred: np.ndarray
    gt: np.ndarray

    def __add__(self, other: AreaCounts) -> AreaCounts:
        return AreaCounts(self.intersection + other.intersection, self.pred + other.pred, self.gt + other.gt)


@dataclasses.dataclass(frozen=True)
class ImageStats:
    """One image's contribution; ``buckets`` / ``boundary_buckets`` follow ``SIZE_BUCKETS``."""

    area: AreaCounts
    boundary: AreaCounts
    buckets: tuple[AreaCounts, ...]
    boundary_buckets: tuple[AreaCounts, ...]
    fmeasure: float
    acc_hit: bool


def decode_label_png(rgb: np.ndarray) -> np.ndarray:
    """Class ids ``R + 256 * G`` of an ImageNet-S label PNG array [H, W, >=2], as int64 (no uint8 overflow)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 2:
        raise ValueError(f"expected an RGB(A) label image [H, W, C>=2], got shape {rgb.shape}")
    return rgb[..., 0].astype(np.int64) + 256 * rgb[..., 1].astype(np.int64)


def boundary_labels(labels: np.ndarray, dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> np.ndarray:
    """Map with ``id + 1`` on each class's inner boundary band and 0 elsewhere (int64)."""
    labels = np.asarray(labels)
    h, w = labels.shape
    steps = max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))
    kernel = np.ones((3, 3), np.uint8)
    out = np.zeros((h, w), np.int64)
    for class_id in np.unique(labels):
        mask = (labels == class_id).astype(np.uint8)
        padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        interior = cv2.erode(padded, kernel, iterations=steps)[1:-1, 1:-1]
        out[(mask == 1) & (interior == 0)] = class_id + 1
    return out


def image_stats(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, dilation_ratio: float = BOUNDARY_DILATION_RATIO
) -> ImageStats:
    """Counts of one (GT, prediction) pair of integer label maps."""
    gt, pred = _label_map(gt, "gt"), _label_map(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt shape {gt.shape} differs from pred shape {pred.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    n = num_classes + 1
    boundary_gt, boundary_pred = boundary_labels(gt, dilation_ratio), boundary_labels(pred, dilation_ratio)
    valid = gt != IGNORE_ID
    gt, pred, boundary_gt, boundary_pred = gt[valid], pred[valid], boundary_gt[valid], boundary_pred[valid]

    area = _area_counts(gt, pred, n)
    selections = _bucket_selections(gt)
    buckets = tuple(_area_counts(gt[sel], pred[sel], n) for sel in selections)
    boundary_buckets = tuple(_boundary_counts(boundary_gt[sel], boundary_pred[sel], n) for sel in selections)

    predicted_class = 1 + int(np.argmax(area.pred[1:]))
    return ImageStats(
        area=area,
        boundary=_boundary_counts(boundary_gt, boundary_pred, n),
        buckets=buckets,
        boundary_buckets=boundary_buckets,
        fmeasure=_fmeasure(gt > 0, pred > 0),
        acc_hit=bool(area.gt[predicted_class] > 0 and area.pred[predicted_class] > 0),
    )


def summarize(stats: Sequence[ImageStats]) -> dict[str, float | list[float]]:
    """The evaluator's log (percent): Acc, mIoU, mBIoU, S, MS, ML, L, BS, BMS, BML, BL, IoUs, BIoUs, FMeasure."""
    if not stats:
        raise ValueError("stats is empty")
    ious = 100 * _iou(_total(s.area for s in stats))
    bious = 100 * _iou(_total(s.boundary for s in stats))
    log: dict[str, float | list[float]] = {
        "Acc": 100 * float(np.mean([s.acc_hit for s in stats])),
        "mIoU": float(ious.mean()),
        "mBIoU": float(bious.mean()),
    }
    for k, name in enumerate(SIZE_BUCKETS):
        log[name] = _present_mean_iou(_total(s.buckets[k] for s in stats))
    for k, name in enumerate(SIZE_BUCKETS):
        log["B" + name] = _present_mean_iou(_total(s.boundary_buckets[k] for s in stats))
    log["IoUs"] = ious.tolist()
    log["BIoUs"] = bious.tolist()
    log["FMeasure"] = 100 * float(np.mean([s.fmeasure for s in stats]))
    return log


def evaluate(
    gts: Sequence[np.ndarray], preds: Sequence[np.ndarray], num_classes: int
) -> dict[str, float | list[float]]:
    """``summarize`` over pairs of GT and prediction label maps."""
    if len(gts) != len(preds):
        raise ValueError(f"{len(gts)} GT maps but {len(preds)} predictions")
    return summarize([image_stats(gt, pred, num_classes) for gt, pred in zip(gts, preds)])


def _label_map(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D label map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def _histogram(ids: np.ndarray, n: int) -> np.ndarray:
    ids = ids[(ids >= 0) & (ids < n)]
    return np.bincount(ids, minlength=n).astype(np.int64)


def _area_counts(gt: np.ndarray, pred: np.ndarray, n: int) -> AreaCounts:
    return AreaCounts(_histogram(pred[pred == gt], n), _histogram(pred, n), _histogram(gt, n))


def _boundary_counts(boundary_gt: np.ndarray, boundary_pred: np.ndarray, n: int) -> AreaCounts:
    # Boundary ids are class + 1 (0 = not on a boundary); dropping bin 0 re-indexes them by class.
    counts = _area_counts(boundary_gt, boundary_pred, n + 1)
    return AreaCounts(counts.intersection[1:], counts.pred[1:], counts.gt[1:])


def _bucket_selections(gt: np.ndarray) -> list[np.ndarray]:
    """Per size bucket, the pixels counted: background plus the bucket's classes; none for an empty bucket."""
    classes, counts = np.unique(gt[gt != 0], return_counts=True)
    percent = _size_percent(counts, gt.size)
    bucket_of = np.searchsorted(_BUCKET_UPPER_PERCENT, percent, side="left")
    selections = []
    for k in range(len(SIZE_BUCKETS)):
        members = classes[bucket_of == k]
        selections.append((gt == 0) | np.isin(gt, members) if members.size else np.zeros(gt.shape, bool))
    return selections


def _size_percent(counts: np.ndarray, total: int) -> np.ndarray:
    """ceil(100 * count / total) per class as the evaluator computes it: ``100.0 * counts[c]`` on an int64 tensor is
    float32 (torch's default dtype), and so is its quotient by ``sum(counts)``, an int64 tensor."""
    return np.ceil(np.float32(100.0) * np.asarray(counts).astype(np.float32) / np.float32(total))


def _fmeasure(target: np.ndarray, output: np.ndarray) -> float:
    tp = float(np.sum(target & output))
    recall = tp / (np.sum(target) + _F_EPS)
    precision = tp / (np.sum(output) + _F_EPS)
    beta = FMEASURE_BETA
    return (1 + beta) * precision * recall / (beta * precision + recall + _F_EPS)


def _total(counts: Iterable[AreaCounts]) -> AreaCounts:
    return functools.reduce(operator.add, counts)


def _iou(counts: AreaCounts) -> np.ndarray:
    return counts.intersection / (counts.pred + counts.gt - counts.intersection + _IOU_EPS)


def _present_mean_iou(counts: AreaCounts) -> float:
    present = counts.gt > 0
    if not present.any():
        return float("nan")
    return 100 * float(_iou(counts)[present].mean())
