"""COCO 2017 zero-shot detection: every (image, class present) pair with the class's ground-truth boxes.

Two sources with the same samples:
- the raw layout: ``ROOT/annotations/instances_val2017.json`` and ``ROOT/val2017/<file_name>``;
- TFDS ``coco/2017`` (``tensorflow-datasets``), whose boxes are normalized ``[ymin, xmin, ymax, xmax]``.

Conventions (gScoreCAM's ``evaluation/coco_eval.py`` with ``tools/iou_tool.py``):
- A COCO box ``[x, y, w, h]`` becomes ``(x, y, x + w, y + h)`` in float pixels (``xywh2xyxy``, no rounding);
  a TFDS box becomes ``(xmin * W, ymin * H, xmax * W, ymax * H)``, the same box (TFDS stored ``x / W`` ...).
- Crowd annotations: gScoreCAM's evaluation has no crowd handling: every annotation of the class in its
  metadata table is a ground-truth box, so a crowd box counts like any other (``crowd="keep"``, default).
  ``crowd="drop"`` removes crowd annotations first; a class present only as a crowd then gives no unit.
- Samples are the images with at least one annotation, in image-id order; the key is the image id.
- Classes are the categories in id order (80 for COCO 2017); TFDS labels index the same order.

`coco_seg_dataset` reads the same raw layout as semantic segmentation (the seed papers' COCO protocol): a unit is
each category present, its mask the union of its instances' masks, decoded by pycocotools (polygons and RLE,
`annToMask`'s rules). ``crowd="keep"`` counts crowd regions as the category; ``"drop"`` leaves them out of their
own category's scores (ignore pixels, but for the category's non-crowd instances under them; other categories score
them as any pixel, as COCOeval takes a crowd per category) and a category present only as a crowd gives no unit. A
category whose instances cover no pixel (polygons under a pixel, or outside the image) is not in the semantic mask
either: no unit. Polygon points must lie within one image size of the image (x in [-W, 2W], y in [-H, 2H]); a file
with a point further off is refused up front (see `_segmentation_problem`).
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional

import numpy as np

from tclip_jax.evaluation.datasets.base import Dataset, LoadedSample, Sample, Target, check_size, indexed
from tclip_jax.evaluation.datasets.options import CROWD_MODES, DEFAULT_CROWD, Crowd
from tclip_jax.files import fingerprint, loads_json
from tclip_jax.image import load_image
from tclip_jax.model.tokenizer import has_word

ANNOTATION_FILE = "annotations/instances_val2017.json"
VAL2017_SAMPLES = 4952  # the samples of the whole of val2017, crowds kept: its images with an annotation, of 5,000
IMAGE_DIR = "val2017"
TFDS_NAME = "coco/2017"

# The 80 COCO 2017 categories, id -> name, in id order (TFDS label i is the i-th of them).
COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich",
    55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake",
    62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv",
    73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven",
    80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors",
    88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, w, h]`` rows to ``(x, y, x + w, y + h)``, float64."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    with np.errstate(over="ignore"):  # x + w past the float range is inf, a box no map can overlap: IoU 0
        return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def tfds_to_xyxy(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """TFDS normalized ``[ymin, xmin, ymax, xmax]`` rows to pixel ``(x1, y1, x2, y2)``, float64."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes[:, [1, 0, 3, 2]] * np.array([width, height, width, height], dtype=np.float64)


def coco_dataset(root: str | pathlib.Path, crowd: Crowd = DEFAULT_CROWD) -> Dataset:
    """COCO val2017 from the raw layout under ``root`` (see the module doc)."""
    _check_crowd(crowd)
    annotation_path, image_dir = _raw_layout(root)
    categories, images, objects, annotations = _read_instances(annotation_path)
    samples = []
    for image_id in sorted(objects):
        kept = [(c, box) for c, box, is_crowd, _ in objects[image_id] if crowd == "keep" or not is_crowd]
        if kept:
            info = images[image_id]
            classes = np.array([c for c, _ in kept])
            boxes = xywh_to_xyxy(np.array([box for _, box in kept]))
            samples.append(Sample(str(image_id), len(samples),
                                  _raw_loader(image_dir / info["file_name"], (info["height"], info["width"]),
                                              classes, boxes)))
    _check_has_samples(len(samples), str(annotation_path), crowd)
    return Dataset("coco", tuple(c["name"] for c in categories), len(samples), indexed(samples), annotations)


