"""How fast the CLI answers: `tclip --help`, each subcommand's help and an argument error, against `python -c pass`.

Each command is a fresh `python -m tclip_jax ...` process (what a user's shell runs), timed wall-clock from start
to exit; the commands are interleaved round by round so they share the machine's load. The target: help and
argument errors in under 1 s. Prints a table and rewrites the `startup` section of benchmarks/RESULTS.md (unless
--no-write).

    python benchmarks/startup.py [--repeats 7] [--no-write]
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks._common import (check_output_options, command_line, interleaved_medians, load_average,  # noqa: E402
                                machine_description, markdown_table, positive_int, run_main, today, write_section)

COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "tclip --help": ["-m", "tclip_jax", "--help"],
    "tclip (no arguments: help)": ["-m", "tclip_jax"],
    "tclip explain --help": ["-m", "tclip_jax", "explain", "--help"],
    "tclip sweep --help": ["-m", "tclip_jax", "sweep", "--help"],
    "tclip convert --help": ["-m", "tclip_jax", "convert", "--help"],
    "tclip train-eclip --help": ["-m", "tclip_jax", "train-eclip", "--help"],
    "tclip sweep synthetic (argument error)": ["-m", "tclip_jax", "sweep", "synthetic"],
}
TARGET_SECONDS = 1.0


def run(args: list[str]) -> int:
    return subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="rounds of every command (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args()
    check_output_options(parser, "startup", write=not args.no_write)
    load = load_average()
    medians, codes = interleaved_medians({name: (lambda a=a: run(a)) for name, a in COMMANDS.items()}, args.repeats)
    floor = medians["python -c pass"]
    rows = [[name, f"{medians[name]:.3f}", f"{medians[name] / floor:.1f}", codes[name],
             "yes" if medians[name] < TARGET_SECONDS else "**no**"] for name in COMMANDS]
    body = "\n\n".join([
        "## CLI start-up: help and argument errors (CPU)",
        f"Machine: {machine_description()}",
        f"Date: {today()}; load average before the run: {load}",
        f"Command: `{command_line()}`",
        f"Median wall time of a fresh process over {args.repeats} interleaved rounds; the ratio is to "
        "`python -c pass` in the same rounds. Target: under 1 s.",
        markdown_table(["command", "seconds", "x python -c pass", "exit code", "< 1 s"], rows),
    ])
    print(body)
    if not args.no_write:
        write_section("startup", body)


if __name__ == "__main__":
    run_main(main)
