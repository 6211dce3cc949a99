"""Static pictures of results: a heatmap overlay with its box, and a grid of panels per prompt.

Every picture names what it shows: grid titles carry the method (and its non-default settings), the model and
the prompt; each panel its word, τ and a GMM fallback (that panel's caption in red). A grid's title wraps to the
figure's width and a panel is at least as wide as its caption, up to `MAX_PANEL_ASPECT` times its height (a longer
caption wraps to that), so no text is cut off or overlaps another. Text is drawn as written (`parse_math=False`, and
measured so: `ismath=False`): a prompt's "$5 or $10" is no mathtext, nor is "$\\frac$" an error. Boxes are drawn as
inner strokes (the line lies inside the box), and a box that covers the whole image is drawn further inset, so it
never hides in the frame.
"""
from __future__ import annotations

import contextlib
import dataclasses
import decimal
import io
import math
import pathlib
import warnings
from collections.abc import Iterator
from typing import Optional, Sequence

import cv2
import numpy as np
from matplotlib.figure import Figure  # no pyplot: files need no display backend, and notebooks keep theirs
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath

from tclip_jax.image.io import ImageLike, load_image
from tclip_jax.postprocess import Box

BOX_COLOUR = (255, 255, 255)
BOX_OUTLINE = (0, 0, 0)
MAX_COLUMNS = 5
# A grid panel is about 270 pixels wide as saved: a larger photo is drawn at this longer side (drawing a 48-MP
# photo per panel took minutes and gigabytes for nothing anyone sees).
GRID_MAX_SIDE = 1024
# A grid panel is at most this many times as wide as tall: wider images are drawn smaller and longer captions
# wrap (a 10:1 strip made a figure 7,700 pixels wide, a caption of one 250-letter word 9,300).
MAX_PANEL_ASPECT = 2.0
_TITLE_POINTS, _CAPTION_POINTS, _LINE_SPACING = 12, 10, 1.2
_GAP_INCHES = 0.2  # between panels (and their captions), and around the title
_CAPTION_PAD_INCHES = 0.12  # a caption above its picture (matplotlib's title pad, 6 points, and a little)
_TEXT_PATHS = TextToPath()


def normalize(heatmap: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    low, high = float(heatmap.min()), float(heatmap.max())
    return np.zeros_like(heatmap, np.float32) if high <= low else ((heatmap - low) / (high - low)).astype(np.float32)


def turbo_lut() -> np.ndarray:
    """uint8 [256, 3] RGB: OpenCV's turbo colour map, the one every picture and the explorer page use."""
    return cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0, ::-1].copy()


def is_whole_image(box: Box, size_hw: tuple[int, int]) -> bool:
    x1, y1, x2, y2 = (int(v) for v in box)
    return x1 <= 0 and y1 <= 0 and x2 >= size_hw[1] and y2 >= size_hw[0]


def box_thickness(size_hw: tuple[int, int]) -> int:
    """A box's stroke width in pixels on an image of `size_hw`: a 160th of its longer side (5 on 800x600), at
    least 2."""
    return max(2, round(max(size_hw) / 160))


def draw_box(rgb: np.ndarray, box: Box, colour=BOX_COLOUR, outline=BOX_OUTLINE, thickness: Optional[int] = None,
             ) -> np.ndarray:
    """Draws `box` (xyxy, exclusive end) in place as an inner stroke: a `colour` line edged by `outline`, all
    inside the box; a whole-image box is inset by a further stroke width, so it shows inside the frame. A box is
    drawn as much as lies in the picture (a sweep's ground-truth box may reach far outside it, to inf), its
    coordinates cut to the picture and then truncated to whole pixels; one holding no pixel of it draws nothing."""
    height, width = rgb.shape[:2]
    t = box_thickness((height, width)) if thickness is None else thickness
    band = t + 2                                  # the outline band, the line in its middle
    if len(box) != 4 or any(np.isnan(float(v)) for v in box):
        raise ValueError(f"box must be 4 numbers x1, y1, x2, y2, none NaN, got {tuple(box)!r}")
    x1, y1, x2, y2 = (int(min(max(float(v), 0.0), side)) for v, side in zip(box, (width, height, width, height)))
    if x2 <= x1 or y2 <= y1:
        return rgb
    if is_whole_image((x1, y1, x2, y2), (height, width)):
        x1, y1, x2, y2 = x1 + t, y1 + t, x2 - t, y2 - t
    inset = (band + 1) // 2  # how far cv2's stroke of `band` reaches either side of its line (an odd band's too)
    # Box ends are exclusive, cv2.rectangle's inclusive; the stroke is centred on the line cv2 is given.
    left, top = min(x1 + inset, x2 - 1), min(y1 + inset, y2 - 1)
    right, bottom = max(x2 - 1 - inset, left), max(y2 - 1 - inset, top)
    cv2.rectangle(rgb, (left, top), (right, bottom), outline, band)
    cv2.rectangle(rgb, (left, top), (right, bottom), colour, t)
    return rgb


