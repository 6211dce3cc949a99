"""Where TCLIP's time goes on an accelerator: device vs host per image, float32 vs bfloat16 matmuls.

For each model (random weights: ViT-B/32, ViT-L/14), matmul dtype (float32, bfloat16: ``CLIP(config,
dtype=jnp.bfloat16)``, parameters stay float32), workload (one 10-word prompt; the 80 COCO class names as 80
prompts) and batch size (1, 8, 32 images of 640x480, held-out synthetic scenes, ``whole`` protocol, K = 25):

- device ms/image: ``TCLIP.device_maps`` (25 translated copies through the image tower, relevance, shift-back,
  trimmed mean) on one batch, ``block_until_ready``, divided by the batch size;
- floor ms/image: the image tower alone on the batch's 25 translated copies (the least any K = 25 method does);
- host ms/image: ``to_original`` + ``soft_maps_and_boxes`` (soft maps, GMM fits, boxes) of one image's maps;
- explain ms/image: ``explain_batch`` end to end over the images (prompts encoded once), per image;
- explain/floor.
Then, per model and workload, bfloat16 against float32 on the same images (`compare_dtypes`): the largest and
the median difference of the aggregated maps (image size), each map's in units of its float32 map's range, the
largest of tau in the same units, and how many boxes agree. Medians of ``--repeats`` timed runs after a compiling
warm-up.

    python benchmarks/gpu_profile.py --results $OUT/RESULTS.md   # on a GPU machine (a few minutes)
    python benchmarks/gpu_profile.py --smoke                      # CPU, tiny model and sizes: checks the script
    python benchmarks/gpu_profile.py --embedded-dtypes 16         # any device: bf16 vs fp32 on a trained model,
                                                                  # every method (--methods: some); 8 min, 2 CPUs

Without a GPU (and without --smoke or --embedded-dtypes) it says so and exits 0 without measuring or writing
anything. Random weights give nearly flat maps, whose small range rounding swamps; `--embedded-dtypes N` makes
the same bfloat16-vs-float32 comparison on the embedded default model (trained) for every registered method, each
under its own default settings and input protocol (TCLIP: K = 25, `whole`), on N held-out scenes each with its
own caption (its words and the whole caption for TCLIP, the caption for prompt-level methods; the label set of
set-dependent methods, CLIP Surgery and the decomposition, is a synthetic sweep's: `SYNTHETIC_CLASSES`, since
explain's, the one caption, is too small for the decomposition), and writes its own section; boxes and TCLIP's
tau come from each method's own `postprocess`, as in `explain`. `--smoke` never writes RESULTS.md (nor
--results); `--json` holds the raw rows of any run that measures, a smoke run's or an --embedded-dtypes run's too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # also run as a script
from benchmarks._common import (PROMPT, RESULTS_PATH, check_output_file, check_output_options,  # noqa: E402
                                command_line, floor_pass, load_average, machine_description, markdown_table,
                                median_seconds, positive_int, positive_seconds, refuse_part_of_a_table, run_main,
                                timed_tclip, today, workloads, write_section)
from tclip_jax.checkpoints.load import LoadedClip, load_clip  # noqa: E402
from tclip_jax.evaluation.datasets.synthetic import SYNTHETIC_CLASSES  # noqa: E402
from tclip_jax.image import to_original  # noqa: E402
from tclip_jax.methods import REGISTRY, get  # noqa: E402
from tclip_jax.methods.base import HostMaps, Method, distinct_queries  # noqa: E402
from tclip_jax.methods.tclip import TCLIP  # noqa: E402
from tclip_jax.model import CLIP, PRESETS, CLIPConfig, init_params  # noqa: E402
from tclip_jax.model.tokenizer import default_tokenizer  # noqa: E402
from tclip_jax.postprocess.soft import soft_maps_and_boxes  # noqa: E402
from tclip_jax.synthetic import HELDOUT_SEED_START, make_scene  # noqa: E402
from tclip_jax.files import write_text_atomic  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODELS, BATCHES = ("ViT-B/32", "ViT-L/14"), (1, 8, 32)  # the table's rows (with the dtypes and workloads)
SMOKE_CONFIG = CLIPConfig(embed_dim=32, image_size=64, patch_size=16, vision_width=64, vision_layers=2,
                          vision_heads=2, vision_mlp_dim=128, vocab_size=49408, context_length=77, text_width=64,
                          text_layers=2, text_heads=2, text_mlp_dim=128)


@dataclasses.dataclass
class Plan:
    models: tuple[str, ...]
    batches: tuple[int, ...]
    workloads: dict[str, tuple[str, ...]]
    image_hw: tuple[int, int]
    repeats: int
    explain_images: int  # at least this many images (and at least one batch) go through explain_batch


def full_plan(args) -> Plan:
    return Plan(tuple(args.models), tuple(args.batches),
                {"1 prompt": (PROMPT,), "80 COCO prompts": workloads()["coco80"]},
                (480, 640), args.repeats, args.explain_images)


def smoke_plan() -> Plan:
    return Plan(("tiny",), (1, 2), {"1 prompt": (PROMPT,), "5 COCO prompts": workloads()["coco80"][:5]},
                (96, 128), 1, 2)


def build(config: CLIPConfig, params, dtype, name: str) -> TCLIP:
    return timed_tclip(LoadedClip(CLIP(config, dtype=dtype), params, default_tokenizer(), "tclip", f"random {name}"))


def profile(plan: Plan, configs: dict[str, CLIPConfig], images: list[np.ndarray], deadline: float) -> list[dict]:
    """Every (batch, model, workload, dtype), the most telling batch sizes first so that a time budget cuts the
    least useful ones; bfloat16 vs float32 is compared on the first batch size's maps."""
    models = {}
    for name, config in configs.items():
        params = init_params(config, seed=0)
        models[name] = {d: build(config, params, dtype, name) for d, dtype in DTYPES.items()}
    order = sorted(plan.batches, key=lambda b: (b != 8, b != 32, b))
    rows, compared_maps = [], {}
    for batch in order:
        for name, tclips in models.items():
            for workload, prompts in plan.workloads.items():
                for dtype_name, tclip in tclips.items():
                    if time.perf_counter() > deadline:
                        rows.append({"model": name, "dtype": dtype_name, "workload": workload, "batch": batch,
                                     "skipped": True})
                        continue
                    row, maps = measure(tclip, prompts, images, batch, plan)
                    rows.append({"model": name, "dtype": dtype_name, "workload": workload, **row})
                    print(json.dumps(rows[-1]), flush=True)
                    if batch == order[0]:
                        compared_maps.setdefault((name, workload), {})[dtype_name] = maps
    for (name, workload), maps_by_dtype in compared_maps.items():
        if len(maps_by_dtype) == len(DTYPES):
            outputs = {d: [(m, models[name][d].postprocess(m)) for m in maps] for d, maps in maps_by_dtype.items()}
            rows.append({"model": name, "method": "tclip", "workload": workload, **compare_dtypes(outputs)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def measure(tclip: TCLIP, prompts, images: list[np.ndarray], batch: int, plan: Plan) -> tuple[dict, list]:
    """Timings of one configuration, and its image-size maps of the batch (for the dtype comparison)."""
    encoded = tclip.encode_prompts(prompts)
    loaded = [tclip.preprocess(image) for image in images[:batch]]
    pixels = np.stack([p for _, p, _ in loaded])
    rows = np.broadcast_to(np.arange(len(encoded.queries), dtype=np.int32), (batch, len(encoded.queries)))
    device_maps = lambda: tclip.jitted_maps(tclip.params, pixels, encoded.queries, rows).maps  # noqa: E731
    device = median_seconds(lambda: jax.block_until_ready(device_maps()), plan.repeats)[0] / batch
    floor = median_seconds(lambda: floor_pass(tclip, pixels), plan.repeats)[0] / batch
    maps = np.asarray(device_maps())
    first, geometry = maps[0], loaded[0][2]
    host = median_seconds(lambda: soft_maps_and_boxes(to_original(first, geometry)), plan.repeats)[0]
    count = max(plan.explain_images, batch)
    explain_images = [images[i % len(images)] for i in range(count)]
    explain = median_seconds(lambda: list(tclip.explain_batch(explain_images, encoded, batch_size=batch)),
                             1)[0] / count
    row = {"batch": batch, "maps": len(encoded.queries), "device_ms": device * 1e3, "floor_ms": floor * 1e3,
           "host_ms": host * 1e3, "explain_ms": explain * 1e3, "explain_over_floor": explain / floor, "skipped": False}
    return row, [to_original(m, g) for m, (_, _, g) in zip(maps, loaded)]


def embedded_dtype_rows(scenes: int, methods: Sequence[str] = tuple(REGISTRY)) -> list[dict]:
    """bfloat16 against float32 of each of `methods` (registered names) on the embedded default model, each under
    its default settings: each held-out scene (640x480) with its own caption, one scene at a time; maps at the image
    size, boxes (and TCLIP's tau) from the method's `postprocess` within the part of the image its model saw."""
    clips = {name: load_clip(dtype=dtype) for name, dtype in DTYPES.items()}
    drawn = [make_scene(HELDOUT_SEED_START + i, (480, 640)) for i in range(scenes)]
    rows = []
    for method_name in methods:
        outputs = {}
        for dtype_name, clip in clips.items():
            method = get(method_name)(clip)
            outputs[dtype_name] = [scene_outputs(method, scene.image, scene.caption) for scene in drawn]
        rows.append({"model": "embedded default", "method": method_name, "workload": f"{scenes} held-out scenes",
                     **compare_dtypes(outputs)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def scene_outputs(method: Method, image: np.ndarray, caption: str) -> tuple[np.ndarray, list[HostMaps]]:
    """The image-size maps [Q, H, W] of the caption's distinct queries as `explain` makes them (TCLIP: each word,
    then the caption; a prompt-level method: the caption), against the label set `SYNTHETIC_CLASSES`, and their
    host step (`Method.postprocess` within `Geometry.covered`)."""
    tokens = method.tokenize([caption])
    words, queries = method.explained_queries(tokens)
    encoded = distinct_queries(tokens, words, method.encode(queries, label_set=SYNTHETIC_CLASSES), method.encoder)
    maps, _, geometry = method.input_maps(image, encoded.queries)
    maps = np.asarray(method.original_maps(maps, geometry))
    return maps, method.postprocess(maps, covered=geometry.covered)


def compare_dtypes(outputs_by_dtype: dict[str, list[tuple[np.ndarray, list[HostMaps]]]]) -> dict:
    """bfloat16 against float32 over images, from {dtype: per image (maps [Q, H, W], their `HostMaps`)}: the largest
    and the median over maps of max |map difference| / the float32 map's range (1 where that range is 0), the
    largest |tau difference| in the same units (None for a method without tau) and how many boxes are equal."""
    map_diffs, tau_diffs, boxes_equal = [], [], []
    for (reference, hosts_ref), (low, hosts_low) in zip(outputs_by_dtype["float32"], outputs_by_dtype["bfloat16"]):
        span = np.ptp(reference, axis=(1, 2))
        span = np.where(span > 0, span, 1.0)
        map_diffs.extend(np.abs(low - reference).max(axis=(1, 2)) / span)
        for a, b, s in zip(hosts_ref, hosts_low, span):
            if a.gmm is not None:
                tau_diffs.append(abs(a.gmm.tau - b.gmm.tau) / s)
            boxes_equal.append(a.box == b.box)
    return {"bf16_map_diff": float(np.max(map_diffs)), "bf16_map_diff_median": float(np.median(map_diffs)),
            "bf16_tau_diff": float(np.max(tau_diffs)) if tau_diffs else None,
            "bf16_boxes_equal": f"{sum(boxes_equal)}/{len(boxes_equal)}"}


def dtype_table(rows: list[dict]) -> str:
    return markdown_table(
        ["model", "method", "workload", "max |map bf16 - fp32| / range", "median over maps",
         "max |tau bf16 - fp32| / range", "boxes equal"],
        [[r["model"], r["method"], r["workload"], f"{r['bf16_map_diff']:.1e}", f"{r['bf16_map_diff_median']:.1e}",
          "-" if r["bf16_tau_diff"] is None else f"{r['bf16_tau_diff']:.1e}", r["bf16_boxes_equal"]]
         for r in rows if "bf16_map_diff" in r])


def report(rows: list[dict], plan: Plan, machine: str, loads: tuple[str, str], elapsed: float) -> str:
    timed = [r for r in rows if "batch" in r]
    table = markdown_table(
        ["model", "matmuls", "workload", "batch", "maps/image", "device ms/img", "floor ms/img", "host ms/img",
         "explain ms/img", "explain/floor"],
        [[r["model"], r["dtype"], r["workload"], r["batch"]]
         + (["skipped (time budget)"] + [""] * 5 if r["skipped"] else
            [r["maps"], f"{r['device_ms']:.2f}", f"{r['floor_ms']:.2f}", f"{r['host_ms']:.1f}",
             f"{r['explain_ms']:.1f}", f"{r['explain_over_floor']:.1f}"]) for r in timed])
    compared = dtype_table(rows)
    return "\n".join([
        "## TCLIP on an accelerator: device vs host time per image, float32 vs bfloat16", "",
        f"- date: {today()}", f"- machine: {machine}", f"- command: `{command_line()}`",
        f"- load average before: {loads[0]}; after: {loads[1]}; took {elapsed / 60:.1f} min",
        f"- random weights; {plan.image_hw[1]}x{plan.image_hw[0]} held-out synthetic scenes; K = 25; device, floor "
        f"and host: median of {plan.repeats} runs after a compiling warm-up; host = to_original + "
        "soft_maps_and_boxes of one image's maps (one distinct query per map); explain: one timed run of "
        f"explain_batch over max({plan.explain_images}, batch) images, per image", "", table, "", compared])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny model and sizes (with --embedded-dtypes: that comparison as asked); writes "
                             "nothing to the results file (--json is still written)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(PRESETS),
                        help="default: %(default)s (leaving one out needs --no-write)")
    parser.add_argument("--batches", nargs="+", type=positive_int, default=list(BATCHES),
                        help="batch sizes, >= 1 (default: %(default)s; leaving one out needs --no-write)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--explain-images", type=positive_int, default=8, help="images of the explain rows, >= 1")
    parser.add_argument("--budget-s", type=positive_seconds, default=420.0,
                        help="configurations not started within this many seconds (> 0) are reported as skipped "
                             "(batch 8 first, then 32, then 1); a run that measures none writes nothing")
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS_PATH)
    parser.add_argument("--json", type=pathlib.Path,
                        help="also write the raw rows here (with --smoke, --no-write or --embedded-dtypes too)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the results file as it is")
    parser.add_argument("--embedded-dtypes", type=positive_int, metavar="N",
                        help="only compare bfloat16 with float32 maps of every registered method on the embedded "
                             "default model on N held-out scenes (any device; its own section)")
    parser.add_argument("--methods", nargs="+", choices=tuple(REGISTRY), metavar="METHOD",
                        help=f"with --embedded-dtypes: some of {', '.join(REGISTRY)} (default: all; some need "
                             "--no-write)")
    args = parser.parse_args(argv)
    dtypes_only = args.embedded_dtypes is not None  # its own section
    if args.methods is not None and not dtypes_only:
        parser.error("--methods chooses the methods of --embedded-dtypes; the profile measures TCLIP alone")
    methods = tuple(dict.fromkeys(args.methods or REGISTRY))
    write = not args.no_write and not args.smoke  # a smoke run writes nothing to the results file
    check_output_options(parser, "dtype-maps" if dtypes_only else "gpu-profile", args.results, write=write)
    refuse_part_of_a_table(parser, "--methods measures", set(methods) != set(REGISTRY), write=write and dtypes_only,
                           results_path=args.results)
    refuse_part_of_a_table(parser, "--models or --batches measure",
                           not set(MODELS) <= set(args.models) or not set(BATCHES) <= set(args.batches),
                           write=write and not dtypes_only, results_path=args.results)
    if args.json:
        check_output_file(parser, args.json, "--json")
    if dtypes_only:
        started, load_before = time.perf_counter(), load_average()
        rows = embedded_dtype_rows(args.embedded_dtypes, methods)
        text = "\n".join([
            "## bfloat16 against float32 matmuls on a trained model (the embedded default model)", "",
            f"- date: {today()}", f"- machine: {machine_description()}", f"- command: `{command_line()}`",
            f"- load average before: {load_before}; after: {load_average()}; took "
            f"{(time.perf_counter() - started) / 60:.1f} min",
            f"- held-out seeds {HELDOUT_SEED_START}..{HELDOUT_SEED_START + args.embedded_dtypes - 1} (640x480), each "
            "scene its own caption: TCLIP maps each word and the caption, a prompt-level method the caption; the "
            "label set of CLIP Surgery and the decomposition: `SYNTHETIC_CLASSES` (a synthetic sweep's)",
            "- every method under its default settings and input protocol (TCLIP: K = 25, `whole`); maps at image "
            "size; per map max |bf16 - fp32| / the fp32 map's range, its largest and median over the maps; tau "
            "(TCLIP's alone) and boxes from each method's `postprocess`, as `explain` makes them", "",
            dtype_table(rows)])
        print(text)
        if args.json:
            write_text_atomic(args.json, json.dumps(rows, indent=1))
        if write:
            write_section("dtype-maps", text, args.results)
        return 0
    platforms = sorted({d.platform for d in jax.devices()})
    if not args.smoke and not any(p in ("gpu", "cuda", "rocm") for p in platforms):
        print(f"gpu_profile: no GPU (JAX devices: {', '.join(platforms)}); nothing measured, nothing written. "
              "Run it on a GPU machine, or with --smoke to check the script on CPU.")
        return 0
    plan = smoke_plan() if args.smoke else full_plan(args)
    started, load_before = time.perf_counter(), load_average()
    deadline = started + (1e9 if args.smoke else args.budget_s)
    images = [make_scene(HELDOUT_SEED_START + i, plan.image_hw).image for i in range(max(plan.batches))]
    configs = {name: SMOKE_CONFIG if name == "tiny" else PRESETS[name] for name in plan.models}
    rows = profile(plan, configs, images, deadline)
    text = report(rows, plan, machine_description(), (load_before, load_average()), time.perf_counter() - started)
    print(text)
    if not any(r.get("skipped") is False for r in rows):
        print(f"{parser.prog}: no configuration started within --budget-s {args.budget_s:g}; nothing written",
              file=sys.stderr)
        return 1
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1))
    if args.smoke:
        bad = [r for r in rows if "device_ms" in r and not np.isfinite([r["device_ms"], r["host_ms"]]).all()]
        if bad or not any("bf16_map_diff" in r for r in rows):
            print("gpu_profile --smoke: FAILED", file=sys.stderr)
            return 1
        print(f"gpu_profile --smoke: ok (nothing written{'' if args.json is None else ' but --json'})")
        return 0
    if write:
        write_section("gpu-profile", text, args.results)
    return 0


if __name__ == "__main__":
    run_main(main)
