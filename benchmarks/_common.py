"""Helpers shared by the benchmark scripts: timing, machine description, and RESULTS.md sections.

Each script owns one section of `benchmarks/RESULTS.md`, delimited by `<!-- NAME:start -->` and
`<!-- NAME:end -->`; rewriting a section leaves the rest of the file as it is.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Mapping, NoReturn, Sequence

import numpy as np

from tclip_jax import files

RESULTS_PATH = pathlib.Path(__file__).resolve().parent / "RESULTS.md"

# The speed benchmarks' inputs: a 640x480 photo-like scene and these prompt sets.
IMAGE_HW = (480, 640)
PROMPT = "a small brown dog chases a red ball across grass"  # 10 words


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Runs a script's `main` and exits with its status (None: 0). A Ctrl-C ends it with one line on stderr,
    '<script>: interrupted', and status 130, not a traceback; nothing is written then (each script writes its
    results at its end, atomically). The process ends without the interpreter's teardown, as `tclip` does
    (`tclip_jax.cli.program`): that teardown crashed when the signal had landed inside XLA, and it would wait for
    a thread pool's queued work (host_threads.py)."""
    try:
        status = main()
    except KeyboardInterrupt:
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(status)


def positive_int(text: str) -> int:
    """argparse type of a count of rounds, images or scenes: an integer >= 1 (one line from argparse otherwise)."""
    return _integer_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type of a count where 0 leaves something out: an integer >= 0 (one line from argparse otherwise)."""
    return _integer_at_least(text, 0)


def _integer_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type of a time budget: a number of seconds > 0 (one line from argparse otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def workloads() -> dict[str, tuple[str, ...]]:
    """"prompt": the one 10-word prompt; "coco80": the 80 COCO class names as 80 prompts."""
    from tclip_jax.evaluation.datasets import COCO_CATEGORIES

    return {"prompt": (PROMPT,), "coco80": tuple(COCO_CATEGORIES.values())}


def photo_like_image(seed: int, image_hw: tuple[int, int] = IMAGE_HW) -> np.ndarray:
    """A textured held-out synthetic scene (uint8 RGB), 640x480 by default."""
    from tclip_jax.synthetic import HELDOUT_SEED_START, make_scene

    return make_scene(HELDOUT_SEED_START + seed, image_hw).image


def random_vit_b32():
    """The speed benchmarks' model: random ViT-B/32 weights (seed 0) with the CLIP tokenizer, as a `LoadedClip`."""
    from tclip_jax.checkpoints.load import LoadedClip
    from tclip_jax.model import CLIP, PRESETS, init_params
    from tclip_jax.model.tokenizer import default_tokenizer

    config = PRESETS["ViT-B/32"]
    return LoadedClip(CLIP(config), init_params(config, 0), default_tokenizer(), "tclip", "random ViT-B/32 (seed 0)")


def timed_tclip(clip=None):
    """TCLIP as the speed benchmarks time it (K = 25, the `whole` protocol) on `clip`, by default
    `random_vit_b32()`."""
    from tclip_jax.methods.tclip import TCLIP, Settings

    return TCLIP(random_vit_b32() if clip is None else clip, Settings(translations=25, input_protocol="whole"))