def overlay(image: ImageLike, heatmap: np.ndarray, box: Box | None = None, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the image, read as `load_image` reads it (a float array in [0, 1], RGBA, a path...),
    blended with the turbo-coloured min-max heatmap, finite and [H, W] as the image, and the box outlined."""
    rgb = load_image(image)
    heatmap = np.asarray(heatmap)
    if heatmap.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap of shape {heatmap.shape} is not the image's size {rgb.shape[:2]} (height, width)")
    if not np.all(np.isfinite(heatmap)):
        raise ValueError("heatmap holds NaN or infinite values")
    colours = cv2.applyColorMap(np.uint8(np.round(255 * normalize(heatmap))), cv2.COLORMAP_TURBO)[..., ::-1]
    blended = cv2.addWeighted(rgb, 1.0 - alpha, colours, alpha, 0.0)
    if box is not None:
        draw_box(blended, box)
    return blended


_DECIMALS = decimal.Context(prec=40)  # format_number's, whatever the thread's context is


def format_number(value: Optional[float]) -> str:
    """A map value as the pictures and the page show it, by the page's rule (explorer.js's `fmt`: JavaScript's
    `toFixed(4)` under 10 in magnitude, `toPrecision(4)` from 10 up): 4 decimal places under 10 (1.2e-5 is
    0.0000, -1.2e-5 is -0.0000, -0.0 is 0.0000), 4 significant digits from 10 up, trailing zeros kept (10 is
    10.00), in exponent form from 10^4 on (12345.6 is 1.235e+4). The value's exact binary value is rounded, a
    tie away from zero (1234.5 is 1235, 0.03125 is 0.0313), where Python's own formats round a tie to even."""
    if value is None:
        return "—"
    value = float(value)
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    exact = decimal.Decimal(value if value else 0.0)  # -0.0 shows as 0
    if abs(value) < 10:
        return f"{exact.quantize(decimal.Decimal('1e-4'), decimal.ROUND_HALF_UP, _DECIMALS):f}"
    digits = exact.quantize(decimal.Decimal(1).scaleb(exact.adjusted() - 3), decimal.ROUND_HALF_UP, _DECIMALS)
    power = digits.adjusted()  # one more where rounding carried (9999.5 is 1.000e+4)
    if power < 4:
        return f"{digits:.{3 - power}f}"
    return f"{digits.scaleb(-power):.3f}e+{power}"


class ResultFigure(Figure):
    """A matplotlib figure that shows itself in a notebook (as PNG) without pyplot: returned as a cell's last
    value it is displayed once, whatever the backend, and no pyplot figure is left open. Matplotlib's warning per
    character its font lacks is silenced wherever the figure lays out or draws its text (`draw`, `get_tightbbox`:
    `savefig` in any format, with `bbox_inches="tight"` too, and the notebook's PNG): `grid_figure` said it once."""

    def draw(self, renderer) -> None:
        with _missing_glyphs_noted():
            super().draw(renderer)

    def get_tightbbox(self, *args, **kwargs):
        with _missing_glyphs_noted():
            return super().get_tightbbox(*args, **kwargs)

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=80)
        return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class Panel:
    """One overlay of a grid figure."""

    title: str
    heatmap: np.ndarray
    box: Optional[Box] = None
    tau: Optional[float] = None
    fallback: Optional[str] = None

    def caption(self) -> str:
        lines = [self.title]
        if self.tau is not None:
            fallback = f" (GMM fallback: {self.fallback})" if self.fallback else ""
            lines.append(f"τ={format_number(self.tau)}{fallback}")
        return "\n".join(lines)


