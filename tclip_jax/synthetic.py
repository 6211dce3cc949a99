"""Seeded synthetic scenes of coloured shapes, with exact per-word ground truth and named evaluation protocols.

Scenes
------
A scene is an RGB image with 1 to MAX_OBJECTS non-overlapping objects on a background, and a caption that names
every object. Objects have one of the six COLOURS and one of the seven SHAPES; colours *and* shapes may repeat
within a scene (some pairs differ only by shape, others only by colour), but no two objects share both, so a
colour + shape phrase always names exactly one object. Objects are FILLED or OUTLINED, 16 to 160 px (at
DEFAULT_SIZE; they scale with min(H, W) / DEFAULT_SIZE). Backgrounds (BACKGROUNDS): the grey patterns of the
first generator ("flat", "noise", "stripes", "checker", "linear", "radial"), coloured "gradient", "colour_noise",
coloured "colour_stripes", "dark" and "natural" (fractal value noise through an earthy palette, with an uneven
horizon). Every background pixel has chroma (max - min channel) <= BACKGROUND_MAX_CHROMA, below every object
colour's (>= OBJECT_MIN_CHROMA), so only objects carry a colour word's colour. Images may be blurred or JPEG
compressed after painting (DEGRADATIONS).

Objects are painted through their masks without anti-aliasing: `SceneObject.mask` is exactly the set of painted
pixels (before any blur / JPEG), every one of them of colour `rgb`. For an outlined object the mask is the
outline; `SceneObject.region` is its silhouette (the outline and what it encloses; equal to the mask when
filled). `box` is the tight end-exclusive (x0, y0, x1, y1) box of the mask (= of the region).

Captions
--------
A caption is an optional prefix ("a photo of", ...) and one phrase per object, in random object order, joined by
"and" or by a relation phrase ("to the left of", "to the right of", "above", "below") that is true of the two
objects' boxes (`relations_between`). Phrase forms (PHRASE_FORMS): "a red circle" (colour_shape), "a circle that
is red" (shape_colour), "a circle" (shape), "something red" (colour); a one-phrase caption without prefix may
drop its article ("red circle", "circle", "red").

Every word that names something is a `NamedWord` in `Scene.words`, with its character span in the caption and its
referents (indices into `Scene.objects`):
- a colour or shape word refers to the objects that match every attribute word of its phrase *up to and including
  it* (the text tower is causal: in "a red circle", "red" refers to every red object and "circle" to the red
  circle; in "a circle that is red", "circle" refers to every circle and "red" to the red circle);
- a relation word (the head word: "left", "right", "above", "below") refers to the two objects it relates (the
  subject first).

Seeds split into training seeds [TRAIN_SEED_START, HELDOUT_SEED_START) and held-out seeds [HELDOUT_SEED_START,
...); evaluation protocols accept held-out seeds only. Held-out seeds come in streams of HELDOUT_STREAM_SEEDS:
offset 0 holds the evaluation scenes (sweeps, benchmarks, model cards), later streams other uses (training's
validation from offset 1_000_000), and `heldout_seeds` never runs from one stream into the next.

Evaluation protocols (`protocol_sample(name, seed)`)
---------------------------------------------------
Each returns one image and its `EvalUnit`s: a prompt, the character span of the scored word in it, its kind
("colour", "shape", "relation"), its referents' masks (silhouettes) and boxes, and for wrong-attribute units the
mask and box of the named-but-wrong object. Pointing hits when the map's argmax lies in a referent's silhouette;
a box hits with IoU >= 0.5 against any referent's box. Unless a protocol says otherwise its scenes have the PLAIN
style: DEFAULT_SIZE square, 1-5 filled objects of 24-160 px, "plain" backgrounds (grey patterns, gradient,
colour_noise, colour_stripes), no blur or JPEG, colours and shapes repeating as in training.

- ``captions``: an in-style caption (any phrase forms, prefixes, relations, object order); one unit per named word
  (colour, shape and relation words).
- ``bare_words``: one prompt per distinct colour and per distinct shape of the scene, the prompt being that single
  word ("red", "star"); referents: every object with that colour / shape.
- ``shape_only``: one prompt per distinct shape, "a star" or a prefix + "a star" ("a photo of a star"); the shape
  word is scored; referents: every object of that shape.
- ``colour_twins``: two objects of one colour and different shapes, plus 0-2 others that share neither the twins'
  colour nor their shapes; a full caption names every object by colour and shape (colour_shape or shape_colour forms); each twin's
  shape word is scored on its own object (its only referent).
- ``shape_twins``: two objects of one shape and different colours, plus 0-2 others that share neither the twins'
  shape nor their colours; the same caption forms; each twin's colour word is scored on its own object.
- ``wrong_attribute``: 2-4 objects; object A has a shape no other object has, object B is the only object of its
  colour, which differs from A's; no object is both B's colour and A's shape. The prompt is [prefix] "a <B's
  colour> <A's shape>" (e.g. "a blue circle" where the circle is red and a blue star exists); its shape word is
  scored: `wrong_mask` / `wrong_box` are B's (it must not land there), `gt_mask` / `gt_boxes` are A's.
- ``many_objects``: 4 or 5 objects of 24-80 px (so that five fit); a full caption (colour_shape / shape_colour phrases, no relations); every
  colour and shape word is scored; `position` is the 1-based place of the word's phrase in the caption.
- Out-of-style conditions, each the ``captions`` protocol with one factor changed (and so, through placement,
  the number of objects that fit: an object that finds no room is left out; over 1000 held-out scenes captions
  average 2.49 objects, non_square 2.89, small_objects 2.77, outlined 2.27): ``natural_background``
  ("natural" background), ``dark_background`` ("dark"), ``non_square`` (200 x 500 or 500 x 200 pixels, objects at
  scale 200 / DEFAULT_SIZE), ``small_objects`` (every object 16-24 px), ``blur`` (Gaussian, sigma 1-2 px),
  ``jpeg`` (quality 10-30), ``outlined`` (every object outlined).

`retrieval_scenes(count)` gives held-out scenes for image <-> text retrieval: PLAIN style, full captions (every
object by colour and shape), and no two scenes with the same set of (colour, shape) objects (they would share their
captions). A caption is still true of a scene whose objects include its own ("a yellow star" of a scene with a
yellow star and a red circle, relations permitting): of the first 256, 77 captions are true of another scene
(`sweep.heldout` reports retrieval with and without counting those).

Training
--------
`make_scene(seed, size=None)` draws the image size and every factor from TRAINING_STYLE (all backgrounds, outlined
objects, blur, JPEG, non-square sizes, at the rates it states). `scene_variant(scene, seed)` is a scene that
differs from `scene` in a single object (its colour or shape; same background, places and caption form) and
`negative_captions(scene, seed, count)` are captions that differ from the true one in exactly one attribute or
binding (one colour or shape word swapped, two objects' colours swapped, or a relation reversed) and are false of
the scene: the training batches' hard negatives.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import cv2
import numpy as np

from tclip_jax.evaluation.metrics.boxes import mask_box

TRAIN_SEED_START = 0
HELDOUT_SEED_START = 10_000_000
HELDOUT_STREAM_SEEDS = 1_000_000
SYNTHETIC_SCENES = 1000  # held-out scenes a synthetic sweep takes without --limit
DATASET_PREFIX = "synthetic-"  # a synthetic dataset's name: the prefix and its protocol ("synthetic-captions")


def is_synthetic_dataset(name: str) -> bool:
    """Whether a dataset name (a sweep's `Dataset.name`, as sweep.json stores it) is a synthetic protocol's."""
    return name.startswith(DATASET_PREFIX)


def heldout_source(protocol: str, opencv: bool = True) -> str:
    """A synthetic sweep's source, as sweep.json records it and a resume compares it: the protocol and the OpenCV
    version that drew the scenes (its polygon fill, resize, blur and JPEG codec paint some pixels otherwise from one
    version to another: between 4.8.0 and 5.1.0, 6 image values by up to 121 and 2 mask pixels of one scene).
    ``opencv=False``: as sweeps stored before 2026-12-07 recorded it, without the version."""
    drawn = f", drawn with OpenCV {cv2.__version__}" if opencv else ""
    return f"held-out synthetic scenes, protocol {protocol}{drawn}"


DEFAULT_SIZE = 224
MIN_SIZE = 64  # smallest image side

# Saturated object colours; chroma (max - min channel) >= 95 even after jitter.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (35, 170, 50),
    "blue": (35, 70, 220),
    "yellow": (235, 215, 25),
    "purple": (140, 45, 185),
    "orange": (245, 125, 15),
}
COLOUR_JITTER = 20  # per-channel uniform jitter of an object's colour (one colour per object)
OBJECT_MIN_CHROMA = 95
BACKGROUND_MAX_CHROMA = 72

GRAY_BACKGROUNDS = ("flat", "noise", "stripes", "checker", "linear", "radial")
PLAIN_BACKGROUNDS = GRAY_BACKGROUNDS + ("gradient", "colour_noise", "colour_stripes")
BACKGROUNDS = PLAIN_BACKGROUNDS + ("dark", "natural")
DEGRADATIONS = ("none", "blur", "jpeg")
RELATIONS = ("to the left of", "to the right of", "above", "below")
RELATION_WORDS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
_OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
             "below": "above"}
PREFIXES = ("a photo of", "an image of", "a picture of", "a rendering of", "a drawing of")
PHRASE_FORMS = ("colour_shape", "shape_colour", "shape", "colour")
ATTRIBUTES = ("colour", "shape")  # what a phrase says of its object

MAX_OBJECTS = 5
OBJECT_SIZE_RANGE = (16.0, 160.0)  # object extent in pixels at DEFAULT_SIZE
PLAIN_SIZE_RANGE = (24.0, 160.0)
SMALL_OBJECT_RANGE = (16.0, 24.0)
NON_SQUARE_SIZES = ((200, 500), (500, 200))
OBJECT_MARGIN = 6.0  # minimum gap between objects' reserved boxes in pixels at DEFAULT_SIZE
PLACEMENT_ATTEMPTS = 40  # per object; an object that never fits is left out
MAX_ROTATION_DEG = 15.0  # only for shapes that stay recognisable (a rotated square is a diamond)
_ROTATABLE = frozenset({"triangle", "star", "heart", "cross"})
_RESERVE = 1.3  # reserved half-side / (extent / 2): holds every shape, rotated or not
BLUR_SIGMA = (1.0, 2.0)
JPEG_QUALITY = (10, 30)

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive


def check_choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    """Raises ValueError unless `values` is a non-empty subset of `allowed` (Style's and the hard-negative options)."""
    if not values or not set(values) <= set(allowed):
        raise ValueError(f"{name} must be a non-empty subset of {','.join(allowed)}, got {','.join(values) or '()'}")


@dataclasses.dataclass(frozen=True)
class Style:
    """The distribution a scene is drawn from. Rates are probabilities per scene (per object for `outlined_rate`)."""

    counts: tuple[int, ...] = (1, 2, 3, 4, 5)
    count_weights: tuple[float, ...] = (0.2, 0.25, 0.25, 0.15, 0.15)
    size_range: tuple[float, float] = OBJECT_SIZE_RANGE  # log-uniform, pixels at DEFAULT_SIZE
    small_rate: float = 0.0          # a scene whose objects are all SMALL_OBJECT_RANGE
    backgrounds: tuple[str, ...] = BACKGROUNDS
    outlined_rate: float = 0.2
    blur_rate: float = 0.1
    jpeg_rate: float = 0.1
    repeat_rate: float = 0.35        # per object after the first: reuse a colour (or a shape) already in the scene
    colours: tuple[str, ...] = tuple(COLOURS)  # the colours objects are drawn from (training: `step_colours`)
    relation_rate: float = 0.3       # per join: a true relation phrase instead of "and"
    prefix_rate: float = 0.5
    form_weights: tuple[float, ...] = (0.6, 0.16, 0.12, 0.12)  # PHRASE_FORMS
    bare_rate: float = 0.15          # a one-phrase caption without prefix drops its article
    non_square_rate: float = 0.0     # used when make_scene draws the size (size=None)
    size_sides: tuple[int, int] = (160, 512)  # sides of a non-square size (and of NON_SQUARE_SIZES' range)

    def __post_init__(self):  # checked once, where a style is made, not for every scene
        check_choices("colours", self.colours, tuple(COLOURS))


TRAINING_STYLE = Style(small_rate=0.1, non_square_rate=0.3)
PLAIN_STYLE = Style(size_range=PLAIN_SIZE_RANGE, backgrounds=PLAIN_BACKGROUNDS, outlined_rate=0.0, blur_rate=0.0,
                    jpeg_rate=0.0)
FULL_FORMS = (0.75, 0.25, 0.0, 0.0)  # every object by colour and shape


@dataclasses.dataclass(frozen=True, eq=False)
class SceneObject:
    colour: str
    shape: str
    style: str  # "filled" or "outlined"
    rgb: tuple[int, int, int]  # the exact painted colour (palette colour plus jitter)
    mask: np.ndarray  # [H, W] bool, the painted pixels
    region: np.ndarray  # [H, W] bool, the silhouette (mask plus what an outline encloses)
    box: Box


@dataclasses.dataclass(frozen=True)
class Phrase:
    """How a caption names one object: which attributes it says, in which form."""

    object_index: int
    colour: str | None
    shape: str | None
    form: str  # one of PHRASE_FORMS


@dataclasses.dataclass(frozen=True)
class Description:
    """A caption as structure: rendered by `render_caption`."""

    prefix: str
    phrases: tuple[Phrase, ...]
    joins: tuple[str, ...]  # len(phrases) - 1 items: "and" or a RELATIONS phrase ("a <join> b")
    bare: bool = False      # no article (one phrase, no prefix)


@dataclasses.dataclass(frozen=True)
class NamedWord:
    """A caption word that names something, with its ground truth."""

    start: int  # character span caption[start:end]
    end: int
    text: str
    kind: str  # "colour", "shape" or "relation"
    referents: tuple[int, ...]  # indices into Scene.objects (see the module docstring)
    phrase: int  # index of its phrase in the caption (relation words: the subject's)
    phrase_object: int  # the object its phrase names (relation words: the subject)


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
    seed: int
    image: np.ndarray  # [H, W, 3] uint8 RGB
    caption: str
    background: str  # one of BACKGROUNDS
    degradation: str  # one of DEGRADATIONS
    objects: tuple[SceneObject, ...]
    description: Description
    words: tuple[NamedWord, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class EvalUnit:
    """One word to localise: the map of the word at prompt[span[0]:span[1]] is scored against its referents."""

    protocol: str
    seed: int
    prompt: str
    span: tuple[int, int]
    word: str
    kind: str  # "colour", "shape" or "relation"
    referents: tuple[int, ...]  # indices into the scene's objects
    gt_mask: np.ndarray  # [H, W] bool, union of the referents' silhouettes
    gt_boxes: tuple[Box, ...]  # the referents' boxes
    wrong_mask: np.ndarray | None = None  # wrong_attribute: the named-but-wrong object's silhouette
    wrong_box: Box | None = None
    position: int = 0  # many_objects: 1-based place of the word's phrase in the caption (0 elsewhere)


@dataclasses.dataclass(frozen=True, eq=False)
class ProtocolSample:
    protocol: str
    scene: Scene
    units: tuple[EvalUnit, ...]

    @property
    def image(self) -> np.ndarray:
        return self.scene.image


# ------------------------------------------------------------------------------------------------ shapes
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


# ------------------------------------------------------------------------------------------------ validation
def _validate_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return int(seed)


def _validate_size(size: int | tuple[int, int]) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else size
    if (not isinstance(hw, Sequence) or len(hw) != 2
            or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in hw)):
        raise ValueError(f"size must be an int or an (height, width) pair of ints, got {size!r}")
    if min(hw) < MIN_SIZE:
        raise ValueError(f"image sides must be >= {MIN_SIZE}, got {size!r}")
    return int(hw[0]), int(hw[1])


def _rngs(seed: int, stream: int, count: int) -> list[np.random.Generator]:
    """Independent generators per part of a scene, so changing one part's draws leaves the others alone."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, stream]).spawn(count)]


# ------------------------------------------------------------------------------------------------ backgrounds
@functools.lru_cache(maxsize=8)
def _coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as broadcastable [H, 1] and [1, W] arrays."""
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    coarse = rng.random((int(h / cell) + 2, int(w / cell) + 2), dtype=np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)


def _pattern(kind: str, rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """A [H, W] float32 pattern in [0, 1] that blends two background colours."""
    ys, xs = _coords(h, w)
    if kind == "flat":
        return np.zeros((h, w), np.float32)
    if kind == "noise":
        return _value_noise(rng, h, w, rng.choice([4, 8, 16, 32]) * scale)
    if kind == "checker":
        cell = rng.uniform(8, 40) * scale
        ox, oy = rng.uniform(0, cell, size=2)
        return np.not_equal((xs + ox) // cell % 2, (ys + oy) // cell % 2).astype(np.float32)
    if kind == "radial":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        dist = np.sqrt((ys - np.float32(cy)) ** 2 + (xs - np.float32(cx)) ** 2)
        return dist / max(float(dist.max()), 1.0)
    theta = rng.uniform(0, np.pi)
    kx, ky = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    if kind == "stripes":
        omega = np.float32(2 * np.pi / (rng.uniform(8, 40) * scale))
        wave = np.sin(xs * omega * kx + ys * omega * ky + np.float32(rng.uniform(0, 2 * np.pi)))
        return (wave > 0).astype(np.float32) if rng.random() < 0.5 else wave * 0.5 + 0.5
    if kind == "linear":
        along = xs * kx + ys * ky
        along = along - along.min()
        return along / max(float(along.max()), 1.0)
    raise ValueError(f"unknown pattern {kind!r}")


def _tinted(rng: np.random.Generator, levels: tuple[float, float], tint: float) -> np.ndarray:
    """Two colours [2, 3]: grey levels plus a per-channel tint (chroma <= 2 * tint)."""
    gray = rng.uniform(*levels, size=(2, 1))
    return gray + rng.uniform(-tint, tint, size=(2, 3))


# Earthy colours (chroma <= 66) for natural-looking textures.
_NATURAL_PALETTE = np.array([(194, 178, 128), (120, 90, 60), (90, 120, 60), (150, 180, 210), (130, 130, 125),
                             (60, 90, 50), (100, 80, 60), (170, 160, 150), (110, 140, 170), (80, 100, 80)],
                            np.float32)


def _fractal(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Multi-octave value noise in [0, 1]."""
    total, weight, amplitude = np.zeros((h, w), np.float32), 0.0, 1.0
    cell = rng.uniform(48, 96) * scale
    while cell >= 2:
        total += amplitude * _value_noise(rng, h, w, cell)
        weight += amplitude
        amplitude *= rng.uniform(0.45, 0.65)
        cell /= 2
    total /= weight
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def _background(kind: str, rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """A background [H, W, 3] uint8 of the given kind; chroma <= BACKGROUND_MAX_CHROMA everywhere."""
    grain = np.float32(rng.uniform(0, 10))
    if kind in GRAY_BACKGROUNDS:
        colours, pattern = _tinted(rng, (25, 230), 12), _pattern(kind, rng, h, w, scale)
    elif kind == "dark":
        colours = _tinted(rng, (0, 45), 8)
        pattern = _pattern(GRAY_BACKGROUNDS[rng.integers(len(GRAY_BACKGROUNDS))], rng, h, w, scale)
    elif kind == "gradient":
        colours, pattern = _tinted(rng, (40, 215), 33), _pattern(("linear", "radial")[rng.integers(2)], rng, h, w,
                                                                 scale)
    elif kind == "colour_stripes":
        colours, pattern = _tinted(rng, (40, 215), 33), _pattern("stripes", rng, h, w, scale)
    elif kind == "colour_noise":
        base = _tinted(rng, (50, 205), 12)[0]
        amplitude = rng.uniform(8, 23)  # per-channel independent noise: chroma < 24 + 2 * 23 + 1
        cell = rng.choice([1, 2, 4, 8]) * scale
        noise = np.stack([_value_noise(rng, h, w, max(cell, 1.0)) for _ in range(3)], axis=-1)
        image = base + (2 * noise - 1) * np.float32(amplitude)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)
    elif kind == "natural":
        picks = _NATURAL_PALETTE[rng.choice(len(_NATURAL_PALETTE), size=3, replace=False)]
        texture = _fractal(rng, h, w, scale)
        ys, xs = _coords(h, w)
        horizon = rng.uniform(0.2, 0.8) * h + _value_noise(rng, 1, w, 24 * scale)[0] * 30 * scale
        ground = np.clip((ys - horizon[None, :]) / (6 * scale) + 0.5, 0, 1)  # soft, uneven horizon
        top = picks[0] + (picks[1] - picks[0]) * (texture[..., None] * 0.6)
        bottom = picks[1] + (picks[2] - picks[1]) * texture[..., None]
        image = top + (bottom - top) * ground[..., None] if rng.random() < 0.6 else bottom
        light = np.float32(rng.uniform(0.6, 1.0))  # darkening scales chroma down
        image = image * light + grain * (2 * rng.random((h, w, 1), dtype=np.float32) - 1)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    c0, c1 = colours.astype(np.float32)
    image = c0 + pattern[..., None] * (c1 - c0)
    image += grain * (2 * rng.random((h, w, 1), dtype=np.float32) - 1)  # grey grain keeps chroma
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ objects
@dataclasses.dataclass(frozen=True)
class _Placed:
    colour: str
    shape: str
    style: str
    jitter: tuple[int, int, int]
    centre: tuple[float, float]  # (x, y)
    extent: float
    angle: float  # radians
    thickness: int  # outline thickness in pixels (outlined only)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(c) for c in np.clip(np.array(COLOURS[self.colour]) + self.jitter, 0, 255))


def _reserved(centre: tuple[float, float], extent: float, thickness: int) -> np.ndarray:
    half = _RESERVE * extent / 2 + thickness + 1
    return np.array([centre[0] - half, centre[1] - half, centre[0] + half + 1, centre[1] + half + 1])


def _separated(a: np.ndarray, b: np.ndarray, margin: float) -> bool:
    """Whether end-exclusive boxes a and b are at least `margin` apart along some axis."""
    return bool(a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _place(rng: np.random.Generator, h: int, w: int, scale: float, size_range: tuple[float, float],
           outlined: bool, taken: list[np.ndarray]) -> tuple[tuple[float, float], float, int, np.ndarray] | None:
    """(centre, extent, thickness, reserved box) clear of `taken`; later attempts draw smaller objects."""
    lo, hi = size_range
    for attempt in range(PLACEMENT_ATTEMPTS):
        top = hi - (hi - lo) * attempt / PLACEMENT_ATTEMPTS
        extent = float(np.exp(rng.uniform(np.log(lo), np.log(max(top, lo))))) * scale
        thickness = max(2, int(round(extent * rng.uniform(0.08, 0.14)))) if outlined else 0
        half = _RESERVE * extent / 2 + thickness + 1
        if 2 * half + 1 > min(h, w):
            continue
        centre = (float(rng.uniform(half, w - 1 - half)), float(rng.uniform(half, h - 1 - half)))
        reserved = _reserved(centre, extent, thickness)
        if all(_separated(reserved, other, OBJECT_MARGIN * scale) for other in taken):
            return centre, extent, thickness, reserved
    return None


def _attributes(rng: np.random.Generator, count: int, repeat_rate: float,
                colours: Sequence[str] = tuple(COLOURS)) -> list[tuple[str, str]]:
    """`count` distinct (colour, shape) pairs, colours from `colours`; each later object reuses a colour or a shape
    with `repeat_rate`."""
    pairs: list[tuple[str, str]] = []
    shapes = list(SHAPES)
    while len(pairs) < count:
        colour, shape = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
        if pairs and rng.random() < repeat_rate:
            other = pairs[rng.integers(len(pairs))]
            colour, shape = (other[0], shape) if rng.random() < 0.5 else (colour, other[1])
        if (colour, shape) not in pairs:
            pairs.append((colour, shape))
    return pairs


def _outline(placed: _Placed) -> np.ndarray:
    points = _OUTLINES[placed.shape] * (placed.extent / 2)
    if placed.angle:
        c, s = np.cos(placed.angle), np.sin(placed.angle)
        points = points @ np.array([[c, s], [-s, c]])
    return points + placed.centre


def _paint(image: np.ndarray, placed: _Placed) -> tuple[np.ndarray, np.ndarray]:
    """Paints `image` in place through the object's mask; returns ([H, W] mask, [H, W] silhouette)."""
    h, w = image.shape[:2]
    reserved = _reserved(placed.centre, placed.extent, placed.thickness)
    x0, y0 = max(int(np.floor(reserved[0])), 0), max(int(np.floor(reserved[1])), 0)
    x1, y1 = min(int(np.ceil(reserved[2])), w), min(int(np.ceil(reserved[3])), h)
    shift = 4  # sub-pixel vertex precision
    vertices = np.round((_outline(placed) - (x0, y0)) * (1 << shift)).astype(np.int32)
    filled = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(filled, [vertices], 1, lineType=cv2.LINE_8, shift=shift)
    if placed.style == "outlined":
        ring = np.zeros_like(filled)
        cv2.polylines(ring, [vertices], True, 1, thickness=placed.thickness, lineType=cv2.LINE_8, shift=shift)
        local, silhouette = ring.view(bool), (filled | ring).view(bool)
    else:
        local = silhouette = filled.view(bool)
    crop = image[y0:y1, x0:x1]
    for channel, value in enumerate(placed.rgb):
        crop[..., channel][local] = value
    mask, region = np.zeros((h, w), bool), np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = local
    region[y0:y1, x0:x1] = silhouette
    return mask, region


def relations_between(a: Box, b: Box) -> list[str]:
    """The RELATIONS phrases true of "a <phrase> b": a's box lies wholly on that side of b's."""
    checks = (a[2] <= b[0], b[2] <= a[0], a[3] <= b[1], b[3] <= a[1])
    return [phrase for phrase, holds in zip(RELATIONS, checks) if holds]


# ------------------------------------------------------------------------------------------------ captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase_words(phrase: Phrase, bare: bool) -> list[tuple[str, str | None]]:
    """(word, kind or None) of one phrase."""
    colour, shape = (phrase.colour, "colour"), (phrase.shape, "shape")
    if phrase.form == "colour_shape":
        body = [colour, shape]
    elif phrase.form == "shape_colour":
        body = [shape, ("that", None), ("is", None), colour]
    elif phrase.form == "shape":
        body = [shape]
    elif phrase.form == "colour":
        return [colour] if bare else [("something", None), colour]
    else:
        raise ValueError(f"unknown phrase form {phrase.form!r}")
    return body if bare else [(_article(body[0][0]), None)] + body


def _referents(objects: Sequence[tuple[str, str]], said: dict[str, str]) -> tuple[int, ...]:
    return tuple(i for i, (colour, shape) in enumerate(objects)
                 if said.get("colour", colour) == colour and said.get("shape", shape) == shape)


def render_caption(description: Description, objects: Sequence[tuple[str, str]] = ()) -> tuple[str, list[NamedWord]]:
    """The caption text and, when `objects` ((colour, shape) per scene object) are given, its named words."""
    words: list[tuple[str, str | None, int]] = [(w, None, -1) for w in description.prefix.split()]
    for p, phrase in enumerate(description.phrases):
        if p > 0:
            join = description.joins[p - 1]
            head = RELATION_WORDS.get(join)
            words += [(w, "relation" if w == head else None, p - 1) for w in join.split()]
        words += [(w, kind, p) for w, kind in _phrase_words(phrase, description.bare)]
    caption, named, position = "", [], 0
    for text, kind, p in words:
        if caption:
            caption += " "
            position += 1
        start = position
        caption += text
        position += len(text)
        if kind is None or not objects:
            continue
        phrase = description.phrases[p]
        if kind == "relation":
            referents = (phrase.object_index, description.phrases[p + 1].object_index)
        else:
            said: dict[str, str] = {}
            for w, k in _phrase_words(phrase, description.bare):  # attribute words up to this one
                if k is not None:
                    said[k] = w
                if k == kind:
                    break
            referents = _referents(objects, said)
        named.append(NamedWord(start, position, text, kind, referents, p, phrase.object_index))
    return caption, named


def _describe(rng: np.random.Generator, objects: Sequence[SceneObject], style: Style,
              form_weights: Sequence[float] | None = None, relations: bool = True) -> Description:
    order = rng.permutation(len(objects))
    weights = np.asarray(style.form_weights if form_weights is None else form_weights, np.float64)
    phrases = []
    for index in order:
        form = PHRASE_FORMS[rng.choice(len(PHRASE_FORMS), p=weights / weights.sum())]
        obj = objects[index]
        phrases.append(Phrase(int(index), obj.colour if form != "shape" else None,
                              obj.shape if form != "colour" else None, form))
    joins = []
    for a, b in zip(order[:-1], order[1:]):
        true = relations_between(objects[a].box, objects[b].box)
        joins.append(true[rng.integers(len(true))] if relations and true and rng.random() < style.relation_rate
                     else "and")
    prefix = PREFIXES[rng.integers(len(PREFIXES))] if rng.random() < style.prefix_rate else ""
    bare = len(phrases) == 1 and not prefix and rng.random() < style.bare_rate
    return Description(prefix, tuple(phrases), tuple(joins), bare)


# ------------------------------------------------------------------------------------------------ scenes
@dataclasses.dataclass(frozen=True)
class _Draft:
    """Everything a scene is rendered from."""

    seed: int
    size: tuple[int, int]
    background_kind: str
    background: np.ndarray
    placed: tuple[_Placed, ...]
    degradation: str
    degradation_value: float


def _draft(seed: int, h: int, w: int, style: Style, rngs: Sequence[np.random.Generator],
           pairs: Sequence[tuple[str, str]] | None = None, size_range: tuple[float, float] | None = None,
           background: str | None = None, outlined: bool | None = None, degradation: str | None = None) -> _Draft:
    layout_rng, background_rng, degrade_rng = rngs
    scale = min(h, w) / DEFAULT_SIZE
    if pairs is None:
        count = int(layout_rng.choice(style.counts, p=np.asarray(style.count_weights) / sum(style.count_weights)))
        pairs = _attributes(layout_rng, count, style.repeat_rate, style.colours)
    if size_range is None:
        size_range = SMALL_OBJECT_RANGE if layout_rng.random() < style.small_rate else style.size_range
    taken: list[np.ndarray] = []
    placed = []
    for colour, shape in pairs:
        is_outlined = layout_rng.random() < style.outlined_rate if outlined is None else outlined
        spot = _place(layout_rng, h, w, scale, size_range, is_outlined, taken)
        jitter = tuple(int(j) for j in layout_rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3))
        angle = (np.deg2rad(layout_rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)) if shape in _ROTATABLE
                 else 0.0)
        if spot is None:
            continue
        centre, extent, thickness, reserved = spot
        taken.append(reserved)
        placed.append(_Placed(colour, shape, "outlined" if is_outlined else "filled", jitter, centre, extent,
                              float(angle), thickness))
    kind = background or style.backgrounds[background_rng.integers(len(style.backgrounds))]
    image = _background(kind, background_rng, h, w, scale)
    if degradation is None:
        u = degrade_rng.random()
        degradation = "blur" if u < style.blur_rate else "jpeg" if u < style.blur_rate + style.jpeg_rate else "none"
    value = (degrade_rng.uniform(*BLUR_SIGMA) * scale if degradation == "blur"
             else float(degrade_rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)) if degradation == "jpeg"
             else 0.0)
    return _Draft(seed, (h, w), kind, image, tuple(placed), degradation, value)


def _degrade(image: np.ndarray, degradation: str, value: float) -> np.ndarray:
    if degradation == "blur":
        return cv2.GaussianBlur(image, (0, 0), sigmaX=value, borderType=cv2.BORDER_REFLECT)
    if degradation == "jpeg":
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, int(value)])
        assert ok
        return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return image


