"""Host-side post-processing of relevance maps: GMM soft maps and zero-shot boxes.

Batched entry points (all maps of an image at once): `soft_maps`, `gmm_thresholds`, `boxes` and
`soft_maps_and_boxes` (the three together, as the explainer needs them). The single-map functions
(`soft_map`, `gmm_threshold`, `heatmap_box`, `otsu_box`, ...) give the same results one map at a time.
"""
from tclip_jax.postprocess.boxes import (
    BOX_RULES,
    GSCORECAM_DUMMY_BOX,
    Box,
    BoxRule,
    boxes,
    contour_boxes,
    foreground,
    heatmap_box,
    largest_component_box,
    otsu_box,
    uint8_minmax,
)
from tclip_jax.postprocess.host import soft_maps_and_boxes
from tclip_jax.postprocess.soft_map import (
    DEFAULT_SIGMA_FRACTION,
    MAX_GMM_SAMPLES,
    GmmFit,
    gaussian_intersection,
    gmm_threshold,
    gmm_threshold_sklearn,
    gmm_thresholds,
    soft_map,
    soft_maps,
)

__all__ = [
    "BOX_RULES",
    "DEFAULT_SIGMA_FRACTION",
    "GSCORECAM_DUMMY_BOX",
    "MAX_GMM_SAMPLES",
    "Box",
    "BoxRule",
    "GmmFit",
    "boxes",
    "contour_boxes",
    "foreground",
    "gaussian_intersection",
    "gmm_threshold",
    "gmm_threshold_sklearn",
    "gmm_thresholds",
    "heatmap_box",
    "largest_component_box",
    "otsu_box",
    "soft_map",
    "soft_maps",
    "soft_maps_and_boxes",
    "uint8_minmax",
]