def grid_figure(image: np.ndarray, panels: Sequence[Panel], suptitle: str, columns: int = MAX_COLUMNS,
                panel_inches: float = 3.0) -> Figure:
    """A figure: the image, then one overlay per panel, wrapped to at most `columns` (≤ 5) per row.

    A panel is `panel_inches` tall and as wide as the image's aspect ratio makes it, within 0.6 and
    `MAX_PANEL_ASPECT` times that (a very wide image is drawn smaller, not in an ever wider figure), and as wide
    as its widest caption line within that bound (captions are wrapped to the panel's width); the title is wrapped
    to the figure's width. The layout is computed from these sizes (tight_layout packed panels closer than their
    captions' widths)."""
    columns = max(1, min(columns, MAX_COLUMNS, 1 + len(panels)))
    rows = math.ceil((1 + len(panels)) / columns)
    aspect = image.shape[1] / image.shape[0]
    captions = ["image", *(panel.caption() for panel in panels)]
    with _missing_glyphs_noted():
        panel_width = min(max(panel_inches * max(aspect, 0.6),
                              max(_text_inches(caption, _CAPTION_POINTS) for caption in captions)),
                          panel_inches * MAX_PANEL_ASPECT)
        captions = [_wrapped(caption, _CAPTION_POINTS, panel_width) for caption in captions]
        width = (panel_width + _GAP_INCHES) * columns
        title = _wrapped(suptitle, _TITLE_POINTS, width - 2 * _GAP_INCHES)
    picture_height = min(panel_inches, panel_width / aspect)
    title_height = _lines_inches(title, _TITLE_POINTS) + 2 * _GAP_INCHES
    caption_height = max(_lines_inches(caption, _CAPTION_POINTS) for caption in captions) + _CAPTION_PAD_INCHES
    height = title_height + (caption_height + picture_height + _GAP_INCHES) * rows
    figure = ResultFigure(figsize=(width, height))
    axes = figure.subplots(rows, columns, squeeze=False, gridspec_kw={
        "left": _GAP_INCHES / 2 / width, "right": 1 - _GAP_INCHES / 2 / width, "wspace": _GAP_INCHES / panel_width,
        "top": 1 - (title_height + caption_height) / height, "bottom": _GAP_INCHES / height,
        "hspace": (caption_height + _GAP_INCHES) / picture_height})
    for axis in axes.flat:
        axis.axis("off")
    scale = min(1.0, GRID_MAX_SIDE / max(image.shape[:2]))
    shown = _resized(image, scale)
    axes.flat[0].imshow(shown)
    axes.flat[0].set_title(captions[0], fontsize=_CAPTION_POINTS, linespacing=_LINE_SPACING, parse_math=False)
    for axis, panel, caption in zip(axes.flat[1:], panels, captions[1:]):
        # Rounded as the picture's size is: a box that ends at the image's edge ends at the drawn picture's edge.
        box = None if panel.box is None else tuple(round(v * scale) for v in panel.box)
        axis.imshow(overlay(shown, _resized(np.asarray(panel.heatmap, np.float32), scale), box))
        axis.set_title(caption, fontsize=_CAPTION_POINTS, linespacing=_LINE_SPACING, parse_math=False,
                       color="firebrick" if panel.fallback else "black")
    figure.suptitle(title, fontsize=_TITLE_POINTS, linespacing=_LINE_SPACING, y=1 - _GAP_INCHES / height,
                    verticalalignment="top", parse_math=False)
    _note_missing_glyphs([suptitle, *captions[1:]])  # wrapping adds only line breaks, which are no glyphs
    return figure


def _lines_inches(text: str, points: float) -> float:
    """The height in inches of `text`'s lines at `points`."""
    return (text.count("\n") + 1) * points * _LINE_SPACING / 72


def _text_inches(text: str, points: float) -> float:
    """The width in inches of the widest line of `text` in the figures' font at `points` (as drawn, within a few
    hundredths of an inch)."""
    font = FontProperties(size=points)
    return max(_TEXT_PATHS.get_text_width_height_descent(line, font, ismath=False)[0] for line in text.split("\n")) / 72