def _render_objects(draft: _Draft) -> tuple[np.ndarray, tuple[SceneObject, ...]]:
    image = draft.background.copy()
    objects = []
    for placed in draft.placed:
        mask, region = _paint(image, placed)
        objects.append(SceneObject(placed.colour, placed.shape, placed.style, placed.rgb, mask, region,
                                   mask_box(mask)))
    return _degrade(image, draft.degradation, draft.degradation_value), tuple(objects)


def _scene(draft: _Draft, image: np.ndarray, objects: tuple[SceneObject, ...], description: Description) -> Scene:
    caption, words = render_caption(description, [(o.colour, o.shape) for o in objects])
    return Scene(draft.seed, image, caption, draft.background_kind, draft.degradation, objects, description,
                 tuple(words))


def _draw_size(rng: np.random.Generator, style: Style) -> tuple[int, int]:
    if rng.random() >= style.non_square_rate:
        return DEFAULT_SIZE, DEFAULT_SIZE
    lo, hi = style.size_sides
    long = int(rng.integers(max(lo, DEFAULT_SIZE), hi + 1))
    short = int(rng.integers(lo, min(long, 2 * DEFAULT_SIZE) + 1))
    return (short, long) if rng.random() < 0.5 else (long, short)


def make_scene(seed: int, size: int | tuple[int, int] | None = DEFAULT_SIZE, style: Style = TRAINING_STYLE) -> Scene:
    """The scene of `seed`, deterministic: `size` an int (square), (height, width), or None to draw it from
    `style` (TRAINING_STYLE: 30 % non-square, sides 160-512)."""
    seed = _validate_seed(seed)
    size_rng, layout_rng, background_rng, degrade_rng, caption_rng = _rngs(seed, 0, 5)
    h, w = _draw_size(size_rng, style) if size is None else _validate_size(size)
    draft = _draft(seed, h, w, style, (layout_rng, background_rng, degrade_rng))
    image, objects = _render_objects(draft)
    return _scene(draft, image, objects, _describe(caption_rng, objects, style))


