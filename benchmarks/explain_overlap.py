"""Does `TCLIP.explain_batch` keep the device busy? The share of time the device waits on the host, ViT-B/32 size.

Per workload (one 10-word prompt; the 80 COCO class names as 80 prompts), random ViT-B/32 weights, K = 25,
`--images` 640x480 photo-like scenes at `--batch-size`:
- overlapped: `explain_batch(..., overlap=True)`, which dispatches batch i+1 to the device before the host step
  of batch i;
- serial: `explain_batch(..., overlap=False)`, each batch's host step before the next batch is dispatched.
`explain_batch` overlaps by default. Each result is dropped as it arrives (as a sweep writes and forgets it):
keeping 109 maps and soft maps at 640x480 per image (0.27 GB) makes later host steps slower (page faults on
fresh memory), which would confound the comparison.
'Overlapped / floor' is the overlapped wall time over the floor of the same images: their 25 translated copies
through the image tower alone, batch by batch, the least any K = 25 method does (prompts encoded once, outside).
The jitted maps are wrapped so that the sweep's `DeviceClock` notes when each batch finishes on the device;
'device waiting' is the sweep's `device_wait_share`: the share of the time from the first batch's finish to the
last's during which no batch was queued. Wall times: median of `--rounds` rounds, the two schedules alternating,
after one untimed warm-up pass (compilation). On this CPU the "device" is XLA:CPU on the same cores as the host
step, so the two compete; on an accelerator they do not.

    python benchmarks/explain_overlap.py [--images 6] [--batch-size 2] [--rounds 3] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # also run as a script
from benchmarks._common import (IMAGE_HW, check_output_options, command_line, floor_pass, load_average,  # noqa: E402
                                machine_description, markdown_table, photo_like_image, positive_int,
                                refuse_part_of_a_table, run_main, timed_tclip, today, workloads, write_section)

from tclip_jax.methods.tclip import TCLIP  # noqa: E402
from tclip_jax.sweep.runner import DeviceClock, device_busy_seconds, device_wait_share  # noqa: E402

WORKLOADS = workloads()


def clocked(tclip: TCLIP, clock: DeviceClock) -> None:
    """Wraps the method's jitted maps so that `clock` notes each dispatched batch."""
    jitted = tclip.jitted_maps

    def maps(*args):
        out = jitted(*args)
        clock.dispatched(out.maps)
        return out

    tclip.__dict__["jitted_maps"] = maps  # shadows the cached property on this instance


def images_floor(tclip: TCLIP, images: list, batch_size: int):
    """The floor of the same images, batch by batch (`floor_pass`)."""
    batches = [np.stack([tclip.preprocess(image)[1] for image in images[start:start + batch_size]])
               for start in range(0, len(images), batch_size)]
    return lambda: [floor_pass(tclip, pixels) for pixels in batches]


def measure(tclip: TCLIP, images: list, prompts, batch_size: int, rounds: int) -> dict:
    encoded = tclip.encode_prompts(list(prompts))
    for _ in tclip.explain_batch(images, encoded, batch_size=batch_size):  # warm-up: compiles every batch shape
        pass
    floor = images_floor(tclip, images, batch_size)
    floor()  # warm-up
    walls, floors, spans = {False: [], True: []}, [], {}
    for _ in range(rounds):
        start = time.perf_counter()
        floor()
        floors.append(time.perf_counter() - start)
        for overlap in (False, True):
            with DeviceClock() as clock:
                clocked(tclip, clock)
                start = time.perf_counter()
                for _ in tclip.explain_batch(images, encoded, batch_size=batch_size, overlap=overlap):
                    pass
                walls[overlap].append(time.perf_counter() - start)
                del tclip.__dict__["jitted_maps"]
            spans[overlap] = clock.spans  # the last round's
    return {"maps": len(encoded.queries), "serial": float(np.median(walls[False])),
            "overlapped": float(np.median(walls[True])), "floor": float(np.median(floors)),
            "device": device_busy_seconds(spans[True]),
            "wait": device_wait_share(spans[True]), "wait_serial": device_wait_share(spans[False]),
            "batches": len(spans[True])}


def device_note() -> str:
    """Where the device work runs against the host step's cores."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"XLA:CPU on the same {len(os.sched_getaffinity(0))} cores as the host step"
    return f"{device.device_kind}, beside the host step's {len(os.sched_getaffinity(0))} cores"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive_int, default=6)
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS),
                        help="default: all (a subset needs --no-write)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args(argv)
    check_output_options(parser, "explain_overlap", write=not args.no_write)
    refuse_part_of_a_table(parser, "--workloads measures", set(args.workloads) != set(WORKLOADS),
                           write=not args.no_write)
    load_before = load_average()
    tclip = timed_tclip()
    images = [photo_like_image(i) for i in range(args.images)]
    rows = []
    for name in args.workloads:
        r = measure(tclip, images, WORKLOADS[name], args.batch_size, args.rounds)
        rows.append([name, r["maps"], r["batches"], f"{r['serial']:.2f} s", f"{r['overlapped']:.2f} s",
                     f"{r['serial'] / r['overlapped']:.2f}", f"{r['floor']:.2f} s",
                     f"{r['overlapped'] / r['floor']:.2f}", f"{r['device']:.2f} s",
                     *(f"{100 * r[key]:.1f} %" if r[key] is not None else "-" for key in ("wait", "wait_serial"))])
    header = ["workload", "distinct maps per image", "batches", "serial wall", "overlapped wall",
              "serial / overlapped", "floor", "overlapped / floor", "device busy (overlapped)",
              "device waiting, overlapped",
              "device waiting, serial"]
    text = "\n".join([
        f"## explain_batch: device waiting on the host (TCLIP, K = 25, random ViT-B/32, {IMAGE_HW[1]}x{IMAGE_HW[0]})",
        "", f"- date: {today()}", f"- machine: {machine_description()}", f"- command: `{command_line()}`",
        f"- load average (1/5/15 min) before: {load_before}; after: {load_average()}",
        f"- {args.images} images, batch size {args.batch_size}; wall: median of {args.rounds} rounds, serial and "
        "overlapped alternating, after a warm-up pass; 'device waiting': the share of the time from the first "
        "batch's finish to the last's with no batch queued (the sweep's measure; the last round's); 'floor': the "
        "same images' 25 translated copies through the image tower alone, batch by batch, timed in each round "
        "before the two schedules (the `floor ms/img` of gpu_profile.py). "
        f"Each result dropped as it arrives; the device: {device_note()}.", "",
        markdown_table(header, rows)])
    print(text)
    if not args.no_write:
        write_section("explain_overlap", text)


if __name__ == "__main__":
    run_main(main)
