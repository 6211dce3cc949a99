"""The results explorer: one self-contained HTML page (or notebook output) per run, offline, no server.

What the page holds, per image: a display copy of the photo (WebP or PNG, whichever is smaller, longer side at
most `DISPLAY_MAX_SIDE`), and for every method shown (the run's method, then each `--compare` method) every map
of every word and prompt, with τ, the GMM fallback and the box from the result record, and the part of the image
the method's model saw (`covered`, x1, y1, x2, y2: `Geometry.covered`), outside which the page reads out no value.

How maps are stored: each map is an 8-bit grayscale PNG (longer side at most `MAP_MAX_SIDE`, shrunk with
OpenCV's INTER_AREA: a cell is the mean over the photo pixels it covers, one it covers in part weighted by that
part; the page's pointer readout names those pixels, from the same arithmetic, and says where a cell's mean
counts the fill outside `covered`) of
q = round(255 (v - lo) / (hi - lo)), with its exact value range [lo, hi] (the map's own minimum and maximum, raw
cosine for TCLIP) in the page's JSON. The page decodes the PNG onto a canvas, recovers v = lo + q (hi - lo) / 255
and colour-maps it in JavaScript with OpenCV's turbo table (the one the PNG overlays use), on the scale the
viewer picks: shared by every word of the image for that method and map kind, or the map's own range. So the
page can rescale maps without being regenerated, and a number read off the page is a value, not a colour. Eight
bits are enough for display (the range, τ and boxes are exact numbers beside it); maps are smooth, so their PNGs
are small. Equal maps (a one-word prompt's word and phrase) are stored once.

Inline or linked: `PageWriter.finish` inlines every image's data into index.html while the run's page data is at
most `INLINE_LIMIT_BYTES`; above that index.html stays small and each image's data is a script beside its result
(`<image folder>/explorer.js`) that the page loads when that image is shown. Scripts, not JSON or PNG files,
because browsers let a page opened from file:// load scripts from its folder but not read files or the pixels of
linked images.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import pathlib
import uuid
from collections.abc import Iterable, Sequence
from typing import Optional

import cv2
import numpy as np

from tclip_jax.files import loads_json, write_text_atomic
from tclip_jax.visualize.figures import format_number, is_whole_image, method_label, model_label, overlay, turbo_lut

PAGE_FORMAT = "tclip_jax/explorer"
PAGE_VERSION = 1
DISPLAY_MAX_SIDE = 512          # the photo's longer side in the page
MAP_MAX_SIDE = 256              # each map's longer side in the page (maps are smooth; the canvas interpolates)
INLINE_LIMIT_BYTES = 12 * 2**20  # a run's page data up to this is inlined into index.html; above, linked
INDEX_FILE = "index.html"
DATA_SCRIPT = "explorer.js"
# What tells a page written here (`is_explorer_page`).
_PAGE_DATA_TAG = '<script type="application/json" id="tclip-data">'
_ASSETS = pathlib.Path(__file__).resolve().parent / "assets"


@dataclasses.dataclass(frozen=True, eq=False)
class View:
    """One method's results on one image, as the page shows them.

    `words_alone`: for a prompt-level method, its results on each of the page's words alone as the prompt
    (the page's words once each, `distinct_words`), which the page shows for a word; None when not computed.
    """

    result: object                   # ImageResult
    words_alone: object = None       # ImageResult or None
    label: Optional[str] = None      # default: the method and its non-default settings
    note: Optional[str] = None       # shown on the panel, e.g. why word maps are missing


def view_label(view: View) -> str:
    """The name a view goes by, on the page and in result.json."""
    return view.label or method_label(view.result.run)


def views_record(views: Sequence[View]) -> dict:
    """The JSON record of one image's views (result.json, less the files `tclip explain` adds): the main result's
    record, its maps of each word alone (`words_alone`) when there are any, and each compare view (`compare`: its
    label, run and prompts, and its word-alone maps)."""
    main, *others = views
    record = main.result.to_record()
    if main.words_alone is not None:
        record["words_alone"] = main.words_alone.to_record()["prompts"]
    if others:
        record["compare"] = []
        for view in others:
            compared = view.result.to_record()
            entry = {"label": view_label(view), "run": compared["run"], "prompts": compared["prompts"]}
            if view.words_alone is not None:
                entry["words_alone"] = view.words_alone.to_record()["prompts"]
            record["compare"].append(entry)
    return record


def page_words(tokens: Sequence) -> list[list[dict]]:
    """Per prompt (its `TokenizedPrompt`), the words the page lists: the non-punctuation words of its tokenization,
    those a per-word method explains (`Method.explained_queries`), with their spans."""
    return [[{"text": w.text, "span": [w.start, w.end]} for w in prompt.words if not w.is_punctuation]
            for prompt in tokens]


def distinct_words(words: Sequence[Sequence[dict]]) -> list[str]:
    """The page's word texts once each, in order: the prompts a prompt-level method maps word by word."""
    return list(dict.fromkeys(w["text"] for prompt in words for w in prompt))


class _Blobs:
    """Encoded maps of one image, each array once (equal queries share one array)."""

    def __init__(self, map_hw: tuple[int, int]):
        self.map_hw = map_hw
        self.sources: list[str] = []
        self._index: dict[int, int] = {}
        self._keep: list[np.ndarray] = []  # keeps ids unique while the image is encoded

    def add(self, array: np.ndarray) -> dict:
        values = np.asarray(array, np.float32)
        lo, hi = float(values.min()), float(values.max())
        key = id(array)
        if key not in self._index:
            small = values if values.shape == self.map_hw else cv2.resize(
                values, self.map_hw[::-1], interpolation=cv2.INTER_AREA)
            q = np.zeros(small.shape, np.uint8) if hi <= lo else np.clip(
                np.round(255.0 * (small - lo) / (hi - lo)), 0, 255).astype(np.uint8)
            self._index[key] = len(self.sources)
            self._keep.append(array)
            self.sources.append(_data_uri(q, ".png"))
        return {"blob": self._index[key], "range": [lo, hi]}


def image_entry(name: str, views: Sequence[View], *, title: Optional[str] = None,
                links: Optional[dict] = None) -> dict:
    """The page's data for one image: the photo, the prompts' words, and per view every map with its numbers.

    views[0] is the run's own method; `links` maps link names ("result.json", "grid figure ...") to URLs."""
    if not views:
        raise ValueError("an image entry needs at least one view")
    main = views[0].result
    height, width = main.image.shape[:2]
    per_word = next((v.result for v in views if any(p.words for p in v.result.prompts)), None)
    if per_word is not None or any(v.words_alone is not None for v in views):
        words = page_words([prompt.tokens for prompt in (per_word or main).prompts])
    else:  # no method here maps words: the page lists whole prompts only
        words = [[] for _ in main.prompts]
    alone_index = {text: i for i, text in enumerate(distinct_words(words))}
    display_hw = _fit((height, width), DISPLAY_MAX_SIDE)
    blobs = _Blobs(_fit((height, width), MAP_MAX_SIDE))
    panels = [_panel(view, words, alone_index, blobs, (height, width)) for view in views]
    return {
        "name": name,
        "title": title or name,
        "size_hw": [height, width],
        "photo": _photo_uri(main.image, display_hw),
        # the prompt list marks what the result its words come from left unmapped; each panel says its own
        "prompts": [{"prompt": p.prompt, "words": w, **_cut(p.mapped_ends)}
                    for p, w in zip((per_word or main).prompts, words)],
        "panels": panels,
        "blobs": blobs.sources,
        "links": [{"text": k, "href": v} for k, v in (links or {}).items()],
    }


def _panel(view: View, words, alone_index: dict[str, int], blobs: _Blobs, size_hw) -> dict:
    result = view.result
    per_word = any(p.words for p in result.prompts)
    maps: dict[str, dict] = {}
    for p, (prompt, prompt_words) in enumerate(zip(result.prompts, words)):
        cut = None if prompt.mapped_ends is None else prompt.mapped_ends[1]
        quoted = _quote(prompt.prompt if cut is None else prompt.prompt[:cut] + " …")
        if per_word:
            by_span = {(w.start, w.end): m for w, m in zip(prompt.words, prompt.word_maps)}
            for w, word in enumerate(prompt_words):
                m = by_span.get(tuple(word["span"]))
                if m is not None:
                    maps[f"p{p}w{w}"] = _map(m, f"the word {_quote(word['text'])} in {quoted}", blobs, size_hw)
            phrase_text = f"the whole prompt {quoted}{_phrase_query(result.run, prompt)}"
        else:
            if view.words_alone is not None:
                against = _against(view.words_alone, "words")
                for w, word in enumerate(prompt_words):
                    alone = view.words_alone.prompts[alone_index[word["text"]]].phrase
                    maps[f"p{p}w{w}"] = _map(alone, f"the prompt {_quote(word['text'])} alone{against} (a "
                                             f"prompt-level method has no per-word map)", blobs, size_hw)
            phrase_text = f"the prompt {quoted}{_against(result, 'prompts')}"
        if cut is not None:
            phrase_text += _cut_note(prompt)
        maps[f"p{p}"] = _map(prompt.phrase, phrase_text, blobs, size_hw)
    rows, columns = result.geometry.covered  # the pixels the model saw: all but what a centre crop cut off
    return {"label": view_label(view), "method": result.run["method"],
            "model": model_label(result.run), "run": result.run, "per_word": per_word,
            "has_soft": any(m.get("soft") is not None for m in maps.values()), "note": view.note,
            "covered": [columns.start, rows.start, columns.stop, rows.stop], "maps": maps}


def _against(result, what: str) -> str:
    """What a label-set method's maps in `result` were computed against, said after the prompt: the page's prompts
    (or words), the prompts of `result`, its label set, where they are two texts or more that the model tells apart
    (CLIP Surgery maps a prompt of a smaller set by itself; the decomposition refuses one)."""
    texts = {p.tokens.token_ids.tobytes() for p in result.prompts}
    return f", against the page's {what} as its label set" if result.against_label_set and len(texts) > 1 else ""


def _cut(mapped_ends: Optional[tuple[int, int]]) -> dict:
    """A prompt list entry's cut (`PromptResult.mapped_ends`): "cut", where what follows was mapped by no text of
    the prompt (None: mapped whole), and "partly", where what follows up to "cut" was mapped by some texts only
    (a method's template texts, each cut by itself; None where they all kept as much)."""
    fewest, most = mapped_ends or (None, None)
    return {"cut": most, "partly": fewest if fewest != most else None}


def _cut_note(prompt) -> str:
    """What a whole-prompt map says of a prompt cut to fit the model's context (`PromptResult.mapped_ends`)."""
    fewest, most = prompt.mapped_ends
    length = len(prompt.prompt)
    if fewest == most:
        return f" (cut to fit the model's context: its last {length - most} characters were not mapped)"
    return (f" (cut to fit the model's context in each template text by itself: its last {length - most} to "
            f"{length - fewest} characters, by template, were not mapped)")


# The end-of-text attention that each TCLIP token weighting (methods/tclip/token_weights.py) weights pieces by.
_WEIGHTED_BY = {"last": "the end-of-text token's attention in the text tower's last block",
                "mean": "the end-of-text token's attention averaged over the text tower's blocks",
                "rollout": "the end-of-text token's attention rollout over the text tower"}


def _phrase_query(run: dict, prompt) -> str:
    """How a per-word method's whole-prompt map was queried, said after the prompt: TCLIP's query of several
    words is the mean of the words' queries or, with a token weighting, the weighted mean of their pieces (one
    word keeps the mean of its pieces); another method's is not known here."""
    if run["method"] != "tclip":
        return ""
    weighting = run["settings"].get("token_weighting", "none")
    if weighting == "none" or sum(not w.is_punctuation for w in prompt.tokens.words) < 2:
        return " (the mean of its words' queries)"
    return f" (the mean of its words' pieces weighted by {_WEIGHTED_BY[weighting]})"


def _map(m, shows: str, blobs: _Blobs, size_hw) -> dict:
    box = [int(v) for v in m.box]
    return {"shows": shows, "tau": m.tau, "fallback": None if m.gmm is None else m.gmm.fallback,
            "box": box, "whole_image": is_whole_image(box, size_hw), "heatmap": blobs.add(m.heatmap),
            "soft": None if m.soft is None else blobs.add(m.soft)}


VIEWS = ("single", "compare")


def page_data(entries: Iterable[dict], title: str, run: Optional[dict] = None, view: str = "single") -> dict:
    """The page's JSON: its images (full entries, or {name, title, script} stubs of linked ones), the run and its
    model's name (`model_label`); `view`: the view it opens in, "single" (one method, with tabs) or "compare"
    (every method side by side)."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return {"format": PAGE_FORMAT, "version": PAGE_VERSION, "title": title, "run": run,
            "model": None if run is None else model_label(run), "view": view, "turbo": turbo_lut().tobytes().hex(),
            "images": list(entries)}


def page_html(data: dict) -> str:
    """A complete, self-contained HTML document of the explorer (keyboard bound to the document)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(data['title'])}</title>\n<link rel=\"icon\" href=\"data:,\">\n"
            f"<style>\n{_asset('explorer.css')}</style>\n</head>\n<body class=\"tclip-page\">\n"
            "<div class=\"tclip-x\" id=\"tclip-explorer\"><p class=\"tclip-wait\">Loading the explorer… "
            "(it needs JavaScript)</p></div>\n"
            f"<script>\n{_asset('explorer.js')}</script>\n"
            f"{_PAGE_DATA_TAG}{_script_json(data)}</script>\n"
            "<script>TCLIPExplorer.mount(document.getElementById('tclip-explorer'), "
            "JSON.parse(document.getElementById('tclip-data').textContent), {keys: 'document'});</script>\n"
            "</body>\n</html>\n")