# ------------------------------------------------------------------------------------------------ hard negatives
def scene_variant(scene: Scene, seed: int, style: Style = TRAINING_STYLE,
                  attributes: Sequence[str] = ATTRIBUTES) -> Scene | None:
    """`scene` with one object's colour or shape changed (an attribute its caption says, one of `attributes`): same
    size, background, places, degradation and caption form. Re-drawn from `scene.seed`; None when no change keeps
    the objects distinct. `seed` picks the change."""
    check_choices("attributes", attributes, ATTRIBUTES)
    rng = np.random.default_rng(np.random.SeedSequence([_validate_seed(seed), 7]))
    size_rng, layout_rng, background_rng, degrade_rng, _ = _rngs(scene.seed, 0, 5)
    _draw_size(size_rng, style)
    draft = _draft(scene.seed, scene.image.shape[0], scene.image.shape[1], style,
                   (layout_rng, background_rng, degrade_rng))
    pairs = [(p.colour, p.shape) for p in draft.placed]
    if pairs != [(o.colour, o.shape) for o in scene.objects]:
        raise ValueError("scene_variant needs a scene made by make_scene with the same style")
    options = []
    for phrase in scene.description.phrases:
        i = phrase.object_index
        for kind, said in (("colour", phrase.colour), ("shape", phrase.shape)):
            if said is None or kind not in attributes:
                continue
            for value in (COLOURS if kind == "colour" else SHAPES):
                new = (value, pairs[i][1]) if kind == "colour" else (pairs[i][0], value)
                if value != said and new not in pairs:
                    options.append((i, new))
    if not options:
        return None
    i, (colour, shape) = options[rng.integers(len(options))]
    old = draft.placed[i]
    angle = old.angle if shape in _ROTATABLE else 0.0
    placed = list(draft.placed)
    placed[i] = dataclasses.replace(old, colour=colour, shape=shape, angle=angle)
    draft = dataclasses.replace(draft, placed=tuple(placed))
    image, objects = _render_objects(draft)
    phrases = list(scene.description.phrases)
    phrase_index = next(p for p, ph in enumerate(phrases) if ph.object_index == i)
    ph = phrases[phrase_index]
    phrases[phrase_index] = dataclasses.replace(ph, colour=colour if ph.colour else None,
                                                shape=shape if ph.shape else None)
    # Relations are of boxes; a new shape changes its box a little, so keep only joins that stay true.
    joins = tuple(join if join == "and" or join in relations_between(
        objects[phrases[k].object_index].box, objects[phrases[k + 1].object_index].box) else "and"
        for k, join in enumerate(scene.description.joins))
    return _scene(draft, image, objects, dataclasses.replace(scene.description, phrases=tuple(phrases), joins=joins))


