"""Does attention-weighted token relevance help phrase maps? TCLIP K=25 with --token-weighting none|last|mean|rollout
on the phrases of held-out synthetic captions, on both embedded models.

A unit is one phrase of a caption ("a red circle" -> the span "red circle"; "a circle that is red" -> "circle that
is red"), mapped inside its caption and scored against the one object it names, by the sweep's scorer
(`run_sweep`): pointing game on the soft map, BoxAcc@0.5 of the Otsu box. Scenes: the `captions` and
`colour_twins` protocols of `tclip_jax.synthetic` (twins: only the shape word tells the phrase's object apart).
Prints a table and rewrites the `token-weighting` section of benchmarks/RESULTS.md (unless --no-write).

    python benchmarks/token_weighting.py [--scenes 100]
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks._common import (check_output_options, command_line, load_average, machine_description,  # noqa: E402
                                markdown_table, positive_int, run_main, today, write_section)
from benchmarks.synthetic_grounding import MODELS  # noqa: E402
from tclip_jax.checkpoints.load import load_clip  # noqa: E402
from tclip_jax.evaluation.datasets.base import Dataset, LoadedSample, Sample, Target, indexed  # noqa: E402
from tclip_jax.methods.base import Query  # noqa: E402
from tclip_jax.methods.tclip import TCLIP, Settings  # noqa: E402
from tclip_jax.methods.tclip.settings import TOKEN_WEIGHTINGS  # noqa: E402
from tclip_jax.sweep.runner import RunOptions, run_sweep  # noqa: E402
from tclip_jax.synthetic import heldout_seeds, protocol_sample  # noqa: E402

PROTOCOLS = ("captions", "colour_twins")


def phrase_dataset(protocol: str, count: int) -> Dataset:
    samples = [Sample(str(seed), i, functools.partial(_load, protocol, seed))
               for i, seed in enumerate(heldout_seeds(count))]
    return Dataset(f"synthetic-phrases-{protocol}", ("phrase",), count, indexed(samples))


def _load(protocol: str, seed: int) -> LoadedSample:
    scene = protocol_sample(protocol, seed).scene
    targets = []
    for phrase in sorted({w.phrase for w in scene.words if w.kind != "relation"}):
        words = [w for w in scene.words if w.phrase == phrase and w.kind != "relation"]
        obj = scene.objects[words[0].phrase_object]
        span = (min(w.start for w in words), max(w.end for w in words))
        targets.append(Target(0, boxes=np.array([obj.box], np.float64), mask=obj.region,
                              query=Query(scene.caption, span), group="one word" if len(words) == 1 else "phrase"))
    return LoadedSample(scene.image, tuple(targets))


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=positive_int, default=100,
                        help="held-out scenes per protocol (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    check_output_options(parser, "token-weighting", write=not args.no_write)
    load = load_average()
    start = time.perf_counter()
    rows = []
    for model, folder in MODELS.items():
        clip = load_clip(folder)
        for weighting in TOKEN_WEIGHTINGS:
            method = TCLIP(clip, Settings(token_weighting=weighting))
            cells = []
            for protocol in PROTOCOLS:
                with tempfile.TemporaryDirectory() as out:
                    report = run_sweep(phrase_dataset(protocol, args.scenes), method, out,
                                       options=RunOptions(batch_size=8, progress=False)).report
                phrase = report["groups"]["phrase"]
                cells += [f"{phrase['segmentation']['pointing_game']:.3f}", f"{phrase['detection']['box_accuracy']:.3f}",
                          str(phrase["units"])]
            rows.append([model, weighting, *cells])
            print(*rows[-1], flush=True)
    header = ["model", "token weighting"] + [f"{p}: {m}" for p in PROTOCOLS for m in ("PG", "BoxAcc", "phrases")]
    body = "\n\n".join([
        "## Token weighting: phrase maps with --token-weighting (TCLIP K=25)",
        f"Machine: {machine_description()}",
        f"Date: {today()}; load average before the run: {load}; the run took {(time.perf_counter() - start) / 60:.1f} min",
        f"Command: `{command_line()}`",
        f"{args.scenes} held-out scenes per protocol; units: every phrase of two or more words in the caption "
        "(its span mapped inside the caption), scored against the object it names. See the script's docstring.",
        markdown_table(header, rows),
    ])
    print(body)
    if not args.no_write:
        write_section("token-weighting", body)


if __name__ == "__main__":
    run_main(main)
