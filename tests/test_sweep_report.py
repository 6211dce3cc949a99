"""report.html of a sweep: the table, per-class bars, each class's best and worst unit with its picture, IoU and
hit or miss; the pictures the sweep keeps for it whatever the order, split or resumption; labelled pictures."""
import concurrent.futures
import functools
import json
import pathlib
import random
import re
import threading
import warnings
from html.parser import HTMLParser

import numpy as np
import pytest

import browser
from test_datasets import painted, write_coco
from test_sweep import Painted, coco_hand, coco_many  # noqa: F401  (coco_hand, coco_many: COCO fixtures)
from tclip_jax.evaluation.datasets import coco_dataset
from tclip_jax.evaluation.datasets.base import Target
from tclip_jax.sweep import RunOptions, read_all_records, run_sweep
from tclip_jax.sweep.vis import (MAX_STEM_CHARS, UnitGallery, best_and_worst, file_stem, gallery_name, prune_gallery,
                                 unit_picture, unit_score)


def test_report_html_shows_scores_bars_and_the_best_and_worst_units(coco_hand, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    report = run_sweep(coco_dataset(coco_hand), Painted.from_pretrained(), out,
                       options=RunOptions(batch_size=2, progress=False)).report
    page = (out / "report.html").read_text(encoding="utf-8")
    detection = report["detection"]
    assert f"<td class=\"num\">{100 * detection['box_accuracy']:.2f}</td>" in page   # report.md's table
    assert "BoxAcc per class" in page and page.count('class="bar"') == len(detection["per_class"])
    assert "width:50.00%" in page                                                      # person: 1 of 2 hits
    records = read_all_records(out)
    chosen = best_and_worst(records)
    assert set(chosen) == {"person", "traffic light", "cat", "dog", "hair drier"}
    # person: sample 1 (its painted box exactly) is best, sample 2 (IoU 0) worst; the others have one unit each.
    assert [chosen["person"][p][0]["key"] for p in ("best", "worst")] == ["1", "2"]
    pictures = _kept(records)
    assert sorted(p.name for p in (out / "gallery").iterdir()) == sorted(pictures)  # exactly those, no others
    for picture in pictures:
        assert f'src="gallery/{picture}"' in page
    assert re.search(r"best: sample <code>1</code><br>box IoU 1\.0000, <span class=\"hit\">hit</span>", page)
    assert re.search(r"worst: sample <code>2</code><br>box IoU 0\.0000, <span class=\"miss\">miss</span>", page)
    assert "best and worst: sample <code>2</code>" in page  # cat, dog, hair drier: one unit each
    assert "ValueError: cannot read image file" in page  # the errors, as in report.md
    if browser.missing() is None:
        with browser.chromium() as driver:
            driver.get((out / "report.html").as_uri())
            images = driver.find_elements("css selector", "figure img")
            browser.wait_for(lambda: all(driver.execute_script("return arguments[0].complete && "
                                                               "arguments[0].naturalWidth > 0", i) for i in images),
                             what="the pictures")
            assert len(images) == len(pictures)  # person: best and worst; one unit each for the others
            assert browser.console_problems(driver) == []


def _records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for index in range(count):
        units = [{"class": cls, "box": [0, 0, 4, 4], "iou": rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]),
                  "hit": False} for cls in rng.sample(["a", "b", "c"], rng.randint(1, 3))]
        for unit in units:
            unit["hit"] = unit["iou"] >= 0.5
        records.append({"key": f"k{index}", "index": index, "units": units})
    return records


def _offer(gallery: UnitGallery, record: dict) -> None:
    n = len(record["units"])
    image = np.full((8, 8, 3), 100, np.uint8)
    gallery.offer(record["index"], record["key"], image, [Target(0, boxes=np.array([[1, 1, 5, 5]]))] * n,
                  [np.random.default_rng(record["index"]).random((8, 8))] * n, record["units"])