def _false_of(scene_pairs: Sequence[tuple[str, str]], phrase: Phrase) -> bool:
    """Whether no object has the phrase's said attributes."""
    said = {k: v for k, v in (("colour", phrase.colour), ("shape", phrase.shape)) if v is not None}
    return not _referents(scene_pairs, said)


def negative_descriptions(scene: Scene) -> list[tuple[str, Description]]:
    """Every (kind of change, description) that differs from the scene's in one attribute or binding and is
    false of the scene: one said colour or shape replaced ("colour", "shape"), the colours of two colour + shape
    phrases swapped ("binding"), or one relation reversed ("relation")."""
    d = scene.description
    pairs = [(o.colour, o.shape) for o in scene.objects]
    found = []
    for p, phrase in enumerate(d.phrases):
        for kind, values in (("colour", COLOURS), ("shape", SHAPES)):
            said = getattr(phrase, kind)
            if said is None:
                continue
            for value in values:
                changed = dataclasses.replace(phrase, **{kind: value})
                if value != said and _false_of(pairs, changed):
                    found.append((kind, dataclasses.replace(d, phrases=d.phrases[:p] + (changed,) + d.phrases[p + 1:])))
    full = [p for p, ph in enumerate(d.phrases) if ph.colour and ph.shape]
    for a_i, a in enumerate(full):
        for b in full[a_i + 1:]:
            pa, pb = d.phrases[a], d.phrases[b]
            if pa.colour == pb.colour or pa.shape == pb.shape:
                continue
            sa, sb = dataclasses.replace(pa, colour=pb.colour), dataclasses.replace(pb, colour=pa.colour)
            if _false_of(pairs, sa) or _false_of(pairs, sb):
                phrases = list(d.phrases)
                phrases[a], phrases[b] = sa, sb
                found.append(("binding", dataclasses.replace(d, phrases=tuple(phrases))))
    for k, join in enumerate(d.joins):
        if join != "and":
            reversed_relation = dataclasses.replace(d, joins=d.joins[:k] + (_OPPOSITE[join],) + d.joins[k + 1:])
            # Still true where a phrase fits other objects too ("a square below a square" beside two squares).
            if not description_is_true(reversed_relation, scene.objects):
                found.append(("relation", reversed_relation))
    return found