def is_explorer_page(path: pathlib.Path) -> bool:
    """Whether the file at `path` is a page `page_html` wrote (a run's index.html, which a later run replaces)."""
    try:
        return _PAGE_DATA_TAG.encode() in pathlib.Path(path).read_bytes()
    except OSError:  # a folder, unreadable: not ours to replace
        return False


def page_images(path: pathlib.Path) -> list[str]:
    """The names of the images the explorer page at `path` shows (the CLI names each by its folder); [] if `path` is
    not such a page, or its data cannot be read."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
        start = text.index(_PAGE_DATA_TAG) + len(_PAGE_DATA_TAG)
        return [entry["name"] for entry in loads_json(text[start:text.index("</script>", start)])["images"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):  # not a page of ours, or damaged
        return []


def inline_html(entry: dict, title: str, run: Optional[dict] = None, fallback_html: str = "",
                view: str = "single") -> str:
    """The explorer as a fragment for a notebook output: scoped to its own element, keys bound to it."""
    root = f"tclip-{uuid.uuid4().hex[:12]}"
    data = _script_json(page_data([entry], title, run, view))
    return (f"<div class=\"tclip-x tclip-inline\" id=\"{root}\" tabindex=\"0\">{fallback_html}</div>\n"
            f"<style>\n{_asset('explorer.css')}</style>\n"
            f"<script>\n{_asset('explorer.js')}\n"
            # A front end may run the script before the output is attached to the page: look beside it too.
            f"(function () {{ const s = document.currentScript;\n"
            f"  const root = document.getElementById('{root}') || (s && s.parentNode && "
            f"s.parentNode.querySelector('#{root}'));\n"
            f"  TCLIPExplorer.mount(root, {data}, {{keys: 'root'}}); }})();\n</script>\n")


def result_html(main, views: Sequence[View] = (), view: Optional[str] = None) -> str:
    """An `ImageResult` or a `View` of one (and optional compare views of the same image) as a notebook explorer;
    without JavaScript (e.g. a notebook viewer) its first map's overlay and a table of words, τ and boxes show.
    `view`: the view it opens in (default: "compare" when there are compare views)."""
    main = main if isinstance(main, View) else View(main)
    result = main.result
    record = json.dumps(views_record([main, *views]), indent=1)
    entry = image_entry("result", [main, *views], title=f"{method_label(result.run)}: "
                        + " | ".join(p.prompt for p in result.prompts),
                        links={"result.json": "data:application/json;base64,"
                               + base64.b64encode(record.encode()).decode()})
    view = view or ("compare" if views else "single")
    return inline_html(entry, entry["title"], result.run, _static_fallback(result), view)


class Explorer:
    """Views of one image (the main result first, then compare views) that a notebook shows as the explorer."""

    def __init__(self, views: Sequence[View]):
        if not views:
            raise ValueError("the explorer needs at least one view")
        self.views = list(views)

    @property
    def result(self):
        return self.views[0].result

    def __repr__(self) -> str:
        """The views by their labels and the image's size: a notebook keeps it beside the explorer as the cell's
        text."""
        labels = "; ".join(view_label(v) for v in self.views)  # a label's settings are separated by commas
        return (f"<Explorer of {len(self.views)} view{'s' * (len(self.views) != 1)} ({labels}): image size_hw "
                f"{tuple(self.result.image.shape[:2])}>")

    def _repr_html_(self) -> str:
        return result_html(self.views[0], self.views[1:])


def _static_fallback(result) -> str:
    prompt = result.prompts[0]
    first = prompt.word_maps[0] if prompt.word_maps else prompt.phrase
    picture = overlay(result.image, first.heatmap, first.box)
    picture = cv2.resize(picture, _fit(picture.shape[:2], 320)[::-1], interpolation=cv2.INTER_AREA)
    rows = []
    for p in result.prompts:
        for text, m in [*zip((w.text for w in p.words), p.word_maps), (f"“{p.prompt}” (whole prompt)", p.phrase)]:
            rows.append(f"<tr><td>{html.escape(text)}</td><td>{format_number(m.tau)}</td>"
                        f"<td>{', '.join(str(int(v)) for v in m.box)}</td></tr>")
    return (f"<div class=\"tclip-static\"><img alt=\"overlay\" src=\"{_data_uri(picture[..., ::-1], '.webp')}\">"
            f"<table><tr><th>{html.escape(method_label(result.run))}</th><th>τ</th><th>box x1, y1, x2, y2</th></tr>"
            + "".join(rows) + "</table></div>")


# ------------------------------------------------------------------------------------------------ a run's page
class PageWriter:
    """Collects a run's images and writes its index.html: each image's data is written beside its result as
    `explorer.js` (`add`), and `finish` inlines them all into index.html when they total at most `inline_limit`
    bytes (then the per-image scripts are removed), or else links them."""

    def __init__(self, out: pathlib.Path, title: str, run: Optional[dict] = None,
                 inline_limit: Optional[int] = None):
        self.out = pathlib.Path(out)
        self.title = title
        self.run = run
        self.inline_limit = INLINE_LIMIT_BYTES if inline_limit is None else inline_limit
        self._images: list[tuple[str, str, str]] = []   # (name, title, folder relative to out)

    @staticmethod
    def write_data(folder: pathlib.Path, entry: dict) -> None:
        """The image's data script (into its folder, e.g. a staging folder renamed into place later)."""
        text = f"TCLIPExplorer.register({json.dumps(entry['name'])}, {_script_json(entry)});\n"
        (pathlib.Path(folder) / DATA_SCRIPT).write_text(text, encoding="utf-8")

    def add(self, name: str, title: str, folder: str) -> None:
        """Records an image whose data script `write_data` wrote into `out / folder`."""
        self._images.append((name, title, folder))

    def finish(self) -> tuple[pathlib.Path, bool]:
        """Writes index.html; returns its path and whether the data is inlined."""
        scripts = [self.out / folder / DATA_SCRIPT for _, _, folder in self._images]
        total = sum(path.stat().st_size for path in scripts)
        inline = total <= self.inline_limit
        if inline:
            # Each script is `TCLIPExplorer.register(<name>, <entry>);`: the name is read as JSON to find where
            # it ends (a name may itself hold ", "), then the entry after it.
            decoder, prefix = json.JSONDecoder(), len("TCLIPExplorer.register(")
            entries = []
            for path in scripts:
                text = path.read_text(encoding="utf-8")
                _, name_end = decoder.raw_decode(text, prefix)
                entries.append(decoder.raw_decode(text, name_end + len(", "))[0])
        else:
            entries = [{"name": name, "title": title, "script": f"{_url(folder)}/{DATA_SCRIPT}"}
                       for name, title, folder in self._images]
        index = self.out / INDEX_FILE
        write_text_atomic(index, page_html(page_data(entries, self.title, self.run)))
        if inline:
            for path in scripts:
                path.unlink()
        return index, inline


