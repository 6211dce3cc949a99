"""Dataset adapters on tiny datasets written in the real formats: COCO (raw and TFDS), ImageNet-S, synthetic.

The writers here are shared with test_sweep.py.
"""
import io
import json
import pathlib
import shutil
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from tclip_jax.evaluation.datasets import (
    COCO_CATEGORIES,
    SYNTHETIC_CLASSES,
    coco_dataset,
    coco_seg_dataset,
    imagenet_class_names,
    imagenet_s_dataset,
    read_labels,
    split_wnids,
    synthetic_dataset,
    tfds_coco_dataset,
    tfds_order,
    tfds_samples,
    tfds_to_xyxy,
    voc_dataset,
    xywh_to_xyxy,
)
from tclip_jax.evaluation.datasets.base import Sample
from tclip_jax.synthetic import HELDOUT_STREAM_SEEDS, heldout_seeds, protocol_sample

CATEGORIES = [{"id": i, "name": n, "supercategory": "thing"} for i, n in COCO_CATEGORIES.items()]


# ----------------------------------------------------------------------------------------------- writers
def write_coco(root: pathlib.Path, images: dict, annotations: list, image_files: dict | None = None) -> pathlib.Path:
    """COCO raw layout. images: id -> uint8 array (stored as PNG, lossless, under a .png name);
    annotations: (image_id, category_id, [x, y, w, h], iscrowd); image_files: file name -> raw bytes to write as is
    for images listed with `"file_name"` in a dict instead of an array."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    entries = []
    for image_id, image in images.items():
        if isinstance(image, dict):  # {"file_name", "height", "width"}: the file is written from image_files
            entries.append({"id": image_id, **image})
            continue
        name = f"{image_id:012d}.png"
        Image.fromarray(image).save(root / "val2017" / name)
        entries.append({"id": image_id, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
    for name, data in (image_files or {}).items():
        (root / "val2017" / name).write_bytes(data)
    anns = [{"id": 100 + i, "image_id": image_id, "category_id": cat, "bbox": box, "iscrowd": crowd,
             "area": box[2] * box[3],
             "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0], box[1] + box[3]]]}
            for i, (image_id, cat, box, crowd) in enumerate(annotations)]
    with open(root / "annotations" / "instances_val2017.json", "w") as f:
        json.dump({"info": {}, "licenses": [], "images": entries, "annotations": anns,
                   "categories": CATEGORIES}, f)
    return root


def write_imagenet_s(root: pathlib.Path, samples: dict) -> pathlib.Path:
    """ImageNet-S layout: key 'wnid/name' -> (uint8 image, int label ids); labels as PNG with id = R + 256 * G.
    Images are PNG data under the official .JPEG names, so that their pixels are exact."""
    for key, (image, labels) in samples.items():
        wnid, name = key.split("/")
        for folder in ("validation", "validation-segmentation"):
            (root / folder / wnid).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "validation" / wnid / f"{name}.JPEG", format="PNG")
        rgb = np.stack([labels % 256, labels // 256, np.zeros_like(labels)], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "validation-segmentation" / wnid / f"{name}.png")
    return root


def build_tfds_coco(raw: pathlib.Path, data_dir: pathlib.Path) -> None:
    """Prepare a real TFDS coco/2017 from the raw layout: TFDS's own builder, its downloads served from disk."""
    import tensorflow_datasets as tfds

    downloads = data_dir.parent / "coco_downloads"
    shutil.copytree(raw, downloads)
    spare = next((raw / "val2017").iterdir())
    with Image.open(spare) as image:
        height, width = image.height, image.width
    for folder, annotation in (("train2017", "instances_train2017.json"), ("test2017", "image_info_test2017.json")):
        (downloads / folder).mkdir()  # TFDS insists on non-empty train and test splits
        shutil.copy(spare, downloads / folder / spare.name)
        with open(downloads / "annotations" / annotation, "w") as f:
            json.dump({"images": [{"id": 1, "file_name": spare.name, "height": height, "width": width}],
                       "annotations": [], "categories": CATEGORIES}, f)
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                           lambda self, urls: {name: str(downloads) for name in urls}):
        tfds.builder("coco/2017", data_dir=str(data_dir)).download_and_prepare()


