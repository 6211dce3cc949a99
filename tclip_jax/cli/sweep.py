"""`tclip sweep coco|coco-seg|imagenet-s|voc|synthetic --method M --model M --data PATH --out DIR [...]`.

Runs (or with --resume continues) an evaluation sweep and writes DIR/report.md and DIR/report.json. Several
processes (`jax.distributed`, --coordinator/--num-processes/--process-id, or --distributed on a cluster
that JAX detects) each take their own share and process 0 writes the merged report.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Optional

from tclip_jax.cli.common import (add_method_arguments, add_progress_argument, build_method, chosen_method,
                                  progress_bars)

DATASETS = ("coco", "coco-seg", "imagenet-s", "voc", "synthetic")
CONNECT_TIMEOUT_S = 120  # --connect-timeout's default
# --connect-timeout's most: one day. JAX takes its deadline as a C++ 32-bit int (2147483638 s, plus the 10 s it is
# given after ours, was refused in pybind's words), and Python's timer no more than threading.TIMEOUT_MAX.
MOST_CONNECT_TIMEOUT_S = 24 * 60 * 60
# --num-processes' most, beyond any cluster: 2147483648 was refused in pybind's words, 2147483647 left process 0
# allocating for that many peers until killed.
MOST_PROCESSES = 65536


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tclip_jax.evaluation.datasets.options import DatasetOptions
    from tclip_jax.evaluation.options import EvalOptions
    from tclip_jax.sweep.options import RunOptions

    parser.add_argument("dataset", choices=DATASETS, help="what to evaluate on: COCO boxes (coco) or instance masks "
                        "(coco-seg), ImageNet-S or VOC2012 segmentation, or generated synthetic scenes")
    parser.add_argument("--data", metavar="PATH", help="dataset root folder: COCO (annotations/instances_val2017.json "
                        "+ val2017/; coco-seg too), a TFDS data_dir with --coco-source tfds, ImageNet-S (validation/, "
                        "validation-segmentation/) or VOC2012 (ImageSets/Segmentation/val.txt, JPEGImages/, "
                        "SegmentationClass/)")
    parser.add_argument("--out", required=True, help="results folder: records, sweep.json, report.md, report.json, "
                        "report.html with its pictures in gallery/, and --save-vis's in vis/")
    parser.add_argument("--template", help="prompt template with one '{}' for the class name (default: the bare name)")
    DatasetOptions.add_arguments(parser)
    add_method_arguments(parser)
    EvalOptions.add_arguments(parser.add_argument_group("scoring"))
    running = parser.add_argument_group("running")
    RunOptions.add_arguments(running)
    add_progress_argument(running)
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() from the environment")
    group.add_argument("--coordinator", help="coordinator address HOST:PORT")
    group.add_argument("--num-processes", type=_at_least_one("process", "processes", most=MOST_PROCESSES),
                       help=f"how many processes the sweep runs in (with --coordinator; at most {MOST_PROCESSES})")
    group.add_argument("--process-id", type=int, help="this process's index, 0 to --num-processes - 1; process 0 "
                       "writes the report")
    group.add_argument("--connect-timeout", type=_at_least_one("second", "seconds", most=MOST_CONNECT_TIMEOUT_S),
                       default=CONNECT_TIMEOUT_S, metavar="SECONDS", help="how long a process waits for every process "
                       "of the sweep to join before it ends in one line, status 2 (default: "
                       f"{CONNECT_TIMEOUT_S}; at most {MOST_CONNECT_TIMEOUT_S}, one day)")


def run(args: argparse.Namespace) -> int:
    _init_distributed(args)
    from tclip_jax.cli import USER_ERRORS
    from tclip_jax.sweep import run_sweep
    from tclip_jax.sweep.report import errors_listed
    from tclip_jax.sweep.runner import refuse_together

    # Every process opens its dataset and builds its method, and where one cannot (a --data folder one host lacks),
    # all refuse in its line: one refusing alone left the others waiting at the sweep's first collective for ever.
    evaluation, options, dataset, source, data_folder, method = refuse_together(lambda: _sweep_inputs(args),
                                                                                USER_ERRORS)
    result = run_sweep(dataset, method, args.out, source, args.template, evaluation, options, data_folder)
    if result.report is not None:
        print((pathlib.Path(args.out) / "report.md").read_text())
        errors = result.report["errors"]
        if errors and not result.report["images"]:  # a run that scored nothing did not succeed, whatever it wrote
            raise ValueError(f"no sample could be scored: all {len(errors)} failed (the first, {errors[0]['key']}: "
                             f"{errors[0]['error']}); --resume tries them again once the data is mended")
        if errors:  # a success, said where a script's log shows it: report.md went to stdout
            warnings.warn(f"{len(errors)} of {len(errors) + result.report['images']} samples failed, "
                          f"{errors_listed(len(errors))}; --resume tries them again")
    return 0


def _sweep_inputs(args: argparse.Namespace) -> tuple:
    """(evaluation options, run options, dataset, its source, its folder, method) the arguments give."""
    from tclip_jax.evaluation.options import EvalOptions
    from tclip_jax.sweep import RunOptions
    from tclip_jax.sweep.runner import DEFAULT_TEMPLATE
    from tclip_jax.synthetic import SYNTHETIC_SCENES

    evaluation = EvalOptions.from_arguments(args)
    options = RunOptions.from_arguments(args, progress=progress_bars(args))
    if options.resume and not hasattr(args, "limit"):  # a bare --resume continues the sweep as it was, not the default
        options = dataclasses.replace(options, limit=_stored_limit(args.out))
    if args.dataset == "synthetic":  # the scenes swept (however many --limit asks), recorded and compared on resume
        options = dataclasses.replace(options, limit=options.limit or SYNTHETIC_SCENES)
    chosen = chosen_method(args)  # a bad --sigma is refused before the dataset is read
    dataset, source, data_folder = _open_dataset(args, options.limit)
    method = build_method(args, chosen)
    if args.dataset == "synthetic" and args.template not in (None, DEFAULT_TEMPLATE) and not method.uses_label_set:
        raise ValueError(f"--template makes the class prompts, and a synthetic scene's queries are its own words: it "
                         f"would change only the label set of a method that uses one (clip_surgery with feature "
                         f"surgery, decomposition), not {args.method}'s maps, yet be recorded as used")
    return evaluation, options, dataset, source, data_folder, method


def _stored_limit(out: str) -> Optional[int]:
    """The limit of the sweep stored in `out` (None: every sample, or no sweep there)."""
    from tclip_jax.sweep.report import CONFIG_FILE, read_config

    folder = pathlib.Path(out)
    return read_config(folder).get("limit") if (folder / CONFIG_FILE).is_file() else None


def _open_dataset(args: argparse.Namespace, limit):
    """The dataset the arguments name, a description of its source for sweep.json, and the folder it names."""
    from tclip_jax.files import nonempty_path

    data = None if args.data is None else str(nonempty_path(args.data, "--data", "the dataset's root folder").resolve())
    if data is not None and pathlib.Path(data).is_file():  # else named as a folder missing its annotations
        raise ValueError(f"--data {args.data} is a file; {args.dataset} reads the dataset's root folder")
    return (*_dataset_and_source(args, limit, data), data)


def _dataset_and_source(args: argparse.Namespace, limit, data: Optional[str]):
    from tclip_jax.evaluation import datasets
    from tclip_jax.evaluation.datasets.options import SPLITS, DatasetOptions, spelled
    from tclip_jax.synthetic import heldout_source

    chosen = DatasetOptions.for_dataset(args.dataset, DatasetOptions.given_arguments(args))
    if args.dataset == "synthetic":
        if data is not None:
            raise ValueError("synthetic scenes are generated: --data is not used (size the sweep with --limit)")
        try:
            dataset = datasets.synthetic_dataset(limit, chosen.protocol)
        except ValueError as err:  # the protocol is a choice already: what is left to refuse is the number of scenes
            raise ValueError(f"--limit {limit}: {err}") from None
        return dataset, heldout_source(chosen.protocol)
    if data is None:
        raise ValueError(f"{args.dataset} needs --data (the dataset's root folder)")
    crowd = chosen.crowd
    if args.dataset == "coco-seg":
        if chosen.coco_source == "tfds":
            raise ValueError("coco-seg reads the raw layout (instance masks from instances_val2017.json); "
                             "--coco-source tfds is for coco boxes")
        return datasets.coco_seg_dataset(data, crowd=crowd), f"coco val2017 masks in {data}, crowd {crowd}"
    if args.dataset == "voc":
        return datasets.voc_dataset(data), f"voc2012 segmentation val in {data}"
    if args.dataset == "coco":
        if chosen.coco_source == "tfds":
            return datasets.tfds_coco_dataset(data, crowd=crowd), f"tfds coco/2017 validation in {data}, crowd {crowd}"
        return datasets.coco_dataset(data, crowd=crowd), f"coco val2017 in {data}, crowd {crowd}"
    if chosen.split is None:
        raise ValueError(f"imagenet-s needs --split {spelled(SPLITS)} (label ids index that split's classes)")
    return datasets.imagenet_s_dataset(data, chosen.split), f"imagenet-s{chosen.split} validation in {data}"


def _init_distributed(args: argparse.Namespace) -> None:
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id {args.process_id} is not one of 0 to {args.num_processes - 1} "
                         f"(--num-processes {args.num_processes})")
    if args.distributed or args.coordinator is not None:
        import jax

        ours = signal.getsignal(signal.SIGTERM)
        with _joined_within(args.connect_timeout, args):
            # JAX's own deadline, a little later than ours, ends the process with a fatal error (SIGABRT, a C++ trace)
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                       initialization_timeout=args.connect_timeout + _JAX_DEADLINE_AFTER_S)
        # The initialization starts JAX's preemption service, which takes SIGTERM over below Python (for its sync
        # points, which a sweep does not use), so SIGTERM no longer ended the sweep: tclip's handler is set again.
        # (jax_enable_preemption_service, the switch that turns the service off, is in jax 0.8.2 and later only.)
        if ours is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, ours)


_JAX_DEADLINE_AFTER_S = 10


@contextlib.contextmanager
def _joined_within(seconds: int, args: argparse.Namespace) -> Iterator[None]:
    """While the block (jax.distributed.initialize) runs: if it has not returned `seconds` later (the coordinator
    unreachable, a process missing or started with another --num-processes, which JAX waits out in silence, then
    aborts), the process ends at once with one line and status 2; nothing has been written yet."""
    ended, lock = False, threading.Lock()

    def end() -> None:
        with lock:
            if ended:
                return
            if args.distributed and args.coordinator is None:
                from jax._src import distributed  # the address JAX detected, which jax.distributed does not expose

                found = distributed.global_state.coordinator_address
                where = f"the coordinator the cluster's environment names ({found or 'none detected yet'})"
                ask = "are all of the job's processes running, and does JAX detect this cluster (--distributed)?"
                what = f"this process could not join {where}"
            elif args.process_id == 0:  # the coordinator is this process
                what = f"process 0 waited for the others to join the sweep's coordinator {args.coordinator}"
                ask = (f"is each --process-id 1 to {args.num_processes - 1} started once, with the same --coordinator "
                       "and --num-processes?")
            else:
                what = f"process {args.process_id} could not join the sweep's coordinator {args.coordinator}"
                ask = (f"is process 0 running there, and each --process-id 0 to {args.num_processes - 1} started "
                       "once, with the same --coordinator and --num-processes?")
            print(f"tclip sweep: error: {what} within {seconds} s (--connect-timeout): {ask}", file=sys.stderr,
                  flush=True)
            sys.stdout.flush()
            os._exit(2)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            ended = True
        timer.cancel()


def _at_least_one(unit: str, units: str, most: Optional[int] = None) -> Callable[[str], int]:
    """argparse type of a whole number of `units`, at least 1 and at most `most` where given (--num-processes;
    --connect-timeout, as JAX takes whole seconds), refused in argparse's one line otherwise."""
    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of {units}, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected at least 1 {unit}, got {text!r}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"expected at most {most} {units}, got {text!r}")
        return value

    return read
