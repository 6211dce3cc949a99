"""ImageNet-S (splits 50, 300, 919) validation set: every (image, class present) pair with the class's mask.

Official layout under ``ROOT`` (e.g. ``ImageNetS50``):
``ROOT/validation/<wnid>/<name>.JPEG`` and ``ROOT/validation-segmentation/<wnid>/<name>.png``.

Conventions (LUSSeg/ImageNet-S):
- A label PNG holds ``id = R + 256 * G`` per pixel: 0 = background, ``IGNORE_ID`` (1000) = ignore, and
  ``1..n`` the ``id``-th wnid of the split's sorted wnid list (``split_wnids``); class index = ``id - 1``.
- A unit is each class id present in the label map; its mask is ``label == id``, its ignore region
  ``label == 1000`` (left out of the segmentation scores).
- Samples are the annotated images (those with a label PNG), sorted by ``<wnid>/<name>``, which is the key; a
  missing image is its sample's error (as in COCO), which a resumed sweep tries again.
  Hidden entries (a name starting with ".": Jupyter's ``.ipynb_checkpoints``, macOS's ``._<name>.png``) are
  tools' files, not the dataset's, and are passed over.
- Ids depend on the split (a wnid's id in ImageNet-S50 is another in ImageNet-S300): data of another split than
  the one asked for is refused up front when, for some other split, the first label of the first folder whose id
  differs between the two misses its own id and holds that split's id of that folder (the first folders of
  ImageNet-S300 have the ids they have in ImageNet-S919; its second, goldfish, differs from ImageNet-S50 only), and
  each such label is an error of its sample.
- Class names are the first WordNet lemma of each wnid (``imagenet_class_names``), as ImageNet-S names them.
  ImageNet-S919 merged five ImageNet classes into others (e.g. n04356056 "sunglasses" into n04355933
  "sunglass"); their images carry the surviving class's id and name.
"""
from __future__ import annotations

import functools
import pathlib

import numpy as np

from tclip_jax.evaluation.datasets.base import Dataset, LoadedSample, Sample, Target, check_size, indexed
from tclip_jax.evaluation.datasets.options import SPLITS
from tclip_jax.files import fingerprint
from tclip_jax.image import load_image
from tclip_jax.image.io import read_raster
from tclip_jax.evaluation.metrics.imagenet_s import IGNORE_ID, decode_label_png

VALIDATION_IMAGES = {50: 752, 300: 4097, 919: 12419}  # each split's annotated validation images (its README's table)
IMAGE_DIR = "validation"
LABEL_DIR = "validation-segmentation"
_DATA = pathlib.Path(__file__).resolve().parent / "data"


@functools.lru_cache(maxsize=None)
def imagenet_class_names() -> dict[str, str]:
    """wnid -> class name (first lemma) of the 1000 ImageNet-1k classes, in wnid order."""
    rows = (line.split("\t") for line in (_DATA / "imagenet_classes.tsv").read_text().splitlines())
    return {wnid: lemmas.split(", ")[0] for wnid, lemmas in rows}


@functools.lru_cache(maxsize=None)
def split_wnids(split: int) -> tuple[str, ...]:
    """The sorted wnids of ImageNet-S ``split``; label id k >= 1 is entry k - 1."""
    if split not in SPLITS:
        raise ValueError(f"ImageNet-S split must be one of {SPLITS}, got {split!r}")
    return tuple((_DATA / f"imagenet_s_{split}.txt").read_text().split())


def _other_split_hint(split: int, folders: set[str]) -> str:
    """": is this ImageNet-S300 (--split 300)?": the smallest split whose wnids are all the class folders of some
    split (S50 is in S300, S300 in S919: the first split holding one folder may not hold them all), where it is not
    `split`; and the folders of no split, the first few, named apart (a stray tmp/ beside ImageNet-S919's folders
    read as S50: ": is this ImageNet-S919 (--split 919)? (tmp is a wnid of no split)")."""
    of_split = {other: set(split_wnids(other)) for other in SPLITS}
    known = {folder for folder in folders if any(folder in wnids for wnids in of_split.values())}
    holding = [other for other in SPLITS if known <= of_split[other]] if known else []
    question = f": is this ImageNet-S{holding[0]} (--split {holding[0]})?" if holding and holding[0] != split else ""
    foreign = sorted(folders - known)
    if not foreign:
        return question
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    said = f"{shown} {'is a wnid' if len(foreign) == 1 else 'are wnids'} of no split"
    return f"{question} ({said})" if question else f": {said}"