def _kept(records: list[dict]) -> set[str]:
    return {gallery_name(record["key"], cls, position) for cls, places in best_and_worst(records).items()
            for record, position in places.values()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gallery_keeps_exactly_the_reports_units_in_any_order_split_or_resumption(tmp_path, seed):
    records = _records(40, seed)
    wanted = _kept(records)
    # One process, in a shuffled order (host threads finish out of order).
    one = tmp_path / "one"
    gallery = UnitGallery(one)
    for record in random.Random(seed).sample(records, len(records)):
        _offer(gallery, record)
    assert {p.name for p in one.iterdir()} == wanted
    # Host threads offering at once (each draws outside the gallery's lock): the same pictures.
    threaded = tmp_path / "threaded"
    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        list(threads.map(functools.partial(_offer, UnitGallery(threaded)), records))
    assert sorted(p.name for p in threaded.iterdir()) == sorted(wanted)  # and no temporary file
    assert all((threaded / name).read_bytes() == (one / name).read_bytes() for name in wanted)
    # Two processes sharing the folder, and a resumed run that starts from the records on disk.
    shared = tmp_path / "shared"
    first, second = UnitGallery(shared), UnitGallery(shared)
    for record in records[:25]:
        _offer(first if record["index"] % 2 else second, record)
    resumed = UnitGallery(shared, seen=records[:25])
    for record in records[25:]:
        _offer(resumed, record)
    assert wanted <= {p.name for p in shared.iterdir()}  # each process kept the places of what it saw
    prune_gallery(shared, best_and_worst(records))  # the report, once every process is done
    assert {p.name for p in shared.iterdir()} == wanted
    # A resumed run whose records' pictures could not be written (a full disk): the samples holding places are run
    # again, in any order among the new ones, and draw only the pictures still held.
    lost = tmp_path / "lost"
    resumed = UnitGallery(lost, seen=records[:25])
    assert resumed.undrawn_keys == {record["key"] for places in best_and_worst(records[:25]).values()
                                    for record, _ in places.values()}
    again = [record for record in records[:25] if record["key"] in resumed.undrawn_keys]
    for record in random.Random(seed).sample(again + records[25:], len(again) + 15):
        _offer(resumed, record)
    assert {p.name for p in lost.iterdir()} == wanted


def test_a_unit_offered_while_another_is_drawn_is_not_kept_waiting_and_its_displaced_picture_goes(tmp_path,
                                                                                                   monkeypatch):
    """Drawing and writing a picture (a JPEG encode, a synced write) held the gallery's lock, so every host thread
    waited on the one drawing (20.8 s of 58 s of host time in a 300-image sweep). A unit offered while another is
    being drawn is placed at once; the one it displaced is deleted once written, by the thread that drew it."""
    import tclip_jax.sweep.vis as vis

    unit = {"class": "a", "box": [0, 0, 4, 4], "iou": 0.5, "hit": True}
    first, earlier = ({"key": f"k{index}", "index": index, "units": [unit]} for index in (1, 0))  # earlier: best, worst
    drawing, release, draw = threading.Event(), threading.Event(), vis.unit_picture

    def blocked_for_k1(image, heatmap, target, drawn, max_side=None):
        if threading.current_thread().name == "k1":
            drawing.set()
            assert release.wait(timeout=60)
        return draw(image, heatmap, target, drawn, max_side)

    monkeypatch.setattr(vis, "unit_picture", blocked_for_k1)
    gallery = UnitGallery(tmp_path)
    threads = [threading.Thread(target=_offer, args=(gallery, record), name=record["key"])
               for record in (first, earlier)]
    try:
        threads[0].start()
        assert drawing.wait(timeout=60)  # k1 holds both places and is being drawn
        threads[1].start()
        threads[1].join(timeout=20)
        assert not threads[1].is_alive(), "k0's offer waited for k1's picture to be drawn"
        assert [p.name for p in tmp_path.iterdir()] == [gallery_name("k0", "a", 0)]
    finally:
        release.set()
        for thread in threads:
            thread.join()
    assert [p.name for p in tmp_path.iterdir()] == [gallery_name("k0", "a", 0)]  # k1's, written after, is deleted


def test_the_gallery_and_report_html_are_the_same_with_one_or_several_host_threads(coco_many, tmp_path):  # noqa: F811
    def sweep(out, workers):
        run_sweep(coco_dataset(coco_many), Painted.from_pretrained(), out,
                  options=RunOptions(batch_size=2, workers=workers, progress=False))
        return {p.name: p.read_bytes() for p in (out / "gallery").iterdir()}, (out / "report.html").read_text()

    one = sweep(tmp_path / "one", 1)
    assert sorted(one[0]) == sorted(_kept(read_all_records(tmp_path / "one")))
    assert sweep(tmp_path / "four", 4) == one


def test_a_resumed_sweep_draws_the_pictures_a_full_disk_kept_it_from_writing(coco_hand, tmp_path,  # noqa: F811
                                                                              monkeypatch):
    """Places held by records on disk were taken without their pictures, so a picture that could not be written (a
    full disk) was never drawn again: a --resume after the disk was freed gave a report.html without them, saying
    "a sweep from before pictures were kept". The resume runs those samples again for their pictures alone: its
    gallery and report.html are the uninterrupted sweep's, and each sample is still recorded once."""
    import errno

    import tclip_jax.sweep.vis as vis

    def sweep(out, resume=False):
        return run_sweep(coco_dataset(coco_hand), Painted.from_pretrained(), out,
                         options=RunOptions(batch_size=2, progress=False, resume=resume))

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    sweep(whole)
    with monkeypatch.context() as patch:
        def full_disk(path, rgb, jpeg_quality=88):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        patch.setattr(vis, "write_image", full_disk)
        with pytest.warns(UserWarning, match="report.html pictures: .*No space left on device"):
            sweep(resumed)
    assert not any((resumed / "gallery").glob("*")) and "could not be written" in (resumed / "report.html").read_text()
    sweep(resumed, resume=True)
    by_index = lambda out: sorted(read_all_records(out), key=lambda record: record["index"])  # noqa: E731
    assert by_index(resumed) == by_index(whole)  # each sample recorded once (read_all_records refuses a second)
    pictures = sorted(p.name for p in (whole / "gallery").iterdir())
    assert pictures == sorted(_kept(read_all_records(whole))) and len(pictures) == 6
    assert sorted(p.name for p in (resumed / "gallery").iterdir()) == pictures
    for name in pictures:
        assert (resumed / "gallery" / name).read_bytes() == (whole / "gallery" / name).read_bytes()
    assert (resumed / "report.html").read_text() == (whole / "report.html").read_text()


def test_a_recorded_sample_run_again_for_its_picture_draws_none_for_a_place_it_lost_meanwhile(tmp_path):
    """The recorded unit held the class's best and worst place without its picture; both places went to new units
    offered before it was run again, so its picture is not drawn (nothing would delete it)."""
    unit = lambda iou: {"class": "a", "box": [0, 0, 4, 4], "iou": iou, "hit": iou >= 0.5}  # noqa: E731
    recorded, best, worst = ({"key": f"k{index}", "index": index, "units": [unit(iou)]}
                             for index, iou in enumerate([0.5, 1.0, 0.0]))
    gallery = UnitGallery(tmp_path, seen=[recorded])
    assert gallery.undrawn_keys == {"k0"}
    for record in (best, worst, recorded):
        _offer(gallery, record)
    assert sorted(p.name for p in tmp_path.iterdir()) == [gallery_name("k1", "a", 0), gallery_name("k2", "a", 0)]


def test_among_equal_ious_the_earliest_unit_is_best_and_worst_in_the_report_and_the_gallery(tmp_path):
    """Ties are common (IoU 0 or 1): the earliest unit in dataset order (index, then position) takes the place,
    whatever order the records arrive in."""
    records = [{"key": f"k{index}", "index": index,
                "units": [{"class": "a", "box": [0, 0, 4, 4], "iou": 1.0, "hit": True}] * 2} for index in range(3)]
    for order in (records, records[::-1]):
        chosen = best_and_worst(order)["a"]
        assert [(chosen[place][0]["index"], chosen[place][1]) for place in ("best", "worst")] == [(0, 0), (0, 0)]
        gallery = UnitGallery(tmp_path / f"first_{order[0]['index']}")
        for record in order:
            _offer(gallery, record)
        assert [p.name for p in gallery.folder.iterdir()] == [gallery_name("k0", "a", 0)]


def test_picture_names_are_plain_where_they_can_be_and_never_shared():
    assert file_stem("000000000139", "person", 0) == "000000000139__person__0"  # a plain name stays as it is
    cases = [("Äpfel", "person"), ("Öpfel", "person"), ("1", "狗"), ("1", "猫"), ("1", "traffic light"),
             ("1", "traffic_light"), ("a__b", "c"), ("a", "b__c"), ("a_", "_b"), ("a", "_b"),
             ("a_", "b"), ("", "b"), ("x" * 300, "dog"),
             ("x" * 300 + "y", "dog"), ("1", "very " * 100)]
    names = [file_stem(*parts) for parts in cases]
    assert len(set(names)) == len(cases)  # neighbours here share a name when only replaced, joined or cut
    for parts, name in zip(cases, names):
        assert re.fullmatch(r"[A-Za-z0-9._-]+(~[0-9a-f]{12})?", name) and len(name) <= MAX_STEM_CHARS + 13, name
        if "~" not in name:
            assert name.split("__") == list(parts)  # a name without a hash reads back to its parts


def test_unit_pictures_are_labelled_with_class_iou_and_hit_or_miss():
    image = np.full((60, 80, 3), 128, np.uint8)
    heatmap = np.zeros((60, 80), np.float32)
    heatmap[10:30, 10:30] = 1
    target = Target(0, boxes=np.array([[10.0, 10.0, 30.0, 30.0]]))
    hit = unit_picture(image, heatmap, target, {"class": "cat", "box": [10, 10, 30, 30], "iou": 1.0, "hit": True})
    miss = unit_picture(image, heatmap, target, {"class": "cat", "box": [40, 40, 60, 60], "iou": 0.0, "hit": False})
    assert hit.shape[0] > 60 and hit.shape[1] == 80                      # a label strip below the picture
    assert tuple(hit[-1, -1]) == (40, 120, 40) and tuple(miss[-1, -1]) == (170, 40, 40)  # RGB: green hit, red miss
    # The boxes are end exclusive, drawn inside themselves: what is drawn of the box [40, 60) x [40, 60) runs over
    # pixels 40-59, a red line edged in black.
    unboxed = unit_picture(image, heatmap, target, {"class": "cat", "iou": 0.0, "hit": False})
    drawn = np.argwhere((miss[:60] != unboxed[:60]).any(axis=-1) & ~(hit[:60] != unboxed[:60]).any(axis=-1))
    assert drawn.min(axis=0).tolist() == [40, 40] and drawn.max(axis=0).tolist() == [59, 59]
    assert (miss[41, 41:59] == (255, 0, 0)).all(axis=-1).any() and (miss[50, 40] == 0).all()
    thumbnail = unit_picture(np.zeros((600, 800, 3), np.uint8), np.zeros((600, 800), np.float32),
                             Target(0, mask=np.ones((600, 800), bool)), {"class": "x", "pg_hit": True,
                                                                         "area_inter": [0, 5], "area_union": [1, 10]},
                             max_side=200)
    assert thumbnail.shape[1] == 200
    assert unit_score({"pg_hit": False, "area_inter": [3, 2], "area_union": [9, 8]}) == (
        "mask IoU", 0.25, False, "PG miss")
    assert json.dumps(unit_score({"iou": 0.5, "hit": True})) == '["box IoU", 0.5, true, "hit"]'


def test_boxes_far_outside_the_picture_are_drawn_as_much_as_lies_in_it():
    """A ground-truth box at x = 1e10 stopped the sweep in cv2.rectangle (no C int), one at 1e308 (its x2 inf) in
    int(round(inf)). Such boxes leave the picture untouched; a box cut by the picture's edge is drawn as its part in
    the picture (`draw_box`'s inner stroke, as every picture draws boxes)."""
    image = np.full((60, 80, 3), 128, np.uint8)
    heatmap = np.zeros((60, 80), np.float32)
    unit = {"class": "cat", "iou": 0.0, "hit": False}

    def picture(boxes, predicted=None, max_side=None):
        return unit_picture(image, heatmap, Target(0, boxes=np.array(boxes, np.float64).reshape(-1, 4)),
                            {**unit, **({} if predicted is None else {"box": predicted})}, max_side)

    for max_side in (None, 40):
        empty = picture([], max_side=max_side)
        for far in ([1e10, 10, 1e10 + 30, 40], [1e308, 10, np.inf, 40], [10, -np.inf, 30, -1e12]):
            np.testing.assert_array_equal(picture([far], max_side=max_side), empty)
            np.testing.assert_array_equal(picture([], far, max_side=max_side), empty)
    # [-1e10, 20) x [10, 30) is drawn as [0, 20) x [10, 30), inside it: columns 0-19, rows 10-29.
    cut = picture([[-1e10, 10, 20, 30]])
    np.testing.assert_array_equal(cut, picture([[0, 10, 20, 30]]))
    changed = np.argwhere((cut != picture([])).any(axis=-1)[:60])
    assert changed.min(axis=0).tolist() == [10, 0] and changed.max(axis=0).tolist() == [29, 19]
    assert (cut[11, :19] == (0, 200, 0)).all(axis=-1).any()  # green, the ground truth's colour



def test_a_unit_picture_draws_its_map_as_every_other_picture_does(tmp_path):
    """The sweep's pictures (--save-vis, the gallery) drew the map in OpenCV's jet colours with their own min-max
    and blend, `tclip explain` and the explorer in turbo: one map, two colourings. Now a unit picture is
    `figures.overlay` of its map, the closed form round(0.5 image + 0.5 turbo[round(255 (h - min) / (max - min))])
    wherever no outline is drawn, and its boxes are `figures.draw_box`'s (the ground truth green, the prediction
    red), full size (a --save-vis PNG, read back) and as a gallery thumbnail (image and map shrunk first)."""
    import cv2

    from tclip_jax.image import load_image
    from tclip_jax.sweep.vis import UnitPictures
    from tclip_jax.visualize.figures import draw_box, overlay, turbo_lut

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), np.uint8)
    heatmap = np.linspace(-2.0, 5.0, 60 * 80).reshape(60, 80) + rng.random((60, 80))  # off zero: min-max matters
    target, unit = Target(0, boxes=np.array([[5.0, 6.0, 30.0, 40.0]])), {"class": "cat", "box": [20, 10, 70, 50],
                                                                         "iou": 0.2, "hit": False}
    UnitPictures(tmp_path).save("k", image, [target], [heatmap], [unit])
    saved = load_image(tmp_path / "k__cat.png")
    low, high = heatmap.min(), heatmap.max()
    explicit = np.round(0.5 * image + 0.5 * turbo_lut()[np.round(255 * (heatmap - low) / (high - low)).astype(int)])
    expected = draw_box(draw_box(explicit.astype(np.uint8), (5, 6, 30, 40), colour=(0, 200, 0)), (20, 10, 70, 50),
                        colour=(255, 0, 0))
    np.testing.assert_array_equal(saved[:60], expected)
    outside = np.ones((60, 80), bool)
    outside[6:40, 5:30] = outside[10:50, 20:70] = False
    np.testing.assert_array_equal(saved[:60][outside], overlay(image, heatmap)[outside])  # the map's own pixels
    thumbnail = unit_picture(image, heatmap, target, unit, max_side=40)
    small = cv2.resize(image, (40, 30), interpolation=cv2.INTER_AREA)
    shrunk = cv2.resize(heatmap, (40, 30), interpolation=cv2.INTER_AREA)
    expected = draw_box(draw_box(overlay(small, shrunk), (2.5, 3.0, 15.0, 20.0), colour=(0, 200, 0)),
                        (10, 5, 35, 25), colour=(255, 0, 0))
    np.testing.assert_array_equal(thumbnail[:30], expected)

