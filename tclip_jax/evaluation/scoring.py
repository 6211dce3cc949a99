"""The one unit scorer: the scores of one (image, target) unit from its method's map, box and relevance.

- Detection (a target with boxes): the method's box (`HostMaps.box`: Otsu + the largest region, under the
  method's box rule); a hit is IoU >= 0.5 with any ground-truth box of the target, IoU in gScoreCAM's convention
  (`metrics.box_iou`).
- Segmentation (a target with a mask), all on the method's relevance map (TCLIP: its soft map; a baseline: its
  heatmap): pointing game against the mask (``pg_tolerance`` 1: the argmax pixel is on the mask; TorchRay: 15);
  energy pointing game in the tight box of the mask (Score-CAM's box version, ``energy_pg``) and in the mask
  itself (``energy_in_mask``); pixel accuracy, per-class intersection/union and AP of the relevance map,
  normalized as Chefer et al.'s code does (negatives clipped to 0, then min-max: `metrics.normalize_relevance`; a
  map with no positive value, such as a TCLIP soft map of negative cosines, scores as an empty mask and is marked
  ``no_positive_relevance``), against the binary mask with ignore pixels left out, foreground above the
  threshold: ``"mean"`` (Chefer et al.), ``"otsu"``, ``"gmm"`` (the GMM split τ of the normalized map) or a
  number in [0, 1). Raw counts are stored so that dataset scores sum them. Under a centre crop the map is
  normalized and split within the part of the image the model saw (``covered``), as its soft map and box are; the
  rest is background of relevance 0, and every labeled pixel counts.
- Seed metrics (``metrics="seed"``, a target with a mask): score contrast and foreground intersection / union at
  every grid threshold (`metrics.seed`), for the report's mSC and mIoU.
- Wrong attribute (a target with a `wrong_mask`): ``wrong_pg_hit``, the pointing game of the same relevance map
  against the object the prompt names wrongly (lower is better).
"""
from __future__ import annotations

import numpy as np

from tclip_jax.evaluation.datasets.base import Target
from tclip_jax.evaluation.metrics import (
    HIT_IOU,
    IGNORE_LABEL,
    box_ious,
    energy_in_mask,
    energy_pointing_game,
    mask_box,
    normalize_relevance,
    pointing_game,
    segmentation_scores,
)
from tclip_jax.evaluation.metrics.seed import seed_unit_scores
from tclip_jax.methods.base import HostMaps
from tclip_jax.postprocess import Box, gmm_threshold
from tclip_jax.postprocess.boxes import covered_window
from tclip_jax.evaluation.options import EvalOptions


def score_unit(target: Target, heatmap: np.ndarray, host: HostMaps, options: EvalOptions,
               covered: tuple[slice, slice] | None = None) -> dict:
    """The JSON-ready scores of one unit; `heatmap` [H, W] and `host` are its method's map at original size, and
    `covered` the part of the image its model saw (`Geometry.covered`; None: all of it)."""
    unit = {}
    relevance = heatmap if host.soft is None else host.soft
    if target.boxes is not None:
        unit.update(box_scores(host.box, target.boxes))
    if target.mask is not None:
        window = covered_window(relevance.shape, covered)
        normalized = normalize_relevance(relevance if window is None else relevance[window])
        if window is not None:  # what the crop cut off is the least relevant and never foreground
            normalized = _embedded(normalized, relevance.shape, window)
        unit.update(mask_scores(relevance, normalized, target.mask, target.ignore, options, window))
        if options.metrics == "seed":
            unit["seed"] = seed_unit_scores(normalized, target.mask, target.ignore)
    if target.wrong_mask is not None:
        unit["wrong_pg_hit"] = pointing_game(relevance, target.wrong_mask, options.pg_tolerance)
    return unit


def box_scores(box: Box, gt_boxes: np.ndarray) -> dict:
    best = float(box_ious(box, gt_boxes).max())
    return {"box": [int(v) for v in box], "iou": best, "hit": best >= HIT_IOU}


def _embedded(region: np.ndarray, shape: tuple[int, int], window: tuple[slice, slice]) -> np.ndarray:
    whole = np.zeros(shape, region.dtype)
    whole[window] = region
    return whole


def mask_scores(relevance_map: np.ndarray, relevance: np.ndarray, mask: np.ndarray, ignore: np.ndarray | None,
                options: EvalOptions, window: tuple[slice, slice] | None = None) -> dict:
    """The mask scores of a relevance map and of its normalized `relevance`, thresholds fitted within `window`."""
    labels = mask.astype(np.int64)
    if ignore is not None:
        labels[ignore] = IGNORE_LABEL
    seen = relevance if window is None else relevance[window]
    threshold = gmm_threshold(seen).tau if options.threshold == "gmm" else options.threshold
    counts = segmentation_scores(relevance, labels, threshold, window)
    scores = {
        "pg_hit": pointing_game(relevance_map, mask, options.pg_tolerance),
        "energy_pg": energy_pointing_game(relevance_map, mask_box(mask)),
        "energy_in_mask": energy_in_mask(relevance_map, mask),
        "pixel_correct": counts.pixel_correct,
        "pixel_labeled": counts.pixel_labeled,
        "area_inter": counts.area_inter.tolist(),
        "area_union": counts.area_union.tolist(),
        "ap": counts.ap,
    }
    if not float(np.max(relevance_map if window is None else relevance_map[window])) > 0:  # clipped to nothing
        scores["no_positive_relevance"] = True
    return scores