def _wrapped(text: str, points: float, inches: float) -> str:
    """`text` with each line broken at spaces into lines at most `inches` wide (a word wider than that is broken
    where it must be)."""
    def pieces(word: str) -> Iterator[str]:
        while len(word) > 1 and _text_inches(word, points) > inches:  # most words fit: one measure each
            cut = _longest_fitting_prefix(word, points, inches)
            yield word[:cut]
            word = word[cut:]
        yield word

    lines = []
    for paragraph in text.split("\n"):
        line = None
        for piece in (p for word in paragraph.split(" ") for p in pieces(word)):
            if line is not None and _text_inches(f"{line} {piece}", points) > inches:
                lines.append(line)
                line = None
            line = piece if line is None else f"{line} {piece}"
        lines.append(line or "")
    return "\n".join(lines)


def _longest_fitting_prefix(word: str, points: float, inches: float) -> int:
    """The length of `word`'s longest prefix at most `inches` wide, at least 1. A prefix grows wider as it grows
    longer, so the length is found by doubling and then halving: each step measures a prefix no more than twice
    that long (stepping down from the whole word, measuring every prefix, took minutes for a 3,000-character
    word)."""
    def fits(length: int) -> bool:
        return _text_inches(word[:length], points) <= inches

    fitting, too_long = 1, 2  # the longest length known to fit (or 1), the shortest known not to (or past the end)
    while too_long <= len(word) and fits(too_long):
        fitting, too_long = too_long, 2 * too_long
    too_long = min(too_long, len(word) + 1)
    while too_long - fitting > 1:
        middle = (fitting + too_long) // 2
        fitting, too_long = (middle, too_long) if fits(middle) else (fitting, middle)
    return fitting


@contextlib.contextmanager
def _missing_glyphs_noted() -> Iterator[None]:
    """Matplotlib warns once per character its font lacks (a prompt in Chinese, an emoji), each time a figure is
    laid out or saved: those warnings are silenced here, and `_note_missing_glyphs` says it once instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        yield


def _note_missing_glyphs(texts: Sequence[str]) -> None:
    """One warning, once a process, naming the printable characters of `texts` the figures' font lacks."""
    from matplotlib import font_manager

    font = font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))
    lacking = {c for text in texts for c in text
               if c.isprintable() and not c.isspace() and font.get_char_index(ord(c)) == 0} - _GLYPHS_NOTED
    if lacking:
        _GLYPHS_NOTED.update(lacking)
        warnings.warn(f"the figures' font lacks some characters of the prompts ({' '.join(sorted(lacking)[:8])}): "
                      "they show as boxes in the grid figures; the explorer page shows them", stacklevel=3)


_GLYPHS_NOTED: set[str] = set()  # said once a process


