"""CLIP preprocessing protocols, the geometry linking model input to original image, and map resampling.

Coordinates are continuous pixel-edge coordinates: pixel (row i, col j) covers [j, j+1) x [i, i+1), its centre
is (j + 0.5, i + 0.5), and a frame of size (h, w) spans [0, w] x [0, h]. Boxes are xyxy in these coordinates
(exclusive end, as ``cv2.boundingRect`` gives ``[x, y, x + w, y + h]``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from tclip_jax.image_io import ImageLike, load_image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How the model input was cut from the original image.

    The original (H, W) is resized (PIL bicubic) to ``resized_hw``; the model input is the ``input_hw`` window of
    the resized image whose top-left corner is ``crop_offset_yx``. ``whole_image`` has resized == input, offset 0.
    """

    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    crop_offset_yx: tuple[int, int]

    def __post_init__(self):
        for name in ("original_hw", "input_hw", "resized_hw"):
            if min(getattr(self, name)) <= 0:
                raise ValueError(f"Geometry.{name} must be positive, got {getattr(self, name)}")
        for offset, size, resized in zip(self.crop_offset_yx, self.input_hw, self.resized_hw):
            if offset < 0 or offset + size > resized:
                raise ValueError(
                    f"crop window offset {self.crop_offset_yx} size {self.input_hw} "
                    f"lies outside the resized image {self.resized_hw}"
                )


def clip_center_crop(image: ImageLike, size: int = 224) -> tuple[np.ndarray, Geometry]:
    """OpenAI CLIP ``_transform``: bicubic resize of the short side to ``size``, centre crop, normalise.

    Reproduces torchvision ``Resize(size, BICUBIC)`` (PIL backend; long side ``int(size * long / short)``) and
    ``CenterCrop(size)`` (offset ``int(round((resized - size) / 2.0))``). Returns float32 [size, size, 3].
    """
    if not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"clip_center_crop size must be a positive int, got {size!r}")
    rgb = load_image(image)
    height, width = rgb.shape[:2]
    if width <= height:
        resized_hw = (int(size * height / width), size)
    else:
        resized_hw = (size, int(size * width / height))
    offset_yx = tuple(int(round((r - size) / 2.0)) for r in resized_hw)
    resized = _resize_bicubic(rgb, resized_hw)
    crop = resized[offset_yx[0] : offset_yx[0] + size, offset_yx[1] : offset_yx[1] + size]
    geometry = Geometry((height, width), (size, size), resized_hw, offset_yx)
    return clip_normalise(crop), geometry


def whole_image(image: ImageLike, size: int | tuple[int, int] = 224) -> tuple[np.ndarray, Geometry]:
    """Bicubic resize of the whole image to ``size`` (int or (h, w)), no crop, normalise (CLIP Surgery's protocol).

    Reproduces torchvision ``Resize((h, w), BICUBIC)`` with the PIL backend. Returns float32 [h, w, 3].
    """
    input_hw = (size, size) if isinstance(size, (int, np.integer)) else size
    if not (
        isinstance(input_hw, (tuple, list))
        and len(input_hw) == 2
        and all(isinstance(s, (int, np.integer)) and s > 0 for s in input_hw)
    ):
        raise ValueError(f"whole_image size must be a positive int or (h, w) of positive ints, got {size!r}")
    input_hw = (int(input_hw[0]), int(input_hw[1]))
    rgb = load_image(image)
    geometry = Geometry(rgb.shape[:2], input_hw, input_hw, (0, 0))
    return clip_normalise(_resize_bicubic(rgb, input_hw)), geometry


def _resize_bicubic(rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC))


def clip_normalise(rgb):
    """CLIP's pixel normalisation of uint8 RGB [..., 3], numpy or jax (training normalises batches on device).

    Same float32 operations, in the same order, as torchvision ToTensor (/255) then Normalize (sub, div).
    """
    return (rgb.astype(np.float32) / np.float32(255.0) - CLIP_MEAN) / CLIP_STD


def minmax(x: jax.Array, axis: int | tuple[int, ...] = (-2, -1)) -> jax.Array:
    """(x - min) / (max - min) over ``axis``, with no epsilon, so it equals the reference formula exactly.

    A constant slice (max == min) maps to all zeros rather than NaN.
    """
    low = jnp.min(x, axis=axis, keepdims=True)
    spread = jnp.max(x, axis=axis, keepdims=True) - low
    return jnp.where(spread > 0, (x - low) / jnp.where(spread > 0, spread, 1), 0)