def test_a_sweep_with_ground_truth_boxes_far_outside_the_image_completes(tmp_path):
    """1e10 and 1e308 are 4 finite numbers, as the loader asks; the box IoU is 0 and the pictures are drawn."""
    root = write_coco(tmp_path / "coco", {1: painted(48, 64, []), 2: painted(48, 64, [])},
                      [(1, 1, [1e10, 10, 30, 30], 0), (2, 1, [1e308, 10, 1e308, 30], 0)])
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a numpy warning of x + w overflowing on the way
        report = run_sweep(coco_dataset(root), Painted.from_pretrained(), out,
                           options=RunOptions(save_vis=2, progress=False)).report
    assert (report["images"], report["units"], report["errors"]) == (2, 2, [])
    assert report["detection"]["mean_iou"] == 0.0
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["1__person.png", "2__person.png"]
    # Equal IoUs: the earlier unit is both the class's best and its worst.
    assert [p.name for p in (out / "gallery").iterdir()] == ["1__person__0.jpg"]


class _Page(HTMLParser):
    """report.html read back: the cells of each table (rows of cells, the header first), and all its text."""

    def __init__(self):
        super().__init__()
        self.tables, self.text, self.cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self.cell is not None:
            self.cell += data


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """report.md's tables as a GFM parser (markdown-it) reads them: rows of cells, the header first."""
    from markdown_it import MarkdownIt

    tables, row = [], None
    for token in MarkdownIt("commonmark").enable("table").parse(text):
        if token.type == "table_open":
            tables.append([])
        elif token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:
            row.append(token.content)
        elif token.type == "tr_close":
            tables[-1].append(row)
            row = None
    return tables