def painted(height: int, width: int, regions: list) -> np.ndarray:
    """uint8 image, red channel 0, with (red value, rows slice, cols slice) regions painted."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 1] = 90
    for red, rows, cols in regions:
        image[rows, cols, 0] = red
    return image


# ------------------------------------------------------------------------------------------------- COCO
@pytest.fixture
def coco_root(tmp_path):
    images = {
        7: painted(48, 64, []),
        3: painted(40, 50, []),
        5: painted(30, 30, []),  # no annotations: not a sample
        9: painted(20, 20, []),  # only a crowd annotation
    }
    annotations = [
        (7, 10, [40.0, 0.5, 20.0, 20.25], 0),   # traffic light
        (7, 1, [5, 10, 20, 20], 0),             # person
        (7, 10, [38, 0, 24, 12], 1),            # traffic light, crowd
        (3, 89, [1.5, 2.5, 10, 12], 0),         # hair drier
        (9, 18, [0, 0, 10, 10], 1),             # dog, crowd only
    ]
    return write_coco(tmp_path / "coco", images, annotations)


def _units(dataset):
    """{key: [(class name, boxes)]} of every sample, loaded."""
    out = {}
    for sample in dataset.samples():
        loaded = sample.load()
        out[sample.key] = [(dataset.class_names[t.class_id], t.boxes.tolist()) for t in loaded.targets]
    return out


def test_coco_raw_samples_boxes_and_classes(coco_root):
    dataset = coco_dataset(coco_root)
    assert dataset.class_names == tuple(COCO_CATEGORIES.values())
    assert dataset.class_names[9] == "traffic light" and len(dataset.class_names) == 80
    assert dataset.size == 3
    assert _units(dataset) == {  # image-id order, units sorted by class, xywh -> (x, y, x + w, y + h)
        "3": [("hair drier", [[1.5, 2.5, 11.5, 14.5]])],
        "7": [("person", [[5.0, 10.0, 25.0, 30.0]]),
              ("traffic light", [[40.0, 0.5, 60.0, 20.75], [38.0, 0.0, 62.0, 12.0]])],
        "9": [("dog", [[0.0, 0.0, 10.0, 10.0]])],
    }
    loaded = next(iter(dataset.samples())).load()
    assert loaded.image.shape == (40, 50, 3) and loaded.image.dtype == np.uint8


def test_coco_crowd_drop_removes_crowd_boxes_and_crowd_only_units(coco_root):
    assert _units(coco_dataset(coco_root, crowd="drop")) == {
        "3": [("hair drier", [[1.5, 2.5, 11.5, 14.5]])],
        "7": [("person", [[5.0, 10.0, 25.0, 30.0]]), ("traffic light", [[40.0, 0.5, 60.0, 20.75]])],
    }
    with pytest.raises(ValueError, match="crowd must be one of"):
        coco_dataset(coco_root, crowd="ignore")


def test_box_conversions_by_hand():
    np.testing.assert_array_equal(xywh_to_xyxy([[1, 2, 3, 4], [0.5, 0, 10, 0.25]]),
                                  [[1, 2, 4, 6], [0.5, 0, 10.5, 0.25]])
    # TFDS rows are [ymin, xmin, ymax, xmax] / (H, W, H, W); H = 40, W = 50.
    np.testing.assert_allclose(tfds_to_xyxy([[0.25, 0.1, 0.5, 1.0]], height=40, width=50), [[5, 10, 50, 20]])


def _tfds_example(image_id, image, bboxes, labels, crowd):
    """One example as tfds.as_numpy yields coco/2017 with the image left encoded."""
    return {"image": _png(image), "image/filename": f"{image_id:012d}.jpg".encode(),
            "image/id": np.int64(image_id),
            "objects": {"bbox": np.array(bboxes, np.float32).reshape(-1, 4), "label": np.array(labels, np.int64),
                        "is_crowd": np.array(crowd, bool), "area": np.ones(len(labels), np.int64),
                        "id": np.arange(len(labels), dtype=np.int64)}}


def test_tfds_reader_on_in_memory_examples():
    examples = [
        _tfds_example(4, painted(40, 50, []), [[0.25, 0.1, 0.5, 1.0], [0.0, 0.0, 0.1, 0.2]], [9, 0], [False, True]),
        _tfds_example(2, painted(10, 20, []), [], [], []),      # no objects: skipped
        _tfds_example(6, painted(10, 20, []), [[0, 0, 1, 1]], [79], [True]),
    ]
    order = tfds_order(examples)
    assert order == {4: 0, 6: 1}  # image id order of the images with objects, as the raw layout has them
    samples = list(tfds_samples(examples, order))
    assert [(s.key, s.index) for s in samples] == [("4", 0), ("6", 1)]
    targets = samples[0].load().targets
    assert [t.class_id for t in targets] == [0, 9]
    np.testing.assert_allclose(targets[0].boxes, [[0, 0, 10, 4]], atol=1e-5)   # (0.2 * 50, 0.1 * 40)
    np.testing.assert_allclose(targets[1].boxes, [[5, 10, 50, 20]], atol=1e-5)
    assert samples[1].load().targets[0].class_id == 79
    assert tfds_order(examples, crowd="drop") == {4: 0}
    dropped = list(tfds_samples(examples, tfds_order(examples, "drop"), crowd="drop"))
    assert [s.key for s in dropped] == ["4"]
    kept = dropped[0].load().targets  # the crowd box goes with its label
    assert [t.class_id for t in kept] == [9]
    np.testing.assert_allclose(kept[0].boxes, [[5, 10, 50, 20]], atol=1e-5)
    # A limit keeps the samples of the lowest indices, whatever the storage order.
    assert [s.key for s in tfds_samples(examples[::-1], order, limit=1)] == ["4"]
    bad = [_tfds_example(1, painted(10, 10, []), [[0, 0, 1, 1]], [80], [False])]
    with pytest.raises(ValueError, match="label outside"):
        list(tfds_samples(bad, tfds_order(bad)))


def test_tfds_coco_2017_built_by_tfds_reads_like_the_raw_files(coco_root, tmp_path):
    build_tfds_coco(coco_root, tmp_path / "tfds")
    raw, tfds_data = coco_dataset(coco_root), tfds_coco_dataset(tmp_path / "tfds")
    assert tfds_data.class_names == raw.class_names
    from_raw, from_tfds = _units(raw), _units(tfds_data)
    assert sorted(from_tfds) == sorted(from_raw)
    for key, units in from_raw.items():
        assert [name for name, _ in from_tfds[key]] == [name for name, _ in units]
        for (_, boxes), (_, tfds_boxes) in zip(units, from_tfds[key]):
            np.testing.assert_allclose(tfds_boxes, boxes, atol=1e-4)  # TFDS stores float32 fractions
    images = {s.key: s.load().image for s in raw.samples()}
    for sample in tfds_data.samples():
        np.testing.assert_array_equal(sample.load().image, images[sample.key])
    with pytest.raises(ValueError, match="no split"):
        tfds_coco_dataset(tmp_path / "tfds", split="nope")
    with pytest.raises(FileNotFoundError, match="no prepared TFDS"):
        tfds_coco_dataset(tmp_path)


def test_the_tfds_install_hint_does_not_ask_for_a_tensorflow_over_an_installed_one(tmp_path, monkeypatch):
    """Without tensorflow-datasets the hint said "pip install tensorflow-cpu tensorflow-datasets", which on Colab
    installs tensorflow-cpu's files over its tensorflow: it names tensorflow-cpu only as tensorflow's alternative."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError) as refused:
        tfds_coco_dataset(tmp_path)
    assert str(refused.value) == ("reading TFDS coco/2017 needs tensorflow and tensorflow-datasets (pip install "
                                  "tensorflow-datasets, and tensorflow, or tensorflow-cpu, where neither is "
                                  "installed)")


