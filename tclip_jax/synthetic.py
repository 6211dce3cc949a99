"""Seeded synthetic scenes of coloured shapes with per-word ground truth.

A scene is an RGB image with 1 to 3 saturated, non-overlapping objects on a desaturated
(greyish, lightly tinted) textured background, plus a caption naming every object by one colour
word and one shape word. Within a scene each colour and each shape is used at most once, so every
colour word and every shape word of the caption refers to exactly one object; that object's mask
and box are the word's ground truth. Spatial relation words ("to the left of", "above", ...) only
appear where they are true of the objects' boxes. (An object that finds no free place after
PLACEMENT_ATTEMPTS tries is left out; this is rare.)

Objects are painted through their ground-truth masks without anti-aliasing, so mask and pixels
agree exactly: every mask pixel has the object's colour and no object colour appears outside masks.

Seeds split into training seeds [TRAIN_SEED_START, HELDOUT_SEED_START) and held-out seeds
[HELDOUT_SEED_START, ...), so evaluation never sees a training scene.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import cv2
import numpy as np

TRAIN_SEED_START = 0
HELDOUT_SEED_START = 10_000_000

DEFAULT_SIZE = 224
MIN_SIZE = 64  # smallest image side; objects shrink with min(H, W) / DEFAULT_SIZE

# Saturated object colours; pairwise L-inf distance >= 90 keeps them apart after jitter.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (35, 170, 50),
    "blue": (35, 70, 220),
    "yellow": (235, 215, 25),
    "purple": (140, 45, 185),
    "orange": (245, 125, 15),
}
COLOUR_JITTER = 20  # per-channel uniform jitter of an object's colour (one colour per object)
BACKGROUNDS = ("flat", "noise", "stripes", "checker", "linear", "radial")
RELATIONS = ("to the left of", "to the right of", "above", "below")

OBJECT_SIZE_RANGE = (40.0, 100.0)  # object extent in pixels at DEFAULT_SIZE
OBJECT_MARGIN = 8.0  # minimum gap between objects' boxes in pixels at DEFAULT_SIZE
MAX_OBJECTS = 3
PLACEMENT_ATTEMPTS = 40  # per object; an object that never fits is left out
MAX_ROTATION_DEG = 15.0  # only for shapes that stay recognisable (a rotated square is a diamond)
_ROTATABLE = frozenset({"triangle", "star", "heart", "cross"})

BACKGROUND_LEVEL_RANGE = (25, 230)  # grey levels of the two background colours
BACKGROUND_TINT = 12  # per-channel tint, so background chroma (max - min channel) <= 24
BACKGROUND_GRAIN = 10.0  # max amplitude of grey per-pixel grain
_PREFIXES = ("", "a photo of", "an image of", "a picture of", "a rendering of")

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive


@dataclasses.dataclass(frozen=True, eq=False)
class SceneObject:
    colour: str
    shape: str
    rgb: tuple[int, int, int]  # the exact painted colour (palette colour plus jitter)
    mask: np.ndarray  # [H, W] bool
    box: Box


@dataclasses.dataclass(frozen=True, eq=False)
class WordTarget:
    """Ground truth of one colour or shape word of a caption."""

    word_index: int  # index into caption.split()
    word: str
    kind: str  # "colour" or "shape"
    object_index: int  # index into Scene.objects
    mask: np.ndarray  # [H, W] bool
    box: Box


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    seed: int
    image: np.ndarray  # [H, W, 3] uint8 RGB
    caption: str
    background: str  # one of BACKGROUNDS
    objects: tuple[SceneObject, ...]
    word_targets: dict[int, WordTarget]  # keyed by word_index


@dataclasses.dataclass(frozen=True, eq=False)
class EvalUnit:
    """One word to localise: the heatmap of caption word `word_index` is scored against the GT."""

    image: np.ndarray
    prompt: str  # the full caption
    word: str
    kind: str  # "colour" or "shape"
    word_index: int
    gt_mask: np.ndarray
    gt_box: Box


def _polygon(points: Sequence[tuple[float, float]]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


def _star(tips: int, inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * tips) * np.pi / tips
    radii = np.where(np.arange(2 * tips) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    y -= (y.max() + y.min()) / 2
    return np.stack([x, y], axis=1) / max(np.abs(x).max(), np.abs(y).max())


def _circle() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


_ARM = 0.34  # half-width of the cross's arms
# Outlines in unit coordinates (x right, y down), each spanning [-1, 1] in its larger extent.
_OUTLINES: dict[str, np.ndarray] = {
    "circle": _circle(),
    "square": _polygon([(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)]),
    "triangle": _polygon([(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]),
    "star": _star(5, 0.45),
    "heart": _heart(),
    "cross": _polygon([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
                       (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)]),
    "diamond": _polygon([(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]),
}
SHAPES = tuple(_OUTLINES)


def _validate_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return int(seed)


def _validate_size(size: int | tuple[int, int]) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, (int, np.integer)) else size
    if (not isinstance(hw, Sequence) or len(hw) != 2
            or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in hw)):
        raise ValueError(f"size must be an int or an (height, width) pair of ints, got {size!r}")
    if min(hw) < MIN_SIZE:
        raise ValueError(f"image sides must be >= {MIN_SIZE}, got {size!r}")
    return int(hw[0]), int(hw[1])


@functools.lru_cache(maxsize=8)
def _coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as broadcastable [H, 1] and [1, W] arrays."""
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def _texture(kind: str, rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """A [H, W] float32 pattern in [0, 1] that blends the two background colours.

    Works in place where it can: fresh [H, W] temporaries cost page faults that dominate the arithmetic.
    """
    ys, xs = _coords(h, w)
    if kind == "flat":
        return np.zeros((h, w), np.float32)
    if kind == "noise":  # bilinear value noise: cubic resizing is ~8x slower
        cell = rng.choice([4, 8, 16, 32]) * scale
        coarse = rng.random((int(h / cell) + 2, int(w / cell) + 2), dtype=np.float32)
        return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    if kind == "checker":  # axis-aligned; parity per row and per column, combined once
        cell = rng.uniform(8, 40) * scale
        ox, oy = rng.uniform(0, cell, size=2)
        return np.not_equal((xs + ox) // cell % 2, (ys + oy) // cell % 2).astype(np.float32)
    if kind == "radial":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        dist = (ys - np.float32(cy)) ** 2 + (xs - np.float32(cx)) ** 2  # [H, 1] + [1, W]
        np.sqrt(dist, out=dist)
        dist /= dist.max()
        return dist
    theta = rng.uniform(0, np.pi)
    kx, ky = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    if kind == "stripes":
        omega = 2 * np.pi / (rng.uniform(8, 40) * scale)
        ax, ay = xs * np.float32(omega) * kx + np.float32(rng.uniform(0, 2 * np.pi)), ys * np.float32(omega) * ky
        # sin(ax + ay) = cos(ay) sin(ax) + sin(ay) cos(ax): a rank-2 outer product, no [H, W] sin.
        wave = np.concatenate([np.cos(ay), np.sin(ay)], axis=1) @ np.concatenate([np.sin(ax), np.cos(ax)], axis=0)
        if rng.random() < 0.5:  # hard-edged stripes
            return (wave > 0).astype(np.float32)
        wave *= 0.5
        wave += 0.5
        return wave
    if kind == "linear":
        along = xs * kx + ys * ky
        along -= along.min()
        along /= max(float(along.max()), 1.0)
        return along
    raise ValueError(f"unknown background {kind!r}")


def _background(rng: np.random.Generator, h: int, w: int, scale: float) -> tuple[str, np.ndarray]:
    """A desaturated textured background [H, W, 3] uint8, so saturated objects stay distinct."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    pattern = _texture(kind, rng, h, w, scale)
    levels = rng.uniform(*BACKGROUND_LEVEL_RANGE, size=(2, 1))
    c0, c1 = levels + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=(2, 3))
    grain = rng.uniform(0, BACKGROUND_GRAIN)
    noise = rng.random((h, w), dtype=np.float32)
    # Per channel: c0 + pattern * (c1 - c0) + grain * (2 * noise - 1), saturated to uint8. The grain is
    # grey (equal on all channels) and saturation is 1-Lipschitz, so chroma stays <= 2 * tint (+1 rounding).
    channels = [cv2.addWeighted(pattern, float(c1[c] - c0[c]), noise, 2 * grain, float(c0[c] - grain), dtype=cv2.CV_8U)
                for c in range(3)]
    return kind, cv2.merge(channels)


def _outline(shape: str, rng: np.random.Generator, extent: float) -> np.ndarray:
    """The shape's outline in pixels around the origin, randomly rotated where that keeps its identity."""
    points = _OUTLINES[shape] * (extent / 2)
    if shape in _ROTATABLE:
        angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        c, s = np.cos(angle), np.sin(angle)
        points = points @ np.array([[c, s], [-s, c]])
    return points


def _separated(a: np.ndarray, b: np.ndarray, margin: float) -> bool:
    """Whether end-exclusive boxes a and b (x0, y0, x1, y1) are at least `margin` apart along some axis."""
    return bool(a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _place(shape: str, rng: np.random.Generator, h: int, w: int, scale: float,
           taken: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """Pixel outline of a shape and its reserved box, clear of the `taken` boxes; None when no attempt fits.

    Later attempts draw smaller objects, so crowded scenes still fit their objects.
    """
    lo, hi = OBJECT_SIZE_RANGE
    for attempt in range(PLACEMENT_ATTEMPTS):
        top = hi - (hi - lo) * attempt / PLACEMENT_ATTEMPTS
        points = _outline(shape, rng, rng.uniform(lo, top) * scale)
        # The centre keeps the outline within the pixel centres 0..W-1, 0..H-1.
        placed = points + rng.uniform(-points.min(axis=0), (w - 1, h - 1) - points.max(axis=0))
        # Reserve [floor(min) - 1, ceil(max) + 2), end exclusive: it holds every rasterised pixel.
        reserved = np.concatenate([np.floor(placed.min(axis=0)) - 1, np.ceil(placed.max(axis=0)) + 2])
        if all(_separated(reserved, other, OBJECT_MARGIN * scale) for other in taken):
            return placed, reserved
    return None


def _paint(image: np.ndarray, points: np.ndarray, reserved: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """Rasterises the outline and paints `image` (in place) through that mask; returns the [H, W] mask.

    Both happen inside the reserved box only, so the per-object cost does not grow with the image.
    """
    h, w = image.shape[:2]
    x0, y0 = max(int(reserved[0]), 0), max(int(reserved[1]), 0)
    x1, y1 = min(int(reserved[2]), w), min(int(reserved[3]), h)
    local = np.zeros((y1 - y0, x1 - x0), np.uint8)
    shift = 4  # sub-pixel vertex precision
    vertices = np.round((points - (x0, y0)) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(local, [vertices], 1, lineType=cv2.LINE_8, shift=shift)
    local = local.view(bool)
    crop = image[y0:y1, x0:x1]
    for channel, value in enumerate(rgb):  # per channel: much faster than crop[local] = rgb
        crop[..., channel][local] = value
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = local
    return mask


def mask_box(mask: np.ndarray) -> Box:
    """Tight (x0, y0, x1, y1) box of a non-empty [H, W] bool mask, end exclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def relations_between(a: Box, b: Box) -> list[str]:
    """The RELATIONS phrases true of "a <phrase> b": a's box lies wholly on that side of b's."""
    checks = (a[2] <= b[0], b[2] <= a[0], a[3] <= b[1], b[3] <= a[1])
    return [phrase for phrase, holds in zip(RELATIONS, checks) if holds]


def _objects(rng: np.random.Generator, image: np.ndarray, scale: float) -> tuple[SceneObject, ...]:
    """Places, paints (in place) and returns the objects; colours and shapes are distinct."""
    h, w = image.shape[:2]
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:count]]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:count]]
    taken: list[np.ndarray] = []
    objects = []
    for colour, shape in zip(colours, shapes):
        placement = _place(shape, rng, h, w, scale, taken)
        if placement is None:
            continue
        taken.append(placement[1])
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb = tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
        mask = _paint(image, *placement, rgb)
        objects.append(SceneObject(colour, shape, rgb, mask, mask_box(mask)))
    return tuple(objects)


def _caption(rng: np.random.Generator, objects: tuple[SceneObject, ...]) -> tuple[str, dict[int, WordTarget]]:
    """A caption naming every object once, in random order, and the targets of its colour/shape words.

    The first two objects may be joined by a relation phrase that is true of their boxes.
    """
    prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
    words = prefix.split()
    targets: dict[int, WordTarget] = {}
    order = rng.permutation(len(objects))
    for position, index in enumerate(order):
        obj = objects[index]
        if position > 0:
            true_relations = relations_between(objects[order[position - 1]].box, obj.box)
            use_relation = position == 1 and true_relations and rng.random() < 0.5
            words += (true_relations[rng.integers(len(true_relations))] if use_relation else "and").split()
        words.append("an" if obj.colour[0] in "aeiou" else "a")
        for kind, word in (("colour", obj.colour), ("shape", obj.shape)):
            targets[len(words)] = WordTarget(len(words), word, kind, int(index), obj.mask, obj.box)
            words.append(word)
    return " ".join(words), targets


def make_scene(seed: int, size: int | tuple[int, int] = DEFAULT_SIZE) -> Scene:
    """The scene of `seed` at `size` (an int for square images or (height, width)); deterministic."""
    seed = _validate_seed(seed)
    h, w = _validate_size(size)
    rng = np.random.default_rng(seed)
    scale = min(h, w) / DEFAULT_SIZE
    background, image = _background(rng, h, w, scale)
    objects = _objects(rng, image, scale)
    caption, targets = _caption(rng, objects)
    return Scene(seed, image, caption, background, objects, targets)


def evaluation_units(scene: Scene) -> list[EvalUnit]:
    """One unit per colour/shape word of the caption, in caption order."""
    return [EvalUnit(scene.image, scene.caption, t.word, t.kind, t.word_index, t.mask, t.box)
            for _, t in sorted(scene.word_targets.items())]


def make_batch(seeds: Sequence[int], size: int | tuple[int, int] = DEFAULT_SIZE) -> tuple[np.ndarray, list[str]]:
    """Images [B, H, W, 3] uint8 and captions of the scenes of `seeds`."""
    if len(seeds) == 0:
        raise ValueError("seeds must not be empty")
    scenes = [make_scene(seed, size) for seed in seeds]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def _seed_range(start: int, count: int, offset: int) -> range:
    if count < 0 or offset < 0:
        raise ValueError(f"count and offset must be non-negative, got {count}, {offset}")
    return range(start + offset, start + offset + count)


def train_seeds(count: int, offset: int = 0) -> range:
    """`count` training seeds from TRAIN_SEED_START + offset; never reaches the held-out seeds."""
    seeds = _seed_range(TRAIN_SEED_START, count, offset)
    if seeds.stop > HELDOUT_SEED_START:
        raise ValueError(f"training seeds must stay below HELDOUT_SEED_START={HELDOUT_SEED_START}")
    return seeds


def heldout_seeds(count: int, offset: int = 0) -> range:
    """`count` held-out (evaluation) seeds from HELDOUT_SEED_START + offset."""
    return _seed_range(HELDOUT_SEED_START, count, offset)
