"""Per-word localisation on held-out synthetic scenes: TCLIP (K=25, K=1) and every baseline, every protocol, on
both embedded models (`default_model`, CLIP's loss plus caption-word terms, and `clip_only`, CLIP's loss alone).

Each (model, method, protocol) is `tclip sweep synthetic --protocol P --limit N` run in-process
(`tclip_jax.sweep.heldout.synthetic_report`), so these figures and a sweep's cannot disagree. The protocols are
`tclip_jax.synthetic.PROTOCOLS` (see that module's docstring); a prompt-level baseline, having no per-word maps,
maps the whole prompt. Each cell is "pointing game / BoxAcc@0.5" of the words it names, scored as the sweep
scores them (pointing on the relevance map, TCLIP: the soft map; the Otsu box, largest component); the
wrong-attribute column is the share of maps that peak on the object the prompt names wrongly (lower is better).
Also image <-> text retrieval top-1 on 256 held-out scenes. Prints the tables and rewrites each model's section
of benchmarks/RESULTS.md (`synthetic-default`, `synthetic-clip_only`) as soon as its table is done; a run of some
methods or protocols only (`--methods`, `--protocols`) prints, with `--no-write`, so a whole table is never replaced
by part of one. `--json PATH` keeps every report's headline figures per word group.

    python benchmarks/synthetic_grounding.py [--scenes 100] [--models default clip_only] [--methods tclip_k25 ...]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks._common import (check_output_file, check_output_options, command_line, load_average,  # noqa: E402
                                machine_description, markdown_table, positive_int, refuse_part_of_a_table, run_main,
                                today, write_section)
from tclip_jax.checkpoints.load import DEFAULT_MODEL_DIR, load_clip  # noqa: E402
from tclip_jax.evaluation.retrieval import retrieval_top1  # noqa: E402
from tclip_jax.methods import METHODS  # noqa: E402
from tclip_jax.methods.tclip import TCLIP, Settings  # noqa: E402
from tclip_jax.sweep.heldout import RETRIEVAL_PAIRS, grounding_scores, synthetic_report  # noqa: E402
from tclip_jax.synthetic import HELDOUT_SEED_START, OUT_OF_STYLE, PROTOCOLS, retrieval_scenes  # noqa: E402
from tclip_jax.files import write_text_atomic  # noqa: E402

MODELS = {"default": DEFAULT_MODEL_DIR, "clip_only": DEFAULT_MODEL_DIR.parent / "clip_only_model"}
# The table's columns: (header, protocol, word group); "all" pools every word the protocol scores. many_objects' words
# are grouped by kind and place ("shape 4"); the report also pools each kind over places ("shape", `unit_groups`).
CELLS = (("captions: colour", "captions", "colour"), ("captions: shape", "captions", "shape"),
         ("bare colour", "bare_words", "colour"), ("bare shape", "bare_words", "shape"),
         ("shape only", "shape_only", "shape"), ("colour twins: shape", "colour_twins", "shape"),
         ("shape twins: colour", "shape_twins", "colour"), ("4-5 objects: colour", "many_objects", "colour"),
         ("4-5 objects: shape", "many_objects", "shape"), ("4-5 objects", "many_objects", "all"),
         *((name.replace("_", " "), name, "all") for name in OUT_OF_STYLE))
# The targets for TCLIP K=25, the table's first row (pointing game / BoxAcc).
TARGETS = {"captions: colour": ">=0.95 / >=0.70", "captions: shape": ">=0.90 / >=0.70",
           "bare colour": ">=0.85 / >=0.60", "bare shape": ">=0.85 / >=0.60", "colour twins: shape": ">=0.85 / >=0.60",
           **{name.replace("_", " "): ">=0.85 / >=0.60" for name in OUT_OF_STYLE},
           "small objects": ">=0.70 / -", "wrong attribute": "<=0.10"}


# eclip without trained projections is the similarity baseline; trained, it has its own RESULTS.md section.
BASELINES = tuple(name for name in METHODS if name not in ("tclip", "eclip"))
METHOD_NAMES = ("tclip_k25", "tclip_k1", *BASELINES)


def method_factories(clip) -> dict:
    """{name in METHOD_NAMES: a function that builds the method on `clip`}."""
    factories = {"tclip_k25": lambda: TCLIP(clip), "tclip_k1": lambda: TCLIP(clip, Settings(translations=1))}
    factories.update({name: (lambda cls=METHODS[name]: cls(clip)) for name in BASELINES})
    return factories


def table_row(method: str, scores: dict) -> list[str]:
    """`method`'s cells from {protocol: grounding_scores}; "-" where the protocol did not run."""
    cells = []
    for _, protocol, group in CELLS:
        part = scores.get(protocol, {}).get(group)
        cells.append("-" if part is None else f"{part['pointing_game']:.2f} / {part['box_accuracy']:.2f}")
    wrong = scores.get("wrong_attribute", {}).get("all")
    return [method, *cells, "-" if wrong is None else f"{wrong['wrong_pointing']:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=positive_int, default=100,
                        help="held-out scenes per protocol (default: %(default)s)")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHOD_NAMES, metavar="METHOD",
                        help=f"a subset of {', '.join(METHOD_NAMES)} (default: all; a subset needs --no-write)")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS),
                        help="default: all (a subset needs --no-write)")
    parser.add_argument("--json", type=pathlib.Path, help="also write every report's figures per word group here")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    methods = args.methods or list(METHOD_NAMES)
    refuse_part_of_a_table(parser, "--methods or --protocols measure",
                           set(methods) != set(METHOD_NAMES) or set(args.protocols) != set(PROTOCOLS),
                           write=not args.no_write, table="a model's table")
    for model in args.models:  # each model's own section
        check_output_options(parser, f"synthetic-{model}", write=not args.no_write)
    if args.json:
        check_output_file(parser, args.json, "--json")
    everything = {}
    header = ["method", *(name for name, _, _ in CELLS), "wrong attribute"]
    pairs = retrieval_scenes(RETRIEVAL_PAIRS)  # drawn once for every model
    for model in args.models:
        load = load_average()
        start = time.perf_counter()
        clip = load_clip(MODELS[model])
        factories = method_factories(clip)
        retrieval = retrieval_top1(clip, [s.image for s in pairs], [s.caption for s in pairs])
        rows = [["target (TCLIP K=25)", *(TARGETS.get(name, "") for name, _, _ in CELLS), TARGETS["wrong attribute"]]]
        everything[model] = {"retrieval": retrieval, "methods": {}}
        for name in methods:
            method = factories[name]()
            scores = {}
            for protocol in args.protocols:
                scores[protocol] = grounding_scores(synthetic_report(method, protocol, args.scenes))
                print(model, name, protocol, json.dumps(scores[protocol]["all"]), flush=True)
            everything[model]["methods"][name] = scores
            rows.append(table_row(name, scores))
        body = "\n\n".join([
            f"## Synthetic scenes: per-word localisation, every protocol: model `{model}` "
            f"({MODELS[model].relative_to(DEFAULT_MODEL_DIR.parents[1])})",
            f"Machine: {machine_description()}",
            f"Date: {today()}; load average before the model's run: {load}; its run took "
            f"{(time.perf_counter() - start) / 60:.1f} min",
            f"Command: `{command_line()}`",
            f"Scenes: held-out seeds {HELDOUT_SEED_START}..{HELDOUT_SEED_START + args.scenes - 1} per protocol, each "
            "protocol a synthetic sweep. Cells: pointing game / BoxAcc@0.5 of the words named in the header "
            "(\"4-5 objects\" alone and the out-of-style conditions: every scored word); the last column: the share of "
            "wrong-attribute maps that peak on the wrongly named object (lower is better). See the script's "
            "docstring.",
            f"Retrieval top-1 on {retrieval['pairs']} held-out scenes: image->text "
            f"{retrieval['image_to_text_top1']:.3f}, text->image {retrieval['text_to_image_top1']:.3f} "
            "(target >= 0.90).",
            markdown_table(header, rows)])
        print(body, flush=True)
        if not args.no_write:  # each model's table as soon as it is done
            write_section(f"synthetic-{model}", body)
    if args.json:
        write_text_atomic(args.json, json.dumps(everything, indent=1) + "\n")


if __name__ == "__main__":
    run_main(main)
