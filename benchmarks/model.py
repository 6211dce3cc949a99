"""Conversion cost and ViT-B/32 image-forward time, tclip_jax (jitted) next to transformers (PyTorch).

A random-init transformers CLIPModel of the ViT-B/32 configuration is saved as a Hugging Face folder
(safetensors); `tclip convert` runs on it in a fresh process (time and peak resident memory); then
both implementations embed the same batch of 1 and 25 images with identical weights, in turn in each timed
round (`interleaved_medians`).

    python benchmarks/model.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks._common import (check_output_options, command_line, interleaved_medians,  # noqa: E402
                                load_average, machine_description, markdown_table, positive_int, run_main, today,
                                write_section)

CONVERT_PROBE = """
import json, resource, sys, time
start = time.perf_counter()
from tclip_jax.cli import main
status = main(["convert", sys.argv[1], "--out", sys.argv[2]])
print(json.dumps({"status": status, "seconds": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure_conversion(hf_folder: pathlib.Path, out: pathlib.Path) -> dict:
    completed = subprocess.run([sys.executable, "-c", CONVERT_PROBE, str(hf_folder), str(out)],
                               capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args(argv)
    check_output_options(parser, "model", write=not args.no_write)
    import jax  # imported after the arguments are parsed: --help and argument errors stay fast
    import torch
    import transformers

    from tclip_jax.checkpoints.load import load_clip
    from tclip_jax.model import PRESETS, to_hf_config

    load = load_average()
    config = PRESETS["ViT-B/32"]
    torch.manual_seed(0)
    reference = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(config))).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_folder = pathlib.Path(tmp) / "hf"
        reference.save_pretrained(hf_folder)
        size_mib = (hf_folder / "model.safetensors").stat().st_size / 2**20
        conversion = measure_conversion(hf_folder, pathlib.Path(tmp) / "converted")
        rows.append(("convert HF folder (ViT-B/32, %.0f MiB safetensors)" % size_mib,
                     f"{conversion['seconds']:.1f} s", f"peak RSS {conversion['peak_rss_mib']:.0f} MiB"))
        clip = load_clip(pathlib.Path(tmp) / "converted")

    encode = jax.jit(lambda params, x: clip.model.apply({"params": params}, x, method="encode_image").embeds)
    for batch in (1, 25):
        images = np.random.default_rng(batch).standard_normal((batch, 224, 224, 3)).astype(np.float32)
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

        def torch_forward():
            with torch.inference_mode():
                return reference.get_image_features(pixel_values=pixels)

        medians, first = interleaved_medians(
            {"jax": lambda: encode(clip.params, images).block_until_ready(), "torch": torch_forward}, args.repeats)
        expected = getattr(first["torch"], "pooler_output", first["torch"]).numpy()
        error = float(np.abs(np.asarray(first["jax"]) - expected).max())
        ours, theirs = medians["jax"], medians["torch"]
        rows.append((f"image forward, batch {batch}", f"JAX {ours * 1e3:.0f} ms",
                     f"PyTorch {theirs * 1e3:.0f} ms (PyTorch/JAX {theirs / ours:.2f}; max abs diff {error:.1e})"))

    table = markdown_table(("what", "tclip_jax", "reference"), rows)
    body = (f"## Model: conversion and ViT-B/32 image forward (CPU)\n\n"
            f"Machine: {machine_description()}\n\nDate: {today()}; load average before the run: {load}\n\n"
            f"Command: `{command_line()}` (median of {args.repeats} rounds, JAX and PyTorch in turn, "
            f"after a warm-up call)\n\n{table}\n")
    print(body)  # as the other scripts: the whole section, written or not
    if not args.no_write:
        write_section("model", body)


if __name__ == "__main__":
    run_main(main)