def test_coco_bad_input(tmp_path, coco_root):
    with pytest.raises(FileNotFoundError, match="expected .*instances_val2017.json"):
        coco_dataset(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        coco_dataset(tmp_path / "flat")
    (tmp_path / "flat" / "annotations" / "instances_val2017.json").mkdir(parents=True)  # a folder of that name
    (tmp_path / "flat" / "val2017").mkdir()
    for dataset in (coco_dataset, coco_seg_dataset):  # it was a bare "[Errno 21] Is a directory: ..."
        with pytest.raises(ValueError, match=r"^COCO: cannot read .*instances_val2017\.json: Is a directory$"):
            dataset(tmp_path / "flat")
    for inner in ("val2017", "annotations"):  # the dataset's own folders named: said where it is, as VOC says it
        for dataset in (coco_dataset, coco_seg_dataset):
            with pytest.raises(FileNotFoundError) as refused:
                dataset(coco_root / inner)
            assert str(refused.value).endswith(f"/val2017/ (the dataset is one level up: --data {coco_root})")
    (coco_root / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="not an instances file"):
        coco_dataset(coco_root)
    # Nested deeper than Python's parser goes (it raised RecursionError: an internal error from the CLI).
    (coco_root / "annotations" / "instances_val2017.json").write_text("[" * 100_000 + "]" * 100_000)
    for dataset in (coco_dataset, coco_seg_dataset):
        with pytest.raises(ValueError, match=r"^COCO: .*instances_val2017\.json is not valid JSON: arrays or objects "
                                             r"nested too deeply to read: line 1 column 1 \(char 0\)$"):
            dataset(coco_root)
    bad = write_coco(tmp_path / "bad_cat", {1: painted(8, 8, [])}, [(1, 12, [0, 0, 1, 1], 0)])  # 12 is unused
    with pytest.raises(ValueError, match="unknown category_id 12"):
        coco_dataset(bad)
    wrong_size = write_coco(tmp_path / "wrong_size", {1: {"file_name": "a.png", "height": 9, "width": 8}},
                            [(1, 1, [0, 0, 1, 1], 0)], {"a.png": _png(painted(8, 8, []))})
    for dataset in (coco_dataset, coco_seg_dataset):  # a mask of the annotation's size would not fit the image
        with pytest.raises(ValueError, match="image is 8x8 .* annotation is for 9x8$"):
            next(dataset(wrong_size).samples()).load()
    # annotations exported from the EXIF-turned image: the stored grid is 8x6 and orientation 6 turns it to 6x8
    exif = Image.Exif()
    exif[0x0112] = 6
    turned, plain = io.BytesIO(), io.BytesIO()
    Image.fromarray(painted(8, 6, [])).save(turned, format="PNG", exif=exif.tobytes())
    Image.fromarray(painted(8, 6, [])).save(plain, format="PNG")
    for name, data, hint in (("turned", turned, True), ("plain", plain, False)):
        root = write_coco(tmp_path / f"{name}_size", {1: {"file_name": "a.png", "height": 6, "width": 8}},
                          [(1, 1, [0, 0, 1, 1], 0)], {"a.png": data.getvalue()})
        with pytest.raises(ValueError, match="image is 8x6 .* annotation is for 6x8") as refused:
            next(coco_dataset(root).samples()).load()
        assert ("its EXIF orientation turns it to that size" in str(refused.value)) == hint
    corrupt = write_coco(tmp_path / "corrupt", {1: {"file_name": "a.jpg", "height": 8, "width": 8}},
                         [(1, 1, [0, 0, 1, 1], 0)], {"a.jpg": b"\xff\xd8 not really a jpeg"})
    with pytest.raises(ValueError, match="cannot read image file"):
        next(coco_dataset(corrupt).samples()).load()
    crowds = write_coco(tmp_path / "crowds", {1: painted(8, 8, [])}, [(1, 1, [0, 0, 4, 4], 1)])
    for dataset in (coco_dataset, coco_seg_dataset):  # nothing left to score: refused, not an empty report
        assert dataset(crowds).size == 1
        with pytest.raises(ValueError, match=r"has an annotation that is not a crowd \(--crowd drop\)$"):
            dataset(crowds, crowd="drop")


def _edited_coco(root: pathlib.Path, edit) -> pathlib.Path:
    """A one-image COCO layout whose instances file `edit(data)` changes."""
    write_coco(root, {1: painted(8, 8, [])}, [(1, 1, [0, 0, 4, 4], 0)])
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] \(id 100\): bbox must be 4 finite numbers"),
    (lambda d: d["annotations"][0].pop("category_id"), r"annotations\[0\] \(id 100\): unknown category_id None"),
    (lambda d: d["annotations"][0].pop("image_id"), r"annotations\[0\] \(id 100\): unknown image_id None"),
    # Unhashable ids raised a bare TypeError ("unhashable type: 'list'") from the lookup, before any check.
    (lambda d: d["annotations"][0].update(category_id=[1]), r"annotations\[0\] \(id 100\): unknown category_id \[1\]; "
                                                            r"known ids: \[1, 2, "),
    (lambda d: d["annotations"][0].update(image_id={"id": 1}), r"annotations\[0\] \(id 100\): unknown image_id "
                                                               r"\{'id': 1\}$"),
    (lambda d: d["annotations"][0].update(image_id=True), r"annotations\[0\] \(id 100\): unknown image_id True$"),
    (lambda d: d["annotations"][0].update(bbox=[0, 0, 4]), r"bbox must be 4 finite numbers .* got \[0, 0, 4\]"),
    (lambda d: d["annotations"][0].update(bbox=["0", 0, 4, 4]), r"bbox must be 4 finite numbers"),
    (lambda d: d["annotations"][0].update(bbox=[0, 0, -4, 4]), r"bbox has a negative width or height"),
    (lambda d: d["annotations"][0].update(iscrowd=2), r"iscrowd must be 0 or 1"),
    (lambda d: d["images"][0].pop("file_name"), r"images\[0\] \(id 1\): file_name must be a file name"),
    (lambda d: d["images"][0].update(file_name="../../etc/passwd"), r"file_name must be a file name inside val2017"),
    (lambda d: d["images"][0].pop("height"), r"images\[0\] \(id 1\): height must be an integer >= 1, got None"),
    (lambda d: d["images"][0].update(width="8"), r"width must be an integer >= 1, got '8'"),
    (lambda d: d["categories"][0].pop("name"), r"categories\[0\] \(id 1\): name must be a non-empty string"),
    (lambda d: d["categories"].append("x"), r"categories\[80\]: not an object"),
    (lambda d: d["categories"].append({"id": 5, "name": "cat again"}), r"categories\[80\] \(id 5\): this id appears "
                                                                       r"twice$"),
    (lambda d: d.update(images={}), r"not an instances file"),
    (lambda d: d.update(images=[], annotations=[]), r"COCO: no image of .*instances_val2017.json has an annotation$"),
])
def test_bad_coco_entries_are_named_up_front(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        coco_dataset(_edited_coco(tmp_path / "coco", edit))


def test_iscrowd_written_as_a_json_boolean_is_read_as_pycocotools_reads_it(tmp_path):
    """Some exporters write "iscrowd": false / true; pycocotools reads them as 0 / 1 (Python's False == 0), and
    the whole file was refused ("iscrowd must be 0 or 1, got False")."""
    as_ints = coco_dataset(_edited_coco(tmp_path / "ints", lambda d: None))
    as_bools = coco_dataset(_edited_coco(tmp_path / "bools", lambda d: d["annotations"][0].update(iscrowd=False)))
    (ints,), (bools,) = (next(d.samples()).load().targets for d in (as_ints, as_bools))
    assert (bools.class_id, bools.boxes.tolist()) == (ints.class_id, ints.boxes.tolist())
    crowd_only = _edited_coco(tmp_path / "crowd", lambda d: d["annotations"][0].update(iscrowd=True))
    with pytest.raises(ValueError, match=r"has an annotation that is not a crowd \(--crowd drop\)$"):
        coco_dataset(crowd_only, crowd="drop")  # a crowd, as iscrowd 1 is


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- ImageNet-S
def test_imagenet_class_tables():
    names = imagenet_class_names()
    assert len(names) == 1000 and list(names) == sorted(names)
    assert names["n01440764"] == "tench" and names["n15075141"] == "toilet tissue"
    assert names["n02012849"] == names["n03126707"] == "crane"  # the bird and the machine
    splits = {k: split_wnids(k) for k in (50, 300, 919)}
    for k, wnids in splits.items():
        assert len(wnids) == len(set(wnids)) == k and list(wnids) == sorted(wnids) and set(wnids) <= set(names)
    assert set(splits[50]) < set(splits[300]) < set(splits[919])
    # ImageNet-S data.py: classes_50 starts "goldfish, tiger shark, goldfinch" and ends "lemon, carbonara, agaric".
    assert [names[w] for w in splits[50][:3]] == ["goldfish", "tiger shark", "goldfinch"]
    assert [names[w] for w in splits[50][-3:]] == ["lemon", "carbonara", "agaric"]
    assert "n01440764" not in splits[50] and "n01440764" in splits[300]  # tench
    with pytest.raises(ValueError, match="split must be one of"):
        split_wnids(100)


def _inets_samples():
    wnids = split_wnids(919)
    a = np.zeros((12, 16), np.int64)
    a[2:6, 3:9] = 301        # R 45, G 1: the 301st wnid
    a[0, :] = 1000           # ignore: R 232, G 3
    b = np.zeros((10, 10), np.int64)
    b[5:, :] = 1
    b[:2, :2] = 919
    return wnids, {f"{wnids[300]}/ILSVRC2012_val_00000001": (painted(12, 16, []), a),
                   f"{wnids[0]}/ILSVRC2012_val_00000002": (painted(10, 10, []), b)}


def test_imagenet_s_official_layout(tmp_path):
    wnids, samples = _inets_samples()
    root = write_imagenet_s(tmp_path / "ImageNetS919", samples)
    dataset = imagenet_s_dataset(root, 919)
    assert dataset.name == "imagenet-s919" and len(dataset.class_names) == 919
    assert dataset.class_names[300] == imagenet_class_names()[wnids[300]]
    loaded = {s.key: s.load() for s in dataset.samples()}
    assert list(loaded) == sorted(samples)
    first = loaded[f"{wnids[300]}/ILSVRC2012_val_00000001"]
    (target,) = first.targets
    assert target.class_id == 300 and target.boxes is None
    np.testing.assert_array_equal(target.mask, samples[f"{wnids[300]}/ILSVRC2012_val_00000001"][1] == 301)
    assert target.ignore.sum() == 16 and target.ignore[0].all()
    second = loaded[f"{wnids[0]}/ILSVRC2012_val_00000002"]
    assert [t.class_id for t in second.targets] == [0, 918]
    assert second.targets[0].mask.sum() == 50 and second.targets[1].mask.sum() == 4
    assert read_labels(root / "validation-segmentation" / wnids[0] / "ILSVRC2012_val_00000002.png")[0, 0] == 919


def test_the_imagenet_s_classes_prompted_alike_are_the_ones_the_readme_names():
    """The README names ImageNet-S919's two cranes and "Cardigan"/"cardigan" as the classes that get one prompt."""
    from tclip_jax.model.tokenizer import default_tokenizer

    tokenizer, names = default_tokenizer(), imagenet_class_names()
    for split in (50, 300, 919):
        by_tokens = {}
        for wnid in split_wnids(split):
            by_tokens.setdefault(tokenizer.encode(names[wnid]).tobytes(), []).append(names[wnid])
        alike = sorted(group for group in by_tokens.values() if len(group) > 1)
        assert alike == ([["Cardigan", "cardigan"], ["crane", "crane"]] if split == 919 else []), split


def test_imagenet_s_passes_over_hidden_entries(tmp_path):
    """A Jupyter checkpoint folder among the class folders refused the whole split as an unknown class folder."""
    wnids, samples = _inets_samples()
    root = write_imagenet_s(tmp_path / "ImageNetS919", samples)
    label_root = root / "validation-segmentation"
    before = imagenet_s_dataset(root, 919)
    label = label_root / wnids[0] / "ILSVRC2012_val_00000002.png"
    (label_root / ".ipynb_checkpoints").mkdir()
    shutil.copy(label, label_root / ".ipynb_checkpoints" / label.name)
    shutil.copy(label, label.parent / f"._{label.name}")  # macOS's AppleDouble file beside a label
    after = imagenet_s_dataset(root, 919)
    assert [s.key for s in after.samples()] == sorted(samples)
    assert after.fingerprint == before.fingerprint


def test_imagenet_s_samples_are_in_folder_then_file_name_order_whatever_the_file_system_lists(tmp_path,
                                                                                            monkeypatch):
    """Indices (so --limit and a resumed sweep) follow sorted folder and file names, not the order a file system
    lists entries in (ext4's is by hash): here listings come reversed."""
    wnids = split_wnids(50)
    keys = [f"{wnids[w]}/{name}" for w in (2, 0, 1) for name in ("c", "a", "b")]  # written out of order
    labels = {key: np.full((4, 4), wnids.index(key.split("/")[0]) + 1) for key in keys}  # each its folder's id
    root = write_imagenet_s(tmp_path / "s50", {key: (painted(4, 4, []), labels[key]) for key in keys})
    iterdir, glob = pathlib.Path.iterdir, pathlib.Path.glob
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(sorted(iterdir(self), reverse=True)))
    monkeypatch.setattr(pathlib.Path, "glob", lambda self, *args, **kwargs: iter(sorted(glob(self, *args, **kwargs),
                                                                                        reverse=True)))
    samples = list(imagenet_s_dataset(root, 50).samples())
    assert [(s.key, s.index) for s in samples] == [(key, i) for i, key in enumerate(sorted(keys))]


