"""`tclip explain IMAGE... --prompt "..."`: per-word (TCLIP) or per-prompt maps, figures and result.json per image.

Each image's outputs are written through `staged_folder`, so an interrupted run never leaves a half-written
result folder.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re

from tclip_jax.cli.common import add_method_arguments, build_method


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to explain (TCLIP: word by word); repeat for several prompts")
    parser.add_argument("--out", default="tclip_out", help="output folder (default: %(default)s)")
    parser.add_argument("--save-npz", action="store_true", help="also save the maps (and TCLIP's raw S) as maps.npz")
    add_method_arguments(parser)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "x"


def _unique_names(paths: list[str]) -> list[str]:
    names, seen = [], {}
    for path in paths:
        stem = _slug(pathlib.Path(path).stem)
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def write_result(result, image_path: str, folder: pathlib.Path, save_npz: bool) -> dict:
    """Writes one overlay per map, a grid figure per prompt and maps.npz; returns the result record."""
    import numpy as np

    from tclip_jax import visualize

    record = result.to_record()
    record["image"]["path"] = str(image_path)
    method = result.run["method"]
    arrays = {}
    for p, (prompt, entry) in enumerate(zip(result.prompts, record["prompts"])):
        named = [(f"p{p}_w{w}_{_slug(word.text)}", word.text, maps, entry["words"][w])
                 for w, (word, maps) in enumerate(zip(prompt.words, prompt.word_maps))]
        named.append((f"p{p}_prompt", "whole prompt", prompt.phrase, entry["phrase"]))
        for name, _, maps, map_entry in named:
            map_entry["overlay"] = f"{name}.png"
            visualize.save_png(folder / map_entry["overlay"], visualize.overlay(result.image, maps.heatmap, maps.box))
            arrays[f"{name}/heatmap"] = maps.heatmap
            if maps.soft is not None:
                arrays[f"{name}/soft"] = maps.soft
        entry["grid_figure"] = f"p{p}_grid.png"
        visualize.word_grid(result.image, [title for _, title, _, _ in named], [m.heatmap for _, _, m, _ in named],
                            [m.box for _, _, m, _ in named], f'{method}: "{prompt.prompt}"', folder / entry["grid_figure"])
        if prompt.similarity is not None:
            arrays[f"p{p}_similarity"] = prompt.similarity
    if save_npz:
        np.savez_compressed(folder / "maps.npz", **{k: v.astype(np.float32) for k, v in arrays.items()})
        record["npz"] = "maps.npz"
    return record


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tclip_jax.files import staged_folder

    for path in map(pathlib.Path, args.images):
        if not path.exists():
            raise FileNotFoundError(f"image not found: {path}")
        if not path.is_file():
            raise ValueError(f"{path} is {'a folder' if path.is_dir() else 'not a regular file'}, not an image file")
    method = build_method(args)
    encoded = method.encode_prompts(args.prompt)  # fails early on a bad prompt, before any output
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image_path, name in tqdm(list(zip(args.images, _unique_names(args.images))), desc="explain", unit="image"):
        target = out / name
        with staged_folder(target) as staging:
            record = write_result(method.explain(image_path, encoded), image_path, staging, args.save_npz)
            (staging / "result.json").write_text(json.dumps(record, indent=2) + "\n")
        tqdm.write(f"{image_path}: {target}/ (overlays, grid figure, result.json)")
    return 0
