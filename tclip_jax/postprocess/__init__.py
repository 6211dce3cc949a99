"""Host-side post-processing of relevance maps: GMM soft maps and zero-shot boxes."""
from tclip_jax._exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["BOX_RULES", "GSCORECAM_DUMMY_BOX", "Box", "BoxRule", "contour_boxes", "foreground",
                     "heatmap_box", "largest_component_box", "otsu_box", "uint8_minmax"],
                    "tclip_jax.postprocess.boxes"),
    **dict.fromkeys(["DEFAULT_SIGMA_FRACTION", "MAX_GMM_SAMPLES", "GmmFit", "gaussian_intersection", "gmm_threshold",
                     "soft_map"], "tclip_jax.postprocess.soft_map"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
