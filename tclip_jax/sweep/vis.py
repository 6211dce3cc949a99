"""Per-unit pictures: the image under the map (jet colour map), ground truth in green, predicted box in red."""
from __future__ import annotations

import pathlib
import re

import cv2
import numpy as np

from tclip_jax.evaluation.datasets.base import Target
from tclip_jax.postprocess import uint8_minmax

_GREEN, _RED = (0, 200, 0), (0, 0, 255)  # BGR
_MAP_WEIGHT = 0.5


def vis_path(folder: pathlib.Path, key: str, class_name: str) -> pathlib.Path:
    """A file name from the sample key and the class, with anything unusual replaced by '_'."""
    return folder / (re.sub(r"[^A-Za-z0-9._-]", "_", f"{key}__{class_name}") + ".png")


def save_unit_vis(path: pathlib.Path, image: np.ndarray, heatmap: np.ndarray, target: Target, unit: dict) -> None:
    colour = cv2.applyColorMap(uint8_minmax(heatmap), cv2.COLORMAP_JET)
    picture = cv2.addWeighted(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), 1 - _MAP_WEIGHT, colour, _MAP_WEIGHT, 0)
    if target.mask is not None:
        contours, _ = cv2.findContours(target.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, _GREEN, 1)
    for x1, y1, x2, y2 in [] if target.boxes is None else target.boxes:
        cv2.rectangle(picture, (int(x1), int(y1)), (int(np.ceil(x2)) - 1, int(np.ceil(y2)) - 1), _GREEN, 1)
    if "box" in unit:
        x1, y1, x2, y2 = unit["box"]
        cv2.rectangle(picture, (x1, y1), (x2 - 1, y2 - 1), _RED, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), picture):
        raise OSError(f"could not write {path}")
