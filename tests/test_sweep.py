"""Sweeps end to end: hand-computed scores with a stand-in method, one real TCLIP run checked against the
explainer, resume after SIGKILL, 4 simulated devices, two jax.distributed processes, and bad input.

The stand-in method ``Painted`` paints nothing itself: the map of class k is 1 where an image's red channel
equals k + 1 and 0 elsewhere, so the test images below decide every map, box and score exactly.
"""
import dataclasses
import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from references import first_fingerprint
from tclip_jax.checkpoints.load import load_clip
from tclip_jax.cli import main
from tclip_jax.evaluation.datasets import (SYNTHETIC_CLASSES, coco_dataset, coco_seg_dataset, imagenet_s_dataset,
                                      split_wnids, synthetic_dataset, voc_dataset)
from tclip_jax.evaluation.metrics import (
    box_iou,
    energy_in_mask,
    energy_pointing_game,
    normalize_relevance,
    pointing_game,
    pointing_hit,
    segmentation_scores,
)
from tclip_jax.evaluation.options import EvalOptions
from tclip_jax.image import Geometry
from tclip_jax.methods import METHODS
from tclip_jax.evaluation.scoring import score_unit
from tclip_jax.methods.base import HostMaps, MapOutput, Method, QueryArrays, recorded_maps_version
from tclip_jax.methods.tclip import TCLIP
from tclip_jax.postprocess import heatmap_box
from tclip_jax.postprocess.boxes import box_in_map
from tclip_jax.synthetic import heldout_seeds, protocol_sample
from tclip_jax.sweep import ResultWriter, RunOptions, class_queries, read_all_records, read_records, run_sweep
from tclip_jax.sweep.vis import file_stem
from tclip_jax.evaluation.metrics import mask_box
from test_datasets import build_tfds_coco, painted, write_coco, write_imagenet_s, write_voc

TESTS = pathlib.Path(__file__).resolve().parent
STALL_ENV = "TCLIP_TEST_STALL_AFTER"  # StallingPainted: images a process prepares before it stalls
RELEASE_ENV = "TCLIP_TEST_STALL_RELEASE"  # StallingPainted: a path whose file, once there, ends the stall
FAIL_ENV = "TCLIP_TEST_FAIL"  # FailingPainted: set in the process whose host step raises


# -------------------------------------------------------------------------------------- stand-in method
_prepared = {"count": 0, "lock": threading.Lock()}


class Painted(Method):
    """`--method test_sweep:Painted`: the map of class k is (red == k + 1); no model, the image itself is the input."""

    name = "painted"

    @classmethod
    def from_pretrained(cls, name_or_path=None, activation=None, dtype=None, **settings):
        return cls(None, cls.Settings.from_dict(settings))

    @property
    def params(self):
        return {}

    def run_info(self) -> dict:
        return {"method": self.name, "model": {"origin": "none", "source": "none"},
                "settings": self.settings.to_dict(), "input_protocol": "identity"}

    def prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, Geometry]:
        size = rgb.shape[:2]
        return rgb.astype(np.float32), Geometry(size, size, size, (0, 0))

    def encode(self, queries, label_set=None) -> QueryArrays:
        return QueryArrays(np.array([list(label_set).index(q.prompt) + 1 for q in queries], np.float32))

    def maps(self, params, pixels, queries, rows) -> MapOutput:
        codes = queries.per_query[rows]                                                 # [B, K]
        return MapOutput((pixels[:, None, :, :, 0] == codes[:, :, None, None]).astype(jnp.float32))


class StallingPainted(Painted):
    """The same maps; preparing stalls after $TCLIP_TEST_STALL_AFTER images, so a kill lands mid-sweep, until the
    file $TCLIP_TEST_STALL_RELEASE names exists (for ever without one)."""

    name = "painted"  # the same maps: one method, so a sweep of either resumes with the other

    def prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, Geometry]:
        with _prepared["lock"]:
            _prepared["count"] += 1
            stall = _prepared["count"] > int(os.environ.get(STALL_ENV, "1000000"))
        release = os.environ.get(RELEASE_ENV)
        while stall and not (release and os.path.exists(release)):
            time.sleep(0.1)
        return super().prepare(rgb)


class FailingPainted(Painted):
    """The same maps; the host step raises a bug (not bad data: the sweep stops) in a process started with
    $TCLIP_TEST_FAIL set."""

    name = "painted"

    def postprocess(self, *args, **kwargs):
        if os.environ.get(FAIL_ENV):
            raise RuntimeError("a bug in this process only")
        return super().postprocess(*args, **kwargs)


class InvertedPainted(Painted):
    """Painted's maps inverted, with no name of its own: another method than Painted, whose name it inherits."""

    def maps(self, params, pixels, queries, rows) -> MapOutput:
        return MapOutput(1.0 - super().maps(params, pixels, queries, rows).maps)


def gscorecam_iou(a, b) -> float:
    """gScoreCAM's compute_iou written out: inclusive areas, empty if x2 <= x1 or y2 <= y1, eps 1e-6."""
    def area(x1, y1, x2, y2):
        return 0.0 if x2 <= x1 or y2 <= y1 else (x2 - x1 + 1) * (y2 - y1 + 1)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return inter / (area(*a) + area(*b) - inter + 1e-6)