def test_imagenet_s_bad_input(tmp_path):
    wnids, samples = _inets_samples()
    with pytest.raises(FileNotFoundError, match="validation-segmentation"):
        imagenet_s_dataset(tmp_path / "nothing", 919)
    write_imagenet_s(tmp_path / "ImageNet-S" / "ImageNetS919", samples)  # the download's folder above the split
    with pytest.raises(FileNotFoundError, match=r"one level down: --data .*ImageNet-S/ImageNetS919\)$"):
        imagenet_s_dataset(tmp_path / "ImageNet-S", 919)
    root = write_imagenet_s(tmp_path / "s50", samples)
    folders = {key.split("/")[0] for key in samples}
    holding = next(split for split in (300, 919) if folders <= set(split_wnids(split)))  # the split to name
    with pytest.raises(ValueError, match=f"unknown class folder .*{wnids[0]} .not a wnid of ImageNet-S50.: is this "
                                         rf"ImageNet-S{holding} \(--split {holding}\)\?$"):
        imagenet_s_dataset(root, 50)
    (root / "validation-segmentation" / "n00000000").mkdir()  # a wnid of no split: no other split to name
    with pytest.raises(ValueError, match=r"n00000000 \(not a wnid of ImageNet-S919\): n00000000 is a wnid of no "
                                         r"split$"):
        imagenet_s_dataset(root, 919)
    # S50 is in S300, S300 in S919: the split named is the smallest holding every folder, not the first holding the
    # first unknown one (ImageNet-S919 data read as S50 was asked "is this ImageNet-S300?", tench being in S300).
    in_300 = next(w for w in split_wnids(300) if w not in split_wnids(50))
    only_919 = next(w for w in split_wnids(919) if w not in split_wnids(300))
    assert in_300 < only_919  # the first unknown folder is in ImageNet-S300
    s919 = write_imagenet_s(tmp_path / "s919", {f"{w}/a": (painted(4, 4, []), np.ones((4, 4), np.int64))
                                                for w in (in_300, only_919)})
    with pytest.raises(ValueError, match=rf"{in_300} \(not a wnid of ImageNet-S50\): is this ImageNet-S919 "
                                         r"\(--split 919\)\?$"):
        imagenet_s_dataset(s919, 50)
    # Folders of no split beside them (a stray tmp/): the split is judged by the folders of some split, and the
    # others are named apart (it said "it is a class of ImageNet-S300 or ImageNet-S919, but the folders are of no one
    # split", naming neither tmp nor --split 919).
    (s919 / "validation-segmentation" / "tmp").mkdir()
    with pytest.raises(ValueError, match=rf"{in_300} \(not a wnid of ImageNet-S50\): is this ImageNet-S919 "
                                         r"\(--split 919\)\? \(tmp is a wnid of no split\)$"):
        imagenet_s_dataset(s919, 50)
    for stray in ("n99999999", "a", "b", "c"):
        (s919 / "validation-segmentation" / stray).mkdir()
    with pytest.raises(ValueError, match=r"^ImageNet-S: unknown class folder \S+/a \(not a wnid of ImageNet-S919\): "
                                         r"a, b, c and 2 more are wnids of no split$"):
        imagenet_s_dataset(s919, 919)
    (root / "validation-segmentation" / "n00000000").rmdir()
    image = root / "validation" / wnids[0] / "ILSVRC2012_val_00000002.JPEG"
    image.unlink()  # its sample's error, as a missing COCO image's (a resumed sweep tries it again)
    loaded = {s.key: s for s in imagenet_s_dataset(root, 919).samples()}
    with pytest.raises(FileNotFoundError, match=f"image file not found: {image}$"):
        loaded[f"{wnids[0]}/ILSVRC2012_val_00000002"].load()
    assert loaded[f"{wnids[300]}/ILSVRC2012_val_00000001"].load().targets
    gray = write_imagenet_s(tmp_path / "gray", {f"{wnids[0]}/x": (painted(4, 4, []), np.zeros((4, 4), np.int64))})
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(gray / "validation-segmentation" / wnids[0] / "x.png")
    with pytest.raises(ValueError, match="mode L; expected RGB"):
        next(imagenet_s_dataset(gray, 919).samples()).load()
    rgba = np.zeros((4, 4, 4), np.uint8)  # id = R + 256 * G, the alpha channel aside (the official evaluator's)
    rgba[1:, :, 0], rgba[..., 3] = 1, 255
    Image.fromarray(rgba, mode="RGBA").save(gray / "validation-segmentation" / wnids[0] / "x.png")
    (target,) = next(imagenet_s_dataset(gray, 919).samples()).load().targets
    assert target.class_id == 0
    np.testing.assert_array_equal(target.mask, rgba[..., 0] == 1)
    deep = np.full((4, 4, 3), 1, np.uint16)  # id 1 as 16-bit channels: PIL reads RGB and keeps the high bytes, 0
    (gray / "validation-segmentation" / wnids[0] / "x.png").write_bytes(_png_16bit_rgb(deep))
    with Image.open(gray / "validation-segmentation" / wnids[0] / "x.png") as png:
        assert png.mode == "RGB" and not np.asarray(png).any()
    with pytest.raises(ValueError, match="has 16 bits per channel; expected 8-bit RGB"):
        next(imagenet_s_dataset(gray, 919).samples()).load()
    big = write_imagenet_s(tmp_path / "big", {f"{split_wnids(50)[0]}/x": (painted(4, 4, []), np.full((4, 4), 51))})
    with pytest.raises(ValueError, match="outside 1..50"):
        next(imagenet_s_dataset(big, 50).samples()).load()
    some_outside = np.ones((4, 4), np.int64)
    some_outside[0, 0] = 77
    some = write_imagenet_s(tmp_path / "some", {f"{split_wnids(50)[0]}/x": (painted(4, 4, []), some_outside)})
    with pytest.raises(ValueError, match=r"has class ids \[77\] outside 1..50$"):  # only the ids outside
        next(imagenet_s_dataset(some, 50).samples()).load()
    # ImageNet-S50 data (each label holds its folder's id in ImageNet-S50) read as another split is refused.
    w1, w4 = split_wnids(50)[0], split_wnids(50)[3]
    s50 = write_imagenet_s(tmp_path / "s50_data", {f"{w1}/a": (painted(4, 4, []), np.ones((4, 4), np.int64)),
                                                   f"{w4}/b": (painted(4, 4, []), np.full((4, 4), 4))})
    assert imagenet_s_dataset(s50, 50).size == 2
    for split in (300, 919):
        own = split_wnids(split).index(w1) + 1
        with pytest.raises(ValueError, match=rf"{w1} is id {own} in ImageNet-S{split} but id 1 in ImageNet-S50: "
                                             r"is this ImageNet-S50 \(--split 50\)\?"):
            imagenet_s_dataset(s50, split)
    # ImageNet-S300 data read as ImageNet-S919: its first folders have the same ids in both, so the first folder
    # whose ids differ is the one checked up front, and every label of such a folder is checked when it loads. Its
    # second folder (goldfish) has the same id in both but another in ImageNet-S50: checking the first folder whose
    # id differs in any split checked goldfish, found its own id and let ImageNet-S300 data through.
    same = [w for w in split_wnids(300) if split_wnids(919).index(w) == split_wnids(300).index(w)]
    differ = [w for w in split_wnids(300) if split_wnids(919).index(w) != split_wnids(300).index(w)]
    assert same[:2] == list(split_wnids(300)[:2]) and differ  # what made one label of the first folder too few
    assert split_wnids(50).index(same[1]) != split_wnids(300).index(same[1])
    s300_id = split_wnids(300).index(differ[0]) + 1
    s300 = write_imagenet_s(tmp_path / "s300_data", {
        f"{same[0]}/a": (painted(4, 4, []), np.ones((4, 4), np.int64)),
        f"{same[1]}/c": (painted(4, 4, []), np.full((4, 4), split_wnids(300).index(same[1]) + 1)),
        f"{differ[0]}/b": (painted(4, 4, []), np.full((4, 4), s300_id))})
    with pytest.raises(ValueError, match=rf"but id {s300_id} in ImageNet-S300: is this ImageNet-S300"):
        imagenet_s_dataset(s300, 919)
    later = write_imagenet_s(tmp_path / "s300_later", {
        f"{differ[0]}/a": (painted(4, 4, []), np.full((4, 4), split_wnids(919).index(differ[0]) + 1)),
        f"{differ[0]}/b": (painted(4, 4, []), np.full((4, 4), s300_id))})
    first, second = imagenet_s_dataset(later, 919).samples()
    assert [t.class_id for t in first.load().targets] == [split_wnids(919).index(differ[0])]
    with pytest.raises(ValueError, match="is this ImageNet-S300"):
        second.load()
    (big / "validation-segmentation" / split_wnids(50)[0] / "x.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read ImageNet-S label .*x.png"):
        next(imagenet_s_dataset(big, 50).samples()).load()
    empty = tmp_path / "empty"
    (empty / "validation").mkdir(parents=True)
    (empty / "validation-segmentation").mkdir()
    with pytest.raises(ValueError, match="no label PNGs"):
        imagenet_s_dataset(empty, 50)


