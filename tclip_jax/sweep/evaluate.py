"""Scores of one (image, class) unit from its map at original size; one JSON-ready dict per unit.

- Detection (a target with boxes): the box is Otsu + the largest region of the map (``otsu_box``); a hit is
  IoU >= 0.5 with any ground-truth box of the class, IoU in gScoreCAM's convention (``metrics.box_iou``).
- Segmentation (a target with a mask), all on the method's relevance map (TCLIP: its soft map):
  pointing game against the class mask (``pg_tolerance`` 1: the argmax pixel is on the mask; TorchRay: 15);
  energy pointing game in the tight box of the class mask (Score-CAM's box version, ``energy_pg``) and in the
  mask itself (``energy_in_mask``); pixel accuracy, per-class intersection/union and AP of the relevance map,
  min-max normalised, against the binary class mask with ignore pixels left out, foreground above the
  threshold: ``"mean"`` (Chefer et al.), ``"otsu"``, ``"gmm"`` (the GMM split tau of the normalised map) or a
  number in [0, 1]. Raw counts are stored so that dataset scores sum them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Union

import numpy as np

from tclip_jax.datasets.base import Target
from tclip_jax.metrics import (
    DEFAULT_TOLERANCE,
    HIT_IOU,
    IGNORE_LABEL,
    box_ious,
    energy_in_mask,
    energy_pointing_game,
    normalize_relevance,
    pointing_game,
    segmentation_scores,
)
from tclip_jax.postprocess import BOX_RULES, BoxRule, gmm_threshold, otsu_box
from tclip_jax.synthetic import mask_box

THRESHOLDS = ("mean", "otsu", "gmm")
Threshold = Union[str, float]


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    box_rule: BoxRule = "component"
    pg_tolerance: int = DEFAULT_TOLERANCE
    threshold: Threshold = "mean"

    def __post_init__(self):
        if self.box_rule not in BOX_RULES:
            raise ValueError(f"box_rule must be one of {BOX_RULES}, got {self.box_rule!r}")
        if self.pg_tolerance < 0:
            raise ValueError(f"pg_tolerance must be >= 0, got {self.pg_tolerance}")
        if isinstance(self.threshold, str) and self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS} or a number, got {self.threshold!r}")


def evaluate_targets(targets: tuple[Target, ...], heatmaps: np.ndarray, class_names: tuple[str, ...],
                     relevance: Callable[[np.ndarray], np.ndarray], options: EvalOptions) -> list[dict]:
    """One dict per target; ``heatmaps[k]`` [H, W] is the map of ``targets[k]``'s class."""
    units = []
    for target, heatmap in zip(targets, heatmaps, strict=True):
        unit = {"class_id": target.class_id, "class": class_names[target.class_id]}
        if target.boxes is not None:
            unit.update(box_unit(heatmap, target.boxes, options.box_rule))
        if target.mask is not None:
            unit.update(mask_unit(relevance(heatmap), target.mask, target.ignore, options))
        units.append(unit)
    return units


def box_unit(heatmap: np.ndarray, gt_boxes: np.ndarray, box_rule: BoxRule = "component") -> dict:
    box = otsu_box(heatmap, rule=box_rule)
    best = float(box_ious(box, gt_boxes).max())
    return {"box": [int(v) for v in box], "iou": best, "hit": best >= HIT_IOU}


def mask_unit(relevance_map: np.ndarray, mask: np.ndarray, ignore: np.ndarray | None,
              options: EvalOptions) -> dict:
    labels = mask.astype(np.int64)
    if ignore is not None:
        labels[ignore] = IGNORE_LABEL
    relevance = normalize_relevance(relevance_map)
    threshold = gmm_threshold(relevance).tau if options.threshold == "gmm" else options.threshold
    counts = segmentation_scores(relevance, labels, threshold)
    return {
        "pg_hit": pointing_game(relevance_map, mask, options.pg_tolerance),
        "energy_pg": energy_pointing_game(relevance_map, mask_box(mask)),
        "energy_in_mask": energy_in_mask(relevance_map, mask),
        "pixel_correct": counts.pixel_correct,
        "pixel_labeled": counts.pixel_labeled,
        "area_inter": counts.area_inter.tolist(),
        "area_union": counts.area_union.tolist(),
        "ap": counts.ap,
    }
