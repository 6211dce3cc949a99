"""Per-word localisation on held-out synthetic scenes: TCLIP (K=25, K=1) and every baseline, every protocol.

Each (method, protocol) is `tclip sweep synthetic --protocol P --limit N` run in-process
(`tclip_jax.sweep.heldout.synthetic_report`), so these figures and a sweep's cannot disagree. Protocols
(`tclip_jax.evaluation.datasets.synthetic`): `captions` (each colour and shape word inside its scene's caption;
a prompt-level baseline, having no per-word maps, maps the whole caption) and `bare_words` (each word alone is
the prompt). Scores are the sweep's: pointing game and energy in the mask on the relevance map (TCLIP: the soft
map), BoxAcc at IoU >= 0.5 of the Otsu box, mask IoU (summed) of the relevance map above its mean.
Prints a Markdown table and rewrites the `synthetic` section of benchmarks/RESULTS.md.

    python benchmarks/synthetic_grounding.py [--scenes 500] [--model PATH] [--methods tclip_k25 ...]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks._common import command_line, load_average, machine_description, markdown_table, today, write_section  # noqa: E402
from tclip_jax.checkpoints.load import load_clip  # noqa: E402
from tclip_jax.evaluation.datasets.synthetic import PROTOCOLS  # noqa: E402
from tclip_jax.methods import METHODS  # noqa: E402
from tclip_jax.methods.tclip import TCLIP, Settings  # noqa: E402
from tclip_jax.sweep.heldout import synthetic_report  # noqa: E402
from tclip_jax.synthetic import HELDOUT_SEED_START  # noqa: E402

COLUMNS = (("pointing game", "segmentation", "pointing_game"), ("energy in mask", "segmentation", "energy_in_mask"),
           ("BoxAcc@0.5", "detection", "box_accuracy"), ("mask IoU", "segmentation", "mask_iou"))


def method_factories(clip) -> dict:
    factories = {"tclip_k25": lambda: TCLIP(clip), "tclip_k1": lambda: TCLIP(clip, Settings(translations=1))}
    factories.update({name: (lambda cls=cls: cls(clip)) for name, cls in METHODS.items() if name != "tclip"})
    return factories


def rows_of(method: str, protocol: str, report: dict) -> list[tuple]:
    groups = [("all", report)] + sorted(report.get("groups", {}).items())
    return [(method, protocol, group, *(f"{scores[task][key]:.3f}" for _, task, key in COLUMNS))
            for group, scores in groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=500, help="held-out scenes per protocol")
    parser.add_argument("--model", default=None, help="any model load_clip accepts (default: the embedded one)")
    parser.add_argument("--methods", nargs="+", help="a subset of tclip_k25, tclip_k1 and the baselines")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    if args.scenes < 500:
        print(f"note: {args.scenes} scenes; the recorded benchmark uses >= 500", file=sys.stderr)
    load = load_average()
    clip = load_clip(args.model)
    factories = method_factories(clip)
    unknown = sorted(set(args.methods or ()) - set(factories))
    if unknown:
        parser.error(f"unknown methods {unknown}; available: {', '.join(factories)}")
    start = time.perf_counter()
    rows = []
    for name in args.methods or factories:
        method = factories[name]()
        for protocol in args.protocols:
            rows += rows_of(name, protocol, synthetic_report(method, protocol, args.scenes))
            print(*rows[-1], flush=True)
    seconds = time.perf_counter() - start
    body = "\n\n".join([
        "## Synthetic scenes: per-word localisation",
        f"Machine: {machine_description()}",
        f"Date: {today()}; load average before the run: {load}; the run took {seconds / 60:.1f} min",
        f"Command: `{command_line()}`",
        f"Model: {args.model or 'the embedded default (tclip_jax/data/default_model)'}. Scenes: held-out seeds "
        f"{HELDOUT_SEED_START}..{HELDOUT_SEED_START + args.scenes - 1}, each protocol a synthetic sweep "
        "(see the script's docstring for the protocols and scores).",
        markdown_table(["method", "protocol", "words", *(name for name, _, _ in COLUMNS)], rows),
    ])
    print(body)
    if not args.no_write:
        write_section("synthetic", body)
        print("\nwrote the 'synthetic' section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
