"""Host-side post-processing of relevance maps: GMM soft maps and zero-shot boxes.

Batched entry points (all maps of an image at once): `soft_maps`, `gmm_thresholds`, `heatmap_boxes` and
`soft_maps_and_boxes` (the three together, as the explainer needs them). The single-map functions
(`soft_map`, `gmm_threshold`, `heatmap_box`, `otsu_box`, ...) give the same results one map at a time.
"""
from tclip_jax._exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["BOX_RULES", "GSCORECAM_DUMMY_BOX", "Box", "BoxRule", "contour_boxes", "foreground",
                     "heatmap_box", "heatmap_boxes", "largest_component_box", "otsu_box", "uint8_minmax"],
                    "tclip_jax.postprocess.boxes"),
    "DEFAULT_SIGMA_FRACTION": "tclip_jax.postprocess.sigma",
    **dict.fromkeys(["GmmFit", "gaussian_intersection", "gmm_threshold", "gmm_thresholds",
                     "soft_map", "soft_maps", "soft_maps_and_boxes"],
                    "tclip_jax.postprocess.soft"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