def test_report_html_says_what_report_md_says_and_a_pipe_in_a_label_stays_in_its_cell(coco_hand,  # noqa: F811
                                                                                       tmp_path):
    """Every table of report.md, read by a GFM parser (markdown-it), is report.html's, cell for cell, and every
    sentence below the run's description is there too: the wrong-attribute figure, the no-positive-value caveat,
    why no paper figure is shown. A model folder with '|' in its name must neither shift cells nor drop one."""
    from markdown_it import MarkdownIt
    from tclip_jax.sweep.report import html_report, markdown

    out = tmp_path / "out"
    report = run_sweep(coco_dataset(coco_hand), Painted.from_pretrained(), out,
                       options=RunOptions(batch_size=2, progress=False)).report
    config, summary = report["config"], {k: v for k, v in report.items() if k != "config"}
    config["run"]["model"]["origin"] = "models/pipe|model"
    summary["groups"] = {"colour|shape": summary}
    summary["wrong_attribute"] = {"units": 4, "wrong_pointing": 0.25}
    summary["segmentation"] = {"pointing_game": 0.5, "energy_pg": 0.25, "pixel_accuracy": 0.75, "ap": 0.5,
                               "mask_iou": 0.125, "pointing_game_class_mean": 0.5, "units": 8,
                               "no_positive_relevance": 3, "per_class": {}}
    text = markdown(config, summary)

    page = _Page()
    page.feed(html_report(config, summary, {}, out))
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    tables = _markdown_tables(text)
    assert len(tables) == 2 and page.tables == tables  # detection and segmentation
    assert tables[0][1][0] == "painted (models/pipe|model)"
    assert tables[0][2][0] == "painted (models/pipe|model), colour|shape"
    shown = " ".join("".join(page.text).split())
    paragraphs = [token.content for token in tokens if token.type == "inline" and not token.map[0] < 0]
    below = [p for p in paragraphs if p not in {c for t in tables for r in t for c in r}][2:]  # title, description
    assert any("Wrong-attribute pointing" in p for p in below) and any("no positive value" in p for p in below)
    assert any(p.startswith("No paper figure is shown") for p in below)
    for paragraph in below:
        assert " ".join(paragraph.replace("`", "").split()) in shown


