"""Evaluation metrics: box accuracy, pointing games, segmentation scores, ImageNet-S, aggregation."""
from tclip_jax.evaluation.metrics import imagenet_s
from tclip_jax.evaluation.metrics.aggregate import ClassAggregate, aggregate_by_class
from tclip_jax.evaluation.metrics.boxes import HIT_IOU, box_hit, box_iou, box_ious, mask_box
from tclip_jax.evaluation.metrics.energy import energy_in_mask, energy_pointing_game, energy_pointing_game_scorecam
from tclip_jax.evaluation.metrics.pointing import (
    DEFAULT_TOLERANCE,
    TORCHRAY_TOLERANCE,
    argmax_point,
    pointing_game,
    pointing_hit,
)
from tclip_jax.evaluation.metrics.segmentation import (
    IGNORE_LABEL,
    SegmentationCounts,
    average_precision,
    foreground_mask,
    normalize_relevance,
    segmentation_scores,
    summarize_segmentation,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "HIT_IOU",
    "IGNORE_LABEL",
    "TORCHRAY_TOLERANCE",
    "ClassAggregate",
    "SegmentationCounts",
    "aggregate_by_class",
    "argmax_point",
    "average_precision",
    "box_hit",
    "box_iou",
    "box_ious",
    "energy_in_mask",
    "energy_pointing_game",
    "energy_pointing_game_scorecam",
    "foreground_mask",
    "imagenet_s",
    "mask_box",
    "normalize_relevance",
    "pointing_game",
    "pointing_hit",
    "segmentation_scores",
    "summarize_segmentation",
]
