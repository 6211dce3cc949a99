"""Sweep throughput on the held-out synthetic scenes: images/s and the share of time the device waits on the
host, with the batch split over 1 and over 4 simulated CPU devices (one subprocess each, since the device
count is fixed when JAX starts). Prints a Markdown table and rewrites the `sweeps` section of RESULTS.md.

    python benchmarks/sweep_throughput.py [--model PATH | --random-vit-b32] [--scenes 48] [--batch-size 8]
        [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks._common import (check_output_options, command_line, load_average, machine_description,  # noqa: E402
                                markdown_table, positive_int, run_main, timed_tclip, today, write_section)

DEVICE_COUNTS = (1, 4)


def measure(args: argparse.Namespace) -> dict:
    """One sweep in this process; its Throughput as a dict."""
    import dataclasses

    from tclip_jax.evaluation.datasets import synthetic_dataset
    from tclip_jax.methods.tclip import TCLIP
    from tclip_jax.sweep import RunOptions, run_sweep

    dataset = synthetic_dataset(args.scenes)
    method = timed_tclip() if args.random_vit_b32 else TCLIP.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as out:
        result = run_sweep(dataset, method, out,
                           options=RunOptions(args.batch_size, args.workers, progress=False))
    return dataclasses.asdict(result.throughput)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="any model load_clip accepts (default: the embedded one)")
    parser.add_argument("--random-vit-b32", action="store_true",
                        help="random ViT-B/32 weights instead, as the speed benchmarks time them")
    parser.add_argument("--scenes", type=positive_int, default=48)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--workers", type=positive_int, default=2)
    parser.add_argument("--measure", action="store_true", help="internal: run one sweep and print its throughput")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    check_output_options(parser, "sweeps", write=not args.no_write)
    if args.random_vit_b32 and args.model:
        parser.error("--random-vit-b32 and --model name two models; give one")
    if args.scenes <= args.batch_size:  # refused now: with one batch the steady rate and the waiting share are None
        parser.error(f"--scenes {args.scenes} with --batch-size {args.batch_size} is one batch; the rate after the "
                     "first batch and the device's waiting share need two: give more scenes than the batch size")
    if args.measure:
        print(json.dumps(measure(args)))
        return

    load_before = load_average()
    rows = []
    for devices in DEVICE_COUNTS:
        flags = [os.environ.get("XLA_FLAGS"), f"--xla_force_host_platform_device_count={devices}"]  # keep the user's
        env = {**os.environ, "XLA_FLAGS": " ".join(filter(None, flags))}
        child = subprocess.run([sys.executable, __file__, "--measure", *sys.argv[1:]], env=env,
                               capture_output=True, text=True)
        if child.returncode != 0:  # e.g. --model names no checkpoint: the measuring run's own last line
            reason = (child.stderr.strip().splitlines() or [f"status {child.returncode}"])[-1]
            parser.exit(2, f"{parser.prog}: error: the run on {devices} device(s) failed: {reason}\n")
        t = json.loads(child.stdout.strip().splitlines()[-1])
        assert t["devices"] == devices, t
        rows.append((devices, t["images"], t["batches"], f"{t['wall_seconds']:.1f}", f"{t['images_per_second']:.2f}",
                     f"{t['steady_images_per_second']:.2f}", f"{100 * t['device_wait_share']:.1f} %"))
    table = markdown_table(["simulated CPU devices", "images", "batches", "wall s (with compilation)", "images/s",
                            "images/s after the first batch", "device waiting on the host"], rows)
    model = "random ViT-B/32 weights (seed 0)" if args.random_vit_b32 else args.model or "the embedded default model"
    body = "\n\n".join([
        "## Sweep throughput: TCLIP (K=25) over the held-out synthetic scenes (CPU)",
        f"Machine: {machine_description()}",
        f"Date: {today()}; load average before the run: {load_before}",
        f"Command: `{command_line()}`",
        f"Model: {model}. Batch {args.batch_size} split over the devices, {args.workers} loader and "
        f"{args.workers} host threads. 'Device waiting on the host' is the share of the time after the first "
        "batch (which includes compilation) during which no batch was queued on the device.",
        table,
    ])
    print(body)
    if not args.no_write:
        write_section("sweeps", body)


if __name__ == "__main__":
    run_main(main)