@functools.partial(jax.jit, static_argnames="size")
def upsample_bilinear(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize the last two axes of ``maps`` [..., gh, gw] to ``size`` = (H, W).

    Matches torch ``F.interpolate(mode='bilinear', align_corners=False)``: half-pixel centres, clamped edges,
    and no antialiasing (unlike ``jax.image.resize``), also when shrinking.
    """
    if maps.ndim < 2:
        raise ValueError(f"maps must have at least 2 axes [..., gh, gw], got shape {maps.shape}")
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"size must be (H, W) of positive ints, got {size!r}")
    grid_hw = maps.shape[-2:]
    rows = _bilinear_taps(int(size[0]), grid_hw[0], np.float32(grid_hw[0]) / np.float32(size[0]), 0.0)
    cols = _bilinear_taps(int(size[1]), grid_hw[1], np.float32(grid_hw[1]) / np.float32(size[1]), 0.0)
    return _resample(maps, rows, cols)


def _bilinear_taps(out_size: int, in_size: int, scale: float, shift: float) -> tuple[np.ndarray, ...]:
    """Indices and weights for output pixels whose centres c map to input coordinate ``scale * c + shift``.

    Mirrors torch's float32 ``area_pixel_compute_source_index`` (compiled as one fused multiply-add, hence the
    single rounding from float64, exact here) and ``guard_index_and_lambda``.
    """
    centres = np.arange(out_size, dtype=np.float64) + 0.5
    source = (np.float64(np.float32(scale)) * centres + np.float64(np.float32(shift)) - 0.5).astype(np.float32)
    source = np.maximum(source, np.float32(0.0))
    index0 = np.minimum(source.astype(np.int32), in_size - 1)
    index1 = np.where(index0 < in_size - 1, index0 + 1, index0)
    weight1 = np.clip(source - index0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return index0, index1, np.float32(1.0) - weight1, weight1


def _resample(maps: jax.Array, rows: tuple[np.ndarray, ...], cols: tuple[np.ndarray, ...]) -> jax.Array:
    # Width first, then height: the same order of operations as torch's bilinear kernel.
    maps = jnp.asarray(maps, dtype=jnp.float32)
    c0, c1, cw0, cw1 = cols
    maps = jnp.take(maps, c0, axis=-1) * cw0 + jnp.take(maps, c1, axis=-1) * cw1
    r0, r1, rw0, rw1 = rows
    return jnp.take(maps, r0, axis=-2) * rw0[:, None] + jnp.take(maps, r1, axis=-2) * rw1[:, None]


_resample_jit = jax.jit(_resample)


def to_original(
    heatmap: np.ndarray | jax.Array, geometry: Geometry, fill: float | Literal["min"] = "min"
) -> np.ndarray:
    """Bilinearly resample a map covering the model input onto the original image: [..., gh, gw] -> [..., H, W].

    The map may have any resolution (the model input's, or the patch grid's): it is taken to span the model
    input frame. Each original pixel centre is mapped into that frame and sampled with the
    ``upsample_bilinear`` convention. Pixels whose centre falls outside the frame (cut off by a centre crop) get
    ``fill``: ``"min"`` (default) uses each map's own minimum so that they read as background; pass a number,
    e.g. ``np.nan``, to mark them instead. Returns float32.
    """
    fill_with_min = isinstance(fill, str) and fill == "min"
    if not (fill_with_min or isinstance(fill, (int, float, np.floating, np.integer))):
        raise ValueError(f"fill must be 'min' or a number, got {fill!r}")
    heatmap = jnp.asarray(heatmap, dtype=jnp.float32)
    if heatmap.ndim < 2:
        raise ValueError(f"heatmap must have at least 2 axes [..., gh, gw], got shape {heatmap.shape}")
    taps, inside = [], []
    for original, grid, resized, model, offset in zip(
        geometry.original_hw, heatmap.shape[-2:], geometry.resized_hw, geometry.input_hw, geometry.crop_offset_yx
    ):
        grid_per_model = grid / model
        scale = resized / original * grid_per_model
        shift = -offset * grid_per_model
        taps.append(_bilinear_taps(original, grid, scale, shift))
        centres = scale * (np.arange(original) + 0.5) + shift
        inside.append((centres >= 0) & (centres <= grid))
    resampled = np.asarray(_resample_jit(heatmap, *taps))
    fill_value = np.min(np.asarray(heatmap), axis=(-2, -1), keepdims=True) if fill_with_min else np.float32(fill)
    return np.where(inside[0][:, None] & inside[1][None, :], resampled, fill_value).astype(np.float32)


def points_to_model(points_xy: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map points [..., 2] (x, y) from original-image coordinates to model-input coordinates (not clipped)."""
    scale, offset = _model_from_original(geometry)
    return np.asarray(points_xy, dtype=np.float64) * scale - offset


def points_to_original(points_xy: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map points [..., 2] (x, y) from model-input coordinates to original-image coordinates."""
    scale, offset = _model_from_original(geometry)
    return (np.asarray(points_xy, dtype=np.float64) + offset) / scale


def box_to_model(box_xyxy: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map boxes [..., 4] xyxy from original-image to model-input coordinates (not clipped to the frame)."""
    return _map_boxes(box_xyxy, geometry, points_to_model)


def box_to_original(box_xyxy: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map boxes [..., 4] xyxy from model-input to original-image coordinates."""
    return _map_boxes(box_xyxy, geometry, points_to_original)


def _map_boxes(box_xyxy: np.ndarray, geometry: Geometry, map_points) -> np.ndarray:
    box = np.asarray(box_xyxy, dtype=np.float64)
    if box.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4] (x1, y1, x2, y2), got {box.shape}")
    return map_points(box.reshape(*box.shape[:-1], 2, 2), geometry).reshape(box.shape)


def _model_from_original(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) in (x, y) order such that model = original * scale - offset."""
    scale_yx = np.array(geometry.resized_hw, dtype=np.float64) / np.array(geometry.original_hw, dtype=np.float64)
    return scale_yx[::-1], np.array(geometry.crop_offset_yx[::-1], dtype=np.float64)
