"""Trains variants of a recipe side by side in one process, on batches made once for all of them: recipe search (two
runs on the 2-core build machine, or several on an accelerator, which one run of these small models leaves idle).

    PYTHONPATH=. python training/search_recipes.py --recipe default --out DIR --workers 12 \
        --set select_step=last --run seed0 --run seed1 seed=1 --run start1200 bare_map_start=1200

Each `--run NAME [FIELD=VALUE ...]` is `train_default.py --recipe R --set <--set's overrides> <its own>` and writes
DIR/NAME, the checkpoint folder `train_default.py --out DIR/NAME` would write (with heldout_metrics.json unless
`--no-heldout`): a run's parameters are the same here as alone (tests/test_training_script.py checks). The runs must
agree on every `DataConfig` field. A pool of worker processes makes each step's inputs (`step_inputs`) once, ahead of
the slowest run, and drops them when every run has taken them; the runs train in threads, so the device interleaves
their steps. The shipped checkpoints come from `train_default.py` on the CPU (issue 13): this only ranks recipes.
On an accelerator compiling takes most of the time, and each new caption length compiles a run's step again: add
`--set text_length_step=0` there (it changes only the summation order; RECIPE_SEARCH.md measured it).
`--resume PATH` starts every run from a state `train_default.py --save-state` wrote (late terms from that step on:
a 600-step search instead of 2400). Ctrl-C or a SIGTERM stops every run at its next step and ends the worker
processes; runs already saved stay. Each run's
folder is locked as `train_default.py` locks its `--out`, until the search ends: another run into it is refused.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import pathlib
import re
import signal
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_default  # noqa: E402

from tclip_jax.cli import OneLineErrors, redelivered_interrupts, sigterm_as_interrupt  # noqa: E402
from tclip_jax.files import check_output_folder  # noqa: E402
from tclip_jax.sweep.heldout import record_heldout_metrics  # noqa: E402


class SharedInputs:
    """`step_inputs(data, step)` for runs 0 .. runs - 1 that each take steps 0, 1, 2, ... in order (`take`): a step
    is made once, by `pool`, up to `ahead` steps before the slowest run needs it, and dropped once every run still
    training has taken it. A run `ahead` steps in front of the slowest waits, so at most `ahead` steps are held.
    Resumed runs all start at step `first`."""

    def __init__(self, data: train_default.DataConfig, steps: int, pool: concurrent.futures.Executor,
                 ahead: int, runs: int, first: int = 0):
        self.data, self.steps, self.pool, self.ahead = data, steps, pool, ahead
        self.futures: dict[int, concurrent.futures.Future] = {}
        self.submitted = first                   # steps first .. submitted - 1 have been handed to the pool
        # run -> the next step it will take; every run is counted from the start, so none misses a step
        self.next_step = dict.fromkeys(range(runs), first)
        self.changed = threading.Condition()
        self.stopped = False

    def stop(self) -> None:
        """Every run's next `take` raises `Stopped` (Ctrl-C reaches only the main thread, not the runs)."""
        with self.changed:
            self.stopped = True
            self.changed.notify_all()

    def leave(self, run: int) -> None:
        """`run` takes no more steps (finished or failed): the others no longer wait for it."""
        with self.changed:
            del self.next_step[run]
            self._drop_taken()
            self.changed.notify_all()

    def take(self, run: int, step: int) -> concurrent.futures.Future:
        with self.changed:
            if step != self.next_step[run]:
                raise ValueError(f"run {run} asked for step {step}, expected {self.next_step[run]}")
            self.changed.wait_for(lambda: self.stopped or step < self._slowest() + self.ahead)
            if self.stopped:
                raise Stopped("the search was stopped")
            while self.submitted < min(self.steps, max(step + 1, self._slowest() + self.ahead)):
                self.futures[self.submitted] = self.pool.submit(train_default.step_inputs, self.data, self.submitted)
                self.submitted += 1
            future = self.futures[step]
            self.next_step[run] = step + 1
            self._drop_taken()
            self.changed.notify_all()
            return future

    def _slowest(self) -> int:
        return min(self.next_step.values(), default=self.steps)

    def _drop_taken(self) -> None:
        for step in [s for s in self.futures if s < self._slowest()]:
            del self.futures[step]


class Stopped(Exception):
    """Raised in a run's thread when the search stops (`SharedInputs.stop`)."""


def parse_runs(specs: list[list[str]], common: dict) -> dict[str, dict]:
    """{run name: its overrides}, each run's own `FIELD=VALUE` items after the common ones."""
    runs = {}
    for name, *items in specs:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise ValueError(f"--run {name!r}: a run's name must be a folder name of letters, digits, '_', '.', '-'")
        if name in runs:
            raise ValueError(f"--run {name} is given twice")
        own = train_default.parse_overrides(items, f"--run {name}")
        if own.keys() & common.keys():
            raise ValueError(f"--run {name} gives {min(own.keys() & common.keys())}, which --set gives too")
        runs[name] = {**common, **own}
    return runs


