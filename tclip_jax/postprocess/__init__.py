"""Host-side post-processing of relevance maps: GMM soft maps and zero-shot boxes."""
from tclip_jax.postprocess.boxes import (
    BOX_RULES,
    GSCORECAM_DUMMY_BOX,
    Box,
    BoxRule,
    contour_boxes,
    foreground,
    heatmap_box,
    largest_component_box,
    otsu_box,
    uint8_minmax,
)
from tclip_jax.postprocess.soft_map import (
    DEFAULT_SIGMA_FRACTION,
    MAX_GMM_SAMPLES,
    GmmFit,
    gaussian_intersection,
    gmm_threshold,
    soft_map,
)

__all__ = [
    "BOX_RULES",
    "DEFAULT_SIGMA_FRACTION",
    "GSCORECAM_DUMMY_BOX",
    "MAX_GMM_SAMPLES",
    "Box",
    "BoxRule",
    "GmmFit",
    "contour_boxes",
    "foreground",
    "gaussian_intersection",
    "gmm_threshold",
    "heatmap_box",
    "largest_component_box",
    "otsu_box",
    "soft_map",
    "uint8_minmax",
]
