"""How each method's official code turns a patch-grid map into an image-sized heatmap, and feeds images in."""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from tclip_jax.image_io import ImageLike, load_image
from tclip_jax.model import CLIPConfig
from tclip_jax.preprocess import Geometry, clip_center_crop, minmax, upsample_bilinear, whole_image

InputProtocol = Literal["center_crop", "whole_image", "patch_multiple"]


@dataclasses.dataclass(frozen=True)
class MapPostprocess:
    """Upsampling (bilinear, align_corners=False) and min-max normalisation, in the official order.

    normalize_first: min-max over each grid map, then upsample (CLIP Surgery's `get_similarity_map`,
      Grad-ECLIP's notebook); otherwise upsample, then min-max over the image (HilaCAM, clip_text_span).
    clip_negative: clip the upsampled map to [0, max] before the min-max (clip_text_span's segmentation).
    """

    normalize_first: bool
    clip_negative: bool = False


def postprocess_maps(maps: jax.Array, size: tuple[int, int], spec: MapPostprocess) -> jax.Array:
    """Patch-grid maps [..., gh, gw] -> heatmaps [..., H, W] in [0, 1]."""
    if spec.normalize_first:
        return upsample_bilinear(minmax(maps), tuple(size))
    upsampled = upsample_bilinear(maps, tuple(size))
    if spec.clip_negative:
        upsampled = jnp.maximum(upsampled, 0)
    return minmax(upsampled)


def prepare_input(protocol: InputProtocol, image: ImageLike, config: CLIPConfig) -> tuple[np.ndarray, Geometry]:
    """One image as a method's official code feeds it to the model: float32 [h, w, 3] and its geometry.

    center_crop: OpenAI's `_transform` (short side to image_size, centre crop); HilaCAM, clip_text_span.
    whole_image: the whole image resized to image_size x image_size; CLIP Surgery's demo.
    patch_multiple: each side resized to the nearest multiple of the patch size, `int(side / patch + 0.5)`
      patches (Grad-ECLIP's `imgprocess`); the positional embedding is resized to the grid.
    """
    if protocol == "center_crop":
        return clip_center_crop(image, config.image_size)
    if protocol == "whole_image":
        return whole_image(image, config.image_size)
    if protocol == "patch_multiple":
        rgb = load_image(image)
        size = tuple(int(side / config.patch_size + 0.5) * config.patch_size for side in rgb.shape[:2])
        return whole_image(rgb, size)
    raise ValueError(f"unknown input protocol {protocol!r}; expected center_crop, whole_image or patch_multiple")