def check_same_data(configs: dict[str, train_default.TrainConfig]) -> train_default.DataConfig:
    """The runs' shared `DataConfig`; a run whose batches would differ is refused, naming the field."""
    (first, first_config), *rest = configs.items()
    data = train_default.data_config(first_config)
    for name, config in rest:
        for field in dataclasses.fields(train_default.DataConfig):
            if getattr(config, field.name) != getattr(data, field.name):
                raise ValueError(f"runs {first} and {name} draw different batches ({field.name}: "
                                 f"{getattr(data, field.name)!r} vs {getattr(config, field.name)!r}); "
                                 "search them separately")
    if len({c.steps for c in configs.values()}) > 1:
        raise ValueError("the runs must train the same number of steps")
    return data


def search(configs: dict[str, train_default.TrainConfig], out: pathlib.Path, workers: int, ahead: int,
           heldout: bool = True, resume: pathlib.Path | None = None) -> dict[str, dict]:
    """Trains every run (`train_default.train_and_save` into out/NAME, from the state `resume` if given) on shared
    inputs; {name: run summary}."""
    data = check_same_data(configs)
    steps = next(iter(configs.values())).steps
    first = 0 if resume is None else train_default.saved_step(resume)
    # Worker processes are spawned, not forked: the parent's JAX runtime has threads a fork would copy mid-flight.
    # They ignore Ctrl-C (a terminal sends it to them too): the main thread stops the search and then them.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=signal.signal,
                                                initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        shared = SharedInputs(data, steps, pool, ahead, len(configs), first)

        def run(member: int, name: str, config: train_default.TrainConfig) -> dict:
            try:
                return train_default.train_and_save(config, out / name, inputs=functools.partial(shared.take, member),
                                                    resume=resume)
            finally:
                shared.leave(member)

        with concurrent.futures.ThreadPoolExecutor(len(configs)) as threads:
            futures = {name: threads.submit(run, member, name, config)
                       for member, (name, config) in enumerate(configs.items())}
            try:
                summaries = {name: future.result() for name, future in futures.items()}
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every run ends at its next step, the inputs queued for them
                # go, and the workers end once the steps they are drawing are drawn, before the runs are waited for
                # (left running, they outlived the search: the script ends its process at once, `interrupted`)
                shared.stop()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    if heldout:
        for name in configs:
            summaries[name]["heldout"] = record_heldout_metrics(out / name)
    return summaries


def main() -> None:
    """The command line (`run_command`), a SIGTERM handled as a Ctrl-C is, as `train_default.py` handles them."""
    with redelivered_interrupts(), sigterm_as_interrupt("search_recipes.py"):
        run_command()


def run_command() -> None:
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="one checkpoint folder per run in here")
    parser.add_argument("--recipe", choices=tuple(train_default.RECIPES), help="the recipe every run starts from")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="FIELD=VALUE",
                        help="overrides for every run")
    parser.add_argument("--run", nargs="+", action="append", required=True, metavar=("NAME", "FIELD=VALUE"),
                        help="a run: its name (its folder) and its own overrides; repeat for each run")
    parser.add_argument("--workers", type=int, default=4, help="processes that draw the scenes (default 4)")
    parser.add_argument("--ahead", type=int, default=64, help="steps drawn ahead of the slowest run (default 64)")
    parser.add_argument("--heldout", action=argparse.BooleanOptionalAction, default=True,
                        help="record each run's heldout_metrics.json, as train_default.py does (default: yes)")
    parser.add_argument("--resume", type=pathlib.Path, metavar="PATH",
                        help="every run goes on from this state (train_default.py --save-state)")
    args = parser.parse_args()
    # Each run's folder is held as train_default.py holds its --out, until the search ends; a stop is handled
    # outside, as `interrupted` ends the process at once and would leave the locks' files.
    try:
        with contextlib.ExitStack() as held:
            try:
                if args.workers < 1 or args.ahead < 1:
                    raise ValueError(f"--workers and --ahead must be >= 1, got {args.workers} and {args.ahead}")
                runs = parse_runs(args.run, train_default.parse_overrides(args.set))
                check_output_folder(args.out)
                for name in runs:  # each run's folder, before any run trains (a run saves only when it is done):
                    train_default.check_model_folder(args.out / name)  # to make, empty or a model folder a run wrote
                configs = {name: train_default.train_config(args.recipe, overrides) for name, overrides in runs.items()}
                for config in configs.values():
                    train_default.check_text_init(config)
                    if args.resume is not None:
                        train_default.check_resume(args.resume, config)
                check_same_data(configs)
                for name in runs:
                    held.enter_context(train_default.held_model_folder(args.out / name))
            except (ValueError, OSError) as error:  # a bad run, override, folder or mix of runs, a folder in use
                parser.refuse(str(error))
            start = time.perf_counter()
            summaries = search(configs, args.out, args.workers, args.ahead, args.heldout, args.resume)
    except KeyboardInterrupt as stop:  # a Ctrl-C or SIGTERM (`Terminated`): the runs and the workers have ended
        train_default.interrupted(parser, "each run's folder is written whole or not at all", stop)
    except OSError as error:  # a full disk while a run saves: one line, as train_default.py gives
        parser.refuse(f"the search stopped (each run's folder is written whole or not at all): {error}")
    for name, summary in summaries.items():
        print(json.dumps({"run": name, "overrides": runs[name], **summary}))
    print(json.dumps({"runs": len(configs), "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
