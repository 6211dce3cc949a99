"""`tclip explain IMAGE... --prompt "..."`: per-word (TCLIP) or per-prompt maps, figures and result.json per image,
and one explorer page (index.html) for the whole run.

Every image's file and size are checked before anything is written. Each image's outputs are written through
`staged_folder`, so an interrupted run never leaves a half-written result folder (nor the output folder it made, if
it stops before its first image); index.html is written last, over every image of the run, or of those done when
a run stops (Ctrl-C, an image damaged past its header). An image's results go to the folder of its earlier result
in OUT, else to OUT/<image stem> or the first `<stem>_N` holding no other image's result (`result_folders`). A run
replaces only what `tclip explain` wrote: an image's folder that exists must be empty or an earlier result (its
result.json and the files that names, nothing else) and must not hold an input image, and OUT/index.html an
earlier explorer page; else the run is refused before the model loads (`check_replaced`). A run removes an earlier
explorer page that shows an image it replaces (the page would show the old results beside links to the new files),
just before that image's results are swapped in, with or without a page of its own: one killed before it writes
its page (SIGKILL) leaves none rather than a stale one. A run holds a lock in OUT (`LOCK_FILE`) until it ends:
another run into OUT meanwhile is refused in one line before it chooses its folders.

`--compare METHOD[:key=value,...]` (repeatable) runs more methods on the same images and prompts, on the same
loaded model, for the explorer's compare view (and result.json's "compare" list). A TCLIP run compares with
TCLIP K=1 (`tclip:translations=1`, 1/25 of the cost) unless `--compare none` (or no page is written and no
`--compare` given). A compare method of the run's own
class starts from the run's settings, any other from its defaults with the run's host-step settings (box rule,
truncation); `key=value` pairs override either. A compare method of the same class and settings as the run's or
an earlier one is left out, with a warning. A prompt-level method is also run on each word alone as the
prompt (a method that uses a label set, against the page's words as that set), which the page shows for that word
(labelled so).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import warnings
from typing import Optional

from tclip_jax.cli.common import add_method_arguments, add_progress_argument, build_method, progress_bars

NO_COMPARE = "none"
COMPARE_FLAG = "--compare "  # what the command line's messages name a compare spec after (the API: the spec alone)
LOCK_FILE = ".tclip-explain.lock"  # held in OUT while a run writes there


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to explain (TCLIP: word by word); repeat for several prompts")
    parser.add_argument("--out", default="tclip_out", help="output folder (default: %(default)s)")
    parser.add_argument("--save-npz", action="store_true",
                        help="also save the maps (and TCLIP's raw S) as maps.npz, uncompressed: two float32 maps of "
                             "the image's size per word and per prompt (a baseline's: one), 8 bytes a pixel (24 MB "
                             "per word at 2000x1500)")
    parser.add_argument("--html", action=argparse.BooleanOptionalAction, default=True,
                        help="write OUT/index.html, an offline explorer of every image of the run (default: on; "
                             "--no-html removes an earlier OUT/index.html that shows an image the run replaces)")
    parser.add_argument("--compare", action="append", default=[], metavar="METHOD[:key=value,...]",
                        help="also run METHOD on the same images and prompts, for the explorer's compare view "
                             "(repeatable; a TCLIP run compares with tclip:translations=1 unless --compare none)")
    add_progress_argument(parser)
    add_method_arguments(parser)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "x"


def result_folders(out: pathlib.Path, paths: list[str]) -> list[str]:
    """One output folder name per image, none shared within the run (compared case-blind, as on macOS and Windows
    file systems): the folder in `out` that holds the image's earlier result, so a rerun replaces that; else the
    first of its stem, `<stem>_2`, `<stem>_3`, ... that the run has not taken and that holds no other image's
    result (in an empty `out`, "photo.png", "photo.jpg", "photo_2.jpg" give photo, photo_2, photo_2_2)."""
    stems = [_slug(pathlib.Path(path).stem) for path in paths]
    wanted = {stem.casefold() for stem in stems}
    recorded: dict[str, Optional[pathlib.Path]] = {}  # folder name -> the image its result.json records, read once

    def result_image(name: str) -> Optional[pathlib.Path]:
        if name not in recorded:
            recorded[name] = _result_image(out / name)
        return recorded[name]

    # The earlier results of the run's stems (<stem> and <stem>_N folders, as (stem, N, folder)), by each image
    # they record.
    earlier: dict[tuple, list[tuple[str, int, str]]] = {}
    for folder in (out.iterdir() if out.is_dir() else []):
        numbered = re.fullmatch(r"(.+)_([0-9]+)", folder.name)
        copies = [(folder.name.casefold(), 1, folder.name)] if folder.name.casefold() in wanted else []
        if numbered and numbered[1].casefold() in wanted:
            copies.append((numbered[1].casefold(), int(numbered[2]), folder.name))
        image = result_image(folder.name) if copies and not folder.is_symlink() else None
        for key in (_image_keys(image) if image is not None else []):
            earlier.setdefault(key, []).extend(copies)
    # Each image's folders holding its earlier result, its own stem's first (as (another stem?, N, folder)).
    held = [sorted({(copy_stem != stem.casefold(), copy, name) for key in _image_keys(pathlib.Path(path))
                    for copy_stem, copy, name in earlier.get(key, [])}) for path, stem in zip(paths, stems)]
    names: list[Optional[str]] = [None] * len(paths)
    taken: set[str] = set()
    # Every image takes back a folder of its own stem before any takes another stem's, whatever the order given:
    # two names of one file (a link beside it) each keep their own folder.
    for own_stem_only in (True, False):
        for i, folders in enumerate(held):
            if names[i] is None:
                names[i] = next((name for other_stem, _, name in folders
                                 if not (own_stem_only and other_stem) and name.casefold() not in taken), None)
                if names[i] is not None:
                    taken.add(names[i].casefold())
    for i, stem in enumerate(stems):  # the rest: the first free <stem>, <stem>_2, ...
        copy = 1
        while names[i] is None:
            candidate = stem if copy == 1 else f"{stem}_{copy}"
            if candidate.casefold() not in taken and result_image(candidate) is None:
                names[i] = candidate
                taken.add(candidate.casefold())
            copy += 1
    return names


def _result_image(folder: pathlib.Path) -> Optional[pathlib.Path]:
    """The image whose earlier result `folder` holds, as its result.json records it; None if it holds none."""
    from tclip_jax.files import loads_json

    try:
        return pathlib.Path(loads_json((folder / "result.json").read_text(encoding="utf-8"))["image"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _image_keys(image: pathlib.Path) -> list[tuple]:
    """What tells image files apart, for finding an image's earlier result: its resolved path (a result of an older
    version recorded the path as given, read here as relative to the current folder), and the file itself where it
    exists (its device and inode: a link to it, or a case-blind file system's other spelling of its name)."""
    keys = [("path", str(image.resolve()))]
    try:
        stat = image.stat()
        keys.append(("file", stat.st_dev, stat.st_ino))
    except OSError:  # gone, or not readable: its path alone
        pass
    return keys


def check_replaced(out: pathlib.Path, images: list[str], names: list[str], page: bool) -> None:
    """Refuses a run that would replace something `tclip explain` did not write (see the module doc): each
    image's folder `out / name`, and `out`/index.html if the run writes a page."""
    from tclip_jax.files import check_replaceable
    from tclip_jax.visualize.explorer import INDEX_FILE, is_explorer_page

    for name in names:
        folder = out / name
        if folder.is_symlink():  # a link (to nothing, say) is not a folder this run wrote
            raise ValueError(f"{folder} is a symbolic link where this run writes the results of an image; move it or "
                             "choose another --out")
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise ValueError(f"{folder} is a file, not a folder, where this run writes the results of an image; "
                             "move it or choose another --out")
        check_replaceable(folder, inputs=images)  # not the current folder, nor one holding an input image
        foreign = _foreign_entry(folder)
        if foreign is not None:
            raise ValueError(f"{folder} is not an earlier result of tclip explain ({foreign}), and this run would "
                             "replace it with an image's results; move it or choose another --out")
    index = out / INDEX_FILE
    if page and index.exists() and not is_explorer_page(index):
        raise ValueError(f"{index} is not a page tclip explain wrote, and this run would replace it; move it, choose "
                         "another --out or pass --no-html")


def _foreign_entry(folder: pathlib.Path) -> Optional[str]:
    """Why `folder` is not empty or an earlier result of `write_result`, or None if it is."""
    from tclip_jax.files import loads_json, unwritten_entries
    from tclip_jax.methods.base import RESULT_SCHEMA
    from tclip_jax.visualize.explorer import DATA_SCRIPT

    if not unwritten_entries(folder, ()):  # empty, but for a file browser's files
        return None
    try:
        record = loads_json((folder / "result.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "it has no result.json"
    except (OSError, ValueError):
        return "its result.json cannot be read as JSON"
    try:
        if record["schema"] != RESULT_SCHEMA:
            raise TypeError
        written = {"result.json", DATA_SCRIPT, record.get("npz"),
                   *(entry["grid_figure"] for entry in record["prompts"]),
                   *(m["overlay"] for entry in record["prompts"] for m in [*entry["words"], entry["phrase"]])}
    except (KeyError, TypeError):
        return "its result.json is not one tclip explain wrote"
    foreign = unwritten_entries(folder, written - {None}, files_only=True)
    return f"it holds {foreign[0]}, which tclip explain did not write" if foreign else None


def write_result(views: list, image_path: str, folder: pathlib.Path, save_npz: bool) -> dict:
    """Writes one overlay per map of the main view, a grid figure per prompt and maps.npz; returns the result
    record (`views_record`: with the compare views' records) naming them."""
    from tclip_jax import visualize
    from tclip_jax.files import write_image
    from tclip_jax.visualize.explorer import views_record

    result = views[0].result
    record = views_record(views)
    record["image"]["path"] = str(pathlib.Path(image_path).resolve())  # what a rerun finds it by
    arrays = {}
    for p, (prompt, entry) in enumerate(zip(result.prompts, record["prompts"])):
        named = [(f"p{p}_w{w}_{_slug(word.text)}", maps, entry["words"][w])
                 for w, (word, maps) in enumerate(zip(prompt.words, prompt.word_maps))]
        named.append((f"p{p}_prompt", prompt.phrase, entry["phrase"]))
        for name, maps, map_entry in named:
            map_entry["overlay"] = f"{name}.png"
            write_image(folder / map_entry["overlay"], visualize.overlay(result.image, maps.heatmap, maps.box))
            arrays[f"{name}/heatmap"] = maps.heatmap
            if maps.soft is not None:
                arrays[f"{name}/soft"] = maps.soft
        entry["grid_figure"] = f"p{p}_grid.png"
        visualize.save_figure(visualize.result_figure(result, p), folder / entry["grid_figure"])
        if prompt.similarity is not None:
            arrays[f"p{p}_similarity"] = prompt.similarity
    if save_npz:
        write_maps_npz(folder / "maps.npz", arrays)
        record["npz"] = "maps.npz"
    return record


def write_maps_npz(path: pathlib.Path, arrays: dict) -> None:
    """Writes `arrays` (name -> map) as an uncompressed .npz (`np.savez`; `np.load` reads it by the same names):
    entry by entry into the zip, each float32 array as it is held, so the write holds no copy of the maps (the
    maps are float32: np.asarray copies only one that is not; numpy writes through a buffer of at most 16 MiB).
    A map several names share is written under each. Not compressed: float maps deflate poorly, and slowly
    (1000x750 pixels, 10 prompts, 230 maps, 629 MiB: stored 1.8 s; zlib level 1 20 s for 69 % of the size,
    savez_compressed's level 6 34 s for 68 %; reading back 0.5 s against 4-5 s)."""
    import numpy as np

    np.savez(path, **{name: np.asarray(array, np.float32) for name, array in arrays.items()})


# ------------------------------------------------------------------------------------------- compare methods
@dataclasses.dataclass(frozen=True, eq=False)
class Compared:
    """A method run beside the main one: its prompts encoded once, and its word-alone prompts if it needs them."""

    spec: str
    method: object
    encoded: object
    words_alone: object = None     # EncodedPrompts of the page's words alone, for a prompt-level method
    note: Optional[str] = None


def parse_compare(spec: str) -> tuple[str, list[str]]:
    """"METHOD[:key=value,...]" -> (method, ["key=value", ...]); a method other than a registered name may itself
    be "package.module:Class" (what follows its first ':' is a class name, not an assignment), and a value may hold
    commas (scale_fractions=0.25,0.5) and colons (projections=/a:b/p.safetensors)."""
    from tclip_jax.methods import REGISTRY

    method, sep, tail = spec.partition(":")
    class_name, class_sep, rest = tail.partition(":")
    if method.strip() not in REGISTRY and class_name.strip().isidentifier():  # "package.module:Class[:key=value]"
        method, sep, tail = f"{method}:{class_name.strip()}", class_sep, rest
    if not sep or not tail.strip():
        return method.strip(), []
    assignments: list[str] = []
    for part in tail.split(","):
        if "=" in part or not assignments:
            assignments.append(part.strip())
        else:
            assignments[-1] += "," + part.strip()
    return method.strip(), assignments


def compare_methods(specs: list[str], main, flag: str = "") -> list:
    """The compare methods the specs name (plus TCLIP K=1 for a TCLIP run, a subclass's included, where neither the
    run nor a spec is TCLIP itself at K=1), built on the main method's model; one
    of the same class and settings as the main method or an earlier one is left out, with a warning. Messages name
    a spec after `flag` ("--compare " on the command line; the API's callers name the spec alone)."""
    from tclip_jax import methods
    from tclip_jax.methods.settings import MethodSettings
    from tclip_jax.methods.tclip import TCLIP

    if NO_COMPARE in [s.strip().lower() for s in specs]:
        if len(specs) > 1:
            raise ValueError(f"{flag}{NO_COMPARE} turns comparing off; it cannot go with other {flag}methods")
        return []
    built = []
    for spec in specs:
        name, assignments = parse_compare(spec)
        try:
            method_class = methods.get(name)
            given = method_class.Settings.parse_assignments(assignments)
            if type(main) is method_class:
                settings = main.settings.replace(**given)
            else:  # only what every method's settings mean alike: a same-named setting of two methods may not
                # (HilaCAM's start_layer -1 is its last block; a rollout's -1 another start)
                shared = MethodSettings.field_names()
                base = {k: v for k, v in main.settings.to_dict().items() if k in shared}
                settings = method_class.Settings.from_dict({**base, **given})
        except ValueError as err:
            raise ValueError(f"{flag}{spec}: {err}") from None
        before = [("the run's method", main), *((f"{flag}{earlier}", method) for earlier, method in built)]
        same = next((what for what, method in before if type(method) is method_class and method.settings == settings),
                    None)
        if same is not None:  # the same maps twice, under one label
            warnings.warn(f"{flag}{spec}: the same method and settings as {same}; shown once", stacklevel=2)
            continue
        built.append((spec, method_class(main.clip, settings)))
    # TCLIP K=1's maps are shown where TCLIP itself runs at K=1: a subclass's at K=1 are other maps
    if isinstance(main, TCLIP) and not any(type(m) is TCLIP and m.settings.translations == 1
                                           for m in [main, *(m for _, m in built)]):
        # TCLIP's settings alone: a subclass's may have more, which TCLIP would record as its own
        own = {k: v for k, v in main.settings.to_dict().items() if k in TCLIP.Settings.field_names()}
        k1 = TCLIP(main.clip, TCLIP.Settings.from_dict({**own, "translations": 1}))
        built.insert(0, ("tclip:translations=1", k1))
    return built


def prepare_compare(built: list, prompts: list[str], words: list[str], flag: str = "") -> list[Compared]:
    """Encodes the compare methods (`compare_methods`, whose `flag` this takes) once for the run; `words`: the page's
    words, one each, which a prompt-level method maps alone (none when no method of the run maps words)."""
    compared = []
    for spec, method in built:
        try:
            encoded = method.encode_prompts(prompts)
        except ValueError as err:
            raise ValueError(f"{flag}{spec}: {err}") from None
        words_alone, note = None, None
        if words and not method.explains_words:
            try:
                words_alone = method.encode_prompts(words)
            except ValueError as err:
                note = f"no word maps: each word alone as the prompt failed ({err})"
        compared.append(Compared(spec, method, encoded, words_alone, note))
    return compared


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """What one run computes per image: the main method on the prompts, the compare methods (`Compared`), and,
    for a prompt-level main method beside a per-word one, its maps of each word alone."""

    method: object
    encoded: object
    compared: tuple
    main_alone: object = None

    @classmethod
    def build(cls, method, prompts: list[str], compare: list[str], page: bool = True, flag: str = "") -> "Plan":
        """Encodes everything once, before any image (bad prompts and compare specs fail here; messages name a spec
        after `flag`, as `compare_methods`). Without a page, compare methods run only if some are asked for (and
        then TCLIP K=1 joins a TCLIP run's, as always)."""
        encoded = method.encode_prompts(prompts)
        built = compare_methods(compare, method, flag) if page or compare else []
        words = []  # the words the page lists, once each, if any method of the run maps words
        if method.explains_words or any(m.explains_words for _, m in built):
            from tclip_jax.visualize.explorer import distinct_words, page_words

            words = distinct_words(page_words(encoded.tokens))
        main_alone = None
        if words and not method.explains_words:  # result.json records them, with a page or without
            try:
                main_alone = method.encode_prompts(words)
            except ValueError:
                pass
        return cls(method, encoded, tuple(prepare_compare(built, list(prompts), words, flag)), main_alone)

    def views(self, image) -> list:
        """The explorer's views of one image (uint8 RGB or a path): the main result first, then each compare."""
        from tclip_jax.image import load_image
        from tclip_jax.visualize.explorer import View

        rgb = load_image(image)
        result = self.method.explain(rgb, self.encoded)
        views = [View(result, None if self.main_alone is None else self.method.explain(rgb, self.main_alone))]
        for c in self.compared:
            alone = None if c.words_alone is None else c.method.explain(rgb, c.words_alone)
            views.append(View(c.method.explain(rgb, c.encoded), alone, note=c.note))
        return views


# ------------------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    from tclip_jax.files import check_output_folder, held_lock

    out = check_output_folder(args.out)
    # Two runs into one OUT at once chose the same folders and wrote each other's results and page: a run holds a
    # lock in OUT from before it chooses its folders until it ends. The folders made for it go again if the run
    # leaves them empty (it was refused, or stopped before its first image).
    with held_lock(out / LOCK_FILE, "tclip explain", out, make_folder=True):
        return _run_holding(args, out)


def _run_holding(args: argparse.Namespace, out: pathlib.Path) -> int:
    from tclip_jax.files import mend_killed_swaps
    from tclip_jax.image import image_size

    mend_killed_swaps(out)  # an image's results a killed run hid aside are put back before the folders are chosen
    names = result_folders(out, args.images)
    check_replaced(out, args.images, names, args.html)
    method = build_method(args)
    plan = Plan.build(method, list(args.prompt), args.compare, args.html, COMPARE_FLAG)  # fails early, before output
    for path in args.images:  # every image's header, before any output: a bad image ends the run before it starts
        size = image_size(path)
        for what, checked in [("", plan.method), *((f"{COMPARE_FLAG}{c.spec}: ", c.method) for c in plan.compared)]:
            try:
                checked.check_image_size(size)
            except ValueError as err:
                raise ValueError(f"{path}: {what}{err}") from None
    return _explain_all(args, method, plan, out, names)


def _is_one_of(folder: pathlib.Path, folders: list[pathlib.Path]) -> bool:
    """Whether `folder` is one of `folders`: by name, or the same folder named otherwise (a case-blind file system's
    "PHOTO" for "photo", a link), where both exist. Names that differ in case alone are two folders elsewhere."""
    return any(other == folder or (other.exists() and folder.exists() and os.path.samefile(other, folder))
               for other in folders)


def _explain_all(args: argparse.Namespace, method, plan: Plan, out: pathlib.Path, names: list[str]) -> int:
    from tqdm import tqdm

    from tclip_jax import visualize
    from tclip_jax.files import staged_folder
    from tclip_jax.visualize.explorer import DATA_SCRIPT, INDEX_FILE, PageWriter, image_entry, page_images

    run_info = method.run_info()
    # The model is named in the line under the title (the page's run), not here again.
    page = PageWriter(out, f"TCLIP explorer · {visualize.method_label(run_info)}", run_info) if args.html else None
    # An earlier page (ours) that shows an image the run replaces would show it stale until the run's own page is
    # written, for ever if the run is killed: it is removed just before the first such result is swapped in, so a
    # run that stops before leaves it as it was.
    index = out / INDEX_FILE
    shown = [out / name for name in page_images(index)]
    done = 0
    try:
        for image_path, name in tqdm(list(zip(args.images, names)), desc="explain", unit="image",
                                     disable=not progress_bars(args)):
            target = out / name
            with staged_folder(target) as staging:
                views = plan.views(image_path)
                result = views[0].result
                record = write_result(views, image_path, staging, args.save_npz)
                (staging / "result.json").write_text(json.dumps(record, indent=2) + "\n")
                if page is not None:
                    links = {"result.json": f"{name}/result.json"}
                    links.update({f"grid figure {p + 1}" if len(result.prompts) > 1 else "grid figure":
                                  f"{name}/{entry['grid_figure']}" for p, entry in enumerate(record["prompts"])})
                    PageWriter.write_data(staging, image_entry(name, views, title=str(image_path), links=links))
                if _is_one_of(target, shown):
                    index.unlink(missing_ok=True)
                    shown = []
                    if page is None:  # else the run's own page replaces it
                        tqdm.write(f"{index}: removed (--no-html); it showed earlier results of images this run "
                                   "replaces")
            if page is not None:
                page.add(name, str(image_path), name)
            done += 1
            tqdm.write(f"{image_path}: {target}/ (overlays, grid figure, result.json)")
    except BaseException:
        if page is not None and done:  # the images done keep their page
            page.finish()
        raise
    if page is not None:
        index, inline = page.finish()
        how = "self-contained" if inline else f"loads each image's {DATA_SCRIPT} from its folder"
        print(f"explorer: {index} (open it in a browser; {how})")
    return 0
