"""Per-unit pictures: the image under the map as `tclip explain` and the explorer draw it
(`tclip_jax.visualize.figures.overlay`: turbo colours, min-max), ground truth in green, the predicted box in red
(boxes drawn by its `draw_box`), and a label strip naming the class, the unit's IoU and whether it is a hit (green)
or a miss (red).

- `UnitPictures`: full-size pictures of every unit of the first N samples (`--save-vis N`; a resumed sweep runs
  the recorded ones among them that lack their pictures again, for these).
- `UnitGallery`: thumbnails of the best and the worst unit of each class, kept while the sweep runs, for
  report.html. Units are ranked as the report ranks them (`unit_score`, `best_key`, `worst_key`): a picture is
  drawn when a unit takes a class's best or worst place so far and deleted when it loses it, so the pictures of
  the final best and worst units are on disk whatever the order, split or resumption of the sweep (a resumed sweep
  runs the recorded samples whose places lack their picture again, for it: one could not be written, e.g. on a
  full disk). Scores are read from the scored units; nothing is scored here.

A picture that cannot be written is warned of (once per sweep) and costs no unit its record. File names
(`file_stem`) are the sample key and the class, readable and unique: where they are not plain, anything but ASCII
letters, digits and '._-' becomes '_', long names are cut, and '~' and a hash of the key and class follow.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import re
import threading
import warnings
from collections.abc import Iterable, Sequence
from typing import Optional

import cv2
import numpy as np

from tclip_jax.evaluation.datasets.base import Target
from tclip_jax.files import write_image
from tclip_jax.visualize.figures import draw_box, overlay

_GREEN, _RED = (0, 200, 0), (255, 0, 0)  # RGB
_HIT_STRIP, _MISS_STRIP, _UNSCORED_STRIP = (40, 120, 40), (170, 40, 40), (60, 60, 60)  # RGB
GALLERY_DIR = "gallery"
THUMBNAIL_MAX_SIDE = 256
MAX_STEM_CHARS = 96  # of the readable part; file systems allow 255 bytes


def vis_path(folder: pathlib.Path, key: str, class_name: str, position: int | None = None) -> pathlib.Path:
    """The picture of a unit: its sample key and class (and its position, for a class with several units in the
    sample)."""
    return folder / (file_stem(key, class_name, *([] if position is None else [position])) + ".png")


def gallery_name(key: str, class_name: str, position: int) -> str:
    """The gallery picture of unit `position` of sample `key` (relative to the gallery folder)."""
    return file_stem(key, class_name, position) + ".jpg"


def file_stem(*parts: object) -> str:
    """The parts joined by '__', as they are when each is plain (ASCII letters, digits, '.', '-', and single '_'
    between them) and the name short; otherwise with anything but ASCII letters, digits and '._-' replaced by '_',
    cut at MAX_STEM_CHARS, and '~' and a hash of the parts after it. Distinct parts never share a name: a name
    without '~' splits back into its parts at each '__'."""
    texts = [str(part) for part in parts]
    stem = "__".join(texts)
    if len(stem) <= MAX_STEM_CHARS and all(_PLAIN_PART.fullmatch(text) for text in texts):
        return stem
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', stem)[:MAX_STEM_CHARS]}~{digest}"


_PLAIN_PART = re.compile(r"[A-Za-z0-9.-]+(?:_[A-Za-z0-9.-]+)*")


class _WarnOnce:
    """Warns of the first picture that cannot be written, and of no later one (thread-safe)."""

    def __init__(self, what: str, consequence: str):
        self.what, self.consequence = what, consequence
        self._lock = threading.Lock()
        self._warned = False

    def __call__(self, err: OSError) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        warnings.warn(f"{self.what}: {err}; {self.consequence}", stacklevel=3)


# ------------------------------------------------------------------------------------------------ scores
def unit_score(unit: dict) -> Optional[tuple[str, float, bool, str]]:
    """(IoU name, IoU, hit, hit name) by which a unit is ranked and labelled, or None for an unscored unit.

    A box unit: its box IoU and BoxAcc hit (IoU >= 0.5). A mask unit: its foreground IoU at the segmentation
    threshold (the unit's intersection / union counts) and its pointing-game hit."""
    if "iou" in unit:
        return "box IoU", float(unit["iou"]), bool(unit["hit"]), "hit" if unit["hit"] else "miss"
    if "area_inter" in unit:
        union = unit["area_union"][1]
        iou = float(unit["area_inter"][1] / union) if union else 0.0
        return "mask IoU", iou, bool(unit["pg_hit"]), "PG hit" if unit["pg_hit"] else "PG miss"
    return None


def best_key(iou: float, index: int, position: int) -> tuple:
    """Larger is better; among equal IoUs the earlier unit (dataset order) is best."""
    return iou, -index, -position


def worst_key(iou: float, index: int, position: int) -> tuple:
    """Smaller is worse; among equal IoUs the earlier unit is worst."""
    return iou, index, position


def label_text(unit: dict) -> str:
    score = unit_score(unit)
    if score is None:
        return str(unit.get("class", "?"))
    name, iou, _, verdict = score
    return f"{unit.get('class', '?')} | {name} {iou:.3f} | {verdict}"


# ---------------------------------------------------------------------------------------------- pictures
def unit_picture(image: np.ndarray, heatmap: np.ndarray, target: Target, unit: dict,
                 max_side: Optional[int] = None) -> np.ndarray:
    """RGB: `figures.overlay` of the map on the image (turbo colours of the min-max map, half and half, as every
    picture of the package), the ground truth (green: its mask's outline, its boxes), the predicted box (red), boxes
    drawn by `figures.draw_box` (inner strokes edged in black, as much of a box as lies in the picture), and a label
    strip below (class, IoU, hit or miss); at most `max_side` pixels on the image's longer side (the image and the
    map shrunk first, INTER_AREA)."""
    height, width = image.shape[:2]
    scale = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    rgb, values, mask = image, heatmap, target.mask
    if scale < 1.0:
        rgb = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        values = cv2.resize(np.asarray(heatmap, np.float64), size, interpolation=cv2.INTER_AREA)
        mask = None if mask is None else cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    picture = overlay(rgb, values)
    if mask is not None:
        line = 1 if scale < 1.0 or max(height, width) < 400 else 2
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, _GREEN, line)
    for box in [] if target.boxes is None else target.boxes:
        draw_box(picture, [float(v) * scale for v in box], colour=_GREEN)
    if "box" in unit:
        draw_box(picture, [v * scale for v in unit["box"]], colour=_RED)
    return np.vstack([picture, _label_strip(unit, picture.shape[1])])