def description_is_true(description: Description, objects: Sequence[SceneObject]) -> bool:
    """Whether some assignment of the phrases to distinct objects matches every said attribute and relation."""
    phrases = description.phrases
    for assignment in itertools.permutations(range(len(objects)), len(phrases)):
        if all((p.colour is None or objects[o].colour == p.colour) and (p.shape is None or objects[o].shape == p.shape)
               for p, o in zip(phrases, assignment)) and all(
                join == "and" or join in relations_between(objects[assignment[k]].box, objects[assignment[k + 1]].box)
                for k, join in enumerate(description.joins)):
            return True
    return False


NEGATIVE_KINDS = ("colour", "shape", "binding", "relation")


def negative_captions(scene: Scene, seed: int, count: int,
                      also_false_of: Sequence[Sequence[SceneObject]] = (),
                      kinds: Sequence[str] = NEGATIVE_KINDS) -> list[str]:
    """Up to `count` distinct captions false of the scene (and of every object set in `also_false_of`) that differ
    from its caption in one attribute or binding (`negative_descriptions`), drawn by `seed`: a kind of change
    among `kinds` (colour, shape, binding, relation) uniformly among those available, then a change of that kind."""
    check_choices("kinds", kinds, NEGATIVE_KINDS)
    rng = np.random.default_rng(np.random.SeedSequence([_validate_seed(seed), 11]))
    pool: dict[str, list[Description]] = {}
    for kind, description in negative_descriptions(scene):
        if kind in kinds and not any(description_is_true(description, objects) for objects in also_false_of):
            pool.setdefault(kind, []).append(description)
    captions: list[str] = []
    while len(captions) < count and pool:
        kinds = sorted(pool)
        kind = kinds[rng.integers(len(kinds))]
        options = pool[kind]
        caption, _ = render_caption(options.pop(rng.integers(len(options))))
        if not options:
            del pool[kind]
        if caption not in captions and caption != scene.caption:
            captions.append(caption)
    return captions


