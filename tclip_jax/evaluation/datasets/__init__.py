"""Evaluation datasets (COCO 2017 boxes and masks, ImageNet-S, PASCAL VOC 2012, synthetic scenes) behind one interface (see ``base``)."""
from tclip_jax._exports import lazy_exports

_EXPORTS = {
    "Dataset": "tclip_jax.evaluation.datasets.base",
    "LoadedSample": "tclip_jax.evaluation.datasets.base",
    "Sample": "tclip_jax.evaluation.datasets.base",
    "Target": "tclip_jax.evaluation.datasets.base",
    "COCO_CATEGORIES": "tclip_jax.evaluation.datasets.coco",
    "coco_dataset": "tclip_jax.evaluation.datasets.coco",
    "coco_seg_dataset": "tclip_jax.evaluation.datasets.coco",
    "tfds_coco_dataset": "tclip_jax.evaluation.datasets.coco",
    "tfds_order": "tclip_jax.evaluation.datasets.coco",
    "tfds_samples": "tclip_jax.evaluation.datasets.coco",
    "tfds_to_xyxy": "tclip_jax.evaluation.datasets.coco",
    "xywh_to_xyxy": "tclip_jax.evaluation.datasets.coco",
    "imagenet_class_names": "tclip_jax.evaluation.datasets.imagenet_s",
    "imagenet_s_dataset": "tclip_jax.evaluation.datasets.imagenet_s",
    "read_labels": "tclip_jax.evaluation.datasets.imagenet_s",
    "split_wnids": "tclip_jax.evaluation.datasets.imagenet_s",
    "SYNTHETIC_CLASSES": "tclip_jax.evaluation.datasets.synthetic",
    "synthetic_dataset": "tclip_jax.evaluation.datasets.synthetic",
    "VOC_CLASSES": "tclip_jax.evaluation.datasets.voc",
    "voc_dataset": "tclip_jax.evaluation.datasets.voc",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
