"""Runs the first steps of a training configuration twice and checks that the parameters are bit-identical.

    PYTHONPATH=. python training/check_determinism.py [--recipe default] [--objective clip] --steps 20
        [--set FIELD=VALUE ...]

Uses the configuration `train_default.py` would use (its defaults, the recipe, then the same overrides), stops
after `--steps` steps (the learning-rate schedule stays the full run's) and prints one JSON line with the result.
"""
from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_default  # noqa: E402

from tclip_jax.checkpoints.folder import flatten  # noqa: E402
from tclip_jax.cli import OneLineErrors  # noqa: E402


def main() -> None:
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=tuple(train_default.RECIPES))
    parser.add_argument("--objective", choices=train_default.OBJECTIVES)
    parser.add_argument("--steps", type=int, default=20,
                        help="steps trained each time, 1 up to the configuration's steps (default %(default)s)")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="FIELD=VALUE",
                        help="override TrainConfig fields, as train_default.py --set does (may be repeated)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.refuse(f"--steps must be >= 1, got {args.steps}")
    try:
        config = train_default.config_from_flags(args.recipe, {"objective": args.objective}, args.set)
    except (ValueError, OSError) as error:  # what train_default.py refuses in one line: a bad override or text_init
        parser.refuse(str(error))
    if args.steps > config.steps:  # train() would stop at config.steps, and the report would say --steps
        parser.refuse(f"--steps {args.steps}: the configuration trains only {config.steps} steps")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(2):
            params, _, _ = train_default.train(config, pathlib.Path(tmp) / f"log{run}.jsonl", stop_after=args.steps)
            runs.append(flatten(params))
    identical = runs[0].keys() == runs[1].keys() and all(
        np.array_equal(runs[0][k], runs[1][k]) and runs[0][k].tobytes() == runs[1][k].tobytes() for k in runs[0])
    print(json.dumps({"objective": config.objective, "steps": args.steps, "parameters": len(runs[0]),
                      "bit_identical": identical}))
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
