"""The host step of many images on a many-core host: one image after another against threads over images.

`explain_batch` runs each image's host step (`soft_maps_and_boxes`: soft maps, GMM fits and boxes of all the
image's maps in one batched call) on one thread. On an accelerator the host step sets TCLIP's speed (the
gpu-profile section of RESULTS.md), and such machines have many cores. This times the host step of the word maps
of N held-out scenes (640x480, the embedded default model, each scene's own caption): one image after another,
then over a pool of T threads for each ``--threads`` T. BLAS and OpenCV are held to one thread each, so the
threads only ever work on different images. Median of ``--rounds`` rounds after a warm-up, each round running
every schedule in turn (`interleaved_medians`).

    python benchmarks/host_threads.py --threads 2 4 8 16
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import sys
import time

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # also run as a script
from benchmarks._common import (RESULTS_PATH, check_output_options, command_line, interleaved_medians,  # noqa: E402
                                load_average, machine_description, markdown_table, positive_int,
                                refuse_part_of_a_table, run_main, today, write_section)
from benchmarks.host_step import SIZES, explained_images  # noqa: E402
from tclip_jax.postprocess.soft import soft_maps_and_boxes  # noqa: E402

THREADS = (2, 4, 8, 16)  # the table's rows besides one thread


def time_schedules(images: list[np.ndarray], threads: list[int], rounds: int) -> dict[int, float]:
    """{threads: median wall seconds for the host steps of all images}; 1 = one image after another."""
    pools = {t: concurrent.futures.ThreadPoolExecutor(t) for t in threads}
    runs = {1: lambda: [soft_maps_and_boxes(m) for m in images],
            **{t: (lambda pool=pool: list(pool.map(soft_maps_and_boxes, images))) for t, pool in pools.items()}}
    walls, _ = interleaved_medians(runs, rounds)  # its warm-up call starts the threads and touches the pages
    for pool in pools.values():
        pool.shutdown()
    return walls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=list(THREADS),
                        help="thread counts >= 2, one row each besides one thread (default: %(default)s; leaving "
                             "one out needs --no-write)")
    parser.add_argument("--images", type=positive_int, default=32)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS_PATH)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    check_output_options(parser, "host-threads", args.results, write=not args.no_write)
    if min(args.threads) < 2:
        parser.error("--threads needs counts >= 2 (one thread is always timed)")
    refuse_part_of_a_table(parser, "--threads measures", not set(THREADS) <= set(args.threads),
                           write=not args.no_write, results_path=args.results)
    import tclip_jax

    load_before, started = load_average(), time.perf_counter()
    explainer = tclip_jax.TCLIP.from_pretrained()
    images = [maps for maps, _ in explained_images(explainer, SIZES["640x480"], args.images)]
    maps = sum(len(m) for m in images)
    cv2.setNumThreads(1)
    with threadpool_limits(1):
        walls = time_schedules(images, sorted(set(args.threads)), args.rounds)
    table = markdown_table(
        ["threads over images", "ms per map (wall)", "speed-up over one thread"],
        [[t, f"{w / maps * 1e3:.2f}", f"{walls[1] / w:.1f}x"] for t, w in walls.items()])
    text = "\n".join([
        "## Host step over many images: one thread against threads over images (640x480)", "",
        f"- date: {today()}", f"- machine: {machine_description()}; {len(os.sched_getaffinity(0))} CPUs allowed",
        f"- command: `{command_line()}`",
        f"- load average before: {load_before}; after: {load_average()}; took "
        f"{(time.perf_counter() - started) / 60:.1f} min",
        f"- {args.images} held-out scenes, {maps} word maps (the embedded default model, each scene's own caption); "
        f"`soft_maps_and_boxes` per image; BLAS and OpenCV one thread each; median of {args.rounds} rounds", "",
        table])
    print(text)
    if not args.no_write:
        write_section("host-threads", text, args.results)
    return 0


if __name__ == "__main__":
    run_main(main)
