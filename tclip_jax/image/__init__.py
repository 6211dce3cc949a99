"""Images: decoding (`io`), the model's input protocols and their geometry (`protocols`), the way back from
model-input maps to the original image (`geometry`), and torch-exact bilinear resampling (`resample`)."""
from tclip_jax._exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["Geometry", "box_to_model", "box_to_original", "points_to_model", "points_to_original",
                     "to_original"], "tclip_jax.image.geometry"),
    **dict.fromkeys(["ImageLike", "image_size", "load_image"], "tclip_jax.image.io"),
    **dict.fromkeys(["CLIP_MEAN", "CLIP_STD", "INPUT_PROTOCOLS", "InputProtocol", "center_crop", "check_input_size",
                     "check_rgb", "clip_normalize", "prepare", "resize_rgb", "whole_image"],
                    "tclip_jax.image.protocols"),
    "upsample_bilinear": "tclip_jax.image.resample",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