# ------------------------------------------------------------------------------------------------ seeds
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
    """`count` held-out (evaluation) seeds from HELDOUT_SEED_START + offset; never reaches the next stream."""
    seeds = _seed_range(HELDOUT_SEED_START, count, offset)
    stream_end = (offset // HELDOUT_STREAM_SEEDS + 1) * HELDOUT_STREAM_SEEDS
    if offset + count > stream_end:
        raise ValueError(f"at most {stream_end - offset} held-out seeds (one per scene) from offset {offset}: they "
                         f"must stay below the next stream, offset {stream_end}; got {count}")
    return seeds


# ------------------------------------------------------------------------------------------------ protocols
OUT_OF_STYLE = ("natural_background", "dark_background", "non_square", "small_objects", "blur", "jpeg", "outlined")
PROTOCOLS = ("captions", "bare_words", "shape_only", "colour_twins", "shape_twins", "wrong_attribute",
             "many_objects") + OUT_OF_STYLE
DEFAULT_PROTOCOL = "captions"  # a synthetic sweep's (and dataset's) protocol unless told otherwise


def _heldout(seed: int) -> int:
    seed = _validate_seed(seed)
    if seed < HELDOUT_SEED_START:
        raise ValueError(f"evaluation uses held-out seeds (>= {HELDOUT_SEED_START}), got {seed}")
    return seed


def _units(protocol: str, scene: Scene, prompt: str, words: Sequence[NamedWord], position: bool = False,
           wrong: SceneObject | None = None) -> list[EvalUnit]:
    units = []
    for word in words:
        regions = [scene.objects[i].region for i in word.referents]
        units.append(EvalUnit(
            protocol, scene.seed, prompt, (word.start, word.end), word.text, word.kind, word.referents,
            np.logical_or.reduce(regions), tuple(scene.objects[i].box for i in word.referents),
            None if wrong is None else wrong.region, None if wrong is None else wrong.box,
            word.phrase + 1 if position else 0))
    return units


def _twin_pairs(rng: np.random.Generator, shared: str) -> tuple[list[tuple[str, str]], tuple[int, int]]:
    """(pairs, twin indices): two objects sharing `shared` ("colour" or "shape") and differing in the other, plus
    0-2 others that share neither the twins' colours nor their shapes."""
    colours, shapes = list(COLOURS), list(SHAPES)
    if shared == "colour":
        colour = colours[rng.integers(len(colours))]
        twins = [(colour, shapes[i]) for i in rng.choice(len(shapes), size=2, replace=False)]
    else:
        shape = shapes[rng.integers(len(shapes))]
        twins = [(colours[i], shape) for i in rng.choice(len(colours), size=2, replace=False)]
    free_colours = [c for c in colours if c not in {t[0] for t in twins}]
    free_shapes = [s for s in shapes if s not in {t[1] for t in twins}]
    pairs = list(twins)
    for _ in range(int(rng.integers(0, 3))):
        pair = (free_colours[rng.integers(len(free_colours))], free_shapes[rng.integers(len(free_shapes))])
        if pair not in pairs:
            pairs.append(pair)
    order = [int(i) for i in rng.permutation(len(pairs))]
    return [pairs[i] for i in order], (order.index(0), order.index(1))


def _wrong_attribute_pairs(rng: np.random.Generator) -> tuple[list[tuple[str, str]], int, int]:
    """(pairs, index of A, index of B) for the wrong_attribute protocol."""
    while True:
        pairs = _attributes(rng, int(rng.integers(2, 5)), 0.35)
        shapes, colours = [p[1] for p in pairs], [p[0] for p in pairs]
        options = [(a, b) for a in range(len(pairs)) for b in range(len(pairs))
                   if a != b and shapes.count(shapes[a]) == 1 and colours.count(colours[b]) == 1
                   and colours[b] != colours[a] and (colours[b], shapes[a]) not in pairs]
        if options:
            a, b = options[rng.integers(len(options))]
            return pairs, a, b


def protocol_sample(protocol: str, seed: int) -> ProtocolSample:
    """The image and evaluation units of `protocol` (one of PROTOCOLS) for held-out `seed`; see the module
    docstring for each protocol. Deterministic; each protocol draws its own scene from the seed."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    seed = _heldout(seed)
    stream = 1 + PROTOCOLS.index(protocol)
    size_rng, layout_rng, background_rng, degrade_rng, caption_rng, extra_rng = _rngs(seed, stream, 6)
    style, h, w = PLAIN_STYLE, DEFAULT_SIZE, DEFAULT_SIZE
    options: dict = {}
    if protocol == "natural_background":
        options["background"] = "natural"
    elif protocol == "dark_background":
        options["background"] = "dark"
    elif protocol == "non_square":
        h, w = NON_SQUARE_SIZES[size_rng.integers(len(NON_SQUARE_SIZES))]
    elif protocol == "small_objects":
        options["size_range"] = SMALL_OBJECT_RANGE
    elif protocol in ("blur", "jpeg"):
        options["degradation"] = protocol
    elif protocol == "outlined":
        options["outlined"] = True
    elif protocol in ("colour_twins", "shape_twins"):
        options["pairs"], twins = _twin_pairs(extra_rng, protocol.split("_")[0])
    elif protocol == "many_objects":
        options["pairs"] = _attributes(extra_rng, int(extra_rng.integers(4, 6)), style.repeat_rate)
        options["size_range"] = (24.0, 80.0)  # five objects must fit
    elif protocol == "wrong_attribute":
        options["pairs"], a_index, b_index = _wrong_attribute_pairs(extra_rng)
    for _attempt in range(100):  # protocols that need every object re-draw the layout until all fit
        draft = _draft(seed, h, w, style, (layout_rng, background_rng, degrade_rng), **options)
        if "pairs" not in options or len(draft.placed) == len(options["pairs"]):
            break
    else:
        raise RuntimeError(f"{protocol}: objects of seed {seed} never fit")
    image, objects = _render_objects(draft)
    pairs = [(o.colour, o.shape) for o in objects]

    if protocol in ("colour_twins", "shape_twins", "many_objects"):
        description = _describe(caption_rng, objects, style, FULL_FORMS, relations=protocol != "many_objects")
        scene = _scene(draft, image, objects, description)
        if protocol == "many_objects":
            words = [w for w in scene.words if w.kind != "relation"]
        else:
            kind = "shape" if protocol == "colour_twins" else "colour"
            words = [w for w in scene.words if w.kind == kind and w.phrase_object in twins]
        return ProtocolSample(protocol, scene, tuple(_units(protocol, scene, scene.caption, words,
                                                            position=protocol == "many_objects")))
    description = _describe(caption_rng, objects, style)
    scene = _scene(draft, image, objects, description)
    if protocol == "captions" or protocol in OUT_OF_STYLE:
        return ProtocolSample(protocol, scene, tuple(_units(protocol, scene, scene.caption, scene.words)))
    units: list[EvalUnit] = []
    if protocol == "bare_words":
        for kind, index in (("colour", 0), ("shape", 1)):
            for value in dict.fromkeys(p[index] for p in pairs):
                text, words = render_caption(Description("", (Phrase(0, value if kind == "colour" else None,
                                                                     value if kind == "shape" else None, kind),),
                                                         (), bare=True), pairs)
                units += _units(protocol, scene, text, words)
    elif protocol == "shape_only":
        for shape in dict.fromkeys(p[1] for p in pairs):
            prefix = PREFIXES[caption_rng.integers(len(PREFIXES))] if caption_rng.random() < 0.5 else ""
            text, words = render_caption(Description(prefix, (Phrase(0, None, shape, "shape"),), ()), pairs)
            units += _units(protocol, scene, text, words)
    elif protocol == "wrong_attribute":
        a, b = objects[a_index], objects[b_index]
        prefix = PREFIXES[caption_rng.integers(len(PREFIXES))] if caption_rng.random() < 0.5 else ""
        phrase = Phrase(a_index, b.colour, a.shape, "colour_shape")
        text, words = render_caption(Description(prefix, (phrase,), ()), pairs)
        (shape_word,) = [w for w in words if w.kind == "shape"]
        # The shape word's referents under the prefix rule are empty (no such object); score it against A.
        shape_word = dataclasses.replace(shape_word, referents=(a_index,))
        units += _units(protocol, scene, text, [shape_word], wrong=b)
    return ProtocolSample(protocol, scene, tuple(units))


def retrieval_scenes(count: int, offset: int = 0) -> list[Scene]:
    """`count` held-out PLAIN scenes with full captions for image <-> text retrieval, from held-out seed offset
    `offset` on (their own stream), skipping any scene whose set of (colour, shape) objects an earlier one has (a
    caption can still be true of another scene: the module docstring)."""
    scenes: list[Scene] = []
    seen: set[frozenset] = set()
    seed = HELDOUT_SEED_START + offset
    while len(scenes) < count:
        size_rng, layout_rng, background_rng, degrade_rng, caption_rng = _rngs(seed, 100, 5)
        draft = _draft(seed, DEFAULT_SIZE, DEFAULT_SIZE, PLAIN_STYLE, (layout_rng, background_rng, degrade_rng))
        key = frozenset((p.colour, p.shape) for p in draft.placed)
        if key not in seen:
            seen.add(key)
            image, objects = _render_objects(draft)
            scenes.append(_scene(draft, image, objects, _describe(caption_rng, objects, PLAIN_STYLE, FULL_FORMS)))
        seed += 1
    return scenes