# -------------------------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("protocol", ["captions", "bare_words", "wrong_attribute", "many_objects"])
def test_synthetic_targets_are_the_protocol_units(protocol):
    """One target per unit of `protocol_sample`: the word inside its prompt, its referents' silhouettes and boxes,
    its kind (and place, for many_objects) as the group, and the wrongly named object's silhouette."""
    dataset = synthetic_dataset(3, protocol)
    assert dataset.name == f"synthetic-{protocol}"
    assert dataset.class_names[:6] == ("red", "green", "blue", "yellow", "purple", "orange")
    assert len(dataset.class_names) == len(set(dataset.class_names)) == 6 + 7 + 4
    for sample, seed in zip(dataset.samples(), heldout_seeds(3), strict=True):
        expected, loaded = protocol_sample(protocol, seed), sample.load()
        assert sample.key == str(seed)
        np.testing.assert_array_equal(loaded.image, expected.scene.image)
        assert len(loaded.targets) == len(expected.units) > 0
        for target, unit in zip(loaded.targets, expected.units):
            start, end = target.query.span
            assert SYNTHETIC_CLASSES[target.class_id] == unit.word == target.query.prompt[start:end]
            assert target.query.prompt == unit.prompt
            regions = [expected.scene.objects[i].region for i in unit.referents]
            np.testing.assert_array_equal(target.mask, np.logical_or.reduce(regions))
            np.testing.assert_array_equal(target.boxes, [expected.scene.objects[i].box for i in unit.referents])
            assert target.group == (f"{unit.kind} {unit.position}" if protocol == "many_objects" else unit.kind)
            if protocol == "wrong_attribute":
                assert target.wrong_mask is not None and not (target.wrong_mask & target.mask).any()
            else:
                assert target.wrong_mask is None
    with pytest.raises(ValueError, match="count >= 1"):
        synthetic_dataset(0)
    with pytest.raises(ValueError, match="unknown synthetic protocol 'nope'"):
        synthetic_dataset(1, "nope")


