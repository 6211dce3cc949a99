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
- Ties go to the first candidate (lowest component label, i.e. first in row-major order; first contour in
  OpenCV's order), as ``argmax`` does in gScoreCAM.
- Empty foreground happens only for a constant map (it scales to all zeros). The ``"contour"`` rule then
  returns gScoreCAM's dummy box ``(0, 0, 1, 1)``; the ``"component"`` rule returns the whole image, since a
  constant map marks every pixel as equally relevant.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import cv2
import numpy as np

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
    values = np.asarray(heatmap)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {values.shape}")
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)  # OpenCV has no float16/bool path; float32 stays as gScoreCAM passes it
    if not np.isfinite(values).all():
        raise ValueError("heatmap contains NaN or infinite values")
    return cv2.normalize(values, None, 0, _UINT8_MAX, cv2.NORM_MINMAX, cv2.CV_8UC1)


def foreground(heatmap: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Return the boolean foreground ``gray > t`` and ``t`` (uint8 units); ``threshold=None`` means Otsu."""
    gray = uint8_minmax(heatmap)
    if threshold is None:
        t, _ = cv2.threshold(gray, 0, _UINT8_MAX, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must lie in [0, 1) (fraction of the map's range), got {threshold}")
        t = float(round(threshold * _UINT8_MAX))
    return gray > t, float(t)


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
    count, _, stats, _ = cv2.connectedComponentsWithStats(_as_uint8_mask(mask), connectivity=8)
    if count == 1:  # label 0 is the background
        return None
    label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[label, :4])  # LEFT, TOP, WIDTH, HEIGHT
    return Box(x, y, x + w, y + h)


def heatmap_box(heatmap: np.ndarray, threshold: float | None = None, rule: BoxRule = "component") -> Box:
    """Box of the largest foreground region of ``heatmap`` (Otsu when ``threshold`` is None)."""
    mask, _ = foreground(heatmap, threshold)
    if rule == "component":
        box = largest_component_box(mask)
        return Box(0, 0, mask.shape[1], mask.shape[0]) if box is None else box
    if rule == "contour":
        boxes = contour_boxes(mask)
        if not boxes:
            return GSCORECAM_DUMMY_BOX
        return boxes[int(np.argmax([(b.x2 - b.x1) * (b.y2 - b.y1) for b in boxes]))]
    raise ValueError(f"rule must be one of {BOX_RULES}, got {rule!r}")


def otsu_box(heatmap: np.ndarray, rule: BoxRule = "component") -> Box:
    """TCLIP's zero-shot box: Otsu foreground, then the largest region under ``rule``."""
    return heatmap_box(heatmap, None, rule)


def _as_uint8_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    return (mask != 0).astype(np.uint8)
