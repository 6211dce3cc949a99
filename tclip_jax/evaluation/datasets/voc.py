"""PASCAL VOC 2012 segmentation (val): every (image, class present) pair with the class's mask.

Official layout under ``ROOT`` (``VOCdevkit/VOC2012``): ``ImageSets/Segmentation/val.txt`` (one image id per
line), ``JPEGImages/<id>.jpg`` and ``SegmentationClass/<id>.png``, a palette PNG whose indices are the class:
0 = background, 1..20 = VOC_CLASSES, 255 = ignore (object borders and difficult regions).

A unit is each class index 1..20 present; its mask is ``label == index`` and its ignore region ``label == 255``
(left out of the segmentation scores). Samples follow the order of the split file; the key is the image id.
Every listed id needs its label PNG up front (the labels are the annotations); a missing image is its sample's
error, which a resumed sweep tries again.
"""
from __future__ import annotations

import functools
import pathlib

import numpy as np

from tclip_jax.evaluation.datasets.base import Dataset, LoadedSample, Sample, Target, check_size, indexed
from tclip_jax.files import fingerprint
from tclip_jax.image import load_image
from tclip_jax.image.io import read_raster

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table",
               "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor")
IGNORE_INDEX = 255
SPLIT_FILE = "ImageSets/Segmentation/{split}.txt"
IMAGE_DIR, LABEL_DIR = "JPEGImages", "SegmentationClass"


def voc_dataset(root: str | pathlib.Path, split: str = "val") -> Dataset:
    """The images of VOC 2012 segmentation ``split`` under ``root`` (see the module doc)."""
    root = pathlib.Path(root)
    split_path = root / SPLIT_FILE.format(split=split)
    for path in (root, split_path, root / IMAGE_DIR, root / LABEL_DIR):
        if not path.exists():
            below = next((root / sub for sub in ("VOC2012", "VOCdevkit/VOC2012")
                          if (root / sub / SPLIT_FILE.format(split=split)).exists()), None)
            inner = f" (the dataset is further down: --data {below})" if below is not None else ""
            raise FileNotFoundError(f"VOC: {path} not found; expected {root}/{SPLIT_FILE.format(split=split)}, "
                                    f"{root}/{IMAGE_DIR}/ and {root}/{LABEL_DIR}/{inner}")
    try:  # utf-8-sig: a byte-order mark (Windows editors write one) is no part of the first id
        ids = [(line, text.strip()) for line, text in
               enumerate(split_path.read_text(encoding="utf-8-sig").splitlines(), 1) if text.strip()]
    except OSError as err:  # e.g. a folder under the file's name, or a file not readable by this user
        raise ValueError(f"VOC: cannot read {split_path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"VOC: {split_path} is not a text file of image ids: {err}") from None
    if not ids:
        raise ValueError(f"VOC: {split_path} lists no image ids")
    samples, first_line = [], {}
    for line, image_id in ids:
        if "/" in image_id or image_id.startswith(".") or len(image_id.split()) != 1:
            raise ValueError(f"VOC: {split_path} line {line}: {image_id!r} is not an image id")
        if image_id in first_line:  # its records would clash under one key, and the report would refuse them
            raise ValueError(f"VOC: {split_path} line {line}: {image_id} is listed again (line {first_line[image_id]})")
        first_line[image_id] = line
        image_path, label_path = root / IMAGE_DIR / f"{image_id}.jpg", root / LABEL_DIR / f"{image_id}.png"
        if not label_path.is_file():  # an image is read by its sample (a missing one is its error, as in COCO)
            raise FileNotFoundError(f"VOC: {split_path} line {line}: {label_path} not found")
        samples.append(Sample(image_id, len(samples), functools.partial(_load, image_path, label_path)))
    labels = [split_path.read_bytes(), *(f"{s.key}\0{(root / LABEL_DIR / f'{s.key}.png').stat().st_size}".encode()
                                         for s in samples)]
    return Dataset(f"voc2012-{split}", VOC_CLASSES, len(samples), indexed(samples), fingerprint(labels))


def read_voc_labels(path: pathlib.Path) -> np.ndarray:
    """Class indices [H, W] of a VOC palette PNG (a file that cannot be read: ValueError, `read_raster`)."""
    def indices(png) -> np.ndarray:
        if png.mode not in ("P", "L"):
            raise ValueError(f"it has PIL mode {png.mode}; expected a palette (P) PNG of class indices")
        return np.asarray(png).astype(np.int64)

    return read_raster(path, indices, "VOC label")


def _load(image_path: pathlib.Path, label_path: pathlib.Path) -> LoadedSample:
    image = load_image(image_path, exif=False)
    labels = read_voc_labels(label_path)
    check_size(image, labels.shape, image_path)
    present = np.unique(labels)
    bad = present[(present > len(VOC_CLASSES)) & (present != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(f"VOC label {label_path} has class indices {bad.tolist()} outside 0..20 and 255")
    ignore = labels == IGNORE_INDEX
    return LoadedSample(image, tuple(Target(int(i) - 1, mask=labels == i, ignore=ignore if ignore.any() else None)
                                     for i in present if 1 <= i <= len(VOC_CLASSES)))