def test_synthetic_samples_are_made_as_they_are_iterated(monkeypatch):
    """`tclip sweep synthetic --limit 100000000` made every Sample up front, growing to many GB before the first
    scene: a synthetic dataset makes each as it is reached, in index order, whatever its count."""
    import tclip_jax.evaluation.datasets.synthetic as module

    made = []
    monkeypatch.setattr(module, "Sample", lambda *fields: made.append(fields) or Sample(*fields))
    dataset = synthetic_dataset(HELDOUT_STREAM_SEEDS, "bare_words")  # the most there are
    assert dataset.size == HELDOUT_STREAM_SEEDS and not made
    samples = dataset.samples()
    first = next(samples)
    assert len(made) == 1 and (first.key, first.index) == (str(heldout_seeds(1)[0]), 0)
    assert [(s.key, s.index) for s in dataset.samples(4)] == [(str(seed), i) for i, seed in enumerate(heldout_seeds(4))]
    assert len(made) == 5
    with pytest.raises(ValueError, match=f"at most {HELDOUT_STREAM_SEEDS - 3} held-out seeds"):
        synthetic_dataset(HELDOUT_STREAM_SEEDS - 2, offset=3)


# ------------------------------------------------------------------------------------ segmentation: VOC, COCO
def _png_16bit_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG of uint16 [H, W, 3], written by hand (PIL writes none)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write_voc(root: pathlib.Path, samples: dict, split_lines: list[str] | None = None) -> pathlib.Path:
    """VOC2012 layout: id -> (uint8 image, class indices); labels as palette PNGs, images PNG data under .jpg."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id, (image, labels) in samples.items():
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", format="PNG")
        png = Image.fromarray(labels.astype(np.uint8), mode="P")
        png.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        png.save(root / "SegmentationClass" / f"{image_id}.png")
    lines = split_lines if split_lines is not None else list(samples)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(lines) + "\n")
    return root


def test_voc_units_are_the_classes_present_with_their_masks_and_ignore_pixels(tmp_path):
    labels = np.zeros((20, 30), np.int64)
    labels[2:8, 3:9] = 15          # person
    labels[10:18, 12:25] = 12      # dog
    labels[9, :] = 255             # a border: ignored
    labels[0:2, 25:30] = 20        # tv monitor: the devkit's last class index
    other = np.zeros((12, 12), np.int64)
    other[4:9, 4:9] = 1            # aeroplane
    root = write_voc(tmp_path / "VOC2012", {"2007_000032": (painted(20, 30, []), labels),
                                            "2007_000039": (painted(12, 12, []), other)},
                     split_lines=["2007_000039", "2007_000032"])
    dataset = voc_dataset(root)
    assert dataset.name == "voc2012-val" and len(dataset.class_names) == 20 and dataset.class_names[0] == "aeroplane"
    samples = list(dataset.samples())
    assert [s.key for s in samples] == ["2007_000039", "2007_000032"]  # the split file's order
    first, second = (s.load() for s in samples)
    assert [t.class_id for t in first.targets] == [0] and first.targets[0].ignore is None
    np.testing.assert_array_equal(first.targets[0].mask, other == 1)
    assert [dataset.class_names[t.class_id] for t in second.targets] == ["dog", "person", "tv monitor"]
    for target, index in zip(second.targets, (12, 15, 20)):
        np.testing.assert_array_equal(target.mask, labels == index)
        np.testing.assert_array_equal(target.ignore, labels == 255)
    # The same indices in a grayscale (L) PNG, as some converters write them, read the same.
    Image.fromarray(labels.astype(np.uint8), mode="L").save(root / "SegmentationClass" / "2007_000032.png")
    again = samples[1].load()
    assert [t.class_id for t in again.targets] == [t.class_id for t in second.targets]
    for target, index in zip(again.targets, (12, 15, 20)):
        np.testing.assert_array_equal(target.mask, labels == index)


def test_voc_bad_input_is_named(tmp_path):
    labels = np.zeros((8, 8), np.int64)
    labels[1:3, 1:3] = 21  # no such class
    root = write_voc(tmp_path / "bad", {"a": (painted(8, 8, []), labels)})
    with pytest.raises(ValueError, match=r"class indices \[21\] outside 0..20 and 255"):
        next(voc_dataset(root).samples()).load()
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nmissing\n")
    with pytest.raises(FileNotFoundError, match="line 2: .*SegmentationClass/missing.png not found"):
        voc_dataset(root)
    shutil.copy(root / "SegmentationClass" / "a.png", root / "SegmentationClass" / "missing.png")
    missing = voc_dataset(root).samples()  # a missing image is its sample's error, as a COCO image's
    next(missing)
    with pytest.raises(FileNotFoundError, match=f"image file not found: {root / 'JPEGImages' / 'missing.jpg'}$"):
        next(missing).load()
    (root / "ImageSets/Segmentation/val.txt").write_text("a\n\na\n")  # line numbers count the blank line
    with pytest.raises(ValueError, match=r"val.txt line 3: a is listed again \(line 1\)$"):
        voc_dataset(root)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n")
    with pytest.raises(ValueError, match="lists no image ids"):
        voc_dataset(root)
    (root / "ImageSets/Segmentation/test.txt").mkdir()  # a folder of the split file's name
    with pytest.raises(ValueError, match=r"^VOC: cannot read .*test\.txt: Is a directory$"):
        voc_dataset(root, "test")
    Image.fromarray(painted(8, 8, [])).save(root / "SegmentationClass" / "a.png")  # RGB, not a palette PNG
    (root / "ImageSets/Segmentation/val.txt").write_text("a\n")
    with pytest.raises(ValueError, match="expected a palette"):
        next(voc_dataset(root).samples()).load()
    with pytest.raises(FileNotFoundError, match="VOC: .* not found"):
        voc_dataset(tmp_path / "nowhere")
    # A split file saved with a byte-order mark (as Windows editors do) lists the same ids.
    (root / "ImageSets/Segmentation/val.txt").write_bytes("a\r\n".encode("utf-8-sig"))
    assert [sample.key for sample in voc_dataset(root).samples()] == ["a"]
    # The VOCdevkit folder above the dataset is named with the folder to give instead.
    devkit = tmp_path / "VOCdevkit"
    root.rename(devkit.mkdir() or devkit / "VOC2012")
    for above in (devkit, tmp_path):  # VOCdevkit, and the archive's folder above it
        with pytest.raises(FileNotFoundError, match=f"not found; .*further down: --data {devkit / 'VOC2012'}\\)$"):
            voc_dataset(above)


def test_label_files_in_postscript_are_no_images_and_ghostscript_never_runs(tmp_path, fake_ghostscript):
    """Label PNGs are read by PIL alone, as images are: PIL would render an EPS by running the program gs."""
    from conftest import EPS_BYTES
    from tclip_jax.evaluation.datasets.voc import read_voc_labels

    (tmp_path / "label.png").write_bytes(EPS_BYTES)
    with pytest.raises(ValueError, match=r"^cannot read ImageNet-S label .*label\.png: the file is not an image PIL can decode$"):
        read_labels(tmp_path / "label.png")
    with pytest.raises(ValueError, match=r"^cannot read VOC label .*label\.png: the file is not an image PIL can decode$"):
        read_voc_labels(tmp_path / "label.png")
    assert not fake_ghostscript.exists()


def _column_major_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a mask, by an explicit walk in column-major order (runs start with zeros)."""
    counts, current, run = [], False, 0
    for value in mask.T.reshape(-1):
        if bool(value) != current:
            counts.append(run)
            current, run = bool(value), 0
        run += 1
    counts.append(run)
    return counts