def _report(out: pathlib.Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _cli(*args: str) -> list[str]:
    return ["sweep", *args, "--no-progress"]


# ------------------------------------------------------------------------------------ COCO, hand-computed
PERSON, TRAFFIC_LIGHT, DOG, HAIR_DRIER = 0, 9, 16, 78  # class indices; codes are index + 1


@pytest.fixture(scope="module")
def coco_hand(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_hand") / "coco"
    images = {
        1: painted(48, 64, [(PERSON + 1, slice(10, 30), slice(5, 25)),
                            (TRAFFIC_LIGHT + 1, slice(0, 10), slice(40, 60))]),
        2: painted(48, 64, [(PERSON + 1, slice(40, 48), slice(40, 64)),
                            (DOG + 1, slice(20, 40), slice(0, 30)), (DOG + 1, slice(0, 5), slice(50, 55)),
                            (HAIR_DRIER + 1, slice(0, 20), slice(0, 20))]),
        3: {"file_name": "000000000003.jpg", "height": 48, "width": 64},  # corrupt file
        4: painted(48, 64, []),                                              # no annotations
    }
    annotations = [
        (1, 1, [5, 10, 20, 20], 0),      # person = the painted box (5, 10, 25, 30)
        (1, 10, [40, 0, 24, 20], 0),     # traffic light (40, 0, 64, 20): IoU 231 / 525
        (1, 10, [38, 0, 24, 12], 1),     # crowd traffic light (38, 0, 62, 12): IoU 231 / 325
        (2, 1, [0, 0, 10, 10], 0),       # person, far from its paint
        (2, 17, [10, 10, 10, 10], 0),    # cat, not painted: a constant map, the box is the whole image
        (2, 18, [0, 20, 30, 20], 0),     # dog = the larger painted component
        (2, 18, [50, 40, 5, 5], 0),
        (2, 89, [0, 0, 40, 20], 0),      # hair drier (0, 0, 40, 20): IoU 441 / 861
        (3, 1, [0, 0, 5, 5], 0),
    ]
    return write_coco(root, images, annotations, {"000000000003.jpg": b"\xff\xd8\xff garbage"})


def _expected_coco(crowd: str) -> dict:
    """(box, IoU) per unit from the painted regions and the gScoreCAM formula."""
    light_gt = [(40, 0, 64, 20)] + ([(38, 0, 62, 12)] if crowd == "keep" else [])
    light = max(gscorecam_iou((40, 0, 60, 10), gt) for gt in light_gt)
    return {
        ("1", "person"): ((5, 10, 25, 30), gscorecam_iou((5, 10, 25, 30), (5, 10, 25, 30))),
        ("1", "traffic light"): ((40, 0, 60, 10), light),
        ("2", "person"): ((40, 40, 64, 48), 0.0),
        ("2", "cat"): ((0, 0, 64, 48), gscorecam_iou((0, 0, 64, 48), (10, 10, 20, 20))),
        ("2", "dog"): ((0, 20, 30, 40), gscorecam_iou((0, 20, 30, 40), (0, 20, 30, 40))),
        ("2", "hair drier"): ((0, 0, 20, 20), gscorecam_iou((0, 0, 20, 20), (0, 0, 40, 20))),
    }


@pytest.mark.parametrize("crowd", ["keep", "drop"])
def test_coco_sweep_scores_by_hand(coco_hand, tmp_path, crowd):
    dataset = coco_dataset(coco_hand, crowd=crowd)
    result = run_sweep(dataset, Painted.from_pretrained(), tmp_path / "out", f"crowd {crowd}",
                       options=RunOptions(batch_size=2, progress=False))
    expected = _expected_coco(crowd)
    assert expected[("1", "traffic light")][1] == pytest.approx(231 / 325 if crowd == "keep" else 231 / 525)
    units = {(r["key"], u["class"]): u for r in read_all_records(tmp_path / "out") if "units" in r for u in r["units"]}
    assert set(units) == set(expected)
    for name, (box, iou) in expected.items():
        assert tuple(units[name]["box"]) == box, name
        assert units[name]["iou"] == pytest.approx(iou, abs=1e-12), name
        assert units[name]["hit"] == (iou >= 0.5), name
    hits = {"person": [1, 0], "traffic light": [crowd == "keep"], "cat": [0], "dog": [1], "hair drier": [1]}
    report = result.report
    assert report["images"] == 2 and report["units"] == 6
    assert [e["key"] for e in report["errors"]] == ["3"] and "cannot read image file" in report["errors"][0]["error"]
    detection = report["detection"]
    assert detection["box_accuracy"] == pytest.approx(sum(map(sum, hits.values())) / 6)
    assert detection["box_accuracy_class_mean"] == pytest.approx(np.mean([np.mean(h) for h in hits.values()]))
    assert detection["mean_iou"] == pytest.approx(np.mean([iou for _, iou in expected.values()]))
    assert detection["per_class"]["person"] == {"accuracy": 0.5, "units": 2}
    assert report == _report(tmp_path / "out")
    markdown = (tmp_path / "out" / "report.md").read_text()
    row = f"| {100 * sum(map(sum, hits.values())) / 6:.2f} | {100 * np.mean([np.mean(h) for h in hits.values()]):.2f} |"
    assert row in markdown and "paper: TCLIP" not in markdown  # BoxAcc and its class mean, both in %
    assert "No paper figure is shown: the method is painted" in markdown and f"crowd {crowd}" in markdown
    assert "Prompts: the bare class names; samples: every sample." in markdown
    assert "`3`: ValueError: cannot read image file" in markdown
    assert result.throughput.images == 2 and result.throughput.devices == 1


def test_a_postscript_image_is_one_bad_sample_and_ghostscript_never_runs(tmp_path, fake_ghostscript):
    """PIL would render the EPS file by running the program gs (its error stopped the sweep): an image PIL cannot
    decode itself is recorded as that sample's error, as a broken file is."""
    from conftest import EPS_BYTES

    images = {1: painted(48, 64, [(PERSON + 1, slice(10, 30), slice(5, 25))]),
              2: {"file_name": "000000000002.jpg", "height": 48, "width": 64}}
    root = write_coco(tmp_path / "coco", images, [(1, 1, [5, 10, 20, 20], 0), (2, 1, [0, 0, 5, 5], 0)],
                      {"000000000002.jpg": EPS_BYTES})
    report = run_sweep(coco_dataset(root), Painted.from_pretrained(), tmp_path / "out",
                       options=RunOptions(progress=False)).report
    assert report["images"] == 1 and report["units"] == 1
    assert [e["key"] for e in report["errors"]] == ["2"]
    eps_path = root / "val2017" / "000000000002.jpg"
    assert report["errors"][0]["error"] == (f"ValueError: cannot read image file {eps_path}: the file is not an image "
                                            "PIL can decode")
    assert not fake_ghostscript.exists()


def test_save_vis_writes_one_picture_per_unit_of_the_first_images(coco_hand, tmp_path):
    dataset = coco_dataset(coco_hand)
    run_sweep(dataset, Painted.from_pretrained(), tmp_path, options=RunOptions(batch_size=2, save_vis=1, progress=False))
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["1__person.png",
                                                                    f"{file_stem(1, 'traffic light')}.png"]
    # A picture that cannot be written (here: "vis" is a file, put in the sweep's folder before it resumes; a new
    # sweep goes only into an empty folder) is one warning; the records are the sweep's.
    blocked = tmp_path / "blocked"
    run_sweep(dataset, Painted.from_pretrained(), blocked, options=RunOptions(limit=1, progress=False))
    (blocked / "vis").write_text("not a folder")
    with pytest.warns(UserWarning, match="--save-vis pictures: .*; some units will lack theirs") as warned:
        run_sweep(dataset, Painted.from_pretrained(), blocked, options=RunOptions(batch_size=2, save_vis=3,
                                                                                   resume=True, progress=False))
    assert len([w for w in warned if "--save-vis" in str(w.message)]) == 1  # four pictures, one warning
    in_order = [sorted(read_all_records(out), key=lambda r: r["index"]) for out in (blocked, tmp_path)]
    assert in_order[0] == in_order[1]  # (a resume writes its records after those before it)


def test_save_vis_on_a_resume_draws_the_recorded_samples_among_the_first_too(coco_hand, tmp_path):
    """--save-vis N on a resume drew only the samples that run scored: the recorded ones among the first N are run
    again for their pictures alone (as report.html's are), drawn as a sweep run at once draws them."""
    dataset, options = coco_dataset(coco_hand), RunOptions(batch_size=2, progress=False)
    fresh, grown = tmp_path / "fresh", tmp_path / "grown"
    run_sweep(dataset, Painted.from_pretrained(), fresh, options=dataclasses.replace(options, limit=2, save_vis=2))
    run_sweep(dataset, Painted.from_pretrained(), grown, options=dataclasses.replace(options, limit=1))
    first = (grown / "results-p0.jsonl").read_bytes()
    run_sweep(dataset, Painted.from_pretrained(), grown,
              options=dataclasses.replace(options, limit=2, save_vis=2, resume=True))
    pictures = sorted(p.name for p in (fresh / "vis").iterdir())
    assert len(pictures) == 6 and sorted(p.name for p in (grown / "vis").iterdir()) == pictures  # 2 + 4 units
    for name in pictures:
        assert (grown / "vis" / name).read_bytes() == (fresh / "vis" / name).read_bytes(), name
    records = (grown / "results-p0.jsonl").read_bytes()
    assert records.startswith(first) and records.count(b"\n") == 2  # the first sample recorded once


def test_resume_tries_the_samples_recorded_as_errors_again(coco_hand, tmp_path):
    data, out = tmp_path / "coco", tmp_path / "out"
    shutil.copytree(coco_hand, data)
    options = RunOptions(batch_size=2, progress=False)
    run_sweep(coco_dataset(data), Painted.from_pretrained(), out, options=options)
    assert [r["key"] for r in read_all_records(out) if "error" in r] == ["3"]  # its file is not an image
    resume = dataclasses.replace(options, resume=True)
    rates = (out / "throughput-p0.json").read_bytes()
    run_sweep(coco_dataset(data), Painted.from_pretrained(), out, options=resume)  # still broken: recorded once
    assert [r["key"] for r in read_all_records(out)].count("3") == 1 and "error" in read_all_records(out)[-1]
    assert (out / "throughput-p0.json").read_bytes() == rates  # no image ran: the first run's rates stay
    Image.fromarray(painted(48, 64, [(PERSON + 1, slice(0, 5), slice(0, 5))])).save(
        data / "val2017" / "000000000003.jpg", format="PNG")  # the user puts the image right
    # A resume on fewer processes than wrote the errors: here the records as a second process of an earlier
    # run left them (this one-process sweep owns every sample and never writes results-p1).
    (out / "results-p0.jsonl").rename(out / "results-p1.jsonl")
    run_sweep(coco_dataset(data), Painted.from_pretrained(), out, options=resume)
    run_sweep(coco_dataset(data), Painted.from_pretrained(), tmp_path / "fresh", options=options)
    assert sorted(r["key"] for r in read_all_records(out)) == ["1", "2", "3"]
    assert [r["key"] for r in read_records(out / "results-p0.jsonl")] == ["3"]  # tried again by its new owner
    assert _report(out) == _report(tmp_path / "fresh") and _report(out)["errors"] == []


def test_a_missing_voc_or_imagenet_s_image_is_its_samples_error_and_a_resume_tries_it_again(tmp_path):
    """As COCO's: one missing image refused the whole VOC or ImageNet-S split up front."""
    labels = np.zeros((8, 8), np.int64)
    labels[2:6, 2:6] = 1  # VOC's aeroplane, ImageNet-S50's first wnid: class 0, painted red 1
    both = {"a": (painted(8, 8, [(1, slice(2, 6), slice(2, 6))]), labels), "b": (painted(8, 8, []), labels)}
    wnid = split_wnids(50)[0]
    cases = [("voc", voc_dataset, write_voc(tmp_path / "voc", both), "JPEGImages/b.jpg", "b"),
             ("imagenet-s", lambda root: imagenet_s_dataset(root, 50),
              write_imagenet_s(tmp_path / "s50", {f"{wnid}/{k}": v for k, v in both.items()}),
              f"validation/{wnid}/b.JPEG", f"{wnid}/b")]
    options = RunOptions(batch_size=2, progress=False)
    for name, dataset, root, image_file, key in cases:
        image = (root / image_file).read_bytes()
        (root / image_file).unlink()
        out = tmp_path / f"{name}-out"
        run_sweep(dataset(root), Painted.from_pretrained(), out, options=options)
        errors = {r["key"]: r["error"] for r in read_all_records(out) if "error" in r}
        assert list(errors) == [key] and f"image file not found: {root / image_file}" in errors[key], name
        (root / image_file).write_bytes(image)  # the user puts it back
        run_sweep(dataset(root), Painted.from_pretrained(), out, options=dataclasses.replace(options, resume=True))
        records = {r["key"]: r for r in read_all_records(out)}
        assert "error" not in records[key] and [u["pg_hit"] for u in records[key]["units"]] == [False], name
        assert _report(out)["errors"] == [], name


def test_an_image_or_label_damaged_past_its_header_is_its_samples_error_and_the_sweep_goes_on(tmp_path):
    """PIL raises SyntaxError ("broken PNG file") on a damaged PNG chunk, which stopped the sweep as an internal error
    (and every --resume again at the same sample): a COCO image, a VOC label and an ImageNet-S label."""
    from conftest import png_broken_past_its_header

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (48, 64))  # noise: PNG data long enough for the halved chunk to end inside it
    image = painted(48, 64, [(1, slice(10, 30), slice(5, 25))])
    both = {"a": (image, labels), "b": (image, labels)}
    wnid = split_wnids(50)[0]
    person = [(image_id, PERSON + 1, [5, 10, 20, 20], 0) for image_id in (1, 2)]
    cases = [("coco", coco_dataset, write_coco(tmp_path / "coco", {1: image, 2: image}, person),
              "val2017/000000000002.png", "2", "image file"),
             ("voc", voc_dataset, write_voc(tmp_path / "voc", both), "SegmentationClass/b.png", "b", "VOC label"),
             ("imagenet-s", lambda root: imagenet_s_dataset(root, 50),
              write_imagenet_s(tmp_path / "s50", {f"{wnid}/{k}": v for k, v in both.items()}),
              f"validation-segmentation/{wnid}/b.png", f"{wnid}/b", "ImageNet-S label")]
    for name, dataset, root, damaged, key, what in cases:
        (root / damaged).write_bytes(png_broken_past_its_header((root / damaged).read_bytes()))
        report = run_sweep(dataset(root), Painted.from_pretrained(), tmp_path / f"{name}-out",
                           options=RunOptions(batch_size=2, progress=False)).report
        assert report["images"] == 1 and report["units"] == 1, name  # the other sample is scored
        assert [e["key"] for e in report["errors"]] == [key], name
        assert report["errors"][0]["error"].startswith(f"ValueError: cannot read {what} {root / damaged}: broken PNG")


def test_a_coco_seg_crowd_drop_sweep_stored_before_crowds_were_per_category_is_not_resumed(tmp_path):
    """Its units left every crowd's pixels out, a crowd of another category's too: resuming it mixed those units
    with units scored under per-category crowds. A sweep stored before records no units_version."""
    root = write_coco(tmp_path / "coco", {1: painted(16, 16, [])}, [(1, 1, [0, 0, 8, 8], 1), (1, 18, [8, 8, 8, 8], 0)])
    options = RunOptions(batch_size=2, progress=False)
    for crowd, version in (("drop", 2), ("keep", None)):
        out = tmp_path / crowd
        run_sweep(coco_seg_dataset(root, crowd=crowd), Painted.from_pretrained(), out, f"crowd {crowd}",
                  options=options)
        stored = json.loads((out / "sweep.json").read_text())
        assert stored.pop("units_version", None) == version
        (out / "sweep.json").write_text(json.dumps(stored))  # as a sweep stored before 2026-12-06
        resume = lambda: run_sweep(coco_seg_dataset(root, crowd=crowd), Painted.from_pretrained(), out,  # noqa: E731
                                   f"crowd {crowd}", options=dataclasses.replace(options, resume=True))
        if version is None:
            resume()  # crowd keep: its units are as they were
        else:
            with pytest.raises(ValueError, match=r"units_version \(stored None, now 2\) \(the dataset's units are "
                                                 r"read otherwise since the sweep began"):
                resume()


def test_a_sweep_stored_before_the_matmul_dtype_was_recorded_resumes_as_float32(tmp_path):
    from tclip_jax.sweep.runner import _check_config

    run = {"method": "tclip", "model": {"origin": "m", "source": "hf", "architecture": None}, "settings": {},
           "input_protocol": "whole"}
    (tmp_path / "sweep.json").write_text(json.dumps({"run": run, "dataset": "coco", "limit": None, "evaluation": {}}))
    now = {"run": {**run, "model": {**run["model"], "matmul_dtype": "float32"}}, "dataset": "coco", "limit": None,
           "evaluation": {}}
    _check_config(tmp_path, now, resume=True)  # its runs were float32: the command line had no other
    now["run"]["model"]["matmul_dtype"] = "bfloat16"
    with pytest.raises(ValueError, match="run.model.matmul_dtype \\(stored 'float32', now 'bfloat16'\\)"):
        _check_config(tmp_path, now, resume=True)


def test_a_template_that_would_change_nothing_in_a_synthetic_sweep_is_refused(tmp_path, capsys):
    """A synthetic scene's queries are its words: --template changes only a label-set method's set. On TCLIP it was
    recorded as used while the records were those of a sweep without it."""
    assert main(["sweep", "synthetic", "--template", "a photo of a {}", "--limit", "1",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--template makes the class prompts" in capsys.readouterr().err and not (tmp_path / "out").exists()
    # '{}' is no template (the bare names either way), so it changes nothing to refuse: the sweep of no template.
    assert main(["sweep", "synthetic", "--template", "{}", "--limit", "1", "--translations", "1",
                 "--out", str(tmp_path / "bare")]) == 0
    assert json.loads((tmp_path / "bare" / "sweep.json").read_text())["template"] is None
    # A method with a label set takes it (its set's prompts): what is said next is the missing model.
    capsys.readouterr()
    assert main(["sweep", "synthetic", "--method", "clip_surgery", "--template", "a photo of a {}", "--limit", "1",
                 "--model", str(tmp_path / "no_model.npz"), "--out", str(tmp_path / "surgery")]) == 2
    err = capsys.readouterr().err
    assert "no_model.npz" in err and "--template" not in err
    # CLIP Surgery without feature surgery maps plain cosines, which no label set changes.
    assert main(["sweep", "synthetic", "--method", "clip_surgery", "--option", "feature_surgery=false", "--template",
                 "a photo of a {}", "--limit", "1", "--out", str(tmp_path / "plain")]) == 2
    assert "--template makes the class prompts" in capsys.readouterr().err and not (tmp_path / "plain").exists()


def test_the_multi_process_flags_go_together(tmp_path, capsys):
    for given in (["--coordinator", "127.0.0.1:1"], ["--num-processes", "2", "--process-id", "0"]):
        assert main(["sweep", "synthetic", *given, "--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err == ("tclip sweep: error: --coordinator, --num-processes and --process-id go "
                                           "together\n")
    # JAX refused these in its words (process_id=2); a process started with a --process-id out of range is refused
    assert main(["sweep", "synthetic", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2",
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "tclip sweep: error: --process-id 2 is not one of 0 to 1 (--num-processes 2)\n"
    for seconds in ("0", "1.5", "inf"):
        with pytest.raises(SystemExit):
            main(["sweep", "synthetic", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1",
                  "--connect-timeout", seconds, "--out", str(tmp_path / "o")])
        assert capsys.readouterr().err.startswith("tclip sweep: error: argument --connect-timeout: expected ")
    # JAX takes its deadline as a C++ 32-bit int (2147483638 s: pybind's "incompatible function arguments"), Python's
    # timer no more than threading.TIMEOUT_MAX (1e10 s: an OverflowError's traceback too): one day at most
    for seconds in ("10000000000", "2147483638", str(24 * 60 * 60 + 1)):
        with pytest.raises(SystemExit):
            main(["sweep", "synthetic", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1",
                  "--connect-timeout", seconds, "--out", str(tmp_path / "o")])
        assert capsys.readouterr().err == (f"tclip sweep: error: argument --connect-timeout: expected at most "
                                           f"{24 * 60 * 60} seconds, got '{seconds}' (see tclip sweep --help)\n")
    for count in ("0", "-2"):  # "--process-id 0 is not one of 0 to -1" named the wrong flag
        with pytest.raises(SystemExit):
            main(["sweep", "synthetic", "--coordinator", "127.0.0.1:1", "--num-processes", count, "--process-id", "0",
                  "--out", str(tmp_path / "o")])
        assert capsys.readouterr().err.startswith("tclip sweep: error: argument --num-processes: expected at least 1 "
                                                  f"process, got '{count}'")
    for count in ("2147483648", "65537"):  # pybind's words; a process 0 that allocated for that many peers
        with pytest.raises(SystemExit):
            main(["sweep", "synthetic", "--coordinator", "127.0.0.1:1", "--num-processes", count, "--process-id", "0",
                  "--out", str(tmp_path / "o")])
        assert capsys.readouterr().err == ("tclip sweep: error: argument --num-processes: expected at most 65536 "
                                           f"processes, got '{count}' (see tclip sweep --help)\n")
    assert not (tmp_path / "o").exists()


def test_a_process_that_cannot_join_its_sweep_ends_in_one_line_after_connect_timeout(tmp_path):
    """jax.distributed.initialize waited 300 s in silence for a coordinator nobody listens at (process 1), or for a
    process that never comes (process 0, the coordinator), then aborted with JAX's fatal-error lines (SIGABRT)."""
    out, port = tmp_path / "out", _free_port()
    for process_id in (1, 0):
        started = time.monotonic()
        process = _sweep_process("synthetic", "--limit", "2", "--out", str(out), "--coordinator", f"127.0.0.1:{port}",
                                 "--num-processes", "2", "--process-id", str(process_id), "--connect-timeout", "3")
        try:
            assert process.wait(timeout=60) == 2 and time.monotonic() - started < 30
        finally:
            process.kill()
        error = process.stderr.read().decode()
        assert error.startswith(f"tclip sweep: error: process {process_id} ") and error.count("\n") == 1
        assert f"127.0.0.1:{port} within 3 s (--connect-timeout): " in error
    assert not out.exists()


def test_a_sweep_begun_on_a_methods_earlier_maps_is_not_resumed(tmp_path):
    """The similarity methods' and CLIP Surgery's maps changed (upsampled once, straight to the image): a sweep
    stored before held the old maps, and resuming it mixed both in one report. Methods record their maps
    version; a sweep stored before they did holds version 1."""
    from tclip_jax.methods import METHODS
    from tclip_jax.sweep.runner import _check_config

    run = {"method": "clip_surgery", "model": {"origin": "m", "source": "hf", "architecture": None}, "settings": {},
           "input_protocol": "whole"}
    (tmp_path / "sweep.json").write_text(json.dumps({"run": run, "dataset": "coco", "limit": None, "evaluation": {}}))
    now = {"run": {**run, "maps_version": METHODS["clip_surgery"].maps_version}, "dataset": "coco", "limit": None,
           "evaluation": {}}
    assert now["run"]["maps_version"] == 2
    with pytest.raises(ValueError, match="run.maps_version \\(stored 1, now 2\\) \\(the method's maps changed since "
                                         "the sweep began"):
        _check_config(tmp_path, now, resume=True)
    now["run"]["method"] = "similarity"  # another method: said so, not blamed on changed maps
    with pytest.raises(ValueError, match="run.method") as refused:
        _check_config(tmp_path, now, resume=True)
    assert "maps changed" not in str(refused.value)
    now["run"].update(method="tclip", maps_version=1)  # TCLIP's whole-image maps, unchanged since: resumed
    (tmp_path / "sweep.json").write_text(json.dumps({"run": {**run, "method": "tclip"}, "dataset": "coco",
                                                     "limit": None, "evaluation": {}}))
    _check_config(tmp_path, now, resume=True)
    # TCLIP's maps version follows its input protocol (a setting): a resume under another protocol is refused for
    # the protocol, not blamed on maps that changed under the sweep.
    whole = {"method": "tclip", "model": run["model"], "settings": {"input_protocol": "whole"},
             "input_protocol": "whole", "maps_version": recorded_maps_version(TCLIP.maps_version, "whole")}
    (tmp_path / "sweep.json").write_text(json.dumps({**now, "run": whole}))
    crop = {**whole, "settings": {"input_protocol": "center_crop"}, "input_protocol": "center_crop",
            "maps_version": recorded_maps_version(TCLIP.maps_version, "center_crop")}
    with pytest.raises(ValueError, match="run.input_protocol \\(stored 'whole', now 'center_crop'\\)") as refused:
        _check_config(tmp_path, {**now, "run": crop}, resume=True)
    assert "run.maps_version (stored 1, now 2)" in str(refused.value) and "maps changed" not in str(refused.value)


# ------------------------------------------------------------------------------ ImageNet-S, hand-computed
def _ap(accuracy: float) -> float:
    """AP of a 0/1 relevance map over both channels: at score 1 precision = recall = accuracy, at 0 it is 1/2."""
    return accuracy * accuracy + (1 - accuracy) * 0.5


@pytest.mark.parametrize("threshold", ["mean", "otsu", "gmm"])  # all split a 0/1 map between 0 and 1
def test_imagenet_s_sweep_scores_by_hand(tmp_path, threshold):
    w0, w1 = split_wnids(50)[:2]           # label ids 1 and 2; classes 0 and 1; codes 1 and 2
    a = np.zeros((32, 32), np.int64)
    a[4:12, 4:12] = 1
    a[0:2, :] = 1000
    b = np.zeros((32, 32), np.int64)
    b[0:16, 0:16] = 2
    b[20:24, 20:24] = 1
    root = write_imagenet_s(tmp_path / "ImageNetS50", {
        f"{w0}/a": (painted(32, 32, [(1, slice(4, 12), slice(8, 16))]), a),   # half on the mask
        f"{w1}/b": (painted(32, 32, [(2, slice(0, 16), slice(0, 16))]), b),   # class 1 not painted
    })
    dataset = imagenet_s_dataset(root, 50)
    report = run_sweep(dataset, Painted.from_pretrained(), tmp_path / "out", evaluation=EvalOptions(threshold=threshold),
                       options=RunOptions(batch_size=2, progress=False)).report
    units = {(r["key"], u["class_id"]): u for r in read_all_records(tmp_path / "out") for u in r["units"]}
    # Image a, class 0: 960 valid pixels (64 ignored); 64 painted, 32 of them on the 64-pixel mask.
    # Image b, class 0: constant map, argmax (0, 0) off the mask, nothing predicted, every pixel scored alike (the
    # reference's NaN map zeroed in both AP channels): AP 1/2; class 1: perfect.
    expected = {
        (f"{w0}/a", 0): (True, 0.5, 0.5, 896, 960, [864, 32], [928, 96], _ap(896 / 960)),
        (f"{w1}/b", 0): (False, 16 / 1024, 16 / 1024, 1008, 1024, [1008, 0], [1024, 16], 0.5),
        (f"{w1}/b", 1): (True, 1.0, 1.0, 1024, 1024, [768, 256], [768, 256], 1.0),
    }
    counts, scores = ("pg_hit", "pixel_correct", "pixel_labeled", "area_inter", "area_union"), \
        ("energy_pg", "energy_in_mask", "ap")
    assert set(units) == set(expected)
    for name, (pg_hit, energy, in_mask, correct, labeled, inter, union, ap) in expected.items():
        assert [units[name][f] for f in counts] == [pg_hit, correct, labeled, inter, union], name
        assert [units[name][f] for f in scores] == pytest.approx([energy, in_mask, ap], abs=1e-12), name
    seg = report["segmentation"]
    assert seg["pointing_game"] == pytest.approx(2 / 3)
    assert seg["pointing_game_class_mean"] == pytest.approx(0.75)    # class 0: 1/2, class 1: 1
    assert seg["energy_pg"] == pytest.approx((0.5 + 16 / 1024 + 1) / 3)
    assert seg["pixel_accuracy"] == pytest.approx((896 + 1008 + 1024) / (960 + 1024 + 1024))
    assert seg["mask_iou"] == pytest.approx((32 + 0 + 256) / (96 + 16 + 256))
    assert seg["miou"] == pytest.approx(((864 + 1008 + 768) / (928 + 1024 + 768) + 288 / 368) / 2)
    assert seg["ap"] == pytest.approx((_ap(896 / 960) + 0.5 + 1) / 3)
    assert "detection" not in report
    # Image b's class-0 map is all zeros: clipped to nothing, it scores as an empty mask, and the report says so.
    assert [name for name, unit in units.items() if unit.get("no_positive_relevance")] == [(f"{w1}/b", 0)]
    assert seg["no_positive_relevance"] == 1
    assert "1 of 3 units has a relevance map with no positive value" in (tmp_path / "out" / "report.md").read_text()


def test_classes_that_share_a_name_are_scored_and_pictured_apart(tmp_path):
    """ImageNet's two "crane"s (the bird and the machine): one name, two classes, each its own per-class score
    and gallery place; both are prompted "crane"."""
    from tclip_jax.evaluation.datasets.base import Dataset, LoadedSample, Sample, Target, indexed

    def sample(key, index, class_id, hit):
        box = np.array([[4, 4, 12, 12]], np.float64) if hit else np.array([[20, 20, 28, 28]], np.float64)
        return Sample(key, index, lambda: LoadedSample(painted(32, 32, [(1, slice(4, 12), slice(4, 12))]),
                                                       (Target(class_id, boxes=box),)))

    # Painted maps the prompt "crane" to red value 1 (its first class) for both cranes.
    samples = [sample("bird", 0, 0, True), sample("machine-a", 1, 2, False), sample("machine-b", 2, 2, True)]
    dataset = Dataset("hand", ("crane", "dog", "crane"), 3, indexed(samples))
    report = run_sweep(dataset, Painted.from_pretrained(), tmp_path / "out",
                       options=RunOptions(batch_size=2, progress=False)).report
    per_class = report["detection"]["per_class"]
    assert per_class == {"crane (class 0)": {"accuracy": 1.0, "units": 1},
                         "crane (class 2)": {"accuracy": 0.5, "units": 2}}
    assert report["detection"]["box_accuracy_class_mean"] == pytest.approx(0.75)
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<h3>crane (class 0)</h3>") == 1 and page.count("<h3>crane (class 2)</h3>") == 1
    assert len(list((tmp_path / "out" / "gallery").iterdir())) == 3  # the bird's, and the machines' best and worst
    assert class_queries(dataset.class_names)[2].prompt == "crane"
    # A sweep stored before such classes were told apart (its records say "crane" for both) is not resumed.
    stored = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert stored.pop("shared_class_names") == ["crane"]
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"shared_class_names \(stored None, now \['crane'\]\) \(its records name "
                                         "classes that share a name alike"):
        run_sweep(dataset, Painted.from_pretrained(), tmp_path / "out",
                  options=RunOptions(batch_size=2, progress=False, resume=True))


# ------------------------------------------------------------------------------------- real TCLIP run
@pytest.fixture(scope="module")
def tiny_model(fixtures_dir) -> str:
    return str(fixtures_dir / "tiny_openai_clip.npz")


@pytest.fixture(scope="module")
def tclip_synthetic(tiny_model, tmp_path_factory):
    """A TCLIP sweep of 3 synthetic scenes (each word alone) in batches of 2, through the CLI, on one device."""
    out = tmp_path_factory.mktemp("tclip") / "out"
    assert main(_cli("synthetic", "--protocol", "bare_words", "--model", tiny_model, "--limit", "3", "--batch-size",
                     "2", "--out", str(out))) == 0
    return out


def test_tclip_sweep_matches_the_explainer(tclip_synthetic, tiny_model):
    explainer = TCLIP.from_pretrained(tiny_model)
    records = {r["key"]: r for r in read_all_records(tclip_synthetic)}
    samples = list(synthetic_dataset(3, "bare_words").samples())
    assert sorted(records) == sorted(s.key for s in samples)
    checked = 0
    for sample in samples:
        loaded = sample.load()
        result = explainer.explain(loaded.image, [t.query.prompt for t in loaded.targets])
        for target, prompt, unit in zip(loaded.targets, result.prompts, records[sample.key]["units"], strict=True):
            (word,) = prompt.word_maps  # the prompt is the word alone
            assert unit["class"] == SYNTHETIC_CLASSES[target.class_id] == prompt.prompt
            assert tuple(unit["box"]) == tuple(word.box)
            assert unit["iou"] == max(box_iou(word.box, box) for box in target.boxes)
            assert unit["pg_hit"] == pointing_game(word.soft, target.mask)
            # The explainer ran this image alone; the sweep batched and padded it: maps agree to float rounding.
            energy_pg = energy_pointing_game(word.soft, mask_box(target.mask))
            assert unit["energy_pg"] == pytest.approx(energy_pg, abs=1e-6)
            assert unit["energy_in_mask"] == pytest.approx(energy_in_mask(word.soft, target.mask), abs=1e-6)
            counts = segmentation_scores(normalize_relevance(word.soft), target.mask.astype(int), "mean")
            assert (unit["pixel_correct"], unit["area_inter"]) == (counts.pixel_correct, counts.area_inter.tolist())
            assert unit["ap"] == pytest.approx(counts.ap, abs=1e-6)
            checked += 1
    report = _report(tclip_synthetic)
    assert checked == report["units"] == report["detection"]["units"] == report["segmentation"]["units"]
    assert report["config"]["run"]["model"]["origin"] == tiny_model and report["errors"] == []
    assert report["config"]["run"]["settings"] == explainer.settings.to_dict()


def _swept(dataset, method, out: pathlib.Path) -> tuple[dict, dict]:
    """(report, {key: record}) of a sweep of `dataset` by `method` into `out`, in batches of 2."""
    report = run_sweep(dataset, method, out, options=RunOptions(batch_size=2, progress=False)).report
    return report, {r["key"]: r for r in read_all_records(out)}


def test_caption_words_are_scored_on_their_map_inside_the_caption(tiny_model, tmp_path):
    """The captions protocol: each target brings its own query (a word of its caption), encoded per batch."""
    explainer = TCLIP.from_pretrained(tiny_model, translations=1)
    dataset = synthetic_dataset(3, "captions")
    report, records = _swept(dataset, explainer, tmp_path)
    checked = 0
    for sample in dataset.samples():
        loaded = sample.load()
        (caption,) = {t.query.prompt for t in loaded.targets}
        words = explainer.explain(loaded.image, caption).prompts[0]
        for target, unit in zip(loaded.targets, records[sample.key]["units"], strict=True):
            (index,) = [i for i, w in enumerate(words.words) if (w.start, w.end) == target.query.span]
            word_map = words.word_maps[index]
            assert unit["class"] == words.words[index].text and unit["group"] == target.group
            assert unit["prompt"] == caption and unit["span"] == list(target.query.span)
            assert tuple(unit["box"]) == tuple(word_map.box)
            assert unit["pg_hit"] == pointing_game(word_map.soft, target.mask)
            assert unit["energy_in_mask"] == pytest.approx(energy_in_mask(word_map.soft, target.mask), abs=1e-6)
            checked += 1
    assert checked == report["units"]
    assert {"colour", "shape"} <= set(report["groups"]) <= {"colour", "shape", "relation"}
    assert sum(g["units"] for g in report["groups"].values()) == report["units"]
    assert report["groups"]["colour"]["detection"]["units"] == report["groups"]["colour"]["units"]


def test_wrong_attribute_units_score_where_the_map_points_at_the_wrongly_named_object(tiny_model, tmp_path):
    explainer = TCLIP.from_pretrained(tiny_model, translations=1)
    dataset = synthetic_dataset(3, "wrong_attribute")
    report, records = _swept(dataset, explainer, tmp_path)
    hits = []
    for sample in dataset.samples():
        loaded = sample.load()
        (target,) = loaded.targets  # the shape word of "a <B's colour> <A's shape>"
        words = explainer.explain(loaded.image, target.query.prompt).prompts[0]
        (word_map,) = [m for w, m in zip(words.words, words.word_maps) if (w.start, w.end) == target.query.span]
        (unit,) = records[sample.key]["units"]
        assert unit["wrong_pg_hit"] == pointing_game(word_map.soft, target.wrong_mask)
        assert unit["pg_hit"] == pointing_game(word_map.soft, target.mask)
        hits.append(unit["wrong_pg_hit"])
    assert report["wrong_attribute"] == {"units": 3, "wrong_pointing": np.mean(hits)}
    assert "Wrong-attribute pointing" in (tmp_path / "report.md").read_text()
    assert "synthetic-wrong_attribute" in (tmp_path / "report.md").read_text()


def test_caption_queries_of_a_set_dependent_method_keep_its_label_set(tiny_model, tmp_path):
    """CLIP Surgery on the captions protocol: the classes are its label set, and a caption (in no label set) gets
    the empty-string redundancy, as CLIP Surgery explaining that caption alone does."""
    method = METHODS["clip_surgery"].from_pretrained(tiny_model)
    dataset = synthetic_dataset(3, "captions")
    _, records = _swept(dataset, method, tmp_path)
    for sample in dataset.samples():
        loaded = sample.load()
        phrase = method.explain(loaded.image, loaded.targets[0].query.prompt).prompts[0].phrase
        for target, unit in zip(loaded.targets, records[sample.key]["units"], strict=True):
            assert tuple(unit["box"]) == tuple(phrase.box)
            assert unit["energy_in_mask"] == pytest.approx(energy_in_mask(phrase.heatmap, target.mask), abs=1e-6)


def test_a_centre_crop_methods_sweep_boxes_what_the_model_saw_as_explain_does(tiny_model, tmp_path):
    """Rollout (a centre crop) on 500x200 scenes: each unit's box is explain's, found in the part of the image
    the crop kept (the maps' fill outside it moves Otsu's threshold otherwise)."""
    method = METHODS["rollout"].from_pretrained(tiny_model)
    dataset = synthetic_dataset(2, "non_square")
    _, records = _swept(dataset, method, tmp_path)
    for sample in dataset.samples():
        loaded = sample.load()
        assert loaded.image.shape[0] != loaded.image.shape[1]
        result = method.explain(loaded.image, [t.query.prompt for t in loaded.targets])
        for target, prompt, unit in zip(loaded.targets, result.prompts, records[sample.key]["units"], strict=True):
            rows, columns = result.geometry.covered
            assert (rows.stop - rows.start) * (columns.stop - columns.start) < loaded.image[..., 0].size
            assert tuple(unit["box"]) == tuple(prompt.phrase.box)
            assert unit["box"] == list(box_in_map(heatmap_box(prompt.phrase.heatmap[rows, columns]),
                                                  result.geometry.covered))
            # The mask scores too are those of the part the crop kept (normalized and split there).
            host = HostMaps(None, None, prompt.phrase.box)
            scores = score_unit(target, prompt.phrase.heatmap, host, EvalOptions(), result.geometry.covered)
            assert (unit["area_inter"], unit["area_union"]) == (scores["area_inter"], scores["area_union"])
            assert unit["ap"] == pytest.approx(scores["ap"], abs=1e-6)


def test_class_slots_are_the_smallest_power_of_two_holding_the_classes():
    """A sweep pads each image's class rows to class_slots: one compiled shape per power of two, no wasted half."""
    from tclip_jax.sweep.sharding import class_slots

    for count in range(0, 70):
        assert class_slots(count) == next(2 ** k for k in range(8) if 2 ** k >= count), count


def test_a_class_querys_span_is_the_whole_name_in_its_prompt():
    """The span sweeps record and methods read: all of the name, its one-letter last word too ("Model T")."""
    names = ["Model T", "dog"]
    for template in (None, "a photo of a {}.", "{} in the wild"):
        for query, name in zip(class_queries(names, template), names, strict=True):
            assert query.prompt[query.span[0]:query.span[1]] == name


def test_class_queries_are_phrase_queries_and_templates_keep_the_name_words(tiny_model):
    explainer = TCLIP.from_pretrained(tiny_model)
    names = ["traffic light", "dog", "hair drier"]
    encoded = explainer.encode_prompts(names)
    np.testing.assert_array_equal(explainer.encode(class_queries(names)).per_query,
                                  encoded.queries.take(encoded.rows[-3:]).per_query)
    templated = explainer.encode_prompts(["a photo of a traffic light."])
    # Words: a, photo, of, a, traffic, light ("." is punctuation): the name is words 4 and 5.
    name_words = templated.queries.take(templated.rows[4:6]).per_query
    np.testing.assert_array_equal(explainer.encode(class_queries(["traffic light"], "a photo of a {}.")).per_query[0],
                                  np.mean(list(name_words), axis=0))
    with pytest.raises(ValueError, match="exactly one"):
        class_queries(names, "a photo")
    with pytest.raises(ValueError, match="no words to explain"):
        explainer.encode(class_queries(["&"], "a photo of a {}"))


FOUR_DEVICES = {"XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4"}  # conftest's too


def _sweep_bytes(model, method, limit, out, *extra, env=None) -> tuple[bytes, bytes]:
    """(report.json, results-p0.jsonl) of a `tclip sweep synthetic --protocol captions` run in a fresh process;
    report.json less its configuration's environment (which names the devices of each run), written back as the
    sweep writes it."""
    command = [sys.executable, "-m", "tclip_jax", *_cli("synthetic", "--protocol", "captions", "--method", method,
                                                        "--model", model, "--limit", str(limit), "--out", str(out),
                                                        *extra)]
    subprocess.run(command, check=True, capture_output=True, timeout=600, env={**os.environ, **(env or {})})
    written = (out / "report.json").read_text()
    report = json.loads(written)
    assert json.dumps(report, indent=2, sort_keys=True) + "\n" == written  # so its bytes less the environment
    last_run = report["config"].pop("environment")[-1]  # the environment names the devices it ran on
    assert last_run["devices"] == ("4 x cpu" if env == FOUR_DEVICES else "1 x cpu")
    return (json.dumps(report, indent=2, sort_keys=True) + "\n").encode(), (out / "results-p0.jsonl").read_bytes()


@pytest.mark.parametrize("method", ["tclip", "hilacam"])
def test_batch_size_devices_and_resumption_give_the_same_bytes(tiny_model, tmp_path, method):
    """Records and report.json are byte-identical for any batch size, device count and resume point."""
    def sweep(out, *extra, env=None):
        return _sweep_bytes(tiny_model, method, 4, out, *extra, env=env)

    reference = sweep(tmp_path / "b1", "--batch-size", "1")
    # Batches of 3 and 1 images on four devices: some devices get no real image.
    assert sweep(tmp_path / "d4", "--batch-size", "3", env=FOUR_DEVICES) == reference
    assert json.loads((tmp_path / "d4" / "throughput-p0.json").read_text())["devices"] == 4
    # Resumed on one device after the four-device run's first record: the other three in batches of 2 and 1.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "d4", resumed)
    first = reference[1].split(b"\n", 1)[0] + b"\n"  # as if killed after the first record
    (resumed / "results-p0.jsonl").write_bytes(first)
    (resumed / "report.json").unlink()
    assert sweep(resumed, "--batch-size", "2", "--resume") == reference


def test_m2ib_gives_the_same_bytes_on_one_and_on_four_devices(tiny_model, tmp_path):
    """M2IB's optimisation is where an SPMD program over several devices once differed from one device's (by up
    to 4e-7 in its maps): every device must run the one-device program."""
    four = _sweep_bytes(tiny_model, "m2ib", 2, tmp_path / "d4", "--batch-size", "2", env=FOUR_DEVICES)
    assert four == _sweep_bytes(tiny_model, "m2ib", 2, tmp_path / "d1", "--batch-size", "2")


# ------------------------------------------------------------------- resume, processes (stand-in method)
@pytest.fixture(scope="module")
def coco_many(tmp_path_factory):
    """12 painted images, each with one or two classes and a ground-truth box near the painted one."""
    rng = np.random.default_rng(0)
    images, annotations = {}, []
    for image_id in range(1, 13):
        regions = []
        for class_index, cat_id, top in ((PERSON, 1, 0), (DOG, 18, 24))[: 1 + image_id % 2]:
            y, x, h, w = top + rng.integers(0, 8), rng.integers(0, 30), rng.integers(6, 16), rng.integers(8, 30)
            regions.append((class_index + 1, slice(y, y + h), slice(x, x + w)))
            annotations.append((image_id, cat_id, [int(x + rng.integers(0, 10)), int(y), int(w), int(h)], 0))
        images[image_id] = painted(48, 64, regions)
    return write_coco(tmp_path_factory.mktemp("coco_many") / "coco", images, annotations)


@pytest.fixture(scope="module")
def coco_many_reference(coco_many, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(_cli("coco", "--data", str(coco_many), "--method", "test_sweep:Painted",
                     "--batch-size", "2", "--out", str(out))) == 0
    return out


def test_a_resume_that_only_redraws_a_picture_keeps_the_rates_of_the_run_that_did_the_work(coco_many,
                                                                                          coco_many_reference,
                                                                                          tmp_path):
    """Every sample recorded, one report.html picture missing: the resume runs its sample again for the picture
    alone, records nothing, and leaves throughput-p0.json (the rates of the run that recorded the samples)."""
    out = tmp_path / "out"
    shutil.copytree(coco_many_reference, out)
    picture = sorted((out / "gallery").iterdir())[0]
    picture.unlink()
    assert main(_cli("coco", "--data", str(coco_many), "--method", "test_sweep:Painted", "--batch-size", "2",
                     "--out", str(out), "--resume")) == 0
    assert picture.read_bytes() == (coco_many_reference / "gallery" / picture.name).read_bytes()
    for name in ("throughput-p0.json", "results-p0.jsonl", "report.json"):
        assert (out / name).read_bytes() == (coco_many_reference / name).read_bytes(), name


def test_tfds_coco_sweep_matches_the_raw_files(coco_many, coco_many_reference, tmp_path):
    build_tfds_coco(coco_many, tmp_path / "tfds")  # a real TFDS coco/2017, prepared by TFDS from the same files
    out = tmp_path / "out"
    # As a user runs it, in its own process: TensorFlow's start-up notices must not reach the terminal.
    sweep = _sweep_process("coco", "--coco-source", "tfds", "--data", str(tmp_path / "tfds"), "--method",
                           "test_sweep:Painted", "--batch-size", "2", "--out", str(out))
    assert sweep.wait(timeout=300) == 0 and sweep.stderr.read().decode() == ""
    units = {name: {(r["key"], u["class"]): u for r in read_all_records(path) for u in r["units"]}
             for name, path in (("tfds", out), ("raw", coco_many_reference))}
    assert sorted(units["tfds"]) == sorted(units["raw"])
    for name, unit in units["raw"].items():
        assert (units["tfds"][name]["box"], units["tfds"][name]["hit"]) == (unit["box"], unit["hit"])
        assert units["tfds"][name]["iou"] == pytest.approx(unit["iou"], rel=1e-5)  # TFDS boxes are float32 fractions
    tfds_report, raw_report = _report(out), _report(coco_many_reference)
    assert tfds_report["config"]["source"].startswith("tfds coco/2017 validation")
    for field in ("box_accuracy", "box_accuracy_class_mean", "per_class"):
        assert tfds_report["detection"][field] == raw_report["detection"][field]


def test_a_scoring_bug_stops_the_sweep_and_keeps_the_records_before_it(coco_many, tmp_path, monkeypatch):
    import tclip_jax.sweep.runner as runner
    evaluate, calls = runner._evaluate, []

    def failing_on_the_fifth_sample(*args):  # one host thread scores the samples in dataset order
        calls.append(None)
        if len(calls) == 5:
            raise RuntimeError("bug while scoring")
        return evaluate(*args)

    monkeypatch.setattr(runner, "_evaluate", failing_on_the_fifth_sample)
    dataset = coco_dataset(coco_many)
    with pytest.raises(RuntimeError, match="bug while scoring"):  # a bug, not bad data: never recorded
        run_sweep(dataset, Painted.from_pretrained(), tmp_path, options=RunOptions(batch_size=2, workers=1,
                                                                                      progress=False))
    assert [r["key"] for r in read_records(tmp_path / "results-p0.jsonl")] == ["1", "2", "3", "4"]
    # No thread of the sweep's is left behind: one waiting in the runtime when the interpreter exits aborts it.
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("tclip-")]


def test_a_record_that_cannot_be_written_stops_the_sweep_and_resume_finishes_it(coco_many, coco_many_reference,
                                                                                tmp_path, monkeypatch, capsys, caplog):
    """A write that fails in a host thread (which writes a record as soon as its evaluation is done) ended in a
    done-callback: concurrent.futures logged it, the record was lost and the sweep went on to exit 0."""
    append, out = ResultWriter.append, tmp_path / "out"

    def full_disk_in_a_host_thread(writer, record):
        if threading.current_thread() is not threading.main_thread() and len(read_records(writer.path)) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(writer.path))
        return append(writer, record)

    monkeypatch.setattr(ResultWriter, "append", full_disk_in_a_host_thread)
    args = ("coco", "--data", str(coco_many), "--method", "test_sweep:Painted", "--batch-size", "2", "--workers", "1",
            "--out", str(out))
    assert _fails(capsys, *args).splitlines() == [
        f"tclip sweep: error: [Errno {errno.ENOSPC}] No space left on device: '{out / 'results-p0.jsonl'}'"]
    assert not [r for r in caplog.records if r.name == "concurrent.futures"]  # "exception calling callback"
    assert len(read_records(out / "results-p0.jsonl")) == 2 and not (out / "report.json").exists()
    monkeypatch.undo()  # space again
    assert main(_cli(*args, "--resume")) == 0
    assert _report(out) == _report(coco_many_reference)


# `python -m tclip_jax` with Ctrl-C as in a terminal, also where the suite runs with SIGINT ignored (a child then
# inherits that, and Python installs no handler); no preexec_fn, which forks a multithreaded process.
_CTRL_C_AS_IN_A_TERMINAL = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                            "sys.argv[0] = 'tclip'; runpy.run_module('tclip_jax', run_name='__main__')")


def _sweep_process(*args: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", _CTRL_C_AS_IN_A_TERMINAL, *_cli(*args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _lines(path: pathlib.Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_resume_after_sigkill_gives_the_uninterrupted_report(coco_many, coco_many_reference, tmp_path):
    out = tmp_path / "out"
    results = out / "results-p0.jsonl"
    args = ("coco", "--data", str(coco_many), "--method", "test_sweep:StallingPainted", "--batch-size", "2",
            "--workers", "1", "--out", str(out))
    seen = [0]
    for run in range(2):
        # Each run stalls after 4 more images (two batches: the first is recorded), so it is always cut short;
        # it is killed as soon as a new record is on disk, possibly in the middle of writing the next one.
        process = _sweep_process(*args, *(["--resume"] if run else []), env_extra={STALL_ENV: "4"})
        deadline = time.monotonic() + 120
        while _lines(results) <= seen[-1] and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
        assert seen[-1] < _lines(results)  # progress was made
        seen.append(_lines(results))
        if run == 0:  # a kill in the middle of a write leaves a torn last line; make sure one is there
            with open(results, "ab") as f:
                f.write(b'{"index": 11, "key": "12", "units": [{"cla')
    assert _lines(results) < 12  # both runs were cut short
    finish = _sweep_process(*args, "--resume")
    assert finish.wait(timeout=120) == 0, finish.stderr.read().decode()
    records = read_records(results)  # every line whole: the torn one was cut off before appending
    assert results.read_bytes().endswith(b"\n") and len(records) == _lines(results) == 12
    assert sorted(int(r["key"]) for r in records) == list(range(1, 13))  # nothing lost, nothing twice
    assert _report(out) == _report(coco_many_reference)


def test_ctrl_c_ends_a_sweep_with_one_line_and_status_130_and_resume_finishes_it(coco_many, coco_many_reference,
                                                                                 tmp_path):
    """Ctrl-C while a load is still running: the records so far stay, and the run's rates, the process exits 130
    with one line once the load is done, and --resume finishes the sweep. (The abort a thread left waiting in the runtime caused needs a
    batch in flight on the device at exit; the scoring-bug test above checks that no thread is left.)"""
    out, release = tmp_path / "out", tmp_path / "release"
    args = ("coco", "--data", str(coco_many), "--method", "test_sweep:StallingPainted", "--batch-size", "2",
            "--workers", "1", "--out", str(out))
    process = _sweep_process(*args, env_extra={STALL_ENV: "4", RELEASE_ENV: str(release)})
    deadline = time.monotonic() + 120
    while _lines(out / "results-p0.jsonl") == 0 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    release.touch()
    assert process.wait(timeout=120) == 130
    assert process.stderr.read().decode().splitlines() == ["tclip sweep: interrupted"]
    kept = read_records(out / "results-p0.jsonl")
    assert 0 < len(kept) < 12
    # The stopped run's rates, of what it did: a resume with nothing left to score would have none to keep.
    assert json.loads((out / "throughput-p0.json").read_text())["images"] >= len(kept)
    finish = _sweep_process(*args, "--resume")
    assert finish.wait(timeout=120) == 0, finish.stderr.read().decode()
    assert _report(out) == _report(coco_many_reference)


def test_a_second_sweep_into_a_folder_in_use_is_refused_and_the_first_ends_as_if_alone(coco_many, coco_many_reference,
                                                                                       tmp_path, capsys):
    """Two sweeps into one --out at once wrote one results file, each under the other's sweep.json: while one
    runs, another sweep there, or a --resume of it, is refused in one line naming the running one."""
    out, release = tmp_path / "out", tmp_path / "release"
    data = ("coco", "--data", str(coco_many), "--batch-size", "2", "--out", str(out))
    first = _sweep_process(*data, "--method", "test_sweep:StallingPainted", "--workers", "1",
                           env_extra={STALL_ENV: "4", RELEASE_ENV: str(release)})
    deadline = time.monotonic() + 120
    while _lines(out / "results-p0.jsonl") == 0 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for other in (("--resume",), ("--box-rule", "contour")):
        message = _fails(capsys, *data, "--method", "test_sweep:Painted", *other)
        assert f"another sweep (process {first.pid} on {socket.gethostname()}) is running in {out}" in message
        assert message.count("\n") == 1
    release.touch()
    assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    assert _report(out) == _report(coco_many_reference) and not list(out.glob("*.lock"))
    assert main(_cli(*data, "--method", "test_sweep:Painted", "--resume")) == 0  # once it has ended


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_distributed_processes_give_the_one_process_report(coco_many, coco_many_reference, tmp_path):
    out = tmp_path / "out"
    port = _free_port()
    processes = [_sweep_process("coco", "--data", str(coco_many), "--method", "test_sweep:Painted",
                                "--batch-size", "2", "--out", str(out), "--coordinator", f"127.0.0.1:{port}",
                                "--num-processes", "2", "--process-id", str(i)) for i in range(2)]
    for process in processes:
        assert process.wait(timeout=180) == 0, process.stderr.read().decode()
    shares = [sorted(r["index"] for r in read_records(out / f"results-p{i}.jsonl")) for i in range(2)]
    assert shares == [list(range(0, 12, 2)), list(range(1, 12, 2))]
    assert _report(out) == _report(coco_many_reference)
    # stdout holds the report alone (Gloo's "[Gloo] Rank 0 is connected to 1 peer ranks..." went to stderr)
    assert processes[0].stdout.read() == (out / "report.md").read_bytes() + b"\n"
    assert processes[1].stdout.read() == b""
    (environment,) = json.loads((out / "sweep.json").read_text())["environment"]
    assert (environment["jax"], environment["backend"]) == (jax.__version__, jax.default_backend())
    # A resume where only process 1 has work left (its last record dropped): process 0 scores nothing, yet the run
    # scored, so its environment is listed (it was not: process 0 noted it as it scored its own first sample).
    config = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_text(json.dumps({**config, "environment": [None]}))
    lines = (out / "results-p1.jsonl").read_text().splitlines(keepends=True)
    (out / "results-p1.jsonl").write_text("".join(lines[:-1]))
    port = _free_port()
    processes = [_sweep_process("coco", "--data", str(coco_many), "--method", "test_sweep:Painted",
                                "--batch-size", "2", "--out", str(out), "--coordinator", f"127.0.0.1:{port}",
                                "--num-processes", "2", "--process-id", str(i), "--resume") for i in range(2)]
    for process in processes:
        assert process.wait(timeout=180) == 0, process.stderr.read().decode()
    assert json.loads((out / "sweep.json").read_text())["environment"] == [None, environment]
    resumed, reference = _report(out), _report(coco_many_reference)
    assert {**resumed, "config": None} == {**reference, "config": None}  # the scores; the configs differ by that None


def test_distributed_processes_started_with_other_configurations_all_refuse_in_one_line(coco_many, tmp_path):
    """A process started with another --box-rule than process 0 would write into process 0's sweep: every process
    refuses, in the same one line, before anything is written (none is left waiting at a barrier)."""
    out = tmp_path / "out"
    port = _free_port()
    processes = [_sweep_process("coco", "--data", str(coco_many), "--method", "test_sweep:Painted", "--limit", "2",
                                "--out", str(out), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                "--process-id", str(i), *(["--box-rule", "contour"] if i else []))
                 for i in range(2)]
    for process in processes:
        assert process.wait(timeout=180) == 2
        assert process.stderr.read().decode().splitlines() == [
            "tclip sweep: error: process 1 was started with another sweep configuration than process 0: "
            "run.settings.box_rule (process 0 'component', process 1 'contour'); start every process with the same "
            "arguments"]
    assert not out.exists()


def test_distributed_processes_that_disagree_on_resume_all_refuse_in_one_line(coco_many, tmp_path):
    """Process 1 started with --resume, process 0 without: process 1's check of the folder refused ("nothing to
    resume"), which the configurations compared do not hold, and process 0 waited at the next barrier for ever. Every
    process refuses, in the same one line naming the process that refused and why, and nothing is left."""
    out = tmp_path / "out"
    port = _free_port()
    processes = [_sweep_process("coco", "--data", str(coco_many), "--method", "test_sweep:Painted", "--limit", "2",
                                "--out", str(out), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                "--process-id", str(i), *(["--resume"] if i else []))
                 for i in range(2)]
    try:
        for process in processes:
            assert process.wait(timeout=180) == 2
            assert process.stderr.read().decode().splitlines() == [
                f"tclip sweep: error: process 1 of the sweep refused it: nothing to resume in {out} (no sweep.json); "
                "drop --resume to start a sweep there"]
    finally:
        for process in processes:
            process.kill()
    assert not out.exists()


def test_distributed_processes_where_one_cannot_open_its_data_all_refuse_in_its_line(coco_many, tmp_path):
    """Process 1's --data folder does not exist (not mounted on its host): it refused before the sweep's first
    collective, and process 0 waited there until it aborted with a C++ trace. Every process refuses in the line process
    1 gives alone, naming it, status 2."""
    out, missing = tmp_path / "out", tmp_path / "not_mounted"
    alone = _sweep_process("coco", "--data", str(missing), "--method", "test_sweep:Painted", "--out", str(out))
    assert alone.wait(timeout=180) == 2
    refusal = alone.stderr.read().decode().strip().removeprefix("tclip sweep: error: ")
    port = _free_port()
    processes = [_sweep_process("coco", "--data", str(missing if i else coco_many), "--method", "test_sweep:Painted",
                                "--out", str(out), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                "--process-id", str(i)) for i in range(2)]
    try:
        for process in processes:
            assert process.wait(timeout=180) == 2
            assert process.stderr.read().decode().splitlines() == [
                f"tclip sweep: error: process 1 of the sweep refused it: {refusal}"]
    finally:
        for process in processes:
            process.kill()
    assert not out.exists()


def test_a_distributed_sweep_into_a_folder_in_use_is_refused_by_every_process_and_the_running_one_ends_as_if_alone(
        coco_many, coco_many_reference, tmp_path):
    """A one-process sweep runs in --out, before its first record (sweep.json, an empty results file, its lock), and
    a two-process sweep is started there. Its process 1, its own lock free, took the running sweep's files for those
    a sweep killed before its first record leaves and deleted them (the running sweep then failed on its sweep.json),
    and waited for process 0, refused at the running sweep's lock, for ever, while process 0 waited in JAX's shutdown
    until it aborted. Every process refuses in the same one line, status 2, and the running sweep ends as if alone."""
    out, release = tmp_path / "out", tmp_path / "release"
    data = ("coco", "--data", str(coco_many), "--batch-size", "2", "--out", str(out))
    first = _sweep_process(*data, "--method", "test_sweep:StallingPainted", "--workers", "1",
                           env_extra={STALL_ENV: "0", RELEASE_ENV: str(release)})
    try:
        deadline = time.monotonic() + 120
        while not (out / "results-p0.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # its sweep.json is written, then its results file opened, then its first load stalls
        port = _free_port()
        second = [_sweep_process(*data, "--method", "test_sweep:Painted", "--coordinator", f"127.0.0.1:{port}",
                                 "--num-processes", "2", "--process-id", str(i)) for i in range(2)]
        try:
            for process in second:
                assert process.wait(timeout=120) == 2
                assert process.stderr.read().decode().splitlines() == [
                    f"tclip sweep: error: process 0 of the sweep refused it: another sweep (process {first.pid} on "
                    f"{socket.gethostname()}) is running in {out} (it holds results-p0.lock); wait for it to end or "
                    "choose another --out"]
        finally:
            for process in second:
                process.kill()
        release.touch()
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    finally:
        first.kill()
    assert _report(out) == _report(coco_many_reference) and not list(out.glob("*.lock"))


def test_a_sigterm_ends_distributed_processes_and_resume_finishes_the_sweep(coco_many, coco_many_reference, tmp_path):
    """jax.distributed.initialize starts JAX's preemption service, whose own SIGTERM handler only noted the signal:
    the processes ran on to status 0. They end as README says ("terminated", 143, within the grace period).
    Process 0, which hosts JAX's coordination service, is signalled first and its stall released at once, as a
    scheduler that signals processes in turn would: had it ended then, the other would have printed the service's
    fatal-error lines (a race seen once when both were signalled together)."""
    out, releases = tmp_path / "out", [tmp_path / "release-p0", tmp_path / "release-p1"]

    def two_processes(*extra: str, stall: bool = False) -> list[subprocess.Popen]:
        port = _free_port()
        return [_sweep_process("coco", "--data", str(coco_many), "--method", "test_sweep:StallingPainted",
                               "--batch-size", "2", "--workers", "1", "--out", str(out), "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *extra,
                               env_extra={STALL_ENV: "4", RELEASE_ENV: str(releases[i])} if stall else None)
                for i in range(2)]

    processes = two_processes(stall=True)
    deadline = time.monotonic() + 180
    while (sum(_lines(out / f"results-p{i}.jsonl") for i in range(2)) < 2
           and all(p.poll() is None for p in processes) and time.monotonic() < deadline):
        time.sleep(0.05)
    sent = time.monotonic()
    for process, release in zip(processes, releases):
        process.send_signal(signal.SIGTERM)
        release.touch()  # the stalled load ends, as a slow disk's would
        time.sleep(1.0)
    for process in processes:
        assert process.wait(timeout=60) == 143 and time.monotonic() - sent < 15
        assert process.stderr.read().decode().splitlines() == ["tclip sweep: terminated"]
    assert sum(_lines(out / f"results-p{i}.jsonl") for i in range(2)) < 12
    for process in two_processes("--resume"):
        assert process.wait(timeout=180) == 0, process.stderr.read().decode()
    assert _report(out) == _report(coco_many_reference)


def test_a_collective_of_a_process_started_with_stdout_closed_runs(tmp_path):
    """A process started with file descriptor 1 closed (no sys.stdout): dropping what Gloo prints on stdout raised
    ('NoneType' object has no attribute 'flush', then EBADF), which the collective reported as another process's
    stop, so a multi-process sweep run so failed on every process."""
    code = ("import sys\nfrom tclip_jax.sweep import sharding\nassert sys.stdout is None\n"
            "with sharding._collective():\n    pass\nprint('ran', file=sys.stderr)\n")
    done = subprocess.run(["bash", "-c", 'exec 1>&-; exec "$0" -c "$1"', sys.executable, code], capture_output=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert (done.returncode, done.stderr.decode().strip().splitlines()[-1:]) == (0, ["ran"]), done.stderr.decode()


def _two_coco_processes(coco_many: pathlib.Path, out: pathlib.Path, method: str,
                        env_of_process_1: dict, *extra: str) -> list[subprocess.Popen]:
    """The two processes of a COCO sweep of `method` into `out` (batches of 2, one worker, `extra` flags), process 1
    with `env_of_process_1` added to its environment."""
    port = _free_port()
    return [_sweep_process("coco", "--data", str(coco_many), "--method", method, "--batch-size", "2", "--workers",
                           "1", "--out", str(out), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                           "--process-id", str(i), *extra, env_extra=env_of_process_1 if i else None)
            for i in range(2)]


def test_a_process_of_a_distributed_sweep_whose_peer_was_killed_ends_in_one_line_and_resume_finishes(
        coco_many, coco_many_reference, tmp_path):
    """Process 1 SIGKILLed: process 0's last barrier failed (Gloo: "Connection closed by peer"), which it printed, and
    about 100 s later its exit aborted in JAX's shutdown barrier (SIGABRT, a C++ stack trace). It ends at once,
    status 2, in one line; its records are kept, and a resume (here on one process) finishes the sweep.
    Here process 0's share was scored by a run before (under another environment), so only process 1 scores: its
    run's environment was noted only where process 0 reached the end, which it never does, and was left out of
    sweep.json; it is noted before any process scores."""
    out = tmp_path / "out"
    assert main(_cli("coco", "--data", str(coco_many), "--method", "test_sweep:Painted", "--batch-size", "2",
                     "--out", str(out))) == 0
    results = out / "results-p0.jsonl"
    results.write_text("".join(line for line in results.read_text().splitlines(keepends=True)
                               if json.loads(line)["index"] % 2 == 0))  # process 1's share left to score
    config, before = json.loads((out / "sweep.json").read_text()), {"jax": "0.0.1-another-runtime"}
    (out / "sweep.json").write_text(json.dumps({**config, "environment": [before]}))
    processes = _two_coco_processes(coco_many, out, "test_sweep:StallingPainted", {STALL_ENV: "4"}, "--resume")
    try:
        deadline = time.monotonic() + 180
        while _lines(out / "results-p1.jsonl") == 0 and processes[1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        processes[1].send_signal(signal.SIGKILL)
        assert processes[0].wait(timeout=60) == 2
    finally:
        for process in processes:
            process.kill()
    error = processes[0].stderr.read().decode()
    assert error.startswith("tclip sweep: error: another process of the sweep stopped (") and error.count("\n") == 1
    assert error.endswith("the records written so far are kept: start every process again with --resume\n")
    assert len(read_records(out / "results-p0.jsonl")) == 6  # its whole share
    runs = json.loads((out / "sweep.json").read_text())["environment"]
    assert len(runs) == 2 and runs[0] == before and runs[1]["jax"] == jax.__version__, runs
    config = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_text(json.dumps({**config, "environment": runs[1:]}))  # the reference's, once more
    assert main(_cli("coco", "--data", str(coco_many), "--method", "test_sweep:Painted", "--batch-size", "2",
                     "--out", str(out), "--resume")) == 0
    assert _report(out) == _report(coco_many_reference)


def test_a_distributed_sweep_that_fails_in_one_process_ends_every_process_in_one_line_and_resume_finishes(
        coco_many, coco_many_reference, tmp_path):
    """Process 1's sweep stopped on a bug of its own while process 0's ran on: process 1 said so, then waited about
    300 s in JAX's shutdown barrier for process 0, and both aborted (SIGABRT, C++ traces). Process 1 ends at once
    with its line and status (1), process 0 at its next barrier with README's line and status 2."""
    out = tmp_path / "out"
    processes = _two_coco_processes(coco_many, out, "test_sweep:FailingPainted", {FAIL_ENV: "1"})
    try:
        assert processes[1].wait(timeout=180) == 1
        ended = time.monotonic()
        assert processes[0].wait(timeout=60) == 2 and time.monotonic() - ended < 60
    finally:
        for process in processes:
            process.kill()
    assert processes[1].stderr.read().decode() == ("tclip sweep: internal error (RuntimeError): a bug in this process "
                                                   "only (set TCLIP_TRACEBACK=1 for the traceback)\n")
    error = processes[0].stderr.read().decode()
    assert error.startswith("tclip sweep: error: another process of the sweep stopped (") and error.count("\n") == 1
    assert main(_cli("coco", "--data", str(coco_many), "--method", "test_sweep:Painted", "--batch-size", "2",
                     "--out", str(out), "--resume")) == 0
    assert _report(out) == _report(coco_many_reference)


# ---------------------------------------------------------------------------------------- results store
def test_store_drops_a_torn_last_line_and_rejects_corruption(tmp_path):
    path = tmp_path / "results-p0.jsonl"
    with ResultWriter(path) as writer:
        writer.append({"key": "a", "index": 0, "units": []})
    path.write_bytes(path.read_bytes() + b'{"key": "b", "ind')
    assert [r["key"] for r in read_records(path)] == ["a"]
    with ResultWriter(path) as writer:  # truncates the torn line before appending
        writer.append({"key": "c", "index": 2, "units": []})
    assert path.read_bytes().count(b"\n") == 2 and [r["key"] for r in read_records(path)] == ["a", "c"]
    good = b'{"key": "a", "index": 0, "units": []}\n'
    for bad in (b"not json", b"[" * 100_000 + b"]" * 100_000):  # nested too deeply: not a RecursionError
        path.write_bytes(good + bad + b'\n{"key": "c"}\n')
        with pytest.raises(ValueError, match="line 2 is not a JSON record"):
            read_records(path)
    for bad, problem in ((b'{"key": "c", "units": []}', "no 'index'"), (b'[1]', "not an object"),
                         (b'{"index": 1, "units": []}', "no 'key'"),
                         (b'{"key": "c", "index": 1}', "neither 'units' nor 'error'")):
        path.write_bytes(good + bad + b"\n")
        with pytest.raises(ValueError, match=f"line 2 is not a result record \\({problem}\\)"):
            read_records(path)
    # A write cut short goes on; one that fails (a full disk) leaves a torn last line, and names the file.
    class FullAfter:
        def __init__(self, file, room):
            self.file, self.room = file, room

        def write(self, data):
            if not self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            written = self.file.write(data[:min(5, self.room)])
            self.room -= written
            return written

        def __getattr__(self, name):
            return getattr(self.file, name)

    a, b = ({"key": key, "index": index, "units": []} for index, key in enumerate("ab"))
    line_a, line_b = (json.dumps(record, sort_keys=True).encode() + b"\n" for record in (a, b))
    path.write_bytes(b"")
    with ResultWriter(path) as writer:
        writer._file = FullAfter(writer._file, len(line_a) + 7)
        writer.append(a)
        with pytest.raises(OSError, match=f"No space left on device: '{path}'"):
            writer.append(b)
    assert path.read_bytes() == line_a + line_b[:7] and read_records(path) == [a]
    path.write_bytes(good)
    (tmp_path / "results-p1.jsonl").write_bytes(good)
    with pytest.raises(ValueError, match=f"sample 'a' is recorded in both {path} and {tmp_path / 'results-p1.jsonl'}: "
                                         "the records in .* are not one sweep's .* run the sweep again in a new --out"):
        read_all_records(tmp_path)
    (tmp_path / "results-p1.jsonl").unlink()
    path.write_bytes(good + good)
    with pytest.raises(ValueError, match=f"sample 'a' is recorded twice in {path}: "):
        read_all_records(tmp_path)


# -------------------------------------------------------------------------------------------- bad input
def _fails(capsys, *args: str) -> str:
    assert main(_cli(*args)) == 2
    return capsys.readouterr().err


def test_bad_input_gives_clear_messages(coco_hand, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "instances_val2017.json" in _fails(capsys, "coco", "--data", str(tmp_path / "none"), "--out", out)
    assert "needs --data" in _fails(capsys, "coco", "--out", out)
    assert "validation-segmentation" in _fails(capsys, "imagenet-s", "--split", "50", "--data", str(coco_hand),
                                               "--out", out)
    tench = f"{split_wnids(919)[0]}/x"  # not an ImageNet-S50 class
    inets = write_imagenet_s(tmp_path / "inets", {tench: (painted(8, 8, []), np.ones((8, 8), int))})
    assert "unknown class folder" in _fails(capsys, "imagenet-s", "--split", "50", "--data", str(inets), "--out", out)
    assert "needs --split" in _fails(capsys, "imagenet-s", "--data", str(inets), "--out", out)
    assert "--data is not used" in _fails(capsys, "synthetic", "--data", str(inets), "--out", out)
    # A flag of another dataset is refused, not ignored (as if it had applied).
    for dataset, flag, value, message in [("voc", "--crowd", "drop", "--crowd applies to coco and coco-seg only, "
                                           "not voc"),
                                          ("coco-seg", "--coco-source", "tfds", "--coco-source tfds is for coco "
                                           "boxes"),
                                          ("voc", "--coco-source", "raw", "--coco-source applies to coco and "
                                           "coco-seg only, not voc"),
                                          ("coco", "--split", "300", "--split applies to imagenet-s only, not coco"),
                                          ("imagenet-s", "--protocol", "blur", "--protocol applies to synthetic only")]:
        assert message in _fails(capsys, dataset, "--data", str(coco_hand), flag, value, "--out", out)
    assert not pathlib.Path(out).exists()
    taken = _fails(capsys, "coco-seg", "--coco-source", "raw", "--data", str(tmp_path / "none"), "--out", out)
    assert "--coco-source" not in taken and "instances_val2017.json" in taken  # the flag is taken; the data missing
    assert "unknown method 'nope'" in _fails(capsys, "coco", "--data", str(coco_hand), "--method", "nope", "--out", out)
    # A method's setting is a flag, refused as argparse refuses flags: before the dataset is read.
    for flags in [("--sigma", "-1"), ("--option", "sigma=-1"), ("--method", "nope")]:
        message = _fails(capsys, "coco", "--data", str(tmp_path / "none"), *flags, "--out", out)
        assert flags[-1].partition("=")[0].lstrip("-") in message and "instances_val2017" not in message
    method = ("--method", "test_sweep:Painted")
    assert main(_cli("coco", "--data", str(coco_hand), *method, "--limit", "1", "--out", out)) == 0
    capsys.readouterr()
    assert "pass --resume" in _fails(capsys, "coco", "--data", str(coco_hand), *method, "--limit", "1", "--out", out)
    message = _fails(capsys, "coco", "--data", str(coco_hand), *method, "--limit", "1", "--crowd", "drop",
                     "--resume", "--out", out)
    assert "cannot resume" in message and "source" in message
    # A changed setting is named by its path in sweep.json, with both values, on one line.
    message = _fails(capsys, "coco", "--data", str(coco_hand), *method, "--limit", "1", "--box-rule", "contour",
                     "--resume", "--out", out)
    assert "run.settings.box_rule (stored 'component', now 'contour')" in message
    assert message.count("\n") == 1



def test_dataset_flags_take_their_choices_and_defaults_from_the_dataset_options(monkeypatch, capsys):
    """--split, --coco-source, --crowd and --protocol: each choice list and default has one home
    (`tclip_jax.evaluation.datasets.options`), which the flags, their help, their checks and the dataset functions'
    defaults read. A flag left out chooses what the Python function chooses with its argument left out, and the
    source sweep.json records (which a resume compares) is spelled as it always was."""
    import argparse
    import inspect

    from tclip_jax.cli import sweep as cli_sweep
    from tclip_jax.evaluation import datasets
    from tclip_jax.evaluation.datasets import coco, imagenet_s, options, synthetic as synthetic_datasets
    from tclip_jax.synthetic import PROTOCOLS, heldout_source

    assert coco.CROWD_MODES is options.CROWD_MODES and imagenet_s.SPLITS is options.SPLITS
    assert synthetic_datasets.PROTOCOLS is PROTOCOLS
    parser = argparse.ArgumentParser()
    cli_sweep.add_arguments(parser)
    flags = {action.dest: action for action in parser._actions}
    assert (flags["split"].choices, flags["crowd"].choices, flags["protocol"].choices) == (
        options.SPLITS, options.CROWD_MODES, PROTOCOLS)
    defaults = {name: inspect.signature(function).parameters[argument].default for name, function, argument in [
        ("crowd", coco.coco_dataset, "crowd"), ("crowd_seg", coco.coco_seg_dataset, "crowd"),
        ("crowd_tfds", coco.tfds_coco_dataset, "crowd"), ("protocol", synthetic_datasets.synthetic_dataset,
                                                          "protocol")]}
    assert len({defaults["crowd"], defaults["crowd_seg"], defaults["crowd_tfds"]}) == 1
    assert f"(default: {defaults['crowd']})" in flags["crowd"].help
    assert f"(default: {defaults['protocol']})" in flags["protocol"].help
    calls = []
    for name in ("coco_dataset", "coco_seg_dataset", "tfds_coco_dataset", "synthetic_dataset", "imagenet_s_dataset"):
        monkeypatch.setattr(datasets, name, lambda *args, _name=name, **kwargs: calls.append((_name, args, kwargs)))
    chosen = {}
    for command in (["coco"], ["coco-seg"], ["coco", "--coco-source", "tfds", "--crowd", "drop"], ["synthetic"],
                    ["synthetic", "--protocol", "blur"], ["imagenet-s", "--split", "300"]):
        args = parser.parse_args([*command, "--out", "o"])
        data = None if command[0] == "synthetic" else "/d"
        _, source = cli_sweep._dataset_and_source(args, 3, data)
        chosen[" ".join(command)] = (calls.pop(), source)
    assert chosen == {
        "coco": (("coco_dataset", ("/d",), {"crowd": defaults["crowd"]}), "coco val2017 in /d, crowd keep"),
        "coco-seg": (("coco_seg_dataset", ("/d",), {"crowd": defaults["crowd"]}),
                     "coco val2017 masks in /d, crowd keep"),
        "coco --coco-source tfds --crowd drop": (("tfds_coco_dataset", ("/d",), {"crowd": "drop"}),
                                                 "tfds coco/2017 validation in /d, crowd drop"),
        "synthetic": (("synthetic_dataset", (3, defaults["protocol"]), {}), heldout_source("captions")),
        "synthetic --protocol blur": (("synthetic_dataset", (3, "blur"), {}), heldout_source("blur")),
        "imagenet-s --split 300": (("imagenet_s_dataset", ("/d", 300), {}), "imagenet-s300 validation in /d")}
    # The choices and the missing split are refused in the lists' own words.
    for command, message in [(["imagenet-s", "--split", "7"], "argument --split: invalid choice: 7 (choose from "
                               + ", ".join(map(str, options.SPLITS)) + ")"),
                              (["coco", "--crowd", "some"], "argument --crowd: invalid choice: 'some' (choose from "
                               + ", ".join(map(repr, options.CROWD_MODES)) + ")")]:
        with pytest.raises(SystemExit):
            main(_cli(*command, "--out", "/nonexistent/o"))
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="^imagenet-s needs --split 50, 300 or 919 "):
        cli_sweep._dataset_and_source(parser.parse_args(["imagenet-s", "--out", "o"]), None, "/d")

def test_a_pointing_game_tolerance_that_no_unit_could_hit_is_refused(tmp_path, capsys):
    """TorchRay's hit is a mask pixel strictly closer than the tolerance (its reference: tolerance 0 hits nowhere,
    not even a point inside an all-foreground mask), so --pg-tolerance 0 would score every unit a miss."""
    assert not pointing_hit(np.ones((8, 8), bool), (3, 3), tolerance=0)
    out = tmp_path / "out"
    message = _fails(capsys, "synthetic", "--limit", "1", "--pg-tolerance", "0", "--out", str(out))
    assert "tolerance must be >= 1, got 0" in message and message.count("\n") == 1 and not out.exists()
    assert EvalOptions(pg_tolerance=1).pg_tolerance == 1


def test_a_resume_into_a_folder_holding_no_sweep_is_refused_and_leaves_it_as_it_was(tmp_path, capsys):
    """A mistyped --out with --resume started a whole new sweep there (train-eclip --resume refuses alike)."""
    made = tmp_path / "made"
    made.mkdir()
    for out in (tmp_path / "typo", made):
        message = _fails(capsys, "synthetic", "--limit", "1", "--translations", "1", "--resume", "--out", str(out))
        assert message == f"tclip sweep: error: nothing to resume in {out} (no sweep.json); drop --resume to start a " \
                          "sweep there\n"
    assert not (tmp_path / "typo").exists() and list(made.iterdir()) == []


def test_a_coco_seg_polygon_far_off_its_image_is_refused_in_one_line_before_the_sweep_starts(tmp_path):
    """pycocotools crashed the process (SIGSEGV, nothing printed) on a point of 1e300 and left a sweep folder behind;
    in a fresh process, since that crash would end the test session."""
    root = write_coco(tmp_path / "coco", {1: painted(8, 8, [])}, [(1, 1, [0, 0, 4, 4], 0)])
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"] = [[0, 0, 1e300, 0, 0, 1e300]]
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    process = _sweep_process("coco-seg", "--method", "test_sweep:Painted", "--data", str(root), "--out", str(out))
    stdout, stderr = process.communicate(timeout=300)
    assert (process.returncode, stdout) == (2, b""), stderr
    assert stderr.decode().startswith("tclip sweep: error: COCO: ") and stderr.count(b"\n") == 1
    assert "annotations[0] (id 100): segmentation polygon point (1e+300, 0) is outside" in stderr.decode()
    assert not out.exists()


def test_a_sweep_that_scores_no_sample_fails_and_resume_scores_them_once_mended(tmp_path, capsys):
    """Every image unreadable (a dataset in the wrong format throughout): the report is written, with the errors, but
    the command fails in one line; once the data is mended, --resume scores the samples. One that scores some
    samples succeeds, and says on stderr how many failed (it said nothing there: a script saw a clean run)."""
    images = {1: {"file_name": "000000000001.jpg", "height": 8, "width": 8},
              2: {"file_name": "000000000002.jpg", "height": 8, "width": 8}}
    root = write_coco(tmp_path / "coco", images, [(1, 1, [0, 0, 4, 4], 0), (2, 1, [2, 2, 4, 4], 0)],
                      {name: b"not an image" for name in ("000000000001.jpg", "000000000002.jpg")})
    out = str(tmp_path / "out")
    message = _fails(capsys, "coco", "--method", "test_sweep:Painted", "--data", str(root), "--out", out)
    assert message.startswith("tclip sweep: error: no sample could be scored: all 2 failed (the first, 1: ")
    assert message.endswith("--resume tries them again once the data is mended\n")
    assert _report(tmp_path / "out")["images"] == 0
    assert "Nothing was scored: no sample could be read" in (tmp_path / "out" / "report.md").read_text()
    # The run set out to score them: its environment is listed (noted before any sample is scored), and none said
    # to be of a sweep from before environments were recorded.
    from tclip_jax.environment import environment_line, run_environment

    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["environment"] == [run_environment()]
    assert f"Environment: {environment_line(run_environment())}." in (tmp_path / "out" / "report.md").read_text()
    for mended in (1, 2):
        Image.fromarray(painted(8, 8, [])).save(root / "val2017" / images[mended]["file_name"], format="PNG")
        assert main(_cli("coco", "--method", "test_sweep:Painted", "--data", str(root), "--out", out, "--resume")) == 0
        assert _report(tmp_path / "out")["images"] == mended
        assert capsys.readouterr().err == ("tclip sweep: warning: 1 of 2 samples failed, listed in report.md; --resume "
                                           "tries them again\n" if mended == 1 else "")
        assert [run["backend"] for run in json.loads((tmp_path / "out" / "sweep.json").read_text())["environment"]] \
            == [jax.default_backend()]  # the first run that scored, once


def test_a_sweep_with_more_failed_samples_than_report_md_lists_says_report_json_lists_them(tmp_path, capsys):
    """report.md lists the first 20 errors; a sweep with more said they were all "listed in report.md"."""
    from tclip_jax.sweep.report import REPORT_JSON, REPORT_MD

    broken = {index: {"file_name": f"{index:012d}.jpg", "height": 8, "width": 8} for index in range(2, 23)}
    root = write_coco(tmp_path / "coco", {1: painted(8, 8, []), **broken},
                      [(index, 1, [0, 0, 4, 4], 0) for index in range(1, 23)],
                      {image["file_name"]: b"not an image" for image in broken.values()})
    out = tmp_path / "out"
    assert main(_cli("coco", "--method", "test_sweep:Painted", "--data", str(root), "--out", str(out))) == 0
    listed = [line for line in (out / REPORT_MD).read_text().splitlines() if line.startswith("- `")]
    assert len(_report(out)["errors"]) == 21 and len(listed) == 20
    assert capsys.readouterr().err == (f"tclip sweep: warning: 21 of 22 samples failed, listed in {REPORT_JSON} (the "
                                       f"first {len(listed)} in {REPORT_MD}); --resume tries them again\n")


def test_a_sweep_resumed_with_a_larger_limit_is_the_sweep_run_with_it(coco_hand, tmp_path, capsys):
    method = ("--method", "test_sweep:Painted", "--data", str(coco_hand))
    fresh, grown = str(tmp_path / "fresh"), str(tmp_path / "grown")
    assert main(_cli("coco", *method, "--limit", "2", "--out", fresh)) == 0
    assert main(_cli("coco", *method, "--limit", "1", "--out", grown)) == 0
    first = (tmp_path / "grown" / "results-p0.jsonl").read_bytes()
    assert main(_cli("coco", *method, "--limit", "2", "--resume", "--out", grown)) == 0
    records = (tmp_path / "grown" / "results-p0.jsonl").read_bytes()
    assert records.startswith(first) and records.count(b"\n") == 2  # the first record kept, one added
    for name in ("report.json", "sweep.json", "report.md"):
        assert (tmp_path / "grown" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert "Prompts: the bare class names; samples: the first 2." in (tmp_path / "grown" / "report.md").read_text()
    # A resume without --limit continues the sweep as it was (it grew to every sample, silently).
    assert main(_cli("coco", *method, "--resume", "--out", grown)) == 0
    assert (tmp_path / "grown" / "results-p0.jsonl").read_bytes() == records
    for name in ("report.json", "sweep.json"):
        assert (tmp_path / "grown" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    # The report names the template and the samples it covers (two sweeps differing in them read differently).
    templated = tmp_path / "templated"
    assert main(_cli("coco", *method, "--template", "a photo of a {}.", "--out", str(templated))) == 0
    for report in ("report.md", "report.html"):
        text = (templated / report).read_text()
        assert 'Prompts: the template "a photo of a {}."; samples: every sample.' in text.replace("&quot;", '"')
    capsys.readouterr()
    # Shrinking would leave records past the new limit in the report.
    message = _fails(capsys, "coco", *method, "--limit", "1", "--resume", "--out", grown)
    assert "limit (stored 2, now 1)" in message and "may grow, not shrink" in message


def test_a_method_that_inherits_its_name_is_recorded_resumed_and_reported_as_its_class(coco_hand, tmp_path, capsys):
    """A method derived from another without a `name` of its own was recorded as the other: a sweep of that one
    resumed with it and reported both as one. It is "module:Class": refused in one line, and named in the report."""
    data = ("coco", "--data", str(coco_hand), "--out", str(tmp_path / "out"))
    assert main(_cli(*data, "--method", "test_sweep:Painted", "--limit", "1")) == 0
    capsys.readouterr()
    message = _fails(capsys, *data, "--method", "test_sweep:InvertedPainted", "--limit", "2", "--resume")
    assert "run.method (stored 'painted', now 'test_sweep:InvertedPainted')" in message and message.count("\n") == 1
    alone = tmp_path / "alone"
    assert main(_cli("coco", "--data", str(coco_hand), "--method", "test_sweep:InvertedPainted", "--limit", "1",
                     "--out", str(alone))) == 0
    assert _report(alone)["config"]["run"]["method"] == "test_sweep:InvertedPainted"
    assert "the method is test_sweep:InvertedPainted" in (alone / "report.md").read_text()


def test_a_limit_past_the_datasets_end_is_recorded_as_every_sample(coco_hand, tmp_path, capsys):
    """A --limit 10 sweep of coco_hand's 3 samples was stored and reported as "the first 10" (and a whole split swept
    under a large limit lost its paper figures): it is the sweep without a limit. One stored so before resumes, and
    records None from then on; a limit below the dataset's end is then a shrink."""
    method = ("coco", "--method", "test_sweep:Painted", "--data", str(coco_hand))
    whole, past = tmp_path / "whole", tmp_path / "past"
    assert main(_cli(*method, "--out", str(whole))) == 0
    assert main(_cli(*method, "--limit", "10", "--out", str(past))) == 0
    for name in ("sweep.json", "report.json", "report.md"):
        assert (past / name).read_bytes() == (whole / name).read_bytes(), name
    assert "samples: every sample." in (past / "report.md").read_text()
    config = json.loads((past / "sweep.json").read_text())
    (past / "sweep.json").write_text(json.dumps({**config, "limit": 10}))  # as sweeps before 2026-12-06 stored it
    assert main(_cli(*method, "--resume", "--out", str(past))) == 0
    assert json.loads((past / "sweep.json").read_text())["limit"] is None
    capsys.readouterr()
    message = _fails(capsys, *method, "--limit", "2", "--resume", "--out", str(past))
    assert "limit (stored None, now 2)" in message and "may grow, not shrink" in message


def test_a_synthetic_sweep_records_the_scenes_it_sweeps_as_its_limit(tmp_path, capsys, monkeypatch):
    """Without --limit a synthetic sweep takes SYNTHETIC_SCENES scenes (patched to 2 here), but sweep.json stored
    limit None ("every sample"): a resume with a larger --limit was refused as a shrink, and a --limit 1 sweep
    resumed without --limit was accepted and recorded as None. It records the scenes it sweeps, and reads a synthetic
    sweep stored with None as SYNTHETIC_SCENES; a resume that grows it equals the larger sweep run at once, and one
    without --limit keeps its scenes."""
    import tclip_jax.sweep.runner as runner
    import tclip_jax.synthetic as synthetic

    for module in (synthetic, runner):
        monkeypatch.setattr(module, "SYNTHETIC_SCENES", 2)
    sweep = ("synthetic", "--method", "test_sweep:Painted", "--protocol", "bare_words")
    fresh, grown, default = (str(tmp_path / name) for name in ("fresh", "grown", "default"))
    assert main(_cli(*sweep, "--limit", "3", "--out", fresh)) == 0
    assert main(_cli(*sweep, "--out", grown)) == 0
    assert json.loads((tmp_path / "grown" / "sweep.json").read_text())["limit"] == 2
    assert main(_cli(*sweep, "--limit", "3", "--resume", "--out", grown)) == 0
    for name in ("report.json", "sweep.json", "report.md"):
        assert (tmp_path / "grown" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    # A --limit 1 sweep resumed without --limit keeps its limit (it grew to the default, silently).
    assert main(_cli(*sweep, "--limit", "1", "--out", default)) == 0
    assert main(_cli(*sweep, "--resume", "--out", default)) == 0
    assert (_report(tmp_path / "default")["images"], _report(tmp_path / "default")["config"]["limit"]) == (1, 1)
    # A sweep stored before the limit was recorded (None) holds the default number of scenes.
    config = json.loads((tmp_path / "default" / "sweep.json").read_text())
    (tmp_path / "default" / "sweep.json").write_text(json.dumps({**config, "limit": None}))
    capsys.readouterr()
    message = _fails(capsys, *sweep, "--limit", "1", "--resume", "--out", default)
    assert "limit (stored 2, now 1)" in message and "may grow, not shrink" in message
    assert main(_cli(*sweep, "--limit", "3", "--resume", "--out", default)) == 0
    assert _report(tmp_path / "default")["images"] == 3


def test_a_synthetic_sweep_does_not_resume_under_another_opencv(tmp_path, capsys, monkeypatch):
    """OpenCV draws the scenes (fillPoly, resize, blur, JPEG), and another version paints some pixels otherwise: a
    resume under it added other scenes to the sweep's. sweep.json's source names the version, so a resume under
    another is refused as another source; a sweep stored before it did (no version) resumes, recorded as this one's."""
    import cv2

    sweep = ("synthetic", "--method", "test_sweep:Painted", "--protocol", "bare_words")
    out = tmp_path / "out"
    assert main(_cli(*sweep, "--limit", "1", "--out", str(out))) == 0
    drawn = f"held-out synthetic scenes, protocol bare_words, drawn with OpenCV {cv2.__version__}"
    assert json.loads((out / "sweep.json").read_text())["source"] == drawn
    capsys.readouterr()
    with monkeypatch.context() as patched:
        patched.setattr(cv2, "__version__", "4.8.0")
        message = _fails(capsys, *sweep, "--limit", "2", "--resume", "--out", str(out))
    assert message == (f"tclip sweep: error: cannot resume {out}: the sweep there differs in source (stored {drawn!r}, "
                       "now 'held-out synthetic scenes, protocol bare_words, drawn with OpenCV 4.8.0')\n")
    # Stored before the version was recorded: resumed, and recorded with it from now on.
    config = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_text(json.dumps({**config, "source": "held-out synthetic scenes, protocol bare_words"}))
    assert main(_cli(*sweep, "--limit", "2", "--resume", "--out", str(out))) == 0
    assert json.loads((out / "sweep.json").read_text())["source"] == drawn
    assert _report(out)["images"] == 2


def test_a_sweep_records_the_environment_of_each_run_that_scored_and_resumes_in_another(tmp_path, monkeypatch):
    """sweep.json's "environment": library versions (the running modules') and JAX's backend and devices of each run
    that scored samples, a run in the environment of the one before not listed again, a run that scored nothing (a
    resume with nothing left) not at all; another environment is not refused, and report.md names them. A sweep
    stored before runs were recorded lists None first."""
    import cv2
    import jax
    import numpy as np

    import tclip_jax.sweep.runner as runner

    sweep = ("synthetic", "--method", "test_sweep:Painted", "--protocol", "bare_words")
    out = tmp_path / "out"
    assert main(_cli(*sweep, "--limit", "1", "--out", str(out))) == 0
    (first,) = json.loads((out / "sweep.json").read_text())["environment"]
    assert (first["jax"], first["numpy"], first["opencv"]) == (jax.__version__, np.__version__, cv2.__version__)
    devices = jax.local_devices()
    assert (first["backend"], first["devices"]) == (jax.default_backend(), f"{len(devices)} x {devices[0].device_kind}")
    assert main(_cli(*sweep, "--limit", "2", "--resume", "--out", str(out))) == 0  # the same environment: one entry
    assert json.loads((out / "sweep.json").read_text())["environment"] == [first]
    upgraded = {**first, "jax": "99.0"}
    with monkeypatch.context() as patched:
        patched.setattr(runner, "run_environment", lambda: upgraded)
        assert main(_cli(*sweep, "--limit", "2", "--resume", "--out", str(out))) == 0  # nothing left: not listed
        assert json.loads((out / "sweep.json").read_text())["environment"] == [first]
        assert main(_cli(*sweep, "--limit", "3", "--resume", "--out", str(out))) == 0
    assert json.loads((out / "sweep.json").read_text())["environment"] == [first, upgraded]
    assert _report(out)["images"] == 3
    report = (out / "report.md").read_text()
    assert f"jax {jax.__version__}" in report and "; then " in report and "jax 99.0" in report
    # Stored before runs were recorded: None stands for those runs.
    config = json.loads((out / "sweep.json").read_text())
    del config["environment"]
    (out / "sweep.json").write_text(json.dumps(config))
    assert main(_cli(*sweep, "--limit", "4", "--resume", "--out", str(out))) == 0
    assert json.loads((out / "sweep.json").read_text())["environment"] == [None, first]
    said = ", ".join(f"{name} {first[name]}" for name in sorted(first))
    assert ("Environment, by run (a run in the environment of the one before not listed again): not recorded (runs "
            f"before 2026-12-07); then {said}.") in (out / "report.md").read_text()


def test_the_environment_names_tclip_jax_as_installed_only_where_that_install_is_the_code_that_runs(tmp_path,
                                                                                                    monkeypatch):
    """The installed distribution's version (and commit) was recorded whatever code ran: a checkout run from its
    folder before another install on the path was recorded as that install. A distribution found first on the path
    (here a made one) names the running code only where it locates it, or is an editable install of its folder; that
    one was recorded as its bare version, the same string for every commit and edit of the folder (pip records no
    commit for it), and now names the folder too."""
    import tclip_jax
    import tclip_jax.environment as environment

    running = pathlib.Path(tclip_jax.__file__).resolve().parent

    def installed(direct_url: dict) -> str:
        info = tmp_path / "site" / "tclip_jax-0.0.9.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tclip_jax\nVersion: 0.0.9\n")
        (info / "direct_url.json").write_text(json.dumps(direct_url))
        environment._versions.cache_clear()
        with monkeypatch.context() as patched:
            patched.syspath_prepend(str(tmp_path / "site"))
            return environment.run_environment()["tclip_jax"]

    commit = {"vcs_info": {"vcs": "git", "commit_id": "a" * 40}}
    try:
        assert installed({"url": "https://example.org/tclip_jax.git", **commit}) == f"source at {running}"
        editable = {"url": running.parent.as_uri(), "dir_info": {"editable": True}}
        assert installed(editable) == f"0.0.9 (editable, source at {running})"
        # a commit recorded with an editable install is the install's; the folder's code may have moved on since
        assert installed({**editable, **commit}) == f"0.0.9 (editable, source at {running})"
        elsewhere = {"url": (tmp_path / "another-checkout").as_uri(), "dir_info": {"editable": True}}
        assert installed(elsewhere) == f"source at {running}"
    finally:
        environment._versions.cache_clear()


def test_a_synthetic_sweep_past_the_held_out_seeds_is_refused_up_front(tmp_path, capsys):
    """--limit 1000001 made a million samples before any check (--limit 100000000: many GB, then "out of memory ...
    a smaller --batch-size"); it is refused in one line naming the most there are, before anything is made."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not a sweep")  # an unfixed sweep, past its samples, stops here
    message = _fails(capsys, "synthetic", "--method", "test_sweep:Painted", "--limit", "1000001", "--out", str(out))
    assert message.count("\n") == 1 and "--limit 1000001: at most 1000000 held-out seeds (one per scene) from offset 0" in message
    assert "got 1000001" in message and os.listdir(out) == ["notes.txt"]


def test_a_sweep_does_not_resume_over_annotations_edited_since_it_began(coco_hand, tmp_path, capsys):
    data = tmp_path / "coco"
    shutil.copytree(coco_hand, data)
    method = ("--method", "test_sweep:Painted", "--data", str(data))
    out = str(tmp_path / "out")
    assert main(_cli("coco", *method, "--limit", "1", "--out", out)) == 0
    instances = data / "annotations" / "instances_val2017.json"
    original = instances.read_text()
    edited = json.loads(original)
    edited["annotations"][-1]["bbox"][0] += 1  # one box moved by a pixel
    instances.write_text(json.dumps(edited))
    capsys.readouterr()
    message = _fails(capsys, "coco", *method, "--limit", "3", "--resume", "--out", out)
    assert "data_fingerprint (stored '" in message and "the annotations were edited since the sweep began" in message
    instances.write_text(original)
    stored = json.loads((tmp_path / "out" / "sweep.json").read_text())
    del stored["data_fingerprint"]  # a sweep stored before datasets had fingerprints resumes as before
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(stored))
    assert main(_cli("coco", *method, "--limit", "3", "--resume", "--out", out)) == 0
    assert "data_fingerprint" in json.loads((tmp_path / "out" / "sweep.json").read_text())


def test_a_sweep_resumes_on_its_dataset_moved_to_another_folder(coco_hand, tmp_path, capsys):
    """The annotations' fingerprint tells the data: a dataset moved (or mounted elsewhere) resumes and its sweep
    gives the uninterrupted report; the source's other parts (crowd handling) and edited annotations still refuse."""
    first, moved = tmp_path / "first" / "coco", tmp_path / "moved" / "coco"
    shutil.copytree(coco_hand, first)
    out, whole = str(tmp_path / "out"), str(tmp_path / "whole")
    method = ("--method", "test_sweep:Painted")
    assert main(_cli("coco", *method, "--data", str(first), "--limit", "1", "--out", out)) == 0
    first.parent.rename(moved.parent)
    capsys.readouterr()
    message = _fails(capsys, "coco", *method, "--data", str(moved), "--crowd", "drop", "--limit", "3", "--resume",
                     "--out", out)
    assert "source (stored 'coco val2017 in " in message and "crowd keep'" in message
    assert main(_cli("coco", *method, "--data", str(moved), "--limit", "3", "--resume", "--out", out)) == 0
    assert main(_cli("coco", *method, "--data", str(moved), "--limit", "3", "--out", whole)) == 0
    for name in ("report.json", "sweep.json", "report.md"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    instances = moved / "annotations" / "instances_val2017.json"
    edited = json.loads(instances.read_text())
    edited["annotations"][-1]["bbox"][0] += 1
    instances.write_text(json.dumps(edited))
    moved.parent.rename(first.parent)
    capsys.readouterr()
    message = _fails(capsys, "coco", *method, "--data", str(first), "--limit", "3", "--resume", "--out", out)
    assert "data_fingerprint (stored '" in message and "source (stored '" in message
    # A sweep stored before datasets had fingerprints has nothing to tell a moved dataset by: its folder counts.
    stored = json.loads((tmp_path / "out" / "sweep.json").read_text())
    del stored["data_fingerprint"]
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(stored))
    message = _fails(capsys, "coco", *method, "--data", str(first), "--limit", "3", "--resume", "--out", out)
    assert "source (stored 'coco val2017 in " in message and "data_fingerprint" not in message


def test_a_sweep_resumes_on_its_model_by_its_weights_not_by_the_path_as_typed(tiny_model, tmp_path, capsys,
                                                                             monkeypatch):
    """The model is compared by `LoadedClip.fingerprint` (its config and every weight): the same file named another
    way, or saved in another format, resumes; another model at the same path, even one whose transformer blocks alone
    differ, or the same weights under another --activation, is refused."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_model, "m.npz")
    sweep = ("synthetic", "--protocol", "bare_words", "--translations", "1")
    assert main(_cli(*sweep, "--model", "m.npz", "--limit", "1", "--out", "out")) == 0
    assert main(_cli(*sweep, "--model", "./m.npz", "--limit", "2", "--resume", "--out", "out")) == 0
    assert main(_cli(*sweep, "--model", "./m.npz", "--limit", "2", "--out", "fresh")) == 0
    for name in ("sweep.json", "report.json"):  # the origin recorded is the one the resume was named by
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    with np.load("m.npz") as weights:  # the same weights in another format
        safetensors.numpy.save_file(dict(weights), "m.safetensors")
    assert main(_cli(*sweep, "--model", "m.safetensors", "--limit", "3", "--resume", "--out", "fresh")) == 0
    assert _report(tmp_path / "out")["config"]["run"]["model"]["activation"] == "quick_gelu"  # OpenAI's default
    capsys.readouterr()
    message = _fails(capsys, *sweep, "--model", "m.npz", "--activation", "gelu", "--limit", "3", "--resume",
                     "--out", "out")
    assert "run.model.activation (stored 'quick_gelu', now 'gelu')" in message and "whatever its path" in message
    rng = np.random.default_rng(0)
    with np.load(tiny_model) as weights:  # a fine-tune of the transformer blocks alone (a merged LoRA), put where the
        # first was: projections, final norms and embeddings as they were
        tuned = {k: v + (0.1 * rng.standard_normal(v.shape) * v.std()).astype(v.dtype) if ".resblocks." in k else v
                 for k, v in weights.items()}
    np.savez("m.npz", **tuned)
    message = _fails(capsys, *sweep, "--model", "m.npz", "--limit", "3", "--resume", "--out", "out")
    assert "run.model.fingerprint (stored 'v2-" in message and "not the sweep's model" in message
    assert message.count("\n") == 1 and _lines(tmp_path / "out" / "results-p0.jsonl") == 2
    # A sweep stored before models had fingerprints resumes as before: by its origin, as typed.
    shutil.copy(tiny_model, "m.npz")
    stored = json.loads((tmp_path / "out" / "sweep.json").read_text())
    for field in ("fingerprint", "activation"):
        del stored["run"]["model"][field]
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(stored))
    assert "run.model.origin (stored './m.npz', now 'm.npz')" in _fails(capsys, *sweep, "--model", "m.npz", "--limit",
                                                                        "3", "--resume", "--out", "out")
    assert main(_cli(*sweep, "--model", "./m.npz", "--limit", "3", "--resume", "--out", "out")) == 0
    fingerprint = json.loads((tmp_path / "fresh" / "sweep.json").read_text())["run"]["model"]["fingerprint"]
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["run"]["model"]["fingerprint"] == fingerprint
    # One stored with the fingerprint's first definition (16 hex digits, no "v2-") is told by that definition: this
    # model, spelt another way, resumes and the new fingerprint is recorded; another model at its path is refused.
    stored = json.loads((tmp_path / "out" / "sweep.json").read_text())
    stored["run"]["model"]["fingerprint"] = first_fingerprint(load_clip("m.npz"))
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(stored))
    with np.load(tiny_model) as weights:  # another model: its positional embedding, which the first definition reads
        other = {k: v * 1.5 if k == "positional_embedding" else v for k, v in weights.items()}
    np.savez("other.npz", **other)
    shutil.copy("other.npz", "m.npz")
    message = _fails(capsys, *sweep, "--model", "m.npz", "--limit", "4", "--resume", "--out", "out")
    assert "not the sweep's model" in message and _lines(tmp_path / "out" / "results-p0.jsonl") == 3
    shutil.copy(tiny_model, "m.npz")
    message = _fails(capsys, *sweep, "--model", "m.npz", "--activation", "gelu", "--limit", "4", "--resume",
                     "--out", "out")
    assert "run.model.activation (stored 'quick_gelu', now 'gelu')" in message
    assert main(_cli(*sweep, "--model", "m.npz", "--limit", "4", "--resume", "--out", "out")) == 0
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["run"]["model"]["fingerprint"] == fingerprint
    assert _lines(tmp_path / "out" / "results-p0.jsonl") == 4


def test_a_sweep_records_a_matmul_precision_other_than_the_default_and_resumes_only_at_it(tiny_model, tmp_path,
                                                                                          capsys, monkeypatch):
    """JAX's matmul precision (its default runs float32 matmuls as bfloat16 passes on TPU) is recorded where it is not
    the default, and runs the sweep's dispatching threads too (a `jax.default_matmul_precision` context is its own
    thread's); a sweep begun under one is not resumed under another (its records would mix both), and the command
    line sets one as README says, by JAX_DEFAULT_MATMUL_PRECISION."""
    from tclip_jax.methods.base import matmul_precision
    from tclip_jax.methods.devices import DeviceMaps

    dispatched_at = []
    made = DeviceMaps.__init__

    def noting(self, *args):
        made(self, *args)
        maps = self._maps
        self._maps = lambda *inputs: dispatched_at.append(matmul_precision()) or maps(*inputs)

    monkeypatch.setattr(DeviceMaps, "__init__", noting)
    monkeypatch.chdir(tmp_path)
    sweep = ("synthetic", "--protocol", "bare_words", "--method", "similarity", "--model", tiny_model)
    with jax.default_matmul_precision("float32"):  # "highest" by another name
        assert main(_cli(*sweep, "--limit", "1", "--out", "out")) == 0
    assert dispatched_at == ["highest"]
    assert _report(tmp_path / "out")["config"]["run"]["model"]["matmul_precision"] == "highest"
    assert "similarity (" + tiny_model + ") (matmul precision highest)" in (tmp_path / "out" / "report.md").read_text()
    message = _fails(capsys, *sweep, "--limit", "2", "--resume", "--out", "out")
    assert "run.model.matmul_precision (stored 'highest', now None)" in message and message.count("\n") == 1
    assert _lines(tmp_path / "out" / "results-p0.jsonl") == 1
    resumed = _sweep_process(*sweep, "--limit", "2", "--resume", "--out", "out",
                             env_extra={"JAX_DEFAULT_MATMUL_PRECISION": "highest"})
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert _lines(tmp_path / "out" / "results-p0.jsonl") == 2
    assert main(_cli(*sweep, "--limit", "1", "--out", "default")) == 0  # JAX's default: recorded as before
    assert "matmul_precision" not in _report(tmp_path / "default")["config"]["run"]["model"]


def test_a_sweep_resumes_on_its_model_converted_by_tclip_convert(tiny_model, tmp_path):
    """`tclip convert` stores the same weights another way (source 'tclip', not 'openai'), as the fingerprint says: a
    sweep resumes on the converted model and gives the sweep run on it."""
    converted = str(tmp_path / "converted")
    assert main(["convert", tiny_model, "--out", converted]) == 0
    sweep = ("synthetic", "--protocol", "bare_words", "--translations", "1")
    out, fresh = str(tmp_path / "out"), str(tmp_path / "fresh")
    assert main(_cli(*sweep, "--model", tiny_model, "--limit", "1", "--out", out)) == 0
    assert main(_cli(*sweep, "--model", converted, "--limit", "2", "--resume", "--out", out)) == 0
    assert main(_cli(*sweep, "--model", converted, "--limit", "2", "--out", fresh)) == 0
    for name in ("sweep.json", "report.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()


def test_the_template_of_the_bare_names_resumes_a_sweep_without_one(coco_hand, tmp_path):
    """'{}' prompts with the bare class names, as no template does: either resumes a sweep stored with the other,
    also one stored before '{}' was stored as no template."""
    method = ("--method", "test_sweep:Painted", "--data", str(coco_hand))
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert main(_cli("coco", *method, "--limit", "1", "--out", str(out))) == 0
    assert main(_cli("coco", *method, "--template", "{}", "--limit", "2", "--resume", "--out", str(out))) == 0
    stored = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_text(json.dumps({**stored, "template": "{}"}))
    assert main(_cli("coco", *method, "--limit", "3", "--resume", "--out", str(out))) == 0
    assert main(_cli("coco", *method, "--template", "{}", "--limit", "3", "--out", str(fresh))) == 0
    for name in ("sweep.json", "report.json", "report.md"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes()
    assert "Prompts: the bare class names" in (fresh / "report.md").read_text()


@pytest.mark.parametrize("name", ["...", "&amp;"])  # "&amp;" is "&" once cleaned, as CLIP cleans text
def test_a_coco_category_named_without_a_word_is_refused_before_the_sweep(tmp_path, capsys, name):
    """A class prompt names its class by its words: a category named "..." failed in TCLIP's prompt check, naming
    neither the category nor the file. The dataset check names both, in one line, before anything is written."""
    root = write_coco(tmp_path / "coco", {1: painted(8, 8, [])}, [(1, 1, [0, 0, 4, 4], 0)])
    instances = root / "annotations" / "instances_val2017.json"
    data = json.loads(instances.read_text())
    data["categories"][-1]["name"] = name
    instances.write_text(json.dumps(data))
    out = tmp_path / "out"
    message = _fails(capsys, "coco", "--data", str(root), "--out", str(out))
    assert f"{instances}: categories[79] (id 90): name {name!r} has no word (no letter or digit)" in message
    assert message.count("\n") == 1 and not out.exists()


def test_every_sweep_flag_has_help_and_is_in_the_readme():
    from tclip_jax.cli import build_parser

    sweep = build_parser()._subparsers._group_actions[0].choices["sweep"]
    readme = (TESTS.parent / "README.md").read_text()
    flagged = [action for action in sweep._actions if action.option_strings and action.dest != "help"]
    assert [action.dest for action in flagged if not action.help] == []
    assert [action.option_strings[0] for action in flagged  # a --x/--no-x pair is named by either
            if not any(flag in readme for flag in action.option_strings if flag.startswith("--"))] == []


def test_the_command_lines_parser_imports_no_jax():
    """`tclip --help` and argument errors build every sub-command's parser: the sweep's once imported the synthetic
    dataset module (for its default scene count), which imports JAX (1.5 s)."""
    code = "import sys; from tclip_jax.cli import build_parser; build_parser(); print('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_a_lock_names_its_holder_alone_and_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch):
    """A killed holder's longer text stays in the file: the new holder's name replaces it whole. A file that cannot be
    opened (another user's, left by a killed run) is named with what to do, not a PermissionError."""
    from tclip_jax.files import held_lock

    path = tmp_path / "x.lock"
    path.write_text("process 1 on a-very-long-host-name-of-a-killed-run.cluster.example.org")
    with held_lock(path, "sweep", tmp_path):
        with pytest.raises(ValueError) as refused:
            with held_lock(path, "sweep", tmp_path):
                pass
    assert str(refused.value) == (f"another sweep (process {os.getpid()} on {socket.gethostname()}) is running in "
                                  f"{tmp_path} (it holds x.lock); wait for it to end or choose another --out")
    assert not path.exists()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ValueError, match=f"^cannot open {path}, the lock of a sweep in {tmp_path} \\(Permission "
                                         "denied\\): if no sweep runs there, remove it$"):
        with held_lock(path, "sweep", tmp_path):
            pass
    import tclip_jax.files

    monkeypatch.setattr(tclip_jax.files, "fcntl", None)  # as on Windows
    with pytest.raises(ValueError, match="^a sweep needs POSIX file locks \\(fcntl\\), which this system does not "
                                         "have$"):
        with held_lock(path, "sweep", tmp_path):
            pass


def test_datasets_fingerprint_their_annotations(tmp_path):
    from tclip_jax.evaluation.datasets import voc_dataset
    from test_datasets import write_voc

    labels = np.zeros((8, 8), np.int64)
    labels[2:5, 2:5] = 3
    root = write_voc(tmp_path / "voc", {"a": (painted(8, 8, []), labels), "b": (painted(8, 8, []), labels)})
    first = voc_dataset(root).fingerprint
    assert first and voc_dataset(root).fingerprint == first
    (root / "ImageSets/Segmentation/val.txt").write_text("b\na\n")  # another order: other indices
    assert voc_dataset(root).fingerprint != first
    reordered = voc_dataset(root).fingerprint
    wider = labels.copy()
    wider[5:7, 1:7] = 3
    write_voc(root, {"a": (painted(8, 8, []), wider)}, split_lines=["b", "a"])  # another label for a (other size)
    assert voc_dataset(root).fingerprint != reordered
    wnid = split_wnids(50)[0]
    inets = write_imagenet_s(tmp_path / "inets", {f"{wnid}/x": (painted(8, 8, []), np.ones((8, 8), int))})
    before = imagenet_s_dataset(inets, 50).fingerprint
    wider = np.ones((8, 8), int)
    wider[0, :] = 0
    write_imagenet_s(inets, {f"{wnid}/x": (painted(8, 8, []), wider)})
    assert before and imagenet_s_dataset(inets, 50).fingerprint != before
    assert synthetic_dataset(2).fingerprint == ""  # generated: its protocol and seeds are the sweep's own config


def test_the_paper_figure_is_shown_only_beside_a_run_as_the_paper_ran_it():
    from tclip_jax.methods.tclip.settings import Settings
    from tclip_jax.sweep.report import PAPER, markdown, paper_figures

    paper_run = {"method": "tclip", "settings": Settings().to_dict(), "input_protocol": "whole",
                 "model": {"origin": "openai/clip-vit-base-patch32", "source": "hf", "architecture": "ViT-B/32"}}
    from tclip_jax.evaluation.options import EvalOptions

    config = {"run": paper_run, "dataset": "coco", "limit": None, "template": None,
              "source": "coco val2017 in /data/coco, crowd keep", "evaluation": EvalOptions().to_dict()}
    # The whole split, every image scored: COCO val2017's images with an annotation (4952 of the 5000 in
    # instances_val2017.json), ImageNet-S919's annotated validation images (12419, its README's table).
    whole = {"coco": {"images": 4952, "errors": []}, "imagenet-s919": {"images": 12419, "errors": []}}
    assert paper_figures(config, whole["coco"]) == (PAPER["coco"], "")
    assert paper_figures({**config, "dataset": "imagenet-s919"}, whole["imagenet-s919"])[0] == PAPER["imagenet-s919"]
    # The seed metrics add a table and change none of the paper's figures; COCO's boxes depend on no threshold.
    seed_and_otsu = EvalOptions(metrics="seed", threshold="otsu", pg_tolerance=3).to_dict()
    assert paper_figures({**config, "evaluation": seed_and_otsu}, whole["coco"]) == (PAPER["coco"], "")
    assert paper_figures({**config, "template": "{}"}, whole["coco"]) == (PAPER["coco"], "")  # the bare names too
    assert paper_figures({**config, "dataset": "imagenet-s919", "evaluation": EvalOptions(metrics="seed").to_dict()},
                         whole["imagenet-s919"])[0] == PAPER["imagenet-s919"]
    # The configuration alone showed them beside a subset of the split (its annotations filtered by hand, a
    # --limit past the subset's size is recorded as every sample) and beside a run with failed samples.
    def scored(images: int, errors: int = 0) -> dict:
        return {"images": images, "errors": [{"key": str(k), "error": "ValueError: ..."} for k in range(errors)]}

    for dataset, summary, reason in [("coco", scored(4951), "scored 4951 images, the whole split 4952"),
                                     ("coco", scored(5000), "scored 5000 images, the whole split 4952"),
                                     ("imagenet-s919", scored(100), "scored 100 images, the whole split 12419"),
                                     ("coco", scored(4951, 1), "1 sample could not be scored")]:
        figures, why = paper_figures({**config, "dataset": dataset}, summary)
        assert figures == {} and reason in why, (dataset, summary)
    detection = {"units": 1, "box_accuracy": 0.5, "box_accuracy_class_mean": 0.5, "mean_iou": 0.5}
    shown = markdown(config, {**whole["coco"], "units": 1, "detection": detection})
    assert "| paper: TCLIP (ViT-B/32) | 19.07 |" in shown
    subset = markdown(config, {"images": 500, "errors": [], "units": 1, "detection": detection})
    assert "paper: TCLIP" not in subset
    assert ("No paper figure is shown: the sweep scored 500 images, the whole split 4952 (val2017's images with an "
            "annotation).") in subset
    # The paper's ImageNet-S figures are of the 919-class split (benchmarks/RESULTS.md), not of the smaller ones.
    changes = [({"dataset": "synthetic-captions"}, "no synthetic-captions figures"),
               ({"dataset": "imagenet-s50"}, "no imagenet-s50 figures"),
               ({"dataset": "imagenet-s300"}, "no imagenet-s300 figures"),
               ({"limit": 50}, "first 50 samples"),
               ({"run": {**paper_run, "method": "hilacam"}}, "the method is hilacam"),
               ({"run": {**paper_run, "model": {**paper_run["model"], "architecture": "ViT-L/14"}}}, "not OpenAI's"),
               ({"run": {**paper_run, "model": {**paper_run["model"], "source": "tclip"}}}, "not OpenAI's"),
               ({"run": {**paper_run, "settings": Settings(translations=1).to_dict()}}, "settings differ"),
               ({"template": "a photo of a {}."}, "the prompts fill a template"),
               ({"source": "coco val2017 in /data/coco, crowd drop"}, "crowd boxes are dropped"),
               ({"dataset": "imagenet-s919", "evaluation": EvalOptions(threshold="otsu").to_dict()},
                "the evaluation's threshold is not the paper's"),
               ({"dataset": "imagenet-s919", "evaluation": EvalOptions(pg_tolerance=15).to_dict()},
                "the evaluation's pg_tolerance is not the paper's")]
    for change, reason in changes:
        figures, why = paper_figures({**config, **change}, whole.get(change.get("dataset", "coco"), whole["coco"]))
        assert figures == {} and reason in why


def test_damaged_sweep_state_is_named(coco_hand, tmp_path, capsys):
    out = tmp_path / "out"
    method = ("--method", "test_sweep:Painted")
    assert main(_cli("coco", "--data", str(coco_hand), *method, "--limit", "1", "--out", str(out))) == 0
    capsys.readouterr()
    (out / "sweep.json").write_text('{"run": ')
    message = _fails(capsys, "coco", "--data", str(coco_hand), *method, "--limit", "1", "--resume", "--out", str(out))
    assert "sweep.json is damaged" in message and "new --out" in message
    (out / "sweep.json").write_text("[]")
    assert "is not a tclip sweep configuration" in _fails(capsys, "coco", "--data", str(coco_hand), *method,
                                                          "--limit", "1", "--resume", "--out", str(out))
    # Records without sweep.json: not a new sweep (which kept them as its own, whatever they were run with).
    records = (out / "results-p0.jsonl").read_bytes()
    (out / "sweep.json").unlink()
    for resume in ((), ("--resume",)):
        message = _fails(capsys, "coco", "--data", str(coco_hand), *method, "--limit", "2", *resume, "--out", str(out))
        assert "holds sweep records (results-p0.jsonl) but no sweep.json" in message and message.count("\n") == 1
    assert (out / "results-p0.jsonl").read_bytes() == records and not (out / "sweep.json").exists()


def test_output_folders_that_cannot_be_written_are_named(coco_hand, tmp_path, capsys):
    method = ("--method", "test_sweep:Painted")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file, not a folder" in _fails(capsys, "coco", "--data", str(coco_hand), *method, "--out", str(a_file))
    assert f"--out {a_file / 'sub'}: {a_file} is a file, not a folder" in _fails(
        capsys, "coco", "--data", str(coco_hand), *method, "--out", str(a_file / "sub"))
    import tclip_jax.sweep.runner as runner

    with pytest.MonkeyPatch.context() as patch:  # as root every folder is writable, so the check is provoked
        patch.setattr(runner.os, "access", lambda *args: False)
        message = _fails(capsys, "coco", "--data", str(coco_hand), *method, "--out", str(tmp_path / "o"))
    assert f"--out {tmp_path / 'o'}: cannot write in {tmp_path}" in message and not (tmp_path / "o").exists()


def test_a_sweep_that_fails_before_its_first_record_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A failure before any record (here the first batch's maps) removes the folder, so a plain rerun works."""
    import tclip_jax.sweep.runner as runner

    def failing(*args, **kwargs):
        raise ValueError("the first batch failed")

    monkeypatch.setattr(runner.DeviceMaps, "__call__", failing)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="the first batch failed"):
        run_sweep(synthetic_dataset(2, "bare_words"), Painted.from_pretrained(), out,
                  options=RunOptions(batch_size=1, progress=False))
    assert not out.exists()


def test_a_sweep_stopped_before_its_first_record_leaves_a_folder_made_beforehand_as_it_was(tmp_path, monkeypatch):
    """Job scripts make --out first (`mkdir out`): a sweep stopped there before any record (Ctrl-C while the first
    image's record is written, its pictures drawn) left sweep.json and an empty results file, and a plain rerun was
    refused as a sweep there. It removes what it wrote, not the folder nor what was in it, and a rerun works."""
    import tclip_jax.sweep.runner as runner

    out = tmp_path / "out"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"a file browser's")

    def interrupted(self, record):
        raise KeyboardInterrupt

    sweep = (synthetic_dataset(2, "bare_words"), Painted.from_pretrained(), out)
    with monkeypatch.context() as patch:
        patch.setattr(runner.ResultWriter, "append", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(*sweep, options=RunOptions(batch_size=1, save_vis=2, progress=False))
    assert sorted(os.listdir(out)) == [".DS_Store"] and (out / ".DS_Store").read_bytes() == b"a file browser's"
    assert run_sweep(*sweep, options=RunOptions(batch_size=1, save_vis=2, progress=False)).report["images"] == 2
    assert {"gallery", "vis"} <= set(os.listdir(out))  # what the interrupted run had drawn, it had drawn too


def test_a_new_sweep_into_a_folder_that_is_neither_empty_nor_a_sweep_is_refused(coco_hand, tmp_path, capsys):
    """A new sweep writes report.md and keeps in gallery/ only its own pictures: into someone's folder it overwrote
    their report.md and deleted their pictures. It is refused in one line naming the folder, which is left as it
    was, as `tclip explain` refuses a folder that is neither empty nor its own."""
    out = tmp_path / "mine"
    (out / "gallery").mkdir(parents=True)
    (out / "gallery" / "holiday.jpg").write_bytes(b"my precious")
    (out / "report.md").write_text("# my notes\n")
    method = ("--method", "test_sweep:Painted", "--data", str(coco_hand), "--out", str(out))
    for resume in ((), ("--resume",)):
        message = _fails(capsys, "coco", *method, *resume)
        assert f"{out} is neither empty nor a sweep (it has no sweep.json and holds gallery, report.md)" in message
        assert message.count("\n") == 1
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["gallery", "gallery/holiday.jpg", "report.md"]
    assert (out / "gallery" / "holiday.jpg").read_bytes() == b"my precious"
    assert (out / "report.md").read_text() == "# my notes\n"


def test_a_resume_on_fewer_processes_removes_the_lock_files_killed_processes_left(coco_hand, tmp_path):
    """A killed process leaves its lock file (the lock goes with it): process 1's of a two-process sweep stayed for
    good after a resume on one process. Process 0 removes those of the processes it does not have. One held is a live
    process's, whose sweep runs there still (its other processes killed): the resume is refused, as at its own lock,
    and removes nothing."""
    from tclip_jax.files import held_lock

    out = tmp_path / "out"
    sweep = (coco_dataset(coco_hand), Painted.from_pretrained(), out)
    run_sweep(*sweep, options=RunOptions(limit=1, progress=False))
    for process in (1, 2):
        (out / f"results-p{process}.lock").write_text(f"process {process} of a killed sweep")
    with held_lock(out / "results-p2.lock", "sweep", out):  # a live holder's (another open file: a lock of its own)
        with pytest.raises(ValueError) as refused:
            run_sweep(*sweep, options=RunOptions(limit=2, resume=True, progress=False))
        assert sorted(p.name for p in out.glob("*.lock")) == ["results-p1.lock", "results-p2.lock"]
    assert str(refused.value) == (f"another sweep (process {os.getpid()} on {socket.gethostname()}) is running in "
                                  f"{out} (it holds results-p2.lock); wait for it to end or choose another --out")
    (out / "results-p2.lock").write_text("process 2 of a killed sweep")  # its holder was killed after all
    run_sweep(*sweep, options=RunOptions(limit=2, resume=True, progress=False))
    assert not list(out.glob("*.lock")) and len(read_all_records(out)) == 2


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    from tclip_jax.files import write_text_atomic

    path = tmp_path / "report.json"
    write_text_atomic(path, "old\n")
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    def failing_replace(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "half\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_picture_that_cannot_be_written_whole_leaves_the_one_before(tmp_path):
    """Sweep pictures (and explain's overlays, the demo's scene: one writer) are written atomically: a write that
    fails midway (here the file-size limit, EFBIG, in a child process) leaves the picture that was there, and no
    half-written file (cv2.imwrite wrote over it in place, and lost it when the write failed)."""
    from tclip_jax.sweep.vis import _write

    path = tmp_path / "best" / "unit.jpg"
    _write(path, np.zeros((8, 8, 3), np.uint8))
    before = path.read_bytes()
    script = ("import pathlib, resource, signal, sys\nimport numpy as np\nfrom tclip_jax.sweep.vis import _write\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))\n"
              "try:\n    _write(pathlib.Path(sys.argv[1]), np.random.default_rng(0).integers(0, 256, (200, 200, 3), "
              "np.uint8))\nexcept OSError as err:\n    print('refused:', err)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("refused:"), done.stdout + done.stderr
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["unit.jpg"]


def test_a_picture_is_written_in_the_format_its_suffix_names_in_any_case(tmp_path):
    """write_image wrote PNG bytes unless the suffix was exactly ".jpg" (x.JPG, x.jpeg, x.webp: PNG inside): the
    format follows the suffix whatever its case, and a suffix it does not write is refused in one line, nothing
    written."""
    from tclip_jax.files import write_image

    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3), np.uint8)
    for name, expected in [("x.png", "PNG"), ("x.PNG", "PNG"), ("x.jpg", "JPEG"), ("x.JPG", "JPEG"),
                           ("x.jpeg", "JPEG"), ("x.Jpeg", "JPEG")]:
        write_image(tmp_path / name, rgb)
        with Image.open(tmp_path / name) as written:
            assert written.format == expected, name
            assert written.size == (16, 12)
            if expected == "PNG":  # lossless, and RGB kept in order
                assert np.array_equal(np.asarray(written), rgb)
    for name, shown in [("x.webp", ".webp"), ("x.bmp", ".bmp"), ("noext", "a file without a suffix")]:
        with pytest.raises(ValueError) as raised:
            write_image(tmp_path / name, rgb)
        assert str(raised.value) == f"{tmp_path / name}: a picture is written as .png, .jpg or .jpeg, not as {shown}"
        assert not (tmp_path / name).exists()
    for picture in [rgb.astype(np.float64) / 255, rgb[..., 0], rgb[:0]]:  # OpenCV would cast or fail its own way
        with pytest.raises(ValueError, match="expected a decoded uint8 RGB array"):
            write_image(tmp_path / "bad.png", picture)
        assert not (tmp_path / "bad.png").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_atomic_write_keeps_the_files_mode_and_writes_through_a_link(tmp_path):
    """Atomic writes (a temporary file renamed over the old one) reset a rewritten file's mode to the umask's
    (0640 became 0644) and replaced a link with a file: as a write in place, the file keeps its permission bits,
    and a link is kept and the file it names written (as staged_folder treats a link to a folder)."""
    from tclip_jax.files import write_image, write_text_atomic

    umask = os.umask(0o022)
    os.umask(umask)
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), np.uint8)
    picture, report = tmp_path / "m.png", tmp_path / "report.json"
    write_image(picture, rgb)
    write_text_atomic(report, "old\n")
    assert picture.stat().st_mode & 0o7777 == report.stat().st_mode & 0o7777 == 0o666 & ~umask  # new: the umask's
    for mode in (0o640, 0o604, 0o444):
        picture.chmod(mode)
        report.chmod(mode)
        write_image(picture, rgb[::-1])
        write_text_atomic(report, f"{mode}\n")
        assert picture.stat().st_mode & 0o7777 == report.stat().st_mode & 0o7777 == mode
        assert np.array_equal(np.asarray(Image.open(picture)), rgb[::-1]) and report.read_text() == f"{mode}\n"
    # Links, relative and into another folder: kept, and the files they name written.
    (tmp_path / "real").mkdir()
    write_image(tmp_path / "real" / "target.png", rgb)
    (tmp_path / "real" / "target.png").chmod(0o640)
    (tmp_path / "real" / "notes.txt").write_text("old\n")
    link, text_link = tmp_path / "link.png", tmp_path / "notes.txt"
    link.symlink_to(pathlib.Path("real") / "target.png")
    text_link.symlink_to(tmp_path / "real" / "notes.txt")
    write_image(link, rgb[:, ::-1])
    write_text_atomic(text_link, "new\n")
    assert link.is_symlink() and text_link.is_symlink()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "real" / "target.png")), rgb[:, ::-1])
    assert (tmp_path / "real" / "target.png").stat().st_mode & 0o7777 == 0o640
    assert (tmp_path / "real" / "notes.txt").read_text() == "new\n"
    assert not [p.name for p in [*tmp_path.iterdir(), *(tmp_path / "real").iterdir()] if p.name.startswith(".")]


def test_a_replaced_folder_that_resists_removal_leaves_the_new_one_written_and_says_so(tmp_path, monkeypatch):
    """A read-only sub-folder in the folder a save replaces (the user's) is made writable and removed; what still
    cannot be removed is left with a warning, not an error after the new folder landed. (This process is root, which
    permissions do not stop: the file system's refusals are simulated.)"""
    from tclip_jax.files import staged_folder

    target, real_unlink, refused = tmp_path / "model", os.unlink, {"left": 1}

    def unlink(path, *args, **kwargs):
        if str(path).endswith("x.txt") and refused["left"] > 0:
            refused["left"] -= 1
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    def save(text: str) -> None:
        (target / "locked").mkdir(parents=True, exist_ok=True)
        (target / "locked" / "x.txt").write_text("old")
        with staged_folder(target) as staging:
            (staging / "params.npz").write_text(text)

    monkeypatch.setattr(os, "unlink", unlink)
    save("first")  # refused once: made writable, then removed
    assert refused["left"] == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "params.npz").read_text() == "first" and not (target / "locked").exists()
    refused["left"] = 10**6
    with pytest.warns(UserWarning, match=f"{target} is written, but the folder it replaced could not be removed: "):
        save("second")  # refused always: left, with a warning
    assert (target / "params.npz").read_text() == "second"
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(f".model.{socket.gethostname()}.old.")]) == 1


def test_ctrl_c_while_a_staged_folder_replaces_its_target_leaves_the_new_one_whole(tmp_path, monkeypatch):
    from tclip_jax.files import staged_folder

    target = tmp_path / "checkpoint"
    with staged_folder(target) as staging:
        (staging / "step").write_text("1")
    rename = pathlib.Path.rename

    def interrupted(self, new):  # Ctrl-C just as the new folder is renamed in (where one lost both folders)
        if pathlib.Path(new) == target and self.name != target.name:
            signal.raise_signal(signal.SIGINT)
        return rename(self, new)

    monkeypatch.setattr(pathlib.Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):  # held until the swap is done, then raised
        with staged_folder(target) as staging:
            (staging / "step").write_text("2")
    assert (target / "step").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_a_staging_folder_left_by_a_killed_run_is_removed_by_the_next_save(tmp_path):
    """SIGKILL (the out-of-memory killer) runs no cleanup: a run killed while writing left its hidden staging folder,
    as large as the model, and no later save removed it. The next save of the same target removes it, and keeps the
    folder of a run still writing (told by its lock, not its process id: a run in another process-id space, such as
    a container beside the host, has an id this one cannot see), a fresh one whose run may not have locked it yet,
    other machines' and targets' ones, and a user's hidden folders named like them."""
    from tclip_jax.files import staged_folder

    target = tmp_path / "model"

    def writer():
        process = subprocess.Popen([sys.executable, "-c", f"""
import pathlib, sys, time
from tclip_jax.files import staged_folder
with staged_folder(pathlib.Path({str(target)!r})) as staging:
    (staging / "params.safetensors").write_bytes(bytes(1000))
    print(staging, flush=True)
    time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
        return process, pathlib.Path(process.stdout.readline().strip())  # written, still staged

    (killed, left), (running, live) = writer(), writer()
    try:
        killed.kill()
        killed.wait()
        host = socket.gethostname()
        fresh = tmp_path / f".model.{host}.staging.fresh123"  # made just now, its lock maybe not yet taken
        others = [tmp_path / ".model.elsewhere.staging.abcd1234", tmp_path / f".other.{left.name.split('.', 2)[2]}",
                  tmp_path / f".model.{host}.backup", tmp_path / f".model.{host}.staging.notes"]  # the user's own
        for folder in [fresh, *others]:
            folder.mkdir()
        hour_ago = time.time() - 3600
        for folder in [left, live, *others]:  # older than the grace period
            os.utime(folder, (hour_ago, hour_ago))
        assert left.is_dir() and left.parent == tmp_path == live.parent
        with staged_folder(target) as staging:
            (staging / "params.safetensors").write_bytes(bytes(10))
        assert not left.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name, fresh.name,
                                                                     *(f.name for f in others)])
    finally:
        running.kill()
        running.wait()


class _Killed(BaseException):
    """A SIGKILL at a chosen point of a save, simulated: nothing after it runs but the `finally` blocks (closing files,
    which the system would do), and the staging folder's removal, which the next save would do."""


@pytest.mark.parametrize("killed_at", ["second rename", "deletion"])
def test_the_old_folder_a_killed_swap_left_is_put_back_or_removed_by_the_next_save(tmp_path, monkeypatch, killed_at):
    """SIGKILL between the swap's two renames left the target missing and the old folder hidden beside it, and
    SIGKILL while the old folder was deleted left a half-deleted one, both for ever. The next save puts the old
    folder back where the target is missing and it is whole (the save sees it), and removes it otherwise; the old
    folder of a run still swapping (its lock held) and a fresh one are kept."""
    import fcntl

    from tclip_jax.files import staged_folder

    target, host = tmp_path / "model", socket.gethostname()

    def save(step: str) -> None:
        with staged_folder(target) as staging:
            (staging / "step").write_text(step)
            (staging / "params").write_bytes(bytes(100))

    rmtree, rename = shutil.rmtree, pathlib.Path.rename

    def killed_in_deletion(folder, *args, **kwargs):  # the old folder's first file deleted, then killed
        if pathlib.Path(folder).name.startswith(".model.") and ".old." in pathlib.Path(folder).name:
            next(pathlib.Path(folder).rglob("step")).unlink()
            raise _Killed()
        return rmtree(folder, *args, **kwargs)

    def killed_at_second_rename(self, new):
        if pathlib.Path(new) == target:
            raise _Killed()
        return rename(self, new)

    save("1")
    with monkeypatch.context() as patch:
        if killed_at == "second rename":
            patch.setattr(pathlib.Path, "rename", killed_at_second_rename)
        else:
            patch.setattr(shutil, "rmtree", killed_in_deletion)
        with pytest.raises(_Killed):
            save("2")
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the old folder (the staging one is gone)
    assert len(left) == 1
    assert target.exists() == (killed_at == "deletion")
    live, fresh = tmp_path / f".model.{host}.old.live1234", tmp_path / f".model.{host}.old.fresh123"
    for folder in (live, fresh):
        (folder / "model").mkdir(parents=True)
    hour_ago = time.time() - 3600
    for folder in (*left, live):  # older than the grace period
        os.utime(folder, (hour_ago, hour_ago))
    held = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the run swapping it holds it
        with staged_folder(target) as staging:
            assert (target / "step").read_text() == ("1" if killed_at == "second rename" else "2")
            (staging / "step").write_text("3")
    finally:
        os.close(held)
    assert (target / "step").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name, fresh.name])
    # The target removed by its user after a kill during deletion: the half-deleted old folder is not put back.
    shutil.rmtree(live)
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", killed_in_deletion)
        with pytest.raises(_Killed):
            save("4")
    shutil.rmtree(target)
    for folder in set(tmp_path.glob(".model.*")) - {fresh}:
        os.utime(folder, (hour_ago, hour_ago))
    with staged_folder(target) as staging:
        assert not target.exists()
        (staging / "step").write_text("5")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", fresh.name])


def test_a_folder_that_cannot_be_moved_aside_is_named_and_kept(tmp_path, monkeypatch):
    """A target the OS will not move (an immutable folder, a busy mount) is refused naming it, not the hidden folder
    it was to be moved into, and the old folder stays with nothing else left behind."""
    from tclip_jax.files import staged_folder

    target = tmp_path / "photo"
    with staged_folder(target) as staging:
        (staging / "result.json").write_text("1")
    rename = pathlib.Path.rename

    def refused(self, new):
        if self == target:
            raise PermissionError(1, "Operation not permitted", str(self), str(new))
        return rename(self, new)

    monkeypatch.setattr(pathlib.Path, "rename", refused)
    with pytest.raises(PermissionError) as raised:
        with staged_folder(target) as staging:
            (staging / "result.json").write_text("2")
    assert str(raised.value) == f"[Errno 1] cannot replace {target}: Operation not permitted"
    assert [p.name for p in tmp_path.iterdir()] == ["photo"] and (target / "result.json").read_text() == "1"


def test_a_staged_folder_that_replaces_its_target_syncs_its_files_first(tmp_path, monkeypatch):
    """The old folder is deleted once the new one is renamed in: every file of the new one reaches the disk before
    (a crash right after the swap could otherwise leave empty files and no old folder), as write_bytes_atomic does."""
    from tclip_jax.files import staged_folder

    target = tmp_path / "checkpoint"
    with staged_folder(target) as staging:
        (staging / "step").write_text("1")
    synced, fsync, rename = set(), os.fsync, pathlib.Path.rename
    monkeypatch.setattr(os, "fsync", lambda fd: synced.add(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    seen_at_swap = []
    monkeypatch.setattr(pathlib.Path, "rename", lambda self, new: seen_at_swap.append(set(synced)) or rename(self, new))
    with staged_folder(target) as staging:
        (staging / "step").write_text("2")
        (staging / "sub").mkdir()
        (staging / "sub" / "params").write_bytes(b"\0" * 10)
        written = {str(staging / "step"), str(staging / "sub" / "params")}
    assert written <= seen_at_swap[0]  # before the old folder was moved aside
    assert (target / "step").read_text() == "2"


def test_a_staged_folder_named_by_a_link_replaces_the_folder_it_links_to(tmp_path):
    """A link to a folder (models/current -> models/v3) was replaced by a real folder, and the folder it linked to
    kept the old contents: the link is followed and kept."""
    from tclip_jax.files import staged_folder

    real, link = tmp_path / "v3", tmp_path / "current"
    real.mkdir()
    (real / "step").write_text("1")
    link.symlink_to(real, target_is_directory=True)
    with staged_folder(link) as staging:
        (staging / "step").write_text("2")
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "step").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["current", "v3"]


def test_a_staged_folder_named_by_a_loop_of_links_or_a_link_to_nothing_says_which(tmp_path):
    """staged_folder called both "a link to nothing", where following a loop never ends (ELOOP) and the loop is what
    to undo; nothing is made either way."""
    from tclip_jax.files import staged_folder

    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name, what in (("loop_a", "a loop of links"), ("dangling", "a link to nothing")):
        with pytest.raises(ValueError) as refused:
            with staged_folder(tmp_path / name):
                pass
        assert str(refused.value) == f"{tmp_path / name} is {what}; remove it or name another folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "loop_a", "loop_b"]


_BLOCKED_IN_XLA = """
import sys
import jax
import jax.numpy as jnp
import tclip_jax.cli as cli
import tclip_jax.cli.convert as convert
cli._SigtermWatchdog.GRACE_S = 1.0

def blocked(args):  # about a minute of one XLA computation, during which no Python signal handler runs
    inner = lambda i, v: jax.lax.fori_loop(0, 100_000, lambda j, w: w * 1.0000001 + 1e-9, v)
    compiled = jax.jit(lambda x: jax.lax.fori_loop(0, 200_000, inner, x)).lower(jnp.float32(1)).compile()
    print("blocking", flush=True)
    compiled(jnp.float32(1)).block_until_ready()

convert.run = blocked
sys.exit(cli.main(["convert", "x", "--out", "y"]))
"""


def test_tclip_as_a_program_ends_an_interrupted_command_without_the_interpreters_teardown(monkeypatch):
    """The console script and `python -m tclip_jax` end a command stopped by Ctrl-C (130) or SIGTERM (143) with
    os._exit: the teardown crashed when the signal had landed in an XLA compilation. Other statuses return."""
    import configparser

    import tclip_jax.cli as cli

    scripts = configparser.ConfigParser()
    scripts.read(pathlib.Path(__file__).resolve().parents[1] / "setup.cfg")
    assert scripts["options.entry_points"]["console_scripts"].split() == ["tclip", "=", "tclip_jax.__main__:main"]
    import tclip_jax.__main__ as entry  # what both run: its main returns program's status

    with monkeypatch.context() as patched:
        patched.setattr(cli, "program", lambda: 7)
        assert entry.main() == 7
    exits = []
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    for status in (130, 143, 0, 2):
        monkeypatch.setattr(cli, "main", lambda status=status: status)
        assert cli.program() == status
    assert exits == [130, 143]


def test_tclip_keeps_the_signal_set_up_of_the_process_it_runs_in(monkeypatch, capsys):
    """A wakeup fd someone else set (an asyncio loop) still hears its signals while tclip runs; a SIGTERM handler
    set outside Python (getsignal gives None) is left alone; error lines join every kind of line break."""
    import os

    import tclip_jax.cli.convert as convert_command
    from tclip_jax.cli import _one_line

    theirs_read, theirs_write = os.pipe()
    os.set_blocking(theirs_write, False)
    previous = signal.set_wakeup_fd(theirs_write)
    try:
        monkeypatch.setattr(convert_command, "run", lambda args: os.kill(os.getpid(), signal.SIGINT) or time.sleep(5))
        assert main(["convert", "x", "--out", "y"]) == 130
        os.set_blocking(theirs_read, False)
        heard, deadline = b"", time.monotonic() + 5
        while signal.SIGINT not in heard and time.monotonic() < deadline:
            try:
                heard += os.read(theirs_read, 64)
            except BlockingIOError:
                time.sleep(0.01)
        assert signal.SIGINT in heard
        assert signal.set_wakeup_fd(previous) == theirs_write  # put back as it was
    finally:
        signal.set_wakeup_fd(previous)
        os.close(theirs_read)
        os.close(theirs_write)
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(signal, "getsignal", lambda number: None)
    monkeypatch.setattr(convert_command, "run", lambda args: 0)
    assert main(["convert", "x", "--out", "y"]) == 0
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is handler
    assert _one_line(ValueError("cannot read /tmp/no\rsuch:\r\n  line\u2028two  spaces")) == \
        "cannot read /tmp/no such: line two  spaces"


@pytest.mark.parametrize("raised, status, said", [(KeyboardInterrupt, 130, "interrupted"),
                                                    ("Terminated", 143, "terminated")])
def test_a_signal_swallowed_by_a_garbage_collector_callback_still_ends_tclip(raised, status, said, monkeypatch,
                                                                             capsys):
    """Python drops an exception raised in a gc callback (JAX has one): a Ctrl-C or SIGTERM whose handler ran
    there was lost and the command went on to status 0. It is sent again once the collection is over."""
    import gc

    import tclip_jax.cli as cli
    import tclip_jax.cli.convert as convert_command

    raised = cli.Terminated if raised == "Terminated" else raised
    calls = []

    def handler_ran_in_a_callback(phase, info):
        if not calls:
            calls.append(phase)
            raise raised()

    def run(args):
        gc.callbacks.append(handler_ran_in_a_callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(handler_ran_in_a_callback)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # Python work the signal can interrupt
            sum(range(1000))
        return 0

    monkeypatch.setattr(convert_command, "run", run)
    hook = sys.unraisablehook
    assert main(["convert", "x", "--out", "y"]) == status and calls
    assert capsys.readouterr().err.strip() == f"tclip convert: {said}"
    assert sys.unraisablehook is hook  # put back for the caller


def test_overlapping_commands_in_threads_leave_no_interrupt_redelivery_behind(monkeypatch):
    """Two `main` calls from threads that end out of order: the first restored the original hook while the second
    ran, and the second then put the first's back, which went on turning later unraisable KeyboardInterrupts in
    the process into real signals. Whatever hook is left passes them on as the original would."""
    import types

    import tclip_jax.cli as cli

    passed_on, killed = [], []
    monkeypatch.setattr(sys, "unraisablehook", passed_on.append)
    monkeypatch.setattr(cli.os, "kill", lambda *args: killed.append(args))
    durations = iter([0.3, 0.8])
    monkeypatch.setattr(cli, "_main", lambda argv: time.sleep(next(durations)) or 0)
    first, second = (threading.Thread(target=cli.main, args=([],)) for _ in range(2))
    first.start()
    time.sleep(0.1)
    second.start()
    first.join()
    second.join()
    swallowed = types.SimpleNamespace(exc_value=KeyboardInterrupt(), exc_type=KeyboardInterrupt)
    sys.unraisablehook(swallowed)
    time.sleep(0.2)  # past a redelivery's delay
    assert passed_on == [swallowed] and killed == []


def test_a_ctrl_c_while_tclip_starts_is_one_line(monkeypatch, capsys):
    """Building the parser imports OpenCV and numpy (and the command imports jaxlib with Ctrl-C held: interrupted
    inside its native start-up, the interpreter crashed on its way out)."""
    import tclip_jax.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["convert", "x", "--out", "y"]) == 130
    assert capsys.readouterr().err.strip() == "tclip: interrupted"


def test_a_ctrl_c_while_python_m_tclip_jax_imports_is_one_line(run_interrupted_while_importing, capsys):
    """`python -m tclip_jax` interrupted while it imports the command line ended in a KeyboardInterrupt traceback."""
    assert run_interrupted_while_importing("tclip_jax") == 130
    assert capsys.readouterr().err == "tclip: interrupted\n"


def test_a_ctrl_c_while_the_installed_tclip_command_imports_is_one_line(run_interrupted_while_importing, capsys):
    """The `tclip` script pip writes imports setup.cfg's console-script target, then calls it: the target was
    tclip_jax.cli:program, so a Ctrl-C while tclip_jax.cli loaded ended in a traceback before any handler ran."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(pathlib.Path(__file__).resolve().parents[1] / "setup.cfg")
    scripts = dict(line.split(" = ") for line in setup["options.entry_points"]["console_scripts"].split("\n") if line)
    assert run_interrupted_while_importing(scripts["tclip"]) == 130
    assert capsys.readouterr().err == "tclip: interrupted\n"


def test_a_sigterm_ends_tclip_blocked_in_native_code_after_a_grace_period():
    """The main thread inside an XLA computation runs no Python handler: a watchdog thread ends the process with
    status 143 once the grace period has passed (without it, the SIGTERM waited for the computation to end)."""
    process = subprocess.Popen([sys.executable, "-c", _BLOCKED_IN_XLA], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "blocking"
        time.sleep(0.5)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 143 and time.monotonic() - sent < 15
        assert process.stderr.read().strip().splitlines() == ["tclip convert: terminated"]
    finally:
        process.kill()


_SWEEP_BLOCKED_BEFORE_ITS_FIRST_RECORD = """
import ctypes, sys
import tclip_jax.cli as cli
import tclip_jax.sweep.runner as runner
cli._SigtermWatchdog.GRACE_S = 1.0

class Blocked:  # where the devices' maps are set up, the main thread blocks in native code, as in a long compile
    def __init__(self, method, devices):
        print("blocking", flush=True)
        libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)  # zeros: a default pthread mutex
        libc.pthread_mutex_lock(mutex)
        libc.pthread_mutex_lock(mutex)  # locked again by its holder: blocked for good, no signal handler runs

runner.DeviceMaps = Blocked
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_new_sweep_stopped_in_native_code_before_its_first_record_leaves_its_folder_as_it_found_it(coco_hand,
                                                                                                   tmp_path):
    """A SIGTERM while the main thread is blocked in native code (the first compile) ended the process past the
    sweep's cleanup (the watchdog's os._exit), leaving sweep.json, an empty results file and a lock file (and the
    folders it made). A SIGKILL, which runs nothing, still leaves them: a new sweep there replaces them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    made_before, killed = tmp_path / "made_before", tmp_path / "killed"
    made_before.mkdir()
    for out in (tmp_path / "new" / "out", made_before):
        args = _cli("coco", "--data", str(coco_hand), "--method", "test_sweep:Painted", "--out", str(out))
        process = subprocess.Popen([sys.executable, "-c", _SWEEP_BLOCKED_BEFORE_ITS_FIRST_RECORD, *args], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert process.stdout.readline().strip() == "blocking", process.stderr.read()
            left = ["results-p0.jsonl", "results-p0.lock", "sweep.json"]
            assert sorted(p.name for p in out.iterdir()) == left  # what was left, as late as it gets before a record
            if not killed.exists():
                shutil.copytree(out, killed)  # what a SIGKILL leaves now
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 143
        finally:
            process.kill()
        assert process.stderr.read().splitlines() == ["tclip sweep: terminated"]
        assert not list(out.iterdir()) if out == made_before else not (tmp_path / "new").exists()
    assert main(_cli("coco", "--data", str(coco_hand), "--method", "test_sweep:Painted", "--out", str(killed))) == 0
    assert _report(killed)["images"] == 2


def test_what_a_killed_sweep_left_is_kept_where_a_live_process_holds_a_lock_there(coco_hand, tmp_path, capsys):
    """A new sweep replaces what one killed before its first record left (sweep.json, results files without a
    record, lock files), taking every lock file for one a killed process left: one a live process holds (here of a
    process 1, which this one-process sweep does not take) is another sweep's, running there, whose files it deleted.
    It is refused as at its own lock, nothing removed; once the lock is let go, the leftovers are replaced."""
    from tclip_jax.files import held_lock

    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text("{}\n")  # a new sweep's, left before its first record (not read to replace it)
    (out / "results-p0.jsonl").write_bytes(b"")
    args = ("coco", "--data", str(coco_hand), "--method", "test_sweep:Painted", "--out", str(out))
    with held_lock(out / "results-p1.lock", "sweep", out):
        assert _fails(capsys, *args) == (f"tclip sweep: error: another sweep (process {os.getpid()} on "
                                         f"{socket.gethostname()}) is running in {out} (it holds results-p1.lock); "
                                         "wait for it to end or choose another --out\n")
        assert sorted(p.name for p in out.iterdir()) == ["results-p0.jsonl", "results-p1.lock", "sweep.json"]
        assert (out / "sweep.json").read_text() == "{}\n"
    assert main(_cli(*args)) == 0 and _report(out)["images"] == 2


def test_a_sigterm_ends_tclip_as_ctrl_c_does_and_waits_for_a_staged_folder_to_land(tmp_path, monkeypatch, capsys):
    """`tclip` raises a SIGTERM as Ctrl-C is raised (status 143), so staged folders are cleaned up and a swap in
    progress is finished first (a killed train-eclip left staging folders behind)."""
    import os

    import tclip_jax.cli.convert as convert_command
    from tclip_jax.files import staged_folder

    target = tmp_path / "checkpoint"
    with staged_folder(target) as staging:
        (staging / "step").write_text("1")

    def killed_while_saving(args):
        with staged_folder(target) as staging:
            (staging / "step").write_text("2")
            os.kill(os.getpid(), signal.SIGTERM)  # mid-write: the staging folder must go
            time.sleep(5)

    monkeypatch.setattr(convert_command, "run", killed_while_saving)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["convert", "x", "--out", "y"]) == 143
    assert capsys.readouterr().err.strip() == "tclip convert: terminated"
    assert signal.getsignal(signal.SIGTERM) == before  # put back for the caller
    assert (target / "step").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    rename = pathlib.Path.rename

    def terminated_on_swap(self, new):  # SIGTERM just as the new folder is renamed in: held until it is
        if pathlib.Path(new) == target and self.name != target.name:
            os.kill(os.getpid(), signal.SIGTERM)
        return rename(self, new)

    def saving(args):
        with staged_folder(target) as staging:
            (staging / "step").write_text("3")

    monkeypatch.setattr(convert_command, "run", saving)
    monkeypatch.setattr(pathlib.Path, "rename", terminated_on_swap)
    assert main(["convert", "x", "--out", "y"]) == 143
    assert (target / "step").read_text() == "3" and [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_staged_folders_land_with_the_modes_the_umask_gives(tmp_path):
    """mkdtemp (0700) and safetensors (0600) must not keep collaborators out of results and checkpoints."""
    import safetensors.numpy

    from tclip_jax.files import staged_folder

    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "model"
    with staged_folder(target) as staging:
        safetensors.numpy.save_file({"w": np.zeros(2, np.float32)}, staging / "params.safetensors")
        (staging / "sub").mkdir()
        (staging / "sub" / "result.json").write_text("{}")
    assert target.stat().st_mode & 0o777 == (target / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("params.safetensors", "sub/result.json"):
        assert (target / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_voc_sweep_with_the_seed_metrics_writes_the_seeds_table(tiny_model, tmp_path):
    from test_datasets import write_voc

    labels = np.zeros((40, 48), np.int64)
    labels[5:20, 6:30] = 8     # cat
    labels[25:35, 10:40] = 12  # dog
    root = write_voc(tmp_path / "VOC2012", {"x1": (painted(40, 48, [(200, slice(5, 20), slice(6, 30))]), labels),
                                            "x2": (painted(40, 48, []), np.where(labels == 8, 0, labels))})
    out = tmp_path / "out"
    assert main(_cli("voc", "--data", str(root), "--model", tiny_model, "--translations", "1", "--metrics", "seed",
                     "--out", str(out))) == 0
    report = _report(out)
    assert report["config"]["dataset"] == "voc2012-val" and report["units"] == 3
    assert set(report["seed"]) == {"categories", "msc", "miou_grid", "miou_fixed", "fixed_threshold"}
    assert report["seed"]["categories"] == 2
    assert "| mIoU, grid-searched threshold |" in (out / "report.md").read_text()


def test_images_of_other_input_shapes_go_in_other_batches(tiny_model, tmp_path):
    """gradcam keeps the aspect ratio (patch_multiple): 200x500 and 500x200 scenes cannot share a batch; the records
    equal those of a sweep one image at a time."""
    outs = {}
    for batch_size in ("1", "4"):
        outs[batch_size] = tmp_path / f"b{batch_size}"
        assert main(_cli("synthetic", "--protocol", "non_square", "--method", "gradcam", "--model", tiny_model,
                         "--limit", "5", "--batch-size", batch_size, "--out", str(outs[batch_size]))) == 0
    shapes = {protocol_sample("non_square", seed).scene.image.shape for seed in heldout_seeds(5)}
    assert len(shapes) == 2  # both orientations occur
    assert _report(outs["4"])["errors"] == [] and _report(outs["4"])["images"] == 5
    by_key = lambda out: {r["key"]: r for r in read_all_records(out)}  # noqa: E731
    assert by_key(outs["4"]) == by_key(outs["1"])


def test_device_wait_share_counts_the_gaps_with_nothing_queued():
    from tclip_jax.sweep.runner import device_busy_seconds, device_wait_share

    # Batch 2 is queued before batch 1 finishes (no gap); batch 3 is dispatched 1 s after batch 2 finished.
    assert device_wait_share([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(1 / 3)
    assert device_wait_share([(0.0, 1.0), (0.2, 2.0), (0.4, 3.0)]) == pytest.approx(0.0)
    assert device_wait_share([(0.0, 1.0)]) is None
    # Busy: 1 s, then 1 s more (batch 2 starts when batch 1 ends), then 1 s after a 1 s gap.
    assert device_busy_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)