def floor_pass(tclip, pixels: np.ndarray) -> None:
    """The floor of TCLIP on a batch `pixels` [B, h, w, 3]: its translated copies through the image tower alone (the
    least any method with that many copies does), waited for."""
    from tclip_jax.methods.tclip.relevance import translated_patch_embeddings

    translated_patch_embeddings(tclip.clip.model, tclip.clip.params, pixels, tclip.offsets).block_until_ready()


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """(median, all timings) of `fn()` in seconds over `repeats` calls after `warmup` untimed calls.

    `fn` must block until its work is done (e.g. call `block_until_ready`): JAX dispatch is asynchronous.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def interleaved_medians(fns: Mapping[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds of each function over `repeats` rounds, and the result of its untimed warm-up call.

    Each round calls every function once, in turn, so that all of them see the same drift in machine load
    (on a shared machine it matters more than the noise of any one call). Functions must block until their
    work is done (e.g. `block_until_ready`): JAX dispatch is asynchronous.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    first = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}, first


def lscpu_summary() -> str:
    """CPU model, logical CPU count and threads per core from `lscpu` (or `platform` where it is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    parts = [fields.get("Model name", platform.machine()), f"{fields.get('CPU(s)', os.cpu_count())} CPUs"]
    if "Thread(s) per core" in fields:
        parts.append(f"{fields['Thread(s) per core']} thread(s)/core")
    if "Hypervisor vendor" in fields:
        parts.append(f"virtualised ({fields['Hypervisor vendor']})")
    return ", ".join(parts)


def machine_description() -> str:
    """One line: CPU (lscpu), memory, OS, Python and the JAX / torch versions and JAX devices."""
    import jax  # imported here so that helpers that need no JAX stay cheap to import

    parts = [lscpu_summary()]
    meminfo = pathlib.Path("/proc/meminfo")
    if meminfo.is_file():
        kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo.read_text()).group(1))
        parts.append(f"{kib / 2**20:.0f} GiB RAM")
    parts.append(f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    # an accelerator's str() is only 'cuda:0': its device_kind names the chip (e.g. 'NVIDIA H200')
    devices = [str(d) if d.platform == "cpu" else f"{d} ({d.device_kind})" for d in jax.devices()]
    parts.append(f"jax {jax.__version__} on {', '.join(devices)}")
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    return "; ".join(parts)


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. '1.52 1.80 1.77' (timings on a shared machine depend on it)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def today() -> str:
    return datetime.date.today().isoformat()


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran this script, as it can be pasted into a shell."""
    argv = sys.argv if argv is None else argv
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", argv[0]]
    return shlex.join(head + list(argv[1:]))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown (GFM) pipe table; a '|' inside a cell, e.g. in '|a - b|', is escaped as '\\|' (unescaped, it
    splits the cell and the table does not render)."""
    def row_line(cells) -> str:
        return "| " + " | ".join(re.sub(r"(?<!\\)\|", r"\\|", str(cell)) for cell in cells) + " |"

    lines = [row_line(header), "|" + "|".join(" --- " for _ in header) + "|"]
    lines += [row_line(row) for row in rows]
    return "\n".join(lines)


def check_section_name(name: str) -> None:
    """A results section's name is letters, digits, '_', '.' or '-' (it goes into the section's markers)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section name must be letters, digits, '_', '.' or '-', got {name!r}")


def section_markers(name: str) -> tuple[str, str]:
    """The start and end markers of section `name`."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def check_section_markers(text: str, name: str, path: pathlib.Path) -> None:
    """Raises ValueError unless the text of the results file `path` has section `name`'s markers once each, the
    start before the end, or neither (the section is then appended)."""
    start, end = section_markers(name)
    starts, ends = text.count(start), text.count(end)
    if (starts, ends) == (0, 0):
        return
    if (starts, ends) != (1, 1) or text.index(start) > text.index(end):
        raise ValueError(f"{path} has {starts} '{start}' and {ends} '{end}' markers (one each, in that order, or "
                         "none); fix it by hand")


def write_section(name: str, body: str, path: pathlib.Path = RESULTS_PATH) -> None:
    """Replace section `name` of the results file with `body` (append it if absent; create the file). Everything
    between the section's markers is the script's: readings written by hand go after its end marker."""
    check_section_name(name)
    start, end = section_markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    check_section_markers(text, name, path)
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    files.write_text_atomic(path, text)  # a kill mid-write leaves the old file, not an empty one
    print(f"wrote the '{name}' section of {path} (--no-write leaves it as it is)", file=sys.stderr)


def check_output_file(parser: argparse.ArgumentParser, path: pathlib.Path, what: str) -> None:
    """Refuses with `parser.error`'s one line, before anything is measured, a file the run could not write at its
    end (`tclip_jax.files.check_output_file`: a folder, or in a folder that does not exist or that this process
    cannot write in). `what` names it in the message, e.g. '--json'."""
    try:
        files.check_output_file(path, what)
    except (ValueError, PermissionError) as err:
        parser.error(str(err))


def check_output_options(parser: argparse.ArgumentParser, section: str, results_path: pathlib.Path = RESULTS_PATH,
                         write: bool = True) -> None:
    """Refuses with `parser.error`'s one line, right after the arguments are parsed, what `write_section(section,
    ..., results_path)` would refuse only after the measurement: a section name it does not take, or (when `write`,
    i.e. without --no-write) a results file it cannot write or whose markers for the section are damaged."""
    try:
        check_section_name(section)
    except ValueError as error:
        parser.error(str(error))
    if write:
        check_output_file(parser, results_path, "results file")
        if results_path.is_file():
            try:
                check_section_markers(results_path.read_text(), section, results_path)
            except (OSError, UnicodeDecodeError) as error:
                parser.error(f"results file {results_path}: cannot read it ({error})")
            except ValueError as error:
                parser.error(str(error))


def refuse_part_of_a_table(parser: argparse.ArgumentParser, options: str, part: bool, write: bool,
                           table: str = "the section's table", results_path: pathlib.Path = RESULTS_PATH) -> None:
    """Refuses with `parser.error`'s one line a run that measures only `part` of a table (some of the workloads,
    methods, ...) when it would `write` it: its section would replace the whole table with the part. `options`
    names what chose the part, with its verb (e.g. '--workloads measures')."""
    if part and write:
        parser.error(f"{options} part of {table}, which would replace the whole one in {results_path.name}: add "
                     "--no-write")
