"""Time per image and prompt of TCLIP and every baseline, with their forward/backward pass counts.

ViT-B/32-size random weights (`init_params`), one 640x480 image, 5 prompts, each method through the
same `Method` interface that explain and sweeps use (official input protocol, prompts and map post-processing).

    python benchmarks/baselines.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks._common import (check_output_options, command_line, load_average, machine_description,  # noqa: E402
                                markdown_table, median_seconds, positive_int, run_main, today, write_section)
from tclip_jax.checkpoints.folder import save_checkpoint  # noqa: E402
from tclip_jax.checkpoints.load import load_clip  # noqa: E402
from tclip_jax.methods import METHODS  # noqa: E402
from tclip_jax.methods.base import Query  # noqa: E402
from tclip_jax.model import PRESETS, init_params  # noqa: E402

PROMPTS = ["a dog", "a red car", "a traffic light", "a person riding a bike", "grass"]
COLUMNS = ("method", "forward passes / image", "backward passes / image", f"s / image ({len(PROMPTS)} prompts)",
           "s / image and prompt")


def method_row(name: str, method_class: type, clip, image: np.ndarray, repeats: int) -> tuple[str, ...]:
    """One row of the table: the method's passes through the image encoder per image for the T prompts (as its
    class states them, `Method.image_encoder_passes`; "not stated" for a method that does not) and its median
    seconds for the device maps of `image` and `PROMPTS`."""
    method = method_class(clip)
    queries = method.encode([Query(p) for p in PROMPTS], label_set=PROMPTS)
    query_rows = np.arange(len(PROMPTS), dtype=np.int32)[None]

    def run():
        pixels, _ = method.prepare(image)
        return np.asarray(method.jitted_maps(method.params, pixels[None], queries, query_rows).maps)

    seconds, _ = median_seconds(run, repeats)
    forward, backward = method_class.image_encoder_passes or ("not stated", "not stated")
    return name, forward, backward, f"{seconds:.2f}", f"{seconds / len(PROMPTS):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    check_output_options(parser, "baselines", write=not args.no_write)
    load = load_average()
    config = PRESETS["ViT-B/32"]
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(pathlib.Path(tmp) / "vit_b32", init_params(config), config)
        clip = load_clip(folder)
        for name, method_class in METHODS.items():
            rows.append(method_row(name, method_class, clip, image, args.repeats))
            print(rows[-1], flush=True)
    table = markdown_table(COLUMNS, rows)
    body = (f"## Methods: time per image and prompt (CPU, ViT-B/32 size, maps on the device)\n\n"
            f"Machine: {machine_description()}\n\nDate: {today()}; load average before the run: {load}\n\n"
            f"Command: `{command_line()}` (median of {args.repeats} after a warm-up; a 640x480 image, "
            f"{len(PROMPTS)} prompts; device maps only, host post-processing excluded; T = prompts)\n\n{table}\n")
    print(body)  # as the other scripts: the whole section, written or not
    if not args.no_write:
        write_section("baselines", body)


if __name__ == "__main__":
    run_main(main)
