"""Evaluation metrics: box accuracy, pointing games, segmentation scores, ImageNet-S, aggregation."""
from tclip_jax._exports import lazy_exports

_EXPORTS = {
    "ClassAggregate": "tclip_jax.evaluation.metrics.aggregate",
    "aggregate_by_class": "tclip_jax.evaluation.metrics.aggregate",
    "HIT_IOU": "tclip_jax.evaluation.metrics.boxes",
    "box_hit": "tclip_jax.evaluation.metrics.boxes",
    "box_iou": "tclip_jax.evaluation.metrics.boxes",
    "box_ious": "tclip_jax.evaluation.metrics.boxes",
    "mask_box": "tclip_jax.evaluation.metrics.boxes",
    "energy_in_mask": "tclip_jax.evaluation.metrics.energy",
    "energy_pointing_game": "tclip_jax.evaluation.metrics.energy",
    "energy_pointing_game_scorecam": "tclip_jax.evaluation.metrics.energy",
    "DEFAULT_TOLERANCE": "tclip_jax.evaluation.metrics.pointing",
    "TORCHRAY_TOLERANCE": "tclip_jax.evaluation.metrics.pointing",
    "argmax_point": "tclip_jax.evaluation.metrics.pointing",
    "pointing_game": "tclip_jax.evaluation.metrics.pointing",
    "pointing_hit": "tclip_jax.evaluation.metrics.pointing",
    "IGNORE_LABEL": "tclip_jax.evaluation.metrics.segmentation",
    "SegmentationCounts": "tclip_jax.evaluation.metrics.segmentation",
    "average_precision": "tclip_jax.evaluation.metrics.segmentation",
    "foreground_mask": "tclip_jax.evaluation.metrics.segmentation",
    "normalize_relevance": "tclip_jax.evaluation.metrics.segmentation",
    "segmentation_scores": "tclip_jax.evaluation.metrics.segmentation",
    "summarize_segmentation": "tclip_jax.evaluation.metrics.segmentation",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
