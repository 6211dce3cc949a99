"""Zero-shot boxes from a heatmap: min-max to uint8, threshold (Otsu or fixed), keep the largest region.

Conventions:
- Boxes are pixel coordinates ``(x1, y1, x2, y2)`` with exclusive end (``x2 = x + w``), as gScoreCAM's
  ``[x, y, x+w, y+h]``.
- The heatmap is scaled exactly as gScoreCAM does (``cv2.normalize(..., NORM_MINMAX, 0, 255, CV_8UC1)``);
  foreground is ``gray > t``, with ``t`` from Otsu or ``t = round(threshold * 255)`` (Python rounding).
- Two rules pick the region:
  ``"component"`` (default): the largest 8-connected component by pixel count, TCLIP's "tight box around
  the largest component". It is the default because it is what the method describes, and a pixel
  count is not fooled by a thin, sprawling region whose bounding box is large.
  ``"contour"``: gScoreCAM's evaluation rule, the external contour (``RETR_EXTERNAL``) whose bounding
  rectangle has the largest area ``w * h``; use it to reproduce the gScoreCAM benchmark numbers.
- Ties go to the first candidate (the lowest component label in OpenCV's labelling order, its 2x2-block scan,
  which is not always row-major; the first contour in OpenCV's order), as ``argmax`` does in gScoreCAM.
- Empty foreground happens only for a map that scales to all zeros: a constant one, or one whose range is
  below float64's epsilon (``cv2.normalize``'s own test). The ``"contour"`` rule then
  returns gScoreCAM's dummy box ``(0, 0, 1, 1)``; the ``"component"`` rule returns the whole image, since a
  constant map marks every pixel as equally relevant.
- Speed (`boxes` processes many maps; the single-map functions share its code): the uint8 image is
  ``cv2.normalize``'s own (not ``cv2.convertScaleAbs`` with its scale and shift, which would save normalize's
  min/max pass but takes the absolute value: OpenCV converts in float32, and on a nearly constant map
  cancellation leaves values below -0.5, which it would turn into large grays), Otsu is ``cv2.threshold``'s
  (OpenCV's Otsu runs on Intel IPP where the wheel has it, whose choice between exactly tied thresholds differs
  from OpenCV's C code and from any closed form tried, so it is not recomputed in numpy), and the largest
  component is labelled on the foreground's bounding rectangle (cropped at even offsets, which keeps OpenCV's
  2x2-block scan and so its label order) without per-label statistics: the areas come from a histogram of the
  labels and only the winner's box is measured.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import cv2
import numpy as np

from tclip_jax.postprocess._scratch import scratch

BoxRule = Literal["component", "contour"]
BOX_RULES: tuple[str, ...] = get_args(BoxRule)

_UINT8_MAX = 255


class Box(NamedTuple):
    """Pixel box ``(x1, y1, x2, y2)``, end exclusive."""

    x1: int
    y1: int
    x2: int
    y2: int


GSCORECAM_DUMMY_BOX = Box(0, 0, 1, 1)


def uint8_minmax(heatmap: np.ndarray) -> np.ndarray:
    """Min-max scale a 2-D map to uint8 0..255 with OpenCV's rounding; a constant map becomes all zeros."""
    values = _checked_map(heatmap)
    _finite_range(values)
    return _normalize_uint8(values)


def _checked_map(heatmap: np.ndarray, name: str = "heatmap") -> np.ndarray:
    """A 2-D float32 or float64 view/copy of one map, validated non-empty and real (finiteness: `_finite_range`)."""
    values = np.asarray(heatmap)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {values.shape}")
    if np.iscomplexobj(values):
        raise ValueError(f"{name} must be real, got {values.dtype} values")
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)  # OpenCV has no float16/bool path; float32 stays as gScoreCAM passes it
    return values