def _label_strip(unit: dict, width: int) -> np.ndarray:
    score = unit_score(unit)
    font_scale = float(np.clip(width / 560, 0.32, 0.8))
    text = label_text(unit).encode("ascii", "replace").decode("ascii")
    (text_width, text_height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    if text_width > width - 6:  # too long: shrink to fit
        font_scale *= (width - 6) / text_width
        (text_width, text_height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    strip = np.zeros((text_height + baseline + 8, width, 3), np.uint8)
    strip[:] = _UNSCORED_STRIP if score is None else (_HIT_STRIP if score[2] else _MISS_STRIP)
    cv2.putText(strip, text, (3, text_height + 4), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1,
                cv2.LINE_AA)
    return strip


class UnitPictures:
    """Full-size pictures of the units of the samples it is given (`--save-vis N`: the first N), in `folder`.

    `seen`: records already on disk of samples to picture (a resumed sweep's first N): those whose pictures are not
    all on disk (`undrawn_keys`: a run before drew fewer, or could not write them) are to be run again and given,
    for their pictures only, drawn from their records' units as the gallery draws them."""

    def __init__(self, folder: pathlib.Path, seen: Sequence[dict] = ()):
        self.folder = pathlib.Path(folder)
        self._warn = _WarnOnce("--save-vis pictures", "some units will lack theirs")
        self._recorded = {record["key"]: record["units"] for record in seen
                          if not all(path.is_file() for path in self._paths(record["key"], record.get("units", [])))}
        self.undrawn_keys = frozenset(self._recorded)

    def _paths(self, key: str, units: Sequence[dict]) -> list[pathlib.Path]:
        classes = [unit["class"] for unit in units]
        repeated = {c for c in classes if classes.count(c) > 1}
        return [vis_path(self.folder, key, name, position if name in repeated else None)
                for position, name in enumerate(classes)]

    def save(self, key: str, image: np.ndarray, targets: Sequence[Target], heatmaps: Sequence[np.ndarray],
             units: Sequence[dict]) -> None:
        units = self._recorded.get(key, units)  # a recorded sample's pictures say what its record says
        for path, target, heatmap, unit in zip(self._paths(key, units), targets, heatmaps, units):
            try:
                _write(path, unit_picture(image, heatmap, target, unit))
            except OSError as err:  # a missing picture must not cost a sample its record
                self._warn(err)


def _write(path: pathlib.Path, picture: np.ndarray) -> None:
    """A `unit_picture` (RGB), its folder made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, picture)


# ----------------------------------------------------------------------------------------------- gallery
class UnitGallery:
    """Thumbnails of each class's best and worst unit so far (see the module docstring), in `folder`.

    `seen`: records already on disk (a resumed sweep, other processes): their units hold places without
    pictures being drawn again, but for places whose picture is not on disk (it could not be written: a full disk,
    a kill): the samples holding those (`undrawn_keys`) are to be run again and offered, for their pictures only.
    Thread-safe: host threads offer their images' units concurrently."""

    def __init__(self, folder: pathlib.Path, seen: Sequence[dict] = (), max_side: int = THUMBNAIL_MAX_SIDE):
        self.folder = pathlib.Path(folder)
        self.max_side = max_side
        self._lock = threading.Lock()
        self._drawing: set[str] = set()  # the pictures being drawn and written, outside the lock
        self._best: dict[str, tuple[tuple, str]] = {}   # class -> (rank key, picture name)
        self._worst: dict[str, tuple[tuple, str]] = {}
        self._warn = _WarnOnce("report.html pictures", "the report will lack some")
        for record in seen:
            for position, unit in enumerate(record.get("units", [])):
                self._place(record["index"], record["key"], position, unit)
        # The places whose picture is not on disk: picture name -> the recorded unit, drawn from its record (not
        # from the rerun's scores) so that the picture says what the report says.
        self._undrawn: dict[str, dict] = {}
        undrawn_keys = set()
        for cls, places in best_and_worst(seen).items():
            for record, position in places.values():
                name = gallery_name(record["key"], cls, position)
                if not (self.folder / name).is_file():
                    self._undrawn[name] = record["units"][position]
                    undrawn_keys.add(record["key"])
        self.undrawn_keys = frozenset(undrawn_keys)

    def offer(self, index: int, key: str, image: np.ndarray, targets: Sequence[Target],
              heatmaps: Sequence[np.ndarray], units: Sequence[dict]) -> None:
        """One scored sample: draws the pictures of units that take a place, deletes those that lose theirs. A
        sample of `undrawn_keys` (recorded, run again) draws only the pictures its places lack.

        Only the places are decided under the lock; pictures are drawn and written outside it, so that host threads
        draw at once. A picture being drawn (`_drawing`) is deleted by its drawer if its unit lost its place
        meanwhile, not by the thread that took the place (it would delete it before it is written): the pictures
        left are those of the units holding the places, whatever the threads' timing."""
        placed, dropped = [], []
        with self._lock:
            for position, (target, heatmap, unit) in enumerate(zip(targets, heatmaps, units)):
                if key in self.undrawn_keys:
                    (name, unit), lost = self._undrawn_place(key, position, unit["class"]), []
                else:
                    name, lost = self._place(index, key, position, unit)
                if name is not None:
                    self._drawing.add(name)
                    placed.append((name, unit["class"], target, heatmap, unit))
                dropped += [name for name in lost if name not in self._drawing]
        for name in dropped:  # a unit that lost its place never takes one again: nobody draws these any more
            self._delete(name)
        for name, cls, target, heatmap, unit in placed:
            try:
                with self._lock:
                    held = self._holds(cls, name)  # else it lost its place to a unit offered since (or of this sample)
                if held:
                    _write(self.folder / name, unit_picture(image, heatmap, target, unit, self.max_side))
            except OSError as err:  # a missing picture must not cost a sample its record
                self._warn(err)
            finally:
                with self._lock:
                    self._drawing.discard(name)
                    lost = not self._holds(cls, name)
            if lost:
                self._delete(name)

    def _delete(self, name: str) -> None:
        try:
            (self.folder / name).unlink(missing_ok=True)
        except OSError as err:
            self._warn(err)

    def _holds(self, cls: str, name: str) -> bool:
        """Whether picture `name` is that of class `cls`'s best or worst unit (call under the lock)."""
        return name in (self._best.get(cls, (None, None))[1], self._worst.get(cls, (None, None))[1])

    def _undrawn_place(self, key: str, position: int, cls: str) -> tuple[Optional[str], Optional[dict]]:
        """(its picture name, the recorded unit) where unit `position` of the recorded sample `key` still holds a
        place whose picture is not drawn yet (a unit offered meanwhile may have taken it); else (None, None)."""
        name = gallery_name(key, cls, position)
        recorded = self._undrawn.pop(name, None)
        return (name, recorded) if recorded is not None and self._holds(cls, name) else (None, None)

    def _place(self, index: int, key: str, position: int, unit: dict) -> tuple[Optional[str], list[str]]:
        """Updates the places; (this unit's picture name if it took one, pictures no place holds any more)."""
        score = unit_score(unit)
        if score is None:
            return None, []
        name, cls = gallery_name(key, unit["class"], position), unit["class"]
        best, worst = best_key(score[1], index, position), worst_key(score[1], index, position)
        previous = {self._best.get(cls, (None, None))[1], self._worst.get(cls, (None, None))[1]} - {None}
        took = False
        if cls not in self._best or best > self._best[cls][0]:
            self._best[cls], took = (best, name), True
        if cls not in self._worst or worst < self._worst[cls][0]:
            self._worst[cls], took = (worst, name), True
        if not took:
            return None, []
        held = {self._best[cls][1], self._worst[cls][1]}
        return name, sorted(previous - held)


def prune_gallery(folder: pathlib.Path, chosen: dict[str, dict]) -> None:
    """Deletes the thumbnails of every unit but the best and worst of each class over all records (`chosen`:
    `best_and_worst`): each process's gallery keeps the places of what it saw, so after a sweep split over
    processes some hold places the merged records do not. Run once every process is done."""
    kept = {gallery_name(record["key"], cls, position) for cls, places in chosen.items()
            for record, position in places.values()}
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and path.name not in kept:
                path.unlink(missing_ok=True)


def best_and_worst(records: Iterable[dict]) -> dict[str, dict]:
    """Per class, its best and worst unit as the gallery ranks them: {"best": (record, position), "worst": ...}."""
    chosen: dict[str, dict] = {}
    for record in records:
        for position, unit in enumerate(record.get("units", [])):
            score = unit_score(unit)
            if score is None:
                continue
            places = chosen.setdefault(unit["class"], {})
            best, worst = best_key(score[1], record["index"], position), worst_key(score[1], record["index"], position)
            if "best" not in places or best > places["best"][0]:
                places["best"] = (best, record, position)
            if "worst" not in places or worst < places["worst"][0]:
                places["worst"] = (worst, record, position)
    return {cls: {k: v[1:] for k, v in places.items()} for cls, places in chosen.items()}
