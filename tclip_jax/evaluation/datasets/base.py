"""What every evaluation dataset provides: class names and samples whose image and ground truth load on demand.

A sample is one image; each of its targets is one evaluation unit, an (image, class present) pair. Images are
decoded as stored (``load_image(..., exif=False)``), without applying EXIF orientation, because annotations are
drawn on the stored pixel grid (as pycocotools, gScoreCAM's ``Image.open`` and ImageNet-S's evaluator read them).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Optional

import numpy as np

from tclip_jax.image.io import image_size
from tclip_jax.methods.base import Query


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """Ground truth of one class present in an image; a dataset gives boxes, a mask, or both.

    Its map is of the class prompt unless the target brings its own `query` (e.g. a word of the image's caption);
    `group` names a kind of target that reports summarize separately (e.g. colour or shape words; "colour N",
    "shape N" or "relation N", a word kind at place N, also counts in that kind: `sweep.report.unit_groups`);
    `wrong_mask` is an object the map must *not* point at (a prompt naming the wrong attribute), scored as ``wrong_pointing``.
    """

    class_id: int                        # index into Dataset.class_names
    boxes: Optional[np.ndarray] = None   # float64 [n, 4] (x1, y1, x2, y2), any box is a correct detection
    mask: Optional[np.ndarray] = None    # bool [H, W] the class's pixels
    ignore: Optional[np.ndarray] = None  # bool [H, W] pixels left out of the segmentation scores
    query: Optional[Query] = None
    group: Optional[str] = None
    wrong_mask: Optional[np.ndarray] = None  # bool [H, W]


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedSample:
    image: np.ndarray                    # uint8 [H, W, 3]
    targets: tuple[Target, ...]          # one per class present, sorted by class_id (or one per query)


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    key: str                             # unique and stable across runs: results are resumed by key
    index: int                           # position in the dataset's order (COCO: image id order), from 0
    load: Callable[[], LoadedSample]     # reads and decodes; raises ValueError/FileNotFoundError on bad data


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """`samples(limit)` yields the samples of index below `limit` (all for None), each once, in any order (a
    TFDS split yields them in its storage order), so a limit selects the same samples whatever the source.
    `fingerprint` is a digest of the annotations it was read from (COCO: the instances file; ImageNet-S and VOC:
    the names and sizes of the label files, and VOC's split list; "" where there is none to take: TFDS, generated
    data; `tclip_jax.files.fingerprint`), which a resumed sweep checks: records scored on other annotations must not mix with new ones.
    `units_version` goes up where the units read from the same annotations changed (coco-seg ``--crowd drop``: 2,
    each crowd the ignore region of its own category only since 2026-12-06), so that a resumed sweep does not mix
    old units with new ones either."""

    name: str
    class_names: tuple[str, ...]
    size: int                                                  # number of samples
    samples: Callable[[Optional[int]], Iterator[Sample]]
    fingerprint: str = ""
    units_version: int = 1


def indexed(samples: list[Sample]) -> Callable[[Optional[int]], Iterator[Sample]]:
    """`Dataset.samples` of a list already in the dataset's order."""
    return lambda limit=None: iter(samples[:limit])


def check_size(image: np.ndarray, expected_hw: tuple[int, int], path: str | os.PathLike) -> None:
    """Refuses an image decoded as stored from `path` whose size is not its annotation's; where the file's EXIF
    orientation turns it to the annotated size (annotations exported from turned images), the message says so."""
    if image.shape[:2] == tuple(expected_hw):
        return
    turned = image.shape[1::-1] == tuple(expected_hw) and image_size(path, exif=True) == tuple(expected_hw)
    hint = ("; its EXIF orientation turns it to that size, but annotations are read on the stored pixel grid "
            "(were they made on the turned image?)") if turned else ""
    raise ValueError(f"{os.fspath(path)}: image is {image.shape[0]}x{image.shape[1]} (HxW) but the annotation is "
                     f"for {expected_hw[0]}x{expected_hw[1]}{hint}")