def _resized(array: np.ndarray, scale: float) -> np.ndarray:
    """`array` scaled by `scale` <= 1 (area averaging), as drawn in a grid panel."""
    if scale >= 1.0:
        return array
    height, width = array.shape[:2]
    return cv2.resize(array, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def method_label(run: dict) -> str:
    """The method and its settings that differ from the defaults, e.g. "TCLIP K=25" or "clip_surgery
    (surgery_blocks=4)"; TCLIP (the method named "tclip") always names its number of translated copies K, which
    another method, a TCLIP subclass included, names as any setting. A method whose defaults are not known
    (`_settings_defaults`) names every setting."""
    name, settings = run["method"], dict(run.get("settings") or {})
    defaults = _settings_defaults(name)
    changed = {k: v for k, v in settings.items()
               if (defaults is None or k not in defaults or defaults[k] != v)
               and not (name == "tclip" and k == "translations")}  # in K= below
    label = f"TCLIP K={settings.get('translations')}" if name == "tclip" else name
    if changed:
        label += " (" + ", ".join(f"{k}={_setting_text(v)}" for k, v in changed.items()) + ")"
    return label


def _settings_defaults(name: str) -> Optional[dict]:
    """The default settings (`to_dict`) of the method called `name`: the registered method's, else those of the
    imported method classes of that name (a method from outside the package, "package.module:Class", is
    imported before it produces a result); None when no class, or classes that disagree, go by that name."""
    from tclip_jax import methods
    from tclip_jax.methods.base import Method

    try:
        classes = [methods.get(name)] if name in methods.REGISTRY else [
            cls for cls in _subclasses(Method) if getattr(cls, "name", None) == name]
        defaults = [cls.Settings().to_dict() for cls in classes]
    except (ValueError, TypeError):  # a registered module that cannot be imported, settings without defaults
        return None
    return defaults[0] if defaults and all(d == defaults[0] for d in defaults) else None


def _subclasses(cls: type) -> Iterator[type]:
    """Every imported subclass of `cls`, at any depth."""
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def model_label(run: dict) -> str:
    """The model's short name: a hub name as given, a file or folder by its last path component (a folder named as
    ".", "./" or "..", by the name of the folder it resolves to now, e.g. "my_model"); and its matmul dtype and
    precision where they are not the default (`matmul_note`), e.g. "ViT-B-32.pt (bfloat16 matmuls)"."""
    model = run.get("model") or {}
    origin = str(model.get("origin") or model.get("source") or "?")
    suffix = matmul_note(run)
    if origin.startswith("hf-hub:"):
        return origin + suffix
    name = origin
    if "/" in origin or "\\" in origin:
        path = pathlib.PurePath(origin)
        name = path.name if path.is_absolute() or origin.startswith(".") or pathlib.Path(origin).exists() else origin
    if name in ("", ".", ".."):  # "./" has no last component, ".." says nothing: the folder's own name
        name = pathlib.Path(origin).resolve().name or origin  # (the root has no name either)
    return name + suffix


def matmul_note(run: dict) -> str:
    """The label's note of a model whose matmuls were not float32, or ran at a matmul precision other than JAX's
    default, e.g. " (bfloat16 matmuls)", " (matmul precision highest)"; else ""."""
    model = run.get("model") or {}
    dtype, precision = model.get("matmul_dtype", "float32"), model.get("matmul_precision")
    notes = [] if dtype == "float32" else [f"{dtype} matmuls"]
    if precision is not None:
        notes.append(f"matmul precision {precision}")
    return f" ({', '.join(notes)})" if notes else ""


def _setting_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def prompt_panels(prompt, kind: str = "heatmap") -> list[Panel]:
    """A `PromptResult`'s panels: one per explained word, then the whole prompt."""
    def one(title: str, m) -> Panel:
        values = m.soft if kind == "soft" and m.soft is not None else m.heatmap
        return Panel(title, values, m.box, m.tau, None if m.gmm is None else m.gmm.fallback)

    panels = [one(word.text, m) for word, m in zip(prompt.words, prompt.word_maps)]
    panels.append(one("whole prompt", prompt.phrase))
    return panels


def result_figure(result, prompt: int = 0, kind: str = "heatmap", columns: int = MAX_COLUMNS) -> Figure:
    """An `ImageResult`'s grid for one prompt: the image, each word, the whole prompt; titled with the method,
    its settings, the model and the prompt; τ (and any GMM fallback) in each panel's title.

    kind: "heatmap" (the method's map; TCLIP: the aggregated map) or "soft" (TCLIP's soft map; a method without
    soft maps has its maps drawn, and the title says so)."""
    if kind not in ("heatmap", "soft"):
        raise ValueError(f"kind must be 'heatmap' or 'soft', got {kind!r}")
    if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or not 1 <= columns <= MAX_COLUMNS:
        raise ValueError(f"columns must be an integer from 1 to {MAX_COLUMNS}, got {columns!r}")
    if isinstance(prompt, bool) or not isinstance(prompt, (int, np.integer)):
        raise ValueError(f"prompt must be the index of one of the result's prompts (an integer), got {prompt!r}")
    if not -len(result.prompts) <= prompt < len(result.prompts):
        raise IndexError(f"prompt {prompt} out of range: the result has {len(result.prompts)} prompt(s)")
    chosen = result.prompts[prompt]
    shown = "maps"
    if kind == "soft":
        has_soft = all(m.soft is not None for m in (*chosen.word_maps, chosen.phrase))
        shown = "soft maps" if has_soft else "maps (no soft maps for this method: its maps are shown)"
    title = f'{method_label(result.run)} {shown} · model {model_label(result.run)}\n"{chosen.prompt}"'
    return grid_figure(result.image, prompt_panels(chosen, kind), title, columns)


def save_figure(figure: Figure, path, dpi: int = 90) -> None:
    figure.savefig(path, dpi=dpi)

