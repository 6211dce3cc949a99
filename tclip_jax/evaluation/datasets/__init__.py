"""Evaluation datasets (COCO 2017, ImageNet-S, synthetic scenes) behind one interface (see ``base``)."""
from tclip_jax.evaluation.datasets.base import Dataset, LoadedSample, Sample, Target
from tclip_jax.evaluation.datasets.coco import (
    COCO_CATEGORIES,
    coco_dataset,
    tfds_coco_dataset,
    tfds_samples,
    tfds_to_xyxy,
    xywh_to_xyxy,
)
from tclip_jax.evaluation.datasets.imagenet_s import imagenet_class_names, imagenet_s_dataset, read_labels, split_wnids
from tclip_jax.evaluation.datasets.synthetic import SYNTHETIC_CLASSES, synthetic_dataset

__all__ = [
    "COCO_CATEGORIES",
    "SYNTHETIC_CLASSES",
    "Dataset",
    "LoadedSample",
    "Sample",
    "Target",
    "coco_dataset",
    "imagenet_class_names",
    "imagenet_s_dataset",
    "read_labels",
    "split_wnids",
    "synthetic_dataset",
    "tfds_coco_dataset",
    "tfds_samples",
    "tfds_to_xyxy",
    "xywh_to_xyxy",
]
