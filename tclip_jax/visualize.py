"""Pictures of TCLIP results: a heatmap overlay with its box per word, and a grid of all words."""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
from matplotlib.figure import Figure  # no pyplot: files need no display backend, and notebooks keep theirs

from tclip_jax.postprocess import Box

BOX_COLOUR = (255, 255, 255)


def normalize(heatmap: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    low, high = float(heatmap.min()), float(heatmap.max())
    return np.zeros_like(heatmap, np.float32) if high <= low else ((heatmap - low) / (high - low)).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, box: Box | None = None, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB: the image blended with the turbo-coloured min-max heatmap, and the box outlined."""
    colours = cv2.applyColorMap(np.uint8(255 * normalize(heatmap)), cv2.COLORMAP_TURBO)[..., ::-1]
    blended = cv2.addWeighted(image, 1.0 - alpha, colours, alpha, 0.0)
    if box is not None:
        thickness = max(2, round(max(image.shape[:2]) / 160))
        # Box ends are exclusive; cv2.rectangle's are inclusive.
        cv2.rectangle(blended, (int(box.x1), int(box.y1)), (int(box.x2) - 1, int(box.y2) - 1), (0, 0, 0),
                      thickness + 2)
        cv2.rectangle(blended, (int(box.x1), int(box.y1)), (int(box.x2) - 1, int(box.y2) - 1), BOX_COLOUR,
                      thickness)
    return blended


def word_grid(image: np.ndarray, titles: Sequence[str], heatmaps: Sequence[np.ndarray], boxes: Sequence[Box],
              suptitle: str, path) -> None:
    """Saves a figure: the image, then one overlay per word, titled with the prompt."""
    panels = 1 + len(heatmaps)
    columns = min(panels, 5)
    rows = math.ceil(panels / columns)
    aspect = image.shape[1] / image.shape[0]
    figure = Figure(figsize=(3.2 * columns * aspect, 3.4 * rows + 0.5))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title("image", fontsize=11)
    for axis, title, heatmap, box in zip(axes.flat[1:], titles, heatmaps, boxes):
        axis.imshow(overlay(image, heatmap, box))
        axis.set_title(title, fontsize=11)
    figure.suptitle(suptitle, fontsize=13)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def save_png(path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"could not write {path}")