# ----------------------------------------------------------------------------------------------------- helpers
def _fit(size_hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    height, width = size_hw
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _photo_uri(image: np.ndarray, display_hw: tuple[int, int]) -> str:
    small = image if image.shape[:2] == display_hw else cv2.resize(image, display_hw[::-1],
                                                                    interpolation=cv2.INTER_AREA)
    bgr = np.ascontiguousarray(small[..., ::-1])
    candidates = [_data_uri(bgr, ".webp"), _data_uri(bgr, ".png")]
    return min(candidates, key=len)


def _data_uri(array: np.ndarray, ext: str) -> str:
    params = {".png": [cv2.IMWRITE_PNG_COMPRESSION, 9], ".webp": [cv2.IMWRITE_WEBP_QUALITY, 90]}[ext]
    ok, encoded = cv2.imencode(ext, np.ascontiguousarray(array), params)
    if not ok:
        raise OSError(f"could not encode a {ext} image")
    return f"data:image/{ext[1:]};base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _script_json(data) -> str:
    """JSON that is safe inside a <script> element: '<' only ever appears inside strings, as \\u003c."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _quote(text: str) -> str:
    return f"“{text}”"


def _url(folder: str) -> str:
    from urllib.parse import quote

    return "/".join(quote(part) for part in pathlib.PurePosixPath(folder).parts)


def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")
