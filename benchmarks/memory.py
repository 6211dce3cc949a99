"""Peak memory of `TCLIP.explain` against the number of prompts (random ViT-B/32, K = 25, one 640x480 image).

Each prompt count runs in a fresh process (peak RSS is per process): one cold explain with N single-word
prompts (distinct ImageNet class words), the process's first, so its compilation is included, as in one CLI
run. Reported: the process's peak RSS, the bytes of the result's own arrays (each distinct map at the image
size and its soft map: what the caller receives), and the difference, i.e. what the computation holds on top
of its result (the model, compiled programs, transient buffers, compilation).

    python benchmarks/memory.py [--prompts 1 80 400] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # also run as a script
from benchmarks._common import (IMAGE_HW, check_output_options, command_line, load_average,  # noqa: E402
                                machine_description, markdown_table, photo_like_image, positive_int,
                                refuse_part_of_a_table, run_main, timed_tclip, today, write_section)

CLASSES = pathlib.Path(__file__).resolve().parents[1] / "tclip_jax/evaluation/datasets/data/imagenet_classes.tsv"
PROMPT_COUNTS = (1, 80, 400)  # the table's rows


def single_words() -> list[str]:
    """The distinct one-word prompts: ImageNet class names' single-word synonyms, in file order."""
    words: list[str] = []
    for line in CLASSES.read_text().splitlines():
        for name in line.split("\t", 1)[1].split(", "):
            if name.isalpha() and name.lower() not in words:
                words.append(name.lower())
    return words


def measure(count: int) -> dict:
    result = timed_tclip().explain(photo_like_image(0), single_words()[:count])
    arrays = {}
    for prompt in result.prompts:
        for item in (*prompt.word_maps, prompt.phrase):
            for array in (item.heatmap, item.soft):
                if array is not None:
                    arrays[id(array)] = array.nbytes
    return {"prompts": count, "distinct_arrays": len(arrays), "result_mib": sum(arrays.values()) / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=positive_int, nargs="+", default=list(PROMPT_COUNTS),
                        help="prompt counts, one row each (default: %(default)s; leaving one out needs --no-write)")
    parser.add_argument("--measure", type=positive_int, help="internal: measure one prompt count in this process")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = parser.parse_args(argv)
    check_output_options(parser, "memory", write=not args.no_write)
    refuse_part_of_a_table(parser, "--prompts measures", not set(PROMPT_COUNTS) <= set(args.prompts),
                           write=not args.no_write)
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return
    available = len(single_words())
    if max(args.prompts) > available:
        parser.error(f"--prompts {max(args.prompts)}: there are only {available} single-word class names")
    load_before = load_average()
    rows = []
    for count in args.prompts:
        child = subprocess.run([sys.executable, __file__, "--measure", str(count), "--no-write"],  # the parent writes
                               capture_output=True, text=True)
        if child.returncode != 0:  # the rows measured so far are printed above; the child's own last line says why
            reason = (child.stderr.strip().splitlines() or [f"status {child.returncode}"])[-1]
            parser.exit(2, f"{parser.prog}: error: the run with {count} prompts failed: {reason}\n")
        r = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append([count, r["distinct_arrays"], f"{r['peak_rss_mib']:.0f} MiB", f"{r['result_mib']:.0f} MiB",
                     f"{r['peak_rss_mib'] - r['result_mib']:.0f} MiB"])
        print(f"{count} prompts: peak RSS {rows[-1][2]}, result {rows[-1][3]}", flush=True)
    text = "\n".join([
        f"## Peak memory against the prompt count (TCLIP.explain, random ViT-B/32, {IMAGE_HW[1]}x{IMAGE_HW[0]})",
        "", f"- date: {today()}", f"- machine: {machine_description()}", f"- command: `{command_line()}`",
        f"- load average (1/5/15 min) before: {load_before}; after: {load_average()}",
        "- one fresh process per row, one cold explain (compilation included); single-word prompts; 'result' = "
        "the arrays the caller receives (each distinct map at the image size and its soft map)", "",
        markdown_table(["prompts", "distinct result arrays", "peak RSS", "result", "peak RSS - result"], rows)])
    print(text)
    if not args.no_write:
        write_section("memory", text)


if __name__ == "__main__":
    run_main(main)
