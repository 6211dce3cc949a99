"""`tclip explain IMAGE... --prompt "..."`: per-word overlays, a grid figure and result.json per image.

Each image's outputs are written through `staged_folder`, so an interrupted run never leaves a
half-written result folder.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re

import numpy as np
from tqdm import tqdm

from tclip_jax import visualize
from tclip_jax.files import staged_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to explain word by word (repeat for several prompts)")
    parser.add_argument("--model", default=None,
                        help="hub name, Hugging Face / OpenCLIP / converted folder, OpenAI .pt or state dict "
                             "(default: the embedded synthetic-scenes model)")
    parser.add_argument("--out", default="tclip_out", help="output folder (default: %(default)s)")
    parser.add_argument("--method", default="tclip",
                        help="tclip (per word, default) or a baseline of tclip_jax.methods.registry, one map "
                             "per prompt (an unknown name lists them)")
    parser.add_argument("--translations", type=int, choices=(25, 1), default=25,
                        help="translated copies: 25 (multi-scale) or 1 (off)")
    parser.add_argument("--protocol", choices=("whole", "center_crop", "patch_multiple"), default="whole",
                        help="whole image resized to the model input (default), CLIP's center crop, or each side "
                             "resized to a multiple of the patch size")
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


def write_baseline_result(image: np.ndarray, heatmaps: np.ndarray, prompts: list[str], image_path: str,
                          folder: pathlib.Path, save_npz: bool) -> dict:
    """One overlay per prompt (a baseline explains whole prompts), a grid figure, and the JSON record."""
    from tclip_jax.postprocess import heatmap_box

    boxes = [heatmap_box(heatmap) for heatmap in heatmaps]
    entries = []
    for p, (prompt, heatmap, box) in enumerate(zip(prompts, heatmaps, boxes)):
        overlay_name = f"p{p}_{_slug(prompt)}.png"
        visualize.save_png(folder / overlay_name, visualize.overlay(image, heatmap, box))
        entries.append({"prompt": prompt, "box_xyxy": list(map(int, box)), "overlay": overlay_name})
    visualize.word_grid(image, prompts, list(heatmaps), boxes, pathlib.Path(image_path).name, folder / "grid.png")
    record = {"image": str(image_path), "size_hw": list(image.shape[:2]), "prompts": entries,
              "grid_figure": "grid.png"}
    if save_npz:
        np.savez_compressed(folder / "maps.npz", heatmaps=heatmaps.astype(np.float32))
        record["npz"] = "maps.npz"
    return record


def _tclip_records(args: argparse.Namespace):
    """(header, per-image writer) for TCLIP."""
    from tclip_jax.checkpoints.load import load_clip
    from tclip_jax.method.explainer import TCLIP, Settings

    settings = Settings(translations=args.translations, protocol=args.protocol, trim=args.trim, sigma=args.sigma,
                        truncate=args.truncate)
    explainer = TCLIP(load_clip(args.model), settings)
    encoded = explainer.encode_prompts(args.prompt)  # fails early on a bad prompt, before any output
    header = {"method": "tclip", "model": explainer.clip.origin, "model_source": explainer.clip.source,
              "settings": {"translations": settings.translations, "scale_fractions": settings.scale_fractions,
                           "trim": settings.trim, "protocol": settings.protocol, "sigma": settings.sigma,
                           "box_rule": settings.box_rule, "gmm_seed": settings.gmm_seed}}

    def write(image_path: str, folder: pathlib.Path) -> dict:
        return write_image_result(explainer.explain(image_path, encoded), image_path, folder, args.save_npz)

    return header, write


def _baseline_records(args: argparse.Namespace):
    """(header, per-image writer) for a baseline, through the same Method adapter as sweeps."""
    from tclip_jax.image import load_image, to_original
    from tclip_jax.sweep.methods import build_method

    if args.method not in _baseline_names():
        raise ValueError(f"unknown method {args.method!r}; available: tclip, {', '.join(_baseline_names())}")
    method = build_method(args.method, args.model, args.prompt)
    class_ids = np.arange(len(args.prompt), dtype=np.int32)[None]
    header = {"method": args.method, "model": args.model or "embedded default"}

    def write(image_path: str, folder: pathlib.Path) -> dict:
        image = load_image(image_path)
        pixels, geometry = method.preprocess(image)
        heatmaps = to_original(np.asarray(method.maps(method.params, pixels[None], class_ids))[0], geometry)
        return write_baseline_result(image, heatmaps, args.prompt, image_path, folder, args.save_npz)

    return header, write


def _baseline_names() -> list[str]:
    from tclip_jax.methods.registry import BASELINES

    return sorted(BASELINES)


def run(args: argparse.Namespace) -> int:
    for path in args.images:
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"image not found: {path}")
    header, write = (_tclip_records if args.method == "tclip" else _baseline_records)(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image_path, name in tqdm(list(zip(args.images, _unique_names(args.images))), desc="explain", unit="image"):
        target = out / name
        with staged_folder(target) as staging:
            record = write(image_path, staging)
            (staging / "result.json").write_text(json.dumps({**header, **record}, indent=2) + "\n")
        tqdm.write(f"{image_path}: {target}/ (overlays, grid figure, result.json)")
    return 0