def test_coco_seg_masks_are_the_union_of_instance_masks(tmp_path):
    from pycocotools import mask as coco_mask

    height, width = 24, 32
    dog_a = np.zeros((height, width), bool)
    dog_a[2:9, 3:12] = True
    dog_b = np.zeros((height, width), bool)
    dog_b[15:20, 20:30] = True
    crowd = np.zeros((height, width), bool)
    crowd[0:4, 25:31] = True
    compressed = coco_mask.encode(np.asfortranarray(dog_b.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()
    root = write_coco(tmp_path / "coco", {4: painted(height, width, [])}, [])
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    polygon = [[12.0, 12.0, 20.0, 12.0, 20.0, 18.0, 12.0, 18.0]]  # a person, as a polygon
    anns = [(18, {"size": [height, width], "counts": _column_major_rle(dog_a)}, 0),
            (18, compressed, 0), (1, polygon, 0),
            (18, {"size": [height, width], "counts": _column_major_rle(crowd)}, 1)]
    data["annotations"] = [{"id": i, "image_id": 4, "category_id": c, "bbox": [0, 0, 1, 1], "iscrowd": k,
                            "segmentation": s} for i, (c, s, k) in enumerate(anns)]
    path.write_text(json.dumps(data))
    names = coco_seg_dataset(root).class_names
    loaded = next(coco_seg_dataset(root).samples()).load()
    person, dog = loaded.targets
    assert (names[person.class_id], names[dog.class_id]) == ("person", "dog")
    np.testing.assert_array_equal(dog.mask, dog_a | dog_b | crowd)  # crowd regions count by default
    assert person.mask[13:18, 13:20].all() and not person.mask[:10].any() and not person.mask[:, :11].any()
    dropped = next(coco_seg_dataset(root, crowd="drop").samples()).load()
    np.testing.assert_array_equal(dropped.targets[1].mask, dog_a | dog_b)
    np.testing.assert_array_equal(dropped.targets[1].ignore, crowd)
    # Instances that cover no pixel (under a pixel; outside the image) leave a category out of the semantic mask,
    # and a category with pixels as it was.
    empty = [(3, [[5.1, 5.1, 5.3, 5.1, 5.2, 5.3]], 0), (1, [[40.0, 30.0, 50.0, 30.0, 50.0, 40.0]], 0)]
    whole = data["annotations"]
    data["annotations"] = whole + [{"id": 10 + i, "image_id": 4, "category_id": c, "bbox": [0, 0, 1, 1],
                                    "iscrowd": k, "segmentation": s} for i, (c, s, k) in enumerate(empty)]
    assert not any(coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(s, height, width))).any()
                   for _, s, _ in empty)
    path.write_text(json.dumps(data))
    again = next(coco_seg_dataset(root).samples()).load()
    assert [t.class_id for t in again.targets] == [person.class_id, dog.class_id]
    for before, after in zip(loaded.targets, again.targets):
        np.testing.assert_array_equal(after.mask, before.mask)
    data["annotations"] = data["annotations"][-2:]  # only those: the image is in the dataset, with no unit
    path.write_text(json.dumps(data))
    assert next(coco_seg_dataset(root).samples()).load().targets == ()
    data["annotations"] = whole
    data["annotations"][0]["segmentation"] = {"size": [height, width + 1], "counts": [1]}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[0\] \(id 0\): segmentation RLE size .* is not the image's"):
        coco_seg_dataset(root)
    # Polygons of under three points are refused up front: pycocotools reads one of four numbers as a box
    # [x, y, w, h] and raises TypeError at load time, which would stop a sweep.
    for polygon in ([[1, 2, 3]], [[1, 2, 3, 4]]):
        data["annotations"][0]["segmentation"] = polygon
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match="polygons must be lists of at least 3"):
            coco_seg_dataset(root)