# Each column report.md's tables write and the report.json score it names: (task, key, scale, decimals); "{fixed}"
# is the seed table's fixed threshold. A table's last column, Units or Categories, counts (its task's "units", the
# seed metrics' "categories").
_COLUMNS = {
    "BoxAcc (%)": ("detection", "box_accuracy", 100, 2),
    "BoxAcc, class mean (%)": ("detection", "box_accuracy_class_mean", 100, 2),
    "Mean IoU": ("detection", "mean_iou", 1, 4),
    "PG": ("segmentation", "pointing_game", 1, 4),
    "Energy-PG": ("segmentation", "energy_pg", 1, 4),
    "Pixel acc.": ("segmentation", "pixel_accuracy", 1, 4),
    "AP": ("segmentation", "ap", 1, 4),
    "Mask IoU": ("segmentation", "mask_iou", 1, 4),
    "PG, class mean": ("segmentation", "pointing_game_class_mean", 1, 4),
    "mIoU, grid-searched threshold": ("seed", "miou_grid", 1, 4),
    "mIoU, threshold {fixed}": ("seed", "miou_fixed", 1, 4),
    "mSC (%)": ("seed", "msc", 100, 2),
}


@pytest.mark.parametrize("dataset", ["coco", "imagenet-s919"])
def test_every_table_cell_of_report_md_and_html_is_the_report_json_score_its_header_names(dataset):
    """Every cell of every table report.md and report.html write (detection, segmentation, seed; the run's row, its
    groups' rows, the paper's row), read back by its column's header, is the report.json score that header names:
    a table whose cells were swapped under unchanged headers (Pixel acc. and AP, the grid-searched and fixed-threshold
    mIoU) published the wrong number under the right name while report.json stayed right. Every row's numbers
    differ, so no swap can pass."""
    from tclip_jax.evaluation.datasets.coco import VAL2017_SAMPLES
    from tclip_jax.evaluation.datasets.imagenet_s import VALIDATION_IMAGES
    from tclip_jax.evaluation.metrics.seed import seed_unit_scores
    from tclip_jax.evaluation.options import EvalOptions
    from tclip_jax.methods.tclip.settings import Settings
    from tclip_jax.sweep.report import PAPER, html_report, markdown, run_name, summarize

    rng = np.random.default_rng(4)  # one whose rows' numbers all differ (asserted below)
    records = []
    for index in range(10):
        units = []
        for group in rng.choice(["shape 1", "shape 2", "Route 66"], 1 + index % 3, replace=False).tolist():
            mask = rng.random((6, 6)) < 0.4
            units.append({"class": ["cat", "dog", "bird"][int(rng.integers(3))], "group": group,
                          "hit": bool(rng.random() < 0.5), "iou": float(rng.random()),
                          "pg_hit": bool(rng.random() < 0.6), "energy_pg": float(rng.random()),
                          "energy_in_mask": float(rng.random()), "pixel_correct": int(rng.integers(40, 100)),
                          "pixel_labeled": 100, "area_inter": [int(rng.integers(30)), int(rng.integers(10))],
                          "area_union": [int(rng.integers(30, 60)), int(rng.integers(10, 20))],
                          "ap": float(rng.random()),
                          "seed": seed_unit_scores(rng.normal(size=(6, 6)) + 2 * mask, mask)})
        records.append({"index": index, "key": str(index), "units": units})
    summary = summarize(records)
    summary["images"] = {"coco": VAL2017_SAMPLES, "imagenet-s919": VALIDATION_IMAGES[919]}[dataset]  # the paper's row
    run = {"method": "tclip", "settings": Settings().to_dict(), "input_protocol": "whole",
           "model": {"origin": "openai/clip-vit-base-patch32", "source": "hf", "architecture": "ViT-B/32"}}
    config = {"run": run, "dataset": dataset, "limit": None, "template": None, "source": "s",
              "evaluation": EvalOptions(metrics="seed").to_dict()}
    report = json.loads(json.dumps({"config": config, **summary}))  # report.json, as write_report writes it
    name = run_name(run)
    scores_of = {name: report, **{f"{name}, {g}": s for g, s in report["groups"].items()}}
    text = markdown(config, summary)
    page = _Page()
    page.feed(html_report(config, summary, {}, pathlib.Path("out")))
    columns = {header.format(fixed=f"{report['seed']['fixed_threshold']:.2f}"): named
               for header, named in _COLUMNS.items()}
    for tables in (_markdown_tables(text), page.tables):
        tasks, paper_rows, group_rows = [], 0, 0
        for header, *rows in tables:
            assert header[0] == "Method" and header[-1] in ("Units", "Categories") and rows, header
            named = [columns[h] for h in header[1:-1]]
            task = named[0][0]
            assert all(n[0] == task for n in named), header
            tasks.append(task)
            for label, *cells in rows:
                paper = label == "paper: TCLIP (ViT-B/32)"
                scores = PAPER[dataset] if paper else scores_of[label][task]
                paper_rows += paper
                group_rows += label.startswith(f"{name}, ")
                assert cells[-1] == ("" if paper else str(scores[header[-1].lower()])), (label, header[-1])
                shown = {}
                for head, cell, (_, key, scale, decimals) in zip(header[1:-1], cells, named):
                    if paper and key not in scores:
                        assert cell == "", (label, head)
                        continue
                    value = scale * scores[key]
                    assert abs(float(cell) - value) <= 0.5 * 10 ** -decimals + 1e-12, (label, head, cell, value)
                    shown[head] = cell
                assert len(set(shown.values())) == len(shown), (label, shown)  # a swap of any two would show
        assert tasks == ["detection", "segmentation", "seed"]
        assert paper_rows == 1 and group_rows == 2 * len(report["groups"])


