"""`tclip explain IMAGE... --prompt "..."`: per-word overlays, a grid figure and result.json per image.

Each image's outputs are written into a staging folder that is renamed into place when complete,
so an interrupted run never leaves a half-written result folder.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import tempfile

import numpy as np
from tqdm import tqdm

from tclip_jax import visualize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to explain word by word (repeat for several prompts)")
    parser.add_argument("--model", default=None,
                        help="hub name, Hugging Face / OpenCLIP / converted folder, OpenAI .pt or state dict "
                             "(default: the embedded synthetic-scenes model)")
    parser.add_argument("--out", default="tclip_out", help="output folder (default: %(default)s)")
    parser.add_argument("--translations", type=int, choices=(25, 1), default=25,
                        help="translated copies: 25 (multi-scale) or 1 (off)")
    parser.add_argument("--crop", choices=("whole", "center"), default="whole",
                        help="whole image resized to the model input (default) or CLIP's center crop")
    parser.add_argument("--trim", type=float, default=0.2, help="trimmed-mean proportion per end")
    parser.add_argument("--sigma", type=float, default=None, help="soft-map Gaussian sigma in pixels")
    parser.add_argument("--truncate", action="store_true", help="truncate prompts longer than 77 tokens")
    parser.add_argument("--save-npz", action="store_true", help="also save raw S, aggregated and soft maps")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "x"


def _unique_names(paths: list[str]) -> list[str]:
    names, seen = [], {}
    for path in paths:
        stem = _slug(pathlib.Path(path).stem)
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def write_image_result(result, image_path: str, folder: pathlib.Path, save_npz: bool) -> dict:
    """Writes overlays, the grid figure(s) and returns this image's JSON record."""
    record = {"image": str(image_path), "size_hw": list(result.image.shape[:2]), "grid": list(result.grid),
              "prompts": []}
    arrays = {}
    for p, prompt in enumerate(result.prompts):
        words = []
        for w, (word, maps) in enumerate(zip(prompt.words, prompt.word_maps)):
            overlay_name = f"p{p}_w{w}_{_slug(word.text)}.png"
            visualize.save_png(folder / overlay_name, visualize.overlay(result.image, maps.aggregated, maps.box))
            words.append({"word": word.text, "span": [word.start, word.end],
                          "pieces": [prompt.tokens.pieces[i - 1] for i in word.piece_positions],
                          "piece_positions": list(word.piece_positions), "tau": maps.tau,
                          "gmm_fallback": maps.gmm.fallback, "box_xyxy": list(map(int, maps.box)),
                          "overlay": overlay_name})
            arrays[f"p{p}/aggregated/{w}"] = maps.aggregated.astype(np.float32)
            arrays[f"p{p}/soft/{w}"] = maps.soft.astype(np.float32)
        grid_name = f"p{p}_grid.png"
        visualize.word_grid(result.image, [w.text for w in prompt.words],
                            [m.aggregated for m in prompt.word_maps], [m.box for m in prompt.word_maps],
                            f'"{prompt.prompt}"', folder / grid_name)
        arrays[f"p{p}/similarity"] = prompt.similarity.astype(np.float32)
        record["prompts"].append({"prompt": prompt.prompt, "pieces": list(prompt.tokens.pieces), "words": words,
                                  "phrase": {"tau": prompt.phrase.tau, "box_xyxy": list(map(int, prompt.phrase.box))},
                                  "grid_figure": grid_name})
    if save_npz:
        np.savez_compressed(folder / "maps.npz", **arrays)
        record["npz"] = "maps.npz"
    return record


def run(args: argparse.Namespace) -> int:
    from tclip_jax.loading import load_clip
    from tclip_jax.method.explainer import TCLIP, Settings

    settings = Settings(translations=args.translations, protocol=args.crop, trim=args.trim, sigma=args.sigma,
                        truncate=args.truncate)
    for path in args.images:
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"image not found: {path}")
    explainer = TCLIP(load_clip(args.model), settings)
    encoded = explainer.encode_prompts(args.prompt)  # fails early on a bad prompt, before any output
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = {"model": explainer.clip.origin, "model_source": explainer.clip.source,
              "settings": {"translations": settings.translations, "scale_fractions": settings.scale_fractions,
                           "trim": settings.trim, "protocol": settings.protocol, "sigma": settings.sigma,
                           "box_rule": settings.box_rule, "gmm_seed": settings.gmm_seed}}
    for image_path, name in tqdm(list(zip(args.images, _unique_names(args.images))), desc="explain", unit="image"):
        result = explainer.explain(image_path, encoded)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
        try:
            record = write_image_result(result, image_path, staging, args.save_npz)
            (staging / "result.json").write_text(json.dumps({**header, **record}, indent=2) + "\n")
            target = out / name
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        tqdm.write(f"{image_path}: {target}/ (result.json, {sum(len(p.words) for p in result.prompts)} "
                   f"word overlays, grid figure{'s' if len(result.prompts) > 1 else ''})")
    return 0
