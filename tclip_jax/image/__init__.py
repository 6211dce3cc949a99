"""Images: decoding (`io`), the model's input protocols and their geometry (`protocols`), the way back from
model-input maps to the original image (`geometry`), and torch-exact bilinear resampling (`resample`)."""
from tclip_jax.image.geometry import (
    Geometry,
    box_to_model,
    box_to_original,
    points_to_model,
    points_to_original,
    to_original,
)
from tclip_jax.image.io import ImageLike, load_image
from tclip_jax.image.protocols import (
    CLIP_MEAN,
    CLIP_STD,
    INPUT_PROTOCOLS,
    InputProtocol,
    center_crop,
    clip_normalize,
    prepare,
    whole_image,
)
from tclip_jax.image.resample import upsample_bilinear

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "Geometry", "INPUT_PROTOCOLS", "ImageLike", "InputProtocol", "box_to_model",
    "box_to_original", "center_crop", "clip_normalize", "load_image", "points_to_model", "points_to_original",
    "prepare", "to_original", "upsample_bilinear", "whole_image",
]
