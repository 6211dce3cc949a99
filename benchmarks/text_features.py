"""Text features of prompt-level methods: each text through the whole context against cut after its end-of-text
token, and a label set named again (as in every batch of a sweep) against computed once.

`PromptMethod.text_features` cuts each text after its end-of-text token (`causal_length_groups`: the text tower is
causal) and keeps the features of the texts it has computed. Before 2026-12-05 it ran every text through all 77
positions on every call, one text at a time; `whole context` below is that computation (`whole_context_features`), timed
side by side with today's in each round (`interleaved_medians`), on random ViT-B/32 weights with the CLIP tokenizer:

- CLIP Surgery, whose text is the mean over its 85 templates of one prompt (`--surgery-prompts` COCO class names);
- MaskCLIP, one text per prompt (the 80 COCO class names).

Then the sweep that needed it: `tclip sweep synthetic --protocol captions --method clip_surgery` on the embedded
model (the captions are each batch's own queries, so CLIP Surgery's label set was encoded again in every batch),
timed once with today's code.

    python benchmarks/text_features.py
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # also run as a script
from benchmarks._common import (check_output_options, command_line, interleaved_medians, load_average,  # noqa: E402
                                machine_description, markdown_table, positive_int, random_vit_b32, run_main, today,
                                workloads, write_section)


@functools.partial(jax.jit, static_argnums=0)
def whole_context_features(model, params, token_ids):
    """`text_features` before 2026-12-05: every text through all 77 positions, one text at a time (a `lax.map`)."""
    from tclip_jax.methods.common import text_features

    return jax.lax.map(lambda one: text_features(model, params, one[None])[0], token_ids)


def compare(method_name: str, prompts: list[str], clip, rounds: int) -> list[object]:
    """A table row: whole context, cut (nothing kept), kept (asked again), and the largest difference."""
    from tclip_jax.methods import METHODS

    kept = METHODS[method_name](clip)
    kept.text_features(prompts)

    def whole():
        return np.asarray(whole_context_features(clip.model, clip.params, kept.text_token_ids(prompts)))

    def cut():  # a method that has computed nothing yet
        return METHODS[method_name](clip).text_features(prompts)

    walls, first = interleaved_medians({"whole": whole, "cut": cut, "kept": lambda: kept.text_features(prompts)},
                                       rounds)
    difference = float(np.abs(first["whole"] - first["cut"]).max())
    texts = len(prompts) * (len(kept.templates) if kept.templates else 1)
    return [method_name, len(prompts), texts, f"{walls['whole']:.2f} s", f"{walls['cut']:.2f} s",
            f"{walls['kept'] * 1e3:.1f} ms", f"{walls['whole'] / walls['cut']:.1f}", f"{difference:.1e}"]


def surgery_sweep_seconds(scenes: int) -> float:
    from tclip_jax.evaluation.datasets import synthetic_dataset
    from tclip_jax.methods import METHODS
    from tclip_jax.sweep.options import RunOptions
    from tclip_jax.sweep.runner import run_sweep

    method = METHODS["clip_surgery"].from_pretrained()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_sweep(synthetic_dataset(scenes, "captions"), method, pathlib.Path(out),
                  options=RunOptions(batch_size=8, progress=False))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--surgery-prompts", type=positive_int, default=10, help="COCO class names for CLIP Surgery")
    parser.add_argument("--scenes", type=positive_int, default=32, help="held-out scenes of the CLIP Surgery sweep")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    check_output_options(parser, "text_features", write=not args.no_write)
    load_before = load_average()
    clip = random_vit_b32()
    coco = list(workloads()["coco80"])
    rows = [compare("clip_surgery", coco[:args.surgery_prompts], clip, args.rounds),
            compare("maskclip", coco, clip, args.rounds)]
    sweep = surgery_sweep_seconds(args.scenes)
    table = markdown_table(["method", "prompts", "texts", "whole context", "cut", "kept (asked again)",
                            "whole / cut", "max abs feature diff"], rows)
    body = f"""## Text features of prompt-level methods: whole context vs cut after the end-of-text token, and kept

- date: {today()}
- machine: {machine_description()}
- command: `{command_line()}`
- load average (1/5/15 min) before: {load_before}; after: {load_average()}
- random ViT-B/32 weights (seed 0), CLIP tokenizer; medians of {args.rounds} interleaved rounds after a warm-up;
  "whole context" is what `text_features` computed before 2026-12-05 (every text through all 77 positions, on
  every call), "cut" is today's first call, "kept" today's call for texts it has computed

{table}

- `tclip sweep synthetic --protocol captions --method clip_surgery` on the embedded model, {args.scenes} held-out
  scenes, batch 8: {sweep:.1f} s with today's code
"""
    print(body)
    if not args.no_write:
        write_section("text_features", body)


if __name__ == "__main__":
    run_main(main)
