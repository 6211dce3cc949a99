"""How the model input was cut from the original image, and the way back: maps and points to the original.

Coordinates are continuous pixel-edge coordinates: pixel (row i, col j) covers [j, j+1) x [i, i+1), its centre
is (j + 0.5, i + 0.5), and a frame of size (h, w) spans [0, w] x [0, h]. Boxes are xyxy in these coordinates
(exclusive end, as ``cv2.boundingRect`` gives ``[x, y, x + w, y + h]``).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How the model input was cut from the original image.

    The original (H, W) is resized (PIL bicubic) to ``resized_hw``; the model input is the ``input_hw`` window of
    the resized image whose top-left corner is ``crop_offset_yx``. Without a crop, resized == input and offset 0.
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

    @property
    def covered(self) -> tuple[slice, slice]:
        """The original pixels the model input covers, as an index (rows, columns): those whose centre falls
        inside the model input frame (edges included). All of the image unless a centre crop cut some off; the
        maps on the original image fill the rest (`to_original`), and the host step fits its thresholds here."""
        return tuple(_covered_span(*axis) for axis in zip(self.original_hw, self.resized_hw, self.input_hw,
                                                           self.crop_offset_yx))


def _covered_span(original: int, resized: int, model: int, offset: int) -> slice:
    # Centre i lies at resized / original * (i + 0.5) - offset model pixels; times 2 * original, in integers, so
    # that a centre exactly on an edge is inside whatever floating point would make of it.
    twice_centres = (2 * np.arange(original, dtype=np.int64) + 1) * resized - 2 * offset * original
    inside = np.flatnonzero((twice_centres >= 0) & (twice_centres <= 2 * model * original))  # one run
    return slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0)


def to_original(heatmap, geometry: Geometry, fill: float | Literal["min"] = "min") -> np.ndarray:
    """Bilinearly resample a map covering the model input onto the original image: [..., gh, gw] -> [..., H, W].

    The map may have any resolution (the model input's, or the patch grid's): it is taken to span the model
    input frame. Each original pixel centre is mapped into that frame and sampled with the
    ``upsample_bilinear`` convention. Pixels whose centre falls outside the frame (cut off by a centre crop: all
    but `Geometry.covered`) get ``fill``: ``"min"`` (default) uses each map's own minimum so that they read as
    background; pass a number, e.g. ``np.nan``, to mark them instead. Returns a new float32 array.

    It runs on the host, in numpy (a jax array is fetched first), so no image size compiles a program: this is how
    `explain` and `tclip sweep` resize every map (`Method.original_maps`), one computation for both. A resample
    compiled per image size cost 0.45-0.5 s and about 5 MB kept for ever, per size; numpy, map by map, takes about
    as long as XLA:CPU's run of it (2 loaded cores, 2026-12-07: 109 maps of 224 x 224 to 640 x 480 in 0.31 s
    against 0.21 s, 28 to 2000 x 1500 in 0.53 s against 0.43 s; numpy on the whole stack at once took 2.5 and 3.7 s).
    """
    from tclip_jax.image.resample import bilinear_taps, resample

    fill_with_min = isinstance(fill, str) and fill == "min"
    if not (fill_with_min or isinstance(fill, (int, float, np.floating, np.integer))):
        raise ValueError(f"fill must be 'min' or a number, got {fill!r}")
    if np.ndim(heatmap) < 2:
        raise ValueError(f"heatmap must have at least 2 axes [..., gh, gw], got shape {np.shape(heatmap)}")
    heatmap = np.asarray(heatmap, dtype=np.float32)
    taps = []
    for original, grid, resized, model, offset in zip(
        geometry.original_hw, heatmap.shape[-2:], geometry.resized_hw, geometry.input_hw, geometry.crop_offset_yx
    ):
        grid_per_model = grid / model
        taps.append(bilinear_taps(original, grid, resized / original * grid_per_model, -offset * grid_per_model))
    resampled = resample(heatmap, *taps)  # numpy: a new array
    inside = []  # per axis: whether each original row / column is covered
    for span, original in zip(geometry.covered, geometry.original_hw):
        covered = np.zeros(original, bool)
        covered[span] = True
        inside.append(covered)
    if inside[0].all() and inside[1].all():  # no crop: nothing to fill
        return resampled
    fill_value = heatmap.min(axis=(-2, -1), keepdims=True) if fill_with_min else np.float32(fill)
    np.copyto(resampled, fill_value, where=~(inside[0][:, None] & inside[1][None, :]))
    return resampled


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
