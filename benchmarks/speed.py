"""Per-image speed of TCLIP (K = 25 translations) at ViT-B/32 size.

Rows, per image (median of --repeats timed runs after one warm-up):
  (a) tclip_jax end to end: `TCLIP.explain(image, prompts)` (prompt encoding, device maps, GMM, Otsu, boxes)
  (a') the same with the prompts encoded once beforehand (`explain(image, tclip.encode_prompts(prompts))`), the
      per-image cost of a sweep or an `explain_batch` over many images with the same prompts
  (b) its device part: `TCLIP.maps` (jitted) + `block_until_ready`
  (c) the floor: one batched forward of the 25 translated copies through the image tower, JAX and PyTorch
  (d) a straightforward PyTorch pipeline as a researcher would write it: transformers `CLIPModel`, the 25
      copies one after another in a Python loop, `F.interpolate`, numpy shift-back, `scipy.stats.trim_mean`
      over the valid copies of each pixel; then tclip_jax's own post-processing, one map per call (`soft_map`:
      its histogram GMM, floor and blur; `heatmap_box`: cv2 Otsu and the largest component), not a
      researcher's scikit-learn GMM, which is slower (host_step.py's "old"), so d/a leaves that cost out.
Both sides run identical random ViT-B/32 weights (a transformers CLIPModel converted to ours), so (a) and
(d) must give the same maps; their largest difference is reported. Both post-process with the same functions,
so the tau difference and the equal boxes follow from the maps' difference alone. Workloads: one 10-word
prompt, and the 80 COCO class names as 80 prompts; one 640x480 synthetic photo-like image, `whole` protocol.

`--profile` adds where (a)'s time goes.

    python benchmarks/speed.py [--repeats 3] [--profile] [--threads 1]
    python benchmarks/speed.py --device-report --results $OUT/RESULTS.md   # on an accelerator machine
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import pathlib
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
import transformers
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # also run as a script
from benchmarks._common import (IMAGE_HW, RESULTS_PATH, check_output_options, command_line,  # noqa: E402
                                interleaved_medians, load_average, machine_description, markdown_table,
                                photo_like_image, positive_int, refuse_part_of_a_table, run_main, timed_tclip, today,
                                workloads, write_section)
from tclip_jax.checkpoints.load import LoadedClip  # noqa: E402
from tclip_jax.methods.tclip.relevance import aggregate_maps, translated_patch_embeddings  # noqa: E402
from tclip_jax.methods.tclip.translations import translated_copies  # noqa: E402
from tclip_jax.model import CLIP, PRESETS, to_hf_config  # noqa: E402
from tclip_jax.postprocess.boxes import heatmap_box  # noqa: E402
from tclip_jax.postprocess.soft import soft_map  # noqa: E402
from tclip_jax.image import to_original, whole_image  # noqa: E402
from tclip_jax.model.tokenizer import default_tokenizer  # noqa: E402
from tclip_jax.checkpoints.convert import convert_state_dict  # noqa: E402

WORKLOADS = workloads()


@dataclasses.dataclass(frozen=True)
class MapOut:
    """One explained word or phrase: the aggregated map at the original size and its post-processing."""

    heatmap: np.ndarray
    tau: float
    box: tuple[int, int, int, int]


# --- models and inputs --------------------------------------------------------------------------------------


def build_models(seed: int, torch_device: str) -> tuple[transformers.CLIPModel, LoadedClip]:
    """A random-init transformers ViT-B/32 CLIPModel and the same weights converted to tclip_jax."""
    config = PRESETS["ViT-B/32"]
    torch.manual_seed(seed)
    hf = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(config))).eval()
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    clip = LoadedClip(CLIP(config), convert_state_dict(state, config, "hf"), default_tokenizer(), "hf",
                      f"random ViT-B/32 (torch seed {seed})")
    return hf.to(torch_device), clip


def flat_maps(result) -> list[MapOut]:
    """(a)'s maps in query order: every prompt's words, then every prompt's phrase."""
    words = [m for p in result.prompts for m in p.word_maps]
    return [MapOut(m.heatmap, m.tau, tuple(m.box)) for m in words + [p.phrase for p in result.prompts]]


# --- (c) the floor: one batched image-tower forward ---------------------------------------------------------


def jax_floor(clip: LoadedClip, copies: np.ndarray) -> Callable[[], object]:
    encode = jax.jit(lambda params, x: clip.model.apply({"params": params}, x, method="encode_image").tokens)
    copies = jnp.asarray(copies)
    return lambda: encode(clip.params, copies).block_until_ready()


def torch_floor(hf: transformers.CLIPModel, copies: np.ndarray, device: str) -> Callable[[], object]:
    pixels = torch.from_numpy(copies).permute(0, 3, 1, 2).contiguous().to(device)

    def run():
        with torch.inference_mode():
            hidden = hf.vision_model(pixel_values=pixels).last_hidden_state
            out = hf.visual_projection(hf.vision_model.post_layernorm(hidden))
        _synchronize(device)
        return out

    return run


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- (d) the straightforward PyTorch pipeline ---------------------------------------------------------------