def imagenet_s_dataset(root: str | pathlib.Path, split: int) -> Dataset:
    """The annotated validation images of ImageNet-S ``split`` under ``root`` (see the module doc)."""
    wnids = split_wnids(split)
    root = pathlib.Path(root)
    image_root, label_root = root / IMAGE_DIR, root / LABEL_DIR
    for path in (root, image_root, label_root):
        if not path.is_dir():
            inner = root / f"ImageNetS{split}"
            hint = f" (the split's folder is one level down: --data {inner})" if (inner / LABEL_DIR).is_dir() else ""
            raise FileNotFoundError(f"ImageNet-S: folder {path} not found; expected {root}/{IMAGE_DIR}/<wnid>/*.JPEG "
                                    f"and {root}/{LABEL_DIR}/<wnid>/*.png{hint}")
    folders, known = sorted(p for p in label_root.iterdir() if p.is_dir() and not _hidden(p)), set(wnids)
    unknown = [folder for folder in folders if folder.name not in known]
    if unknown:
        raise ValueError(f"ImageNet-S: unknown class folder {unknown[0]} (not a wnid of ImageNet-S{split})"
                         f"{_other_split_hint(split, {folder.name for folder in folders})}")
    samples = []
    for folder in folders:
        for label_path in sorted(p for p in folder.glob("*.png") if not _hidden(p)):
            image_path = image_root / folder.name / f"{label_path.stem}.JPEG"  # a missing one: its sample's error
            samples.append(Sample(f"{folder.name}/{label_path.stem}", len(samples),
                                  functools.partial(_load, image_path, label_path, split)))
    if not samples:
        raise ValueError(f"ImageNet-S: no label PNGs under {label_root}/<wnid>/")
    # Per other split, its first folder whose id differs from this split's tells the two apart.
    for other in [o for o in SPLITS if o != split]:
        telling = next((s for s in samples if _ids_differ(s.key.split("/")[0], split, other)), None)
        if telling is not None:
            _check_split(label_root / f"{telling.key}.png", split)  # the key is <wnid>/<name>
    names = imagenet_class_names()
    labels = fingerprint(f"{s.key}\0{(label_root / f'{s.key}.png').stat().st_size}".encode() for s in samples)
    return Dataset(f"imagenet-s{split}", tuple(names[w] for w in wnids), len(samples), indexed(samples), labels)


def _hidden(path: pathlib.Path) -> bool:
    """Whether `path` is a hidden entry, a tool's file beside the dataset's (see the module doc)."""
    return path.name.startswith(".")


def _ids_differ(wnid: str, split: int, other: int) -> bool:
    """Whether `wnid`'s label id in `split` is another in split `other`, which has it."""
    return wnid in split_wnids(other) and split_wnids(other).index(wnid) != split_wnids(split).index(wnid)


def _check_split(label_path: pathlib.Path, split: int, ids: set | None = None) -> None:
    """Refuses a label of another split (see the module doc); an unreadable label is left to its sample's
    record. `ids`: the label's ids, where already read."""
    if ids is None:
        try:
            ids = set(np.unique(read_labels(label_path)).tolist())
        except (ValueError, OSError):
            return
    ids = ids - {0, IGNORE_ID}
    wnid = label_path.parent.name
    own = split_wnids(split).index(wnid) + 1
    if own in ids:
        return
    for other in SPLITS:
        if other != split and wnid in split_wnids(other) and split_wnids(other).index(wnid) + 1 in ids:
            raise ValueError(f"ImageNet-S: {label_path} holds class ids {sorted(ids)}; its folder {wnid} is id {own} "
                             f"in ImageNet-S{split} but id {split_wnids(other).index(wnid) + 1} in ImageNet-S{other}: "
                             f"is this ImageNet-S{other} (--split {other})?")


def read_labels(path: pathlib.Path) -> np.ndarray:
    """Class ids [H, W] int64 of an ImageNet-S label PNG (a file that cannot be read: ValueError, `read_raster`)."""
    def ids(png) -> np.ndarray:
        if png.mode not in ("RGB", "RGBA"):
            raise ValueError(f"it has PIL mode {png.mode}; expected RGB with id = R + 256*G")
        if any(";16" in str(tile.args) for tile in png.tile):  # PIL keeps each channel's high byte: ids lost
            raise ValueError("it has 16 bits per channel; expected 8-bit RGB with id = R + 256*G")
        return decode_label_png(np.asarray(png))

    return read_raster(path, ids, "ImageNet-S label")


def _load(image_path: pathlib.Path, label_path: pathlib.Path, split: int) -> LoadedSample:
    num_classes = len(split_wnids(split))
    image = load_image(image_path, exif=False)
    labels = read_labels(label_path)
    check_size(image, labels.shape, image_path)
    ids = np.unique(labels)
    _check_split(label_path, split, set(ids.tolist()))
    ids = ids[(ids != 0) & (ids != IGNORE_ID)]
    outside = ids[(ids < 0) | (ids > num_classes)]
    if outside.size:
        raise ValueError(f"ImageNet-S label {label_path} has class ids {outside.tolist()} outside 1..{num_classes}")
    ignore = labels == IGNORE_ID
    return LoadedSample(image, tuple(Target(int(i) - 1, mask=labels == i, ignore=ignore) for i in ids))