def test_wrong_pointing_is_over_the_units_with_a_wrongly_named_object_alone():
    """Units with a wrong_mask (wrong_pg_hit) and units without one in the same sweep and group: wrong_pointing is
    the hits over the units that have one, counted here unit by unit, in report.json, each group and report.md (no
    current dataset mixes them: the wrong-attribute protocol gives every unit one, the others none)."""
    from tclip_jax.sweep.report import markdown, summarize

    rng = random.Random(2)
    records = []
    for index in range(5):
        units = []
        for _ in range(3):
            unit = {"class": "cat", "group": rng.choice(["colour", "shape"]), "hit": rng.random() < 0.5, "iou": 0.5}
            if rng.random() < 0.5:
                unit["wrong_pg_hit"] = rng.random() < 0.5
            units.append(unit)
        records.append({"index": index, "key": str(index), "units": units})
    summary = summarize(records)
    everything = [u for r in records for u in r["units"]]
    for scores, units in [(summary, everything), *((summary["groups"][g], [u for u in everything if u["group"] == g])
                                                   for g in ("colour", "shape"))]:
        wrong = [u["wrong_pg_hit"] for u in units if "wrong_pg_hit" in u]
        assert 0 < len(wrong) < len(units) and 0 < sum(wrong)  # mixed, so the two denominators differ
        assert scores["wrong_attribute"]["units"] == len(wrong)
        assert scores["wrong_attribute"]["wrong_pointing"] == pytest.approx(sum(wrong) / len(wrong), abs=1e-12)
    config = {"dataset": "synthetic-wrong_attribute", "evaluation": {}, "run": {
        "method": "tclip", "settings": {}, "input_protocol": "whole", "model": {"origin": "m"}}}
    wrong = [u["wrong_pg_hit"] for u in everything if "wrong_pg_hit" in u]
    assert f"better): {sum(wrong) / len(wrong):.4f} over {len(wrong)} units." in markdown(config, summary)