def torch_pipeline(hf: transformers.CLIPModel, image: np.ndarray, prompts, offsets, trim: float,
                   device: str) -> list[MapOut]:
    """TCLIP's maps as a researcher would write them in PyTorch + numpy, post-processed by tclip_jax's `soft_map`
    and `heatmap_box` one map at a time; maps in (a)'s query order."""
    tokenizer = default_tokenizer()
    pixels, _ = whole_image(image, 224)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device)
    with torch.inference_mode():
        tokens = [tokenizer.tokenize_words(p) for p in prompts]
        ids = torch.from_numpy(np.stack([t.token_ids for t in tokens]).astype(np.int64)).to(device)
        text = F.normalize(hf.text_projection(hf.text_model(input_ids=ids).last_hidden_state), dim=-1)
        word_queries, phrase_queries = [], []
        for p, t in enumerate(tokens):
            words = [text[p, list(w.piece_positions)].mean(0) for w in t.words if not w.is_punctuation]
            word_queries += words
            phrase_queries.append(torch.stack(words).mean(0))
        queries = torch.stack(word_queries + phrase_queries)

        height, width = pixels.shape[:2]
        back = np.full((len(offsets), len(queries), height, width), np.nan, np.float32)
        for k, (dy, dx) in enumerate(offsets):
            shifted = torch.zeros_like(x)
            shifted[..., max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
                x[..., max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
            hidden = hf.vision_model(pixel_values=shifted).last_hidden_state[:, 1:]
            patches = F.normalize(hf.visual_projection(hf.vision_model.post_layernorm(hidden)), dim=-1)[0]
            grids = (queries @ patches.T).reshape(len(queries), 1, height // 32, width // 32)
            up = F.interpolate(grids, size=(height, width), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
            back[k, :, max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)] = \
                up[:, max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)]
        aggregated = trim_mean_over_valid(back, trim)
        original = F.interpolate(torch.from_numpy(aggregated)[:, None], size=image.shape[:2], mode="bilinear",
                                 align_corners=False)[:, 0].numpy()
    outputs = []
    for m in original:
        _, gmm = soft_map(m)
        outputs.append(MapOut(m, gmm.tau, tuple(heatmap_box(m))))
    return outputs


def trim_mean_over_valid(back: np.ndarray, trim: float) -> np.ndarray:
    """scipy trim_mean over the non-NaN copies of each pixel; back [K, Q, H, W] -> [Q, H, W].

    Pixels are grouped by which copies cover them (a few dozen rectangles), one trim_mean call per group.
    """
    copies, queries, height, width = back.shape
    valid = ~np.isnan(back[:, 0]).reshape(copies, -1)
    pattern = (valid * (1 << np.arange(copies))[:, None]).sum(0)
    flat = back.reshape(copies, queries, -1)
    out = np.empty((queries, height * width), np.float32)
    for key in np.unique(pattern):
        pixels = np.flatnonzero(pattern == key)
        covering = valid[:, pixels[0]]
        out[:, pixels] = scipy.stats.trim_mean(flat[covering][:, :, pixels], trim, axis=0)
    return out.reshape(queries, height, width)


# --- the benchmark ------------------------------------------------------------------------------------------


def run_workload(name, prompts, image, hf, tclip, copies, args) -> dict:
    """Times (a)-(d), and the profile stages if asked, round-robin; compares (a)'s maps with (d)'s."""
    trim, offsets, device = tclip.settings.trim, tclip.offsets, args.torch_device
    encoded = tclip.encode_prompts(prompts)
    _, pixels, geometry = tclip.preprocess(image)
    batch = pixels[None]
    rows = np.arange(len(encoded.queries), dtype=np.int32)[None]
    fns = {"a": lambda: flat_maps(tclip.explain(image, prompts)),
           "a_encoded": lambda: flat_maps(tclip.explain(image, encoded)),
           "b": lambda: jax.block_until_ready(tclip.jitted_maps(tclip.params, batch, encoded.queries, rows)),
           "c_jax": jax_floor(tclip.clip, copies),
           "c_torch": torch_floor(hf, copies, device),
           "d": lambda: torch_pipeline(hf, image, prompts, offsets, trim, device)}
    stages = {}
    if args.profile:
        stages.update(profile_stages(tclip, image, prompts, encoded, batch, geometry))
    medians, first = interleaved_medians({**fns, **stages}, args.repeats)
    ours, reference = first["a"], first["d"]
    if any(not np.array_equal(o.heatmap, e.heatmap) or o.box != e.box for o, e in zip(ours, first["a_encoded"])):
        raise AssertionError(f"{name}: explain with pre-encoded prompts differs from explain with the prompts")
    row = dict(name=name, prompts=len(prompts), maps=len(ours), **{k: medians[k] for k in fns},
               max_map_diff=max(float(np.abs(o.heatmap - r.heatmap).max()) for o, r in zip(ours, reference)),
               max_tau_diff=max(abs(o.tau - r.tau) for o, r in zip(ours, reference)),
               boxes_equal=sum(o.box == r.box for o, r in zip(ours, reference)),
               unique_queries=len(encoded.queries),
               stages={k: medians[k] for k in stages})
    return row


def profile_stages(tclip, image, prompts, encoded, batch, geometry) -> dict:
    """The stages of (a), one function each, on the distinct queries as (a) runs them."""
    model, params, offsets, trim = tclip.clip.model, tclip.clip.params, tclip.offsets, tclip.settings.trim
    size_hw = batch.shape[1:3]
    grid_hw = tuple(s // tclip.clip.config.patch_size for s in size_hw)
    queries = encoded.queries.per_query
    patches = translated_patch_embeddings(model, params, batch, offsets)[0]
    maps = np.asarray(aggregate_maps(patches, queries, offsets, grid_hw, size_hw, trim))
    original = list(to_original(maps, geometry))
    return {
        "encode prompts (text tower)": lambda: tclip.encode_prompts(prompts),
        "preprocess": lambda: tclip.preprocess(image),
        "ViT on 25 copies": lambda: translated_patch_embeddings(model, params, batch, offsets).block_until_ready(),
        "aggregate (einsum, sorting network, trimmed mean)": lambda: aggregate_maps(
            patches, queries, offsets, grid_hw, size_hw, trim).block_until_ready(),
        "to_original": lambda: to_original(maps, geometry),
        "host: soft maps and boxes (one batched call)": lambda: tclip.postprocess(original),
        "soft maps alone, one map per call": lambda: [soft_map(m) for m in original],
        "boxes alone, one map per call": lambda: [heatmap_box(m) for m in original],
    }


def report(rows, args, machine, loads) -> str:
    header = ["workload", "maps", "(a) explain", "(a') prompts encoded once", "(b) device", "(c) floor JAX",
              "(c) floor torch", "(d) PyTorch", "a/c", "a'/c", "d/a", "max abs map diff a-d", "tau diff", "boxes equal"]
    table = markdown_table(header, [
        [r["name"], r["maps"], f"{r['a']:.2f} s", f"{r['a_encoded']:.2f} s", f"{r['b']:.2f} s",
         f"{r['c_jax']:.2f} s", f"{r['c_torch']:.2f} s", f"{r['d']:.2f} s", f"{r['a'] / r['c_jax']:.2f}",
         f"{r['a_encoded'] / r['c_jax']:.2f}", f"{r['d'] / r['a']:.2f}", f"{r['max_map_diff']:.1e}",
         f"{r['max_tau_diff']:.1e}", f"{r['boxes_equal']}/{r['maps']}"] for r in rows])
    lines = [f"## Speed per image (TCLIP, K = 25, ViT-B/32 size, {IMAGE_HW[1]}x{IMAGE_HW[0]} image)", "",
             f"- date: {today()}", f"- machine: {machine}", f"- command: `{command_line()}`",
             f"- load average (1/5/15 min) before: {loads[0]}; after: {loads[1]}",
             f"- median of {args.repeats} round-robin rounds after a warm-up; a/c uses the JAX floor; torch on "
             f"{args.torch_device}; torch and BLAS/OpenMP threads: {args.threads or 'library defaults'}",
             "", table, ""]
    for r in rows:
        lines.append(f"- {r['name']}: {r['prompts']} prompt(s), {r['maps']} maps ({r['unique_queries']} distinct "
                     f"query vectors)")
        if r["stages"]:
            lines.append("  - stages: " + "; ".join(f"{k} {v:.2f} s" for k, v in r["stages"].items()))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS),
                        help="default: all (a subset needs --no-write)")
    parser.add_argument("--profile", action="store_true", help="time each stage of (a)")
    parser.add_argument("--threads", type=positive_int,
                        help="torch intra-op and BLAS/OpenMP threads for both pipelines, >= 1 (default: the "
                             "libraries' own)")
    parser.add_argument("--device-report", action="store_true",
                        help="accelerator run: torch on CUDA when available, section 'speed_device'")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS_PATH, help="markdown file to update")
    parser.add_argument("--section", help="results section (default 'speed', or 'speed_device')")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    args.torch_device = "cuda" if args.device_report and torch.cuda.is_available() else "cpu"
    args.section = args.section or ("speed_device" if args.device_report else "speed")
    check_output_options(parser, args.section, args.results, write=not args.no_write)
    refuse_part_of_a_table(parser, "--workloads measures", set(args.workloads) != set(WORKLOADS),
                           write=not args.no_write, results_path=args.results)
    if args.threads:
        torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads) if args.threads else contextlib.nullcontext():
        run(args)


def run(args) -> None:
    load_before = load_average()
    hf, clip = build_models(0, args.torch_device)
    tclip = timed_tclip(clip)
    image = photo_like_image(0)
    copies = np.array(translated_copies(whole_image(image, 224)[0], tclip.offsets))
    rows = [run_workload(name, WORKLOADS[name], image, hf, tclip, copies, args) for name in args.workloads]
    text = report(rows, args, machine_description(), (load_before, load_average()))
    print(text)
    if not args.no_write:
        write_section(args.section, text, args.results)


if __name__ == "__main__":
    run_main(main)