def coco_seg_dataset(root: str | pathlib.Path, crowd: Crowd = DEFAULT_CROWD) -> Dataset:
    """COCO val2017 instance masks as per-category semantic masks, from the raw layout (see the module doc)."""
    _check_crowd(crowd)
    annotation_path, image_dir = _raw_layout(root)
    categories, images, objects, annotations = _read_instances(annotation_path, segmentation=True)
    samples = []
    for image_id in sorted(objects):
        if any(crowd == "keep" or not is_crowd for _, _, is_crowd, _ in objects[image_id]):
            info = images[image_id]
            samples.append(Sample(str(image_id), len(samples), functools.partial(
                _seg_load, image_dir / info["file_name"], (info["height"], info["width"]), objects[image_id], crowd)))
    _check_has_samples(len(samples), str(annotation_path), crowd)
    return Dataset("coco-seg", tuple(c["name"] for c in categories), len(samples), indexed(samples), annotations,
                   units_version=2 if crowd == "drop" else 1)  # 2: crowds per category (`Dataset.units_version`)


def _raw_layout(root: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(the instances file, the image folder) of the raw layout under `root`, which must exist."""
    root = pathlib.Path(root)
    annotation_path, image_dir = root / ANNOTATION_FILE, root / IMAGE_DIR
    for path in (root, annotation_path, image_dir):
        if not path.exists():
            up = root.parent  # --data named its val2017/ or annotations/ folder
            outer = (f" (the dataset is one level up: --data {up})"
                     if (up / ANNOTATION_FILE).exists() and (up / IMAGE_DIR).exists() else "")
            raise FileNotFoundError(f"COCO: {path} not found; expected {root}/{ANNOTATION_FILE} "
                                    f"and {root}/{IMAGE_DIR}/{outer}")
    return annotation_path, image_dir


def _seg_load(path: pathlib.Path, size_hw: tuple[int, int], objects: list, crowd: Crowd) -> LoadedSample:
    from pycocotools import mask as coco_mask

    image = load_image(path, exif=False)
    check_size(image, size_hw, path)
    height, width = size_hw
    masks: dict[int, np.ndarray] = {}
    crowds: dict[int, np.ndarray] = {}  # per category, its crowd pixels under crowd="drop"
    for class_index, _, is_crowd, segmentation in objects:
        if isinstance(segmentation, list):  # polygons
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        pixels = coco_mask.decode(rle).astype(bool)
        regions = crowds if is_crowd and crowd == "drop" else masks
        regions[class_index] = regions.get(class_index, np.zeros(size_hw, bool)) | pixels
    targets = []
    for c in sorted(masks):
        if masks[c].any():
            # A crowd is an ignore region of its own category only (COCOeval: gt "ignore" = iscrowd, per image and
            # category), less the category's non-crowd instances, which are ground truth there too; so every unit
            # keeps its mask's pixels to score.
            ignore = crowds.get(c, np.zeros(size_hw, bool)) & ~masks[c]
            targets.append(Target(c, mask=masks[c], ignore=ignore if ignore.any() else None))
    return LoadedSample(image, tuple(targets))


def _read_instances(path: pathlib.Path,
                    segmentation: bool = False) -> tuple[list[dict], dict[int, dict], dict[int, list], str]:
    """(categories in id order, images by id, per image id its (class index, xywh box, is crowd, segmentation)
    objects; segmentation is None unless asked for, then checked: polygons or an RLE of the image's size; the
    file's fingerprint, from the bytes read once).

    Every entry is checked up front; the first bad one is named by its list, position, id and field.
    """
    try:
        raw = path.read_bytes()
        data = loads_json(raw.decode("utf-8"))
    except OSError as err:  # e.g. a folder under the file's name, or a file not readable by this user
        raise ValueError(f"COCO: cannot read {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"COCO: {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise ValueError(f"COCO: {path} is not an instances file: it needs lists 'images', 'annotations' and "
                         "'categories'")

    def bad(kind: str, index: int, entry, problem: str) -> ValueError:
        named = f" (id {entry.get('id')!r})" if isinstance(entry, dict) and "id" in entry else ""
        return ValueError(f"COCO: {path}: {kind}[{index}]{named}: {problem}")

    def integer(kind, index, entry, field, minimum):
        value = entry.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise bad(kind, index, entry, f"{field} must be an integer >= {minimum}, got {value!r}")
        return value

    for index, category in enumerate(data["categories"]):
        if not isinstance(category, dict):
            raise bad("categories", index, category, "not an object")
        integer("categories", index, category, "id", 0)
        if not isinstance(category.get("name"), str) or not category["name"].strip():
            raise bad("categories", index, category, f"name must be a non-empty string, got {category.get('name')!r}")
        if not has_word(category["name"]):  # a class prompt names the class by its words
            raise bad("categories", index, category, f"name {category['name']!r} has no word (no letter or digit) "
                      "for a class prompt to name the category by")
    seen_ids = set()
    for index, category in enumerate(data["categories"]):
        if category["id"] in seen_ids:
            raise bad("categories", index, category, "this id appears twice")
        seen_ids.add(category["id"])
    categories = sorted(data["categories"], key=lambda c: c["id"])
    class_of = {c["id"]: index for index, c in enumerate(categories)}
    images = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            raise bad("images", index, image, "not an object")
        image_id = integer("images", index, image, "id", 0)
        for field in ("height", "width"):
            integer("images", index, image, field, 1)
        name = image.get("file_name")
        if not isinstance(name, str) or not name or pathlib.PurePath(name).is_absolute() or ".." in pathlib.PurePath(name).parts:
            raise bad("images", index, image, f"file_name must be a file name inside {IMAGE_DIR}/, got {name!r}")
        if image_id in images:
            raise bad("images", index, image, "this id appears twice")
        images[image_id] = image
    objects: dict[int, list[tuple[int, list[float], bool]]] = {}
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise bad("annotations", index, ann, "not an object")
        for field, known in (("category_id", class_of), ("image_id", images)):
            value = ann.get(field)  # an int first: a list or dict cannot even be looked up
            if isinstance(value, bool) or not isinstance(value, int) or value not in known:
                listed = f"; known ids: {sorted(known)}" if field == "category_id" else ""
                raise bad("annotations", index, ann, f"unknown {field} {value!r}{listed}")
        box = ann.get("bbox")
        if (not isinstance(box, list) or len(box) != 4
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) for v in box)):
            raise bad("annotations", index, ann, f"bbox must be 4 finite numbers [x, y, width, height], got {box!r}")
        if box[2] < 0 or box[3] < 0:
            raise bad("annotations", index, ann, f"bbox has a negative width or height: {box!r}")
        crowd = ann.get("iscrowd", 0)  # false / true as pycocotools reads them too (some exporters write them)
        if crowd not in (0, 1):
            raise bad("annotations", index, ann, f"iscrowd must be 0 or 1, got {crowd!r}")
        shape = None
        if segmentation:
            shape = ann.get("segmentation")
            info = images[ann["image_id"]]
            problem = _segmentation_problem(shape, info["height"], info["width"])
            if problem:
                raise bad("annotations", index, ann, problem)
        objects.setdefault(ann["image_id"], []).append((class_of[ann["category_id"]], box, bool(crowd), shape))
    return categories, images, objects, fingerprint([raw])


def _segmentation_problem(shape, height: int, width: int) -> str:
    """What is wrong with an annotation's segmentation ("" if nothing): polygons [[x, y, ...], ...] of at least
    three points, each within one image size of the image (x in [-width, 2 * width], y in [-height, 2 * height]),
    or an RLE {"size": [height, width], "counts": str or list of ints}.

    The frame keeps polygons that are clipped by the image or lie just outside it (no pixel, no unit), and refuses
    points that cannot be meant for it: pycocotools scales each point by 5, casts it to a C int and draws every
    edge point by point, so a coordinate of 1e8 takes a minute, 1e9 exhausts memory and 1e300 crashes the process.
    """
    number = lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and np.isfinite(v)  # noqa: E731
    if isinstance(shape, list):
        if not shape or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(number, p))
                                for p in shape):
            return "segmentation polygons must be lists of at least 3 (x, y) pairs of finite numbers"
        for polygon in shape:
            for x, y in zip(polygon[::2], polygon[1::2]):
                if not (-width <= x <= 2 * width and -height <= y <= 2 * height):
                    return (f"segmentation polygon point ({x!r}, {y!r}) is outside [-W, 2W] x [-H, 2H] for the "
                            f"image's W x H = {width} x {height}: too far off the image to be an outline of it")
        return ""
    if isinstance(shape, dict):
        if shape.get("size") != [height, width]:
            return f"segmentation RLE size {shape.get('size')!r} is not the image's [{height}, {width}]"
        counts = shape.get("counts")
        if isinstance(counts, str):  # pycocotools decodes a string of too few pixels into uninitialised memory
            counts = _compressed_rle_counts(counts)
        if isinstance(counts, list) and counts and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                       for c in counts) and sum(counts) == height * width:
            return ""
        return "segmentation RLE counts must be a compressed string or non-negative ints summing to height * width"
    return f"segmentation must be polygons or an RLE, got {type(shape).__name__}"


def _compressed_rle_counts(text: str) -> list[int] | None:
    """The run lengths of a compressed RLE string, decoded as pycocotools' `rleFrString` does (6-bit characters
    from '0', 5 bits of value each, a continuation bit, sign-extended; from the fourth run on, a difference from
    the run two before); None where the string is cut off or holds a character outside that alphabet."""
    counts, position = [], 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text) or not 0 <= ord(text[position]) - 48 < 64:
                return None
            chunk = ord(text[position]) - 48
            value |= (chunk & 0x1F) << (5 * shift)
            more = bool(chunk & 0x20)
            position, shift = position + 1, shift + 1
            if not more and chunk & 0x10:
                value |= -1 << (5 * shift)
        counts.append(value + (counts[-2] if len(counts) > 2 else 0))
    return counts


def tfds_coco_dataset(data_dir: str | pathlib.Path, split: str = "validation", crowd: Crowd = DEFAULT_CROWD) -> Dataset:
    """COCO 2017 from a prepared TFDS ``coco/2017`` under ``data_dir`` (needs tensorflow-datasets)."""
    _check_crowd(crowd)
    # TensorFlow's C++ start-up lines are not the user's. Since TF 2.16 the oneDNN notice comes through absl's log,
    # which TF_CPP_MIN_LOG_LEVEL does not reach; TF only reads records here (images are decoded by our loader), so
    # turning oneDNN's rewrites off changes nothing this computes.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import absl.logging
        import tensorflow_datasets as tfds
    except ImportError as err:
        # Not "pip install tensorflow-cpu": over Colab's tensorflow it installs a second copy of its files.
        raise ImportError("reading TFDS coco/2017 needs tensorflow and tensorflow-datasets (pip install "
                          "tensorflow-datasets, and tensorflow, or tensorflow-cpu, where neither is installed)") from err
    if not pathlib.Path(data_dir).is_dir():
        raise FileNotFoundError(f"TFDS data_dir {data_dir} not found")
    absl.logging.set_verbosity(absl.logging.ERROR)
    tfds.disable_progress_bar()
    builder = tfds.builder(TFDS_NAME, data_dir=str(data_dir))
    if not builder.is_prepared():
        raise FileNotFoundError(f"no prepared TFDS {TFDS_NAME} under {data_dir} (expected {builder.data_dir})")
    if split not in builder.info.splits:
        raise ValueError(f"TFDS {TFDS_NAME} has no split {split!r}; it has {sorted(builder.info.splits)}")

    def examples(image: bool) -> Iterator[Mapping[str, Any]]:
        # Images stay encoded (each is decoded by the worker that loads its sample), or are not read at all.
        skip = tfds.decode.SkipDecoding() if image else tfds.decode.PartialDecoding(
            {"image/id": True, "objects": {"label": True, "is_crowd": True}})
        dataset = builder.as_dataset(split=split, shuffle_files=False,
                                     decoders={"image": skip} if image else skip)
        return iter(tfds.as_numpy(dataset))

    order = tfds_order(examples(image=False), crowd)
    _check_has_samples(len(order), f"TFDS {TFDS_NAME} {split} under {data_dir}", crowd)
    return Dataset("coco", tuple(COCO_CATEGORIES.values()), len(order),
                   lambda limit=None: tfds_samples(examples(image=True), order, crowd, limit))


def tfds_order(examples: Iterable[Mapping[str, Any]], crowd: Crowd = DEFAULT_CROWD) -> dict[int, int]:
    """Image id -> index of the images with objects (after the crowd rule), in image id order as the raw layout
    has them; TFDS stores a split in another order."""
    _check_crowd(crowd)
    ids = sorted(int(example["image/id"]) for example in examples if _kept(example["objects"], crowd).any())
    return {image_id: index for index, image_id in enumerate(ids)}


def tfds_samples(examples: Iterable[Mapping[str, Any]], order: Mapping[int, int], crowd: Crowd = DEFAULT_CROWD,
                 limit: Optional[int] = None) -> Iterator[Sample]:
    """The samples of index below `limit` (`order`: `tfds_order`), from TFDS ``coco/2017`` examples as
    ``tfds.as_numpy`` yields them with the image undecoded, in their storage order."""
    _check_crowd(crowd)
    for example in examples:
        image_id = int(example["image/id"])
        index = order.get(image_id)
        if index is None or (limit is not None and index >= limit):
            continue
        objects = example["objects"]
        keep = _kept(objects, crowd)
        labels = np.asarray(objects["label"])[keep]
        if labels.min() < 0 or labels.max() >= len(COCO_CATEGORIES):
            raise ValueError(f"TFDS coco/2017 image {image_id}: label outside 0..{len(COCO_CATEGORIES) - 1}")
        yield Sample(str(image_id), index,
                     _tfds_loader(bytes(example["image"]), labels, np.asarray(objects["bbox"])[keep]))


def _kept(objects: Mapping[str, Any], crowd: Crowd) -> np.ndarray:
    labels = np.asarray(objects["label"])
    return np.ones(len(labels), bool) if crowd == "keep" else ~np.asarray(objects["is_crowd"], bool)


def _raw_loader(path: pathlib.Path, size_hw: tuple[int, int], classes: np.ndarray, boxes: np.ndarray):
    def load() -> LoadedSample:
        image = load_image(path, exif=False)
        check_size(image, size_hw, path)
        return LoadedSample(image, _targets(classes, boxes))
    return load


def _tfds_loader(encoded: bytes, labels: np.ndarray, normalized: np.ndarray):
    def load() -> LoadedSample:
        image = load_image(encoded, exif=False)
        return LoadedSample(image, _targets(labels, tfds_to_xyxy(normalized, *image.shape[:2])))
    return load


def _targets(classes: np.ndarray, boxes: np.ndarray) -> tuple[Target, ...]:
    return tuple(Target(int(c), boxes=boxes[classes == c]) for c in np.unique(classes))


def _check_has_samples(count: int, source: str, crowd: Crowd) -> None:
    """Refuses a source with no image to score, as VOC and ImageNet-S do, instead of an empty report."""
    if count == 0:
        what = "an annotation that is not a crowd (--crowd drop)" if crowd == "drop" else "an annotation"
        raise ValueError(f"COCO: no image of {source} has {what}")


def _check_crowd(crowd: str) -> None:
    if crowd not in CROWD_MODES:
        raise ValueError(f"crowd must be one of {CROWD_MODES}, got {crowd!r}")