@pytest.mark.parametrize("errors", [20, 21])
def test_report_md_lists_the_first_20_errors_and_counts_the_rest(errors):
    from tclip_jax.evaluation.options import EvalOptions
    from tclip_jax.sweep.report import errors_listed, markdown, summarize

    config = {"dataset": "coco", "evaluation": EvalOptions().to_dict(),
              "run": {"method": "painted", "model": {"origin": "m.npz"}, "settings": {}, "input_protocol": "resize"}}
    summary = summarize([{"key": f"k{index}", "index": index, "error": f"ValueError: bad {index}"}
                         for index in range(errors)])
    lines = markdown(config, summary).splitlines()
    assert [line for line in lines if line.startswith("- `k")] == [f"- `k{i}`: ValueError: bad {i}" for i in range(20)]
    more = [line for line in lines if line.startswith("- ... and")]
    assert more == ([] if errors == 20 else ["- ... and 1 more (see report.json)"])
    # The line a sweep ends with says where they are: report.md where it lists them all.
    assert errors_listed(errors) == ("listed in report.md" if errors == 20 else
                                     "listed in report.json (the first 20 in report.md)")


def test_a_sweep_with_nothing_to_score_says_so(tmp_path):
    """A VOC image whose labels hold only background and ignore pixels has no unit: the report had its description
    ("1 image, 0 units") and no table, and did not say why."""
    from test_datasets import painted, write_voc
    from tclip_jax.evaluation.datasets import voc_dataset

    labels = np.zeros((8, 8), np.int64)
    labels[2:4] = 255  # ignored
    root = write_voc(tmp_path / "VOC2012", {"x1": (painted(8, 8, []), labels)})
    out = tmp_path / "out"
    report = run_sweep(voc_dataset(root), Painted.from_pretrained(), out, options=RunOptions(progress=False)).report
    assert (report["images"], report["units"], report["errors"]) == (1, 0, [])
    text = (out / "report.md").read_text()
    assert "Nothing was scored: no image read holds an object of the dataset's classes" in text
    assert "Nothing was scored" in (out / "report.html").read_text()


