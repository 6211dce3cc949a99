"""`tclip` command line: one sub-command module each (convert, explain, sweep)."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# Sub-command name -> module under tclip_jax.cli with `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "convert": "Convert a CLIP checkpoint (Hugging Face, OpenAI, OpenCLIP) to a tclip_jax folder.",
    "explain": "Per-word TCLIP heatmaps, soft maps and boxes for images and a prompt.",
    "sweep": "Evaluate a method over a dataset (COCO, ImageNet-S, synthetic), resumable.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tclip", description="TCLIP: what does CLIP see per token?")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"tclip_jax.cli.{name}")
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError, ConnectionError, ImportError) as err:
        # Input problems are the user's to fix: one clear line, no traceback.
        print(f"tclip {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