def test_coco_seg_crowd_drop_ignores_a_crowd_for_its_own_category_only(tmp_path):
    """COCOeval takes ground truths per (image, category) with ignore = iscrowd: a person crowd is an ignore region
    of person alone, and a non-crowd person under it is ground truth. All persons' crowd was every category's
    ignore: a dog under it lost its pixels, and a crowd over the whole image made the dog's unit all ignore pixels,
    the image an error."""
    from tclip_jax.evaluation.options import EvalOptions
    from tclip_jax.evaluation.scoring import mask_scores

    height, width = 20, 24
    root = write_coco(tmp_path / "coco", {4: painted(height, width, [])}, [])
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())

    def loaded(rectangles):  # (category id, rows, cols, iscrowd), each an RLE mask of that rectangle
        anns = []
        for i, (category, rows, cols, is_crowd) in enumerate(rectangles):
            pixels = np.zeros((height, width), bool)
            pixels[rows, cols] = True
            anns.append({"id": i, "image_id": 4, "category_id": category, "bbox": [0, 0, 1, 1], "iscrowd": is_crowd,
                         "segmentation": {"size": [height, width], "counts": _column_major_rle(pixels)}})
        data["annotations"] = anns
        path.write_text(json.dumps(data))
        dataset = coco_seg_dataset(root, crowd="drop")
        return {dataset.class_names[t.class_id]: t for t in next(dataset.samples()).load().targets}

    person_crowd, person, dog = (slice(0, 10), slice(None)), (slice(5, 15), slice(2, 8)), (slice(5, 15), slice(14, 20))
    targets = loaded([(1, *person_crowd, 1), (1, *person, 0), (18, *dog, 0)])
    expected = {name: np.zeros((height, width), bool) for name in ("person", "dog", "ignore")}
    expected["person"][person] = expected["dog"][dog] = True
    expected["ignore"][person_crowd] = True
    expected["ignore"][person] = False  # the non-crowd person's pixels count
    np.testing.assert_array_equal(targets["person"].mask, expected["person"])
    np.testing.assert_array_equal(targets["person"].ignore, expected["ignore"])
    np.testing.assert_array_equal(targets["dog"].mask, expected["dog"])
    assert targets["dog"].ignore is None  # the person crowd is no dog's ignore region

    targets = loaded([(1, slice(None), slice(None), 1), (18, *dog, 0)])  # a person crowd over the whole image
    assert list(targets) == ["dog"] and targets["dog"].ignore is None
    relevance = np.zeros((height, width))
    relevance[dog] = 1.0
    scores = mask_scores(relevance, relevance, targets["dog"].mask, targets["dog"].ignore, EvalOptions())
    assert (scores["pixel_labeled"], scores["pixel_correct"]) == (height * width, height * width)


def test_coco_seg_polygon_points_far_off_the_image_are_refused_up_front(tmp_path):
    """pycocotools scales polygon points by 5, casts them to C int and draws each edge point by point: a coordinate
    of 1e300 crashed the process, 1e9 exhausted memory. Points must lie in [-W, 2W] x [-H, 2H]."""
    height, width = 24, 32
    root = write_coco(tmp_path / "coco", {4: painted(height, width, [])}, [])
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())

    def with_polygon(polygon):
        data["annotations"] = [{"id": 7, "image_id": 4, "category_id": 1, "bbox": [0, 0, 1, 1], "iscrowd": 0,
                                "segmentation": [polygon]}]
        path.write_text(json.dumps(data))
        return root

    # The frame's corners are accepted, and the polygon they make covers every pixel of the image.
    frame = [-width, -height, 2 * width, -height, 2 * width, 2 * height, -width, 2 * height]
    (person,) = next(coco_seg_dataset(with_polygon(frame)).samples()).load().targets
    assert person.mask.shape == (height, width) and person.mask.all()
    far = [[0, 0, 1e300, 0, 0, 1e300], [20, 10, 50, 10, 50, 1e9], [0, 0, 1e8, 0, 0, 5],
           [0, 0, 2 * width + 0.5, 0, 0, 5], [0, 0, 5, 0, 5, -height - 0.5], [-width - 1, 0, 5, 0, 5, 5]]
    for polygon in far:
        with pytest.raises(ValueError, match=r"annotations\[0\] \(id 7\): segmentation polygon point .* is outside "
                           r"\[-W, 2W\] x \[-H, 2H\] for the image's W x H = 32 x 24"):
            coco_seg_dataset(with_polygon(polygon))


def test_compressed_rle_strings_are_decoded_as_pycocotools_does_and_must_cover_the_image():
    """A string of too few pixels was taken, and pycocotools filled the rest of the mask from uninitialised memory."""
    from pycocotools import mask as coco_mask

    from tclip_jax.evaluation.datasets.coco import _compressed_rle_counts, _segmentation_problem

    rng = np.random.default_rng(0)
    for height, width, density in [(24, 32, 0.5), (40, 30, 0.02), (7, 900, 0.98), (64, 64, 0.0)]:
        mask = rng.random((height, width)) < density
        mask[height // 3:, width // 4: width // 2] = True  # long runs: multi-character and negative differences
        text = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        assert _compressed_rle_counts(text) == _column_major_rle(mask)
        assert _segmentation_problem({"size": [height, width], "counts": text}, height, width) == ""
    short = coco_mask.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))["counts"].decode()
    assert "RLE counts must be" in _segmentation_problem({"size": [48, 64], "counts": short}, 48, 64)
    # Runs of more pixels than the image has: pycocotools refuses them only at load time (a sweep would stop).
    too_long = {"size": [2, 2], "counts": [2, 3]}
    with pytest.raises(ValueError, match="Invalid RLE mask representation"):
        coco_mask.decode(coco_mask.frPyObjects(too_long, 2, 2))
    assert "RLE counts must be" in _segmentation_problem(too_long, 2, 2)
    assert _segmentation_problem({"size": [2, 2], "counts": [2, 2]}, 2, 2) == ""
    for bad in ("", "\x7f", "0Z" + "o"):  # empty; outside the alphabet; a continuation that never ends
        assert "RLE counts must be" in _segmentation_problem({"size": [1, 1], "counts": bad}, 1, 1)
