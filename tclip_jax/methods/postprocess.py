"""How each method's official code turns a patch-grid map into an image-sized heatmap."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tclip_jax.image import upsample_bilinear
from tclip_jax.methods.common import minmax


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