def _finite_range(values: np.ndarray, name: str = "heatmap") -> tuple[float, float]:
    """(min, max) of a map whose values and range are finite; numpy's min/max propagate NaN, so a NaN or infinite
    value makes one of them non-finite."""
    lo, hi = float(values.min()), float(values.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if not math.isfinite(hi - lo):
        raise ValueError(f"the range of {name} overflows float64 (its values span {lo:g} to {hi:g}); rescale it")
    return lo, hi


def _normalize_uint8(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``cv2.normalize(values, out, 0, 255, NORM_MINMAX, CV_8UC1)``: gScoreCAM's conversion, saturating (no
    absolute value); a map whose range is at most float64's epsilon becomes all zeros."""
    return cv2.normalize(values, out, 0, _UINT8_MAX, cv2.NORM_MINMAX, cv2.CV_8U)


def _threshold_gray(gray: np.ndarray, threshold: float | None, out: np.ndarray | None = None
                    ) -> tuple[np.ndarray, float]:
    """(uint8 mask 0/255 of ``gray > t``, t) with Otsu's t when ``threshold`` is None."""
    if threshold is None:
        t, mask = cv2.threshold(gray, 0, _UINT8_MAX, cv2.THRESH_BINARY + cv2.THRESH_OTSU, dst=out)
        return mask, float(t)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1) (fraction of the map's range), got {threshold}")
    t = float(round(threshold * _UINT8_MAX))
    return cv2.threshold(gray, t, _UINT8_MAX, cv2.THRESH_BINARY, dst=out)[1], t


def foreground(heatmap: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Return the boolean foreground ``gray > t`` and ``t`` (uint8 units); ``threshold=None`` means Otsu."""
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1) (fraction of the map's range), got {threshold}")
    mask, t = _threshold_gray(uint8_minmax(heatmap), threshold)
    return mask > 0, t


def contour_boxes(mask: np.ndarray) -> list[Box]:
    """Bounding boxes of the external contours of a boolean mask, in OpenCV's contour order."""
    contours, _ = cv2.findContours(_as_uint8_mask(mask), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append(Box(x, y, x + w, y + h))
    return boxes


def largest_component_box(mask: np.ndarray) -> Box | None:
    """Tight box around the largest 8-connected component by pixel count; None for an empty mask."""
    return _largest_component(_as_uint8_mask(mask))


_LABELS_16U_MAX_PIXELS = 2**24  # float32 histogram counts stay exact below this
_FEW_LABELS = 12


def _largest_component(mask: np.ndarray) -> Box | None:
    """`largest_component_box` of a uint8 mask (nonzero = foreground)."""
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0:
        return None
    x0, y0 = x & ~1, y & ~1  # even offsets keep OpenCV's 2x2-block scan, hence its label order
    crop = mask[y0:y + h, x0:x + w]
    if crop.size < _LABELS_16U_MAX_PIXELS:
        try:
            count, labels = cv2.connectedComponents(crop, labels=scratch("labels", crop.shape, np.uint16),
                                                    connectivity=8, ltype=cv2.CV_16U)
        except cv2.error:  # more than 65534 components
            count = -1
        if count == 2:  # one component: the foreground's bounding rectangle
            return Box(x, y, x + w, y + h)
        if count > 2:
            # Labels are compared in numpy: cv2.compare takes a Python number for a 4-element Scalar, which it
            # compares element by element with a 4x1 label array (a thin vertical crop) instead of broadcasting.
            if count <= _FEW_LABELS:  # a pass per label beats calcHist, slow on long runs of one label
                areas = [int(np.count_nonzero(labels == k)) for k in range(1, count)]
            else:
                areas = cv2.calcHist([labels], [0], None, [count], [0, count]).ravel()[1:]
            best = 1 + int(np.argmax(areas))  # the first of equal areas, as argmax over stats
            bx, by, bw, bh = cv2.boundingRect((labels == best).view(np.uint8))
            return Box(x0 + bx, y0 + by, x0 + bx + bw, y0 + by + bh)
    count, _, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    bx, by, bw, bh = (int(v) for v in stats[label, :4])  # LEFT, TOP, WIDTH, HEIGHT
    return Box(x0 + bx, y0 + by, x0 + bx + bw, y0 + by + bh)


def _box_of_mask(mask: np.ndarray, rule: BoxRule) -> Box:
    if rule == "component":
        box = _largest_component(mask)
        return Box(0, 0, mask.shape[1], mask.shape[0]) if box is None else box
    boxes_ = contour_boxes(mask)
    if not boxes_:
        return GSCORECAM_DUMMY_BOX
    return boxes_[int(np.argmax([(b.x2 - b.x1) * (b.y2 - b.y1) for b in boxes_]))]


def _check_rule(rule: str, threshold: float | None = None) -> None:
    if rule not in BOX_RULES:
        raise ValueError(f"rule must be one of {BOX_RULES}, got {rule!r}")
    if threshold is not None and not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1) (fraction of the map's range), got {threshold}")


def checked_map_box(values: np.ndarray, threshold: float | None = None, rule: BoxRule = "component") -> Box:
    """`heatmap_box` of a validated 2-D float map whose values are known to be finite."""
    gray = _normalize_uint8(values, scratch("gray", values.shape, np.uint8))
    mask, _ = _threshold_gray(gray, threshold, out=scratch("mask", values.shape, np.uint8))
    return _box_of_mask(mask, rule)


def heatmap_boxes(maps, rule: BoxRule = "component", threshold: float | None = None,
                  covered: tuple[slice, slice] | None = None) -> list[Box]:
    """`heatmap_box` of every map of ``maps`` ([Q, H, W] or a sequence of 2-D maps, of any shapes).

    ``covered`` (an index of rows and columns, `Geometry.covered`): the part of each map the model saw; the box
    is found there alone (min-max, threshold, regions), in the map's coordinates, and the rest is ignored.
    """
    _check_rule(rule, threshold)
    out = []
    for heatmap in maps:
        values = _checked_map(heatmap)
        window = covered_window(values.shape, covered)
        region = values if window is None else values[window]
        _finite_range(region)
        out.append(box_in_map(checked_map_box(region, threshold, rule), window))
    return out


def covered_window(shape: tuple[int, ...], covered: tuple[slice, slice] | None) -> tuple[slice, slice] | None:
    """``covered`` as (rows, columns) slices of non-negative start and stop within a map of ``shape``, or None
    when it is the whole map (or None); refused if empty or strided."""
    if covered is None:
        return None
    if not (isinstance(covered, tuple) and len(covered) == 2 and all(isinstance(c, slice) for c in covered)):
        raise ValueError(f"covered must be a (rows, columns) pair of slices (Geometry.covered), got {covered!r}")
    spans = [(0 if c.start is None else c.start, n if c.stop is None else c.stop, c.step)
             for c, n in zip(covered, shape[-2:])]
    if not all(isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer)) and step in (None, 1)
               and 0 <= start < stop <= n for (start, stop, step), n in zip(spans, shape[-2:])):
        raise ValueError(f"covered {covered} is not a non-empty window of a {shape[-2]}x{shape[-1]} map (the "
                         "Geometry.covered of another image?)")
    if all(stop - start == n for (start, stop, _), n in zip(spans, shape[-2:])):
        return None
    return tuple(slice(int(start), int(stop)) for start, stop, _ in spans)


def box_in_map(box: Box, window: tuple[slice, slice] | None) -> Box:
    """A box found in a `covered_window`, in the whole map's coordinates (gScoreCAM's dummy box of an empty
    foreground too: it is (0, 0, 1, 1) of the window)."""
    if window is None:
        return box
    y0, x0 = window[0].start, window[1].start
    return Box(box.x1 + x0, box.y1 + y0, box.x2 + x0, box.y2 + y0)


def heatmap_box(heatmap: np.ndarray, threshold: float | None = None, rule: BoxRule = "component",
                covered: tuple[slice, slice] | None = None) -> Box:
    """Box of the largest foreground region of ``heatmap`` (Otsu when ``threshold`` is None), within ``covered``
    if given (`heatmap_boxes`)."""
    _check_rule(rule, threshold)
    return heatmap_boxes([heatmap], rule, threshold, covered)[0]


def otsu_box(heatmap: np.ndarray, rule: BoxRule = "component", covered: tuple[slice, slice] | None = None) -> Box:
    """TCLIP's zero-shot box: Otsu foreground, then the largest region under ``rule`` (within ``covered``)."""
    return heatmap_box(heatmap, None, rule, covered)


def _as_uint8_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    return (mask != 0).astype(np.uint8)