def test_reports_count_one_image_unit_or_error_in_the_singular(coco_hand, tmp_path):  # noqa: F811
    from tclip_jax.sweep.report import html_report, markdown

    out = tmp_path / "out"
    report = run_sweep(coco_dataset(coco_hand), Painted.from_pretrained(), out,
                       options=RunOptions(batch_size=2, progress=False)).report
    config = report["config"]
    for images, units, errors, said in [(1, 1, 1, "1 image, 1 unit, 1 error."),
                                        (2, 3, 0, "2 images, 3 units, 0 errors."),
                                        (0, 0, 2, "0 images, 0 units, 2 errors.")]:
        summary = {**{k: v for k, v in report.items() if k != "config"}, "images": images, "units": units,
                   "errors": [{"key": str(i), "error": "ValueError: unreadable"} for i in range(errors)]}
        assert markdown(config, summary).splitlines()[2].startswith(said)
        assert f'<p class="meta">{said}' in html_report(config, summary, {}, out)
    # The sentences that count units further down the report.
    scores = {"pointing_game": 0.5, "energy_pg": 0.25, "pixel_accuracy": 0.75, "ap": 0.5, "mask_iou": 0.125,
              "pointing_game_class_mean": 0.5, "units": 1, "no_positive_relevance": 1, "per_class": {}}
    segmentation = {**{k: v for k, v in report.items() if k != "config"}, "segmentation": scores,
                    "wrong_attribute": {"units": 1, "wrong_pointing": 0.0}}
    text = markdown(config, segmentation)
    assert "1 of 1 unit has a relevance map with no positive value" in text and "over 1 unit." in text
    segmentation["segmentation"].update(units=3, no_positive_relevance=2)
    segmentation["wrong_attribute"]["units"] = 3
    text = markdown(config, segmentation)
    assert "2 of 3 units have a relevance map with no positive value" in text and "over 3 units." in text


def test_placed_groups_are_also_pooled_by_kind_as_an_explicit_count_over_the_records_gives():
    """many_objects groups its words by kind and place ("shape 4"): the report also gives each kind over all places
    ("shape"), counted here unit by unit, and keeps each place and each group without a place as it was."""
    from tclip_jax.sweep.report import markdown, summarize

    rng = random.Random(0)
    # a dataset's own "Route 66" or "phrase 2" is no place of a kind: "phrase" keeps its own units alone
    groups = ["colour 1", "colour 2", "shape 1", "shape 2", "shape 3", "relation", "shape 12", "Route 66", "phrase",
              "phrase 2"]
    kind_of = lambda group: group.split(" ")[0] if group.split(" ")[0] in ("colour", "shape", "relation") else group
    records = []
    for index in range(6):
        units = []
        for group in rng.sample(groups, 6):
            hit, pg = rng.random() < 0.5, rng.random() < 0.6
            units.append({"class": rng.choice(["red", "star", "left"]), "group": group, "hit": hit,
                          "iou": rng.random(), "pg_hit": pg, "energy_pg": rng.random(), "energy_in_mask": rng.random(),
                          "pixel_correct": rng.randrange(50, 100), "pixel_labeled": 100,
                          "area_inter": [rng.randrange(30), rng.randrange(10)],
                          "area_union": [rng.randrange(30, 60), rng.randrange(10, 20)], "ap": rng.random()})
        records.append({"index": index, "key": str(index), "units": units})
    summary = summarize(records)
    everything = [u for r in records for u in r["units"]]
    assert set(summary["groups"]) == {g for u in everything for g in (u["group"], kind_of(u["group"]))}
    assert "Route" not in summary["groups"]
    for name, part in summary["groups"].items():
        # a kind: every unit whose group is that kind, with or without a place; else the group itself
        units = [u for u in everything if u["group"] == name or kind_of(u["group"]) == name]
        assert part["units"] == len(units) == part["segmentation"]["units"] == part["detection"]["units"]
        assert part["detection"]["box_accuracy"] == pytest.approx(sum(u["hit"] for u in units) / len(units))
        assert part["detection"]["mean_iou"] == pytest.approx(sum(u["iou"] for u in units) / len(units))
        assert part["segmentation"]["pointing_game"] == pytest.approx(sum(u["pg_hit"] for u in units) / len(units))
        assert part["segmentation"]["energy_pg"] == pytest.approx(sum(u["energy_pg"] for u in units) / len(units))
        assert part["segmentation"]["mask_iou"] == pytest.approx(
            sum(u["area_inter"][1] for u in units) / sum(u["area_union"][1] for u in units))
    assert summary["groups"]["shape"]["units"] == sum(u["group"].startswith("shape ") for u in everything)
    assert summary["groups"]["relation"]["units"] == sum(u["group"] == "relation" for u in everything)
    config = {"dataset": "synthetic-many_objects", "evaluation": {}, "run": {
        "method": "tclip", "settings": {}, "input_protocol": "whole", "model": {"origin": "m"}}}
    rows = [line.split(" | ")[0] for line in markdown(config, summary).splitlines() if line.startswith("| ")]
    for label in ("colour", "shape", "shape 3", "relation"):  # a row each in both tables
        assert sum(row.endswith(f", {label}") for row in rows) == 2
    overlap = "A word kind's row (colour, shape, relation) pools its rows by place"
    assert overlap in markdown(config, summary)  # said where rows overlap, and only there
    assert overlap not in markdown(config, summarize([{"index": 0, "key": "0", "units": [
        {**everything[0], "group": "Route 66"}]}]))
