"""Gradients through TCLIP's trimmed mean: the derivative rule on the kept values' mask against differentiating the
sorting network itself.

`trimmed_mean` sorts the 25 translated copies' maps with a sorting network of elementwise min/max (fast forward on
XLA:CPU). Until 2026-12-06 a gradient went through those min/max steps; `through the network` below is that
(`sorted_trimmed_mean` differentiated as it is), timed beside today's `trimmed_mean`, whose derivatives are those of
the mean of the kept values (a custom JVP), on the 25 copies' back-shifted maps of one image, for the sum of the map:

    python benchmarks/map_gradient.py
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # also run as a script
from benchmarks._common import (check_output_options, command_line, interleaved_medians,  # noqa: E402
                                load_average, machine_description, markdown_table, positive_int,
                                refuse_part_of_a_table, run_main, today, write_section)

SIZES = (112, 224)  # the table's rows: map sides in pixels
PATCH = 32  # the translations' patch: a map of side s has a grid of s // PATCH patches a side


def map_side(text: str) -> int:
    """argparse type of --sizes: a map side in pixels of at least one patch (one line from argparse otherwise)."""
    side = positive_int(text)
    if side < PATCH:
        raise argparse.ArgumentTypeError(f"expected a map side of at least one patch ({PATCH} pixels), got {side}")
    return side


def first_call(fn) -> tuple[float, np.ndarray]:
    """(seconds of the first call of `fn`, compile included; its result)."""
    start = time.perf_counter()
    result = np.asarray(fn())
    return time.perf_counter() - start, result


def row(size: int, rounds: int) -> list[object]:
    import jax  # imported here, as the library's: --help and argument errors stay fast

    from tclip_jax.methods.tclip.translations import (shift_back_operators, sorted_trimmed_mean, translation_offsets,
                                                      trimmed_mean)

    _, _, valid = shift_back_operators(translation_offsets(PATCH), (size // PATCH, size // PATCH), (size, size))
    count = valid.sum(axis=0, dtype=np.int32)
    cut = np.floor(0.2 * count).astype(np.int32)
    values = jax.random.normal(jax.random.PRNGKey(0), valid.shape)
    forward = jax.jit(lambda v: trimmed_mean(v, valid, 0.2))
    rule = jax.jit(jax.grad(lambda v: trimmed_mean(v, valid, 0.2).sum()))
    network = jax.jit(jax.grad(lambda v: sorted_trimmed_mean(v, valid, cut, count).sum()))
    calls = {name: (lambda fn=fn: jax.block_until_ready(fn(values)))
             for name, fn in (("forward", forward), ("rule", rule), ("network", network))}
    (rule_first, by_rule), (network_first, by_network) = first_call(calls["rule"]), first_call(calls["network"])
    medians, _ = interleaved_medians(calls, rounds)  # the three in turn in each round
    forward_s, rule_s, network_s = medians["forward"], medians["rule"], medians["network"]
    # Where two valid values tie, both are subgradients: the network splits the weight, the rule ranks the first copy
    # first. Compared where no values tie.
    ranked = np.sort(np.where(valid, np.asarray(values), np.inf), axis=0)
    tied = ((ranked[1:] == ranked[:-1]) & np.isfinite(ranked[1:])).any(axis=0)
    difference = np.abs(by_rule - by_network).max(axis=0)[~tied].max()
    return [f"25 x {size} x {size}", f"{forward_s * 1e3:.1f} ms", f"{network_first:.1f} s", f"{network_s:.2f} s",
            f"{rule_first:.2f} s", f"{rule_s:.3f} s", f"{network_s / rule_s:.0f}", f"{difference:.1e}",
            int(tied.sum())]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=map_side, nargs="+", default=list(SIZES),
                        help=f"map sides in pixels, >= {PATCH} (one patch), one row each (default: %(default)s; "
                             "leaving one out needs --no-write)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="timed rounds after the first calls")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args(argv)
    check_output_options(parser, "map_gradient", write=not args.no_write)
    refuse_part_of_a_table(parser, "--sizes measures", not set(SIZES) <= set(args.sizes), write=not args.no_write)
    load_before = load_average()
    rows = [row(size, args.rounds) for size in args.sizes]
    table = markdown_table(["maps", "forward", "network: first call", "network: gradient", "rule: first call",
                            "rule: gradient", "network / rule", "max abs gradient diff (no ties)",
                            "positions with tied values"], rows)
    body = f"""## Gradients through TCLIP's trimmed mean: derivative rule vs the sorting network differentiated

- date: {today()}
- machine: {machine_description()}
- command: `{command_line()}`
- load average (1/5/15 min) before: {load_before}; after: {load_average()}
- the 25 translated copies' maps (random values), trim 0.2, gradient of the map's sum; "first call" includes the
  compile; the other columns are medians of {args.rounds} rounds after it and a warm-up call, the three functions
  in turn in each round; "network" differentiates the sorting network's min/max steps (how gradients were taken
  before 2026-12-06), "rule" is today's `trimmed_mean`; where two valid values at a position tie, either split of
  the weight is a subgradient (the network halves it, the rule gives it to the earlier copy), so the gradients are
  compared at the other positions

{table}
"""
    print(body)
    if not args.no_write:
        write_section("map_gradient", body)


if __name__ == "__main__":
    run_main(main)
