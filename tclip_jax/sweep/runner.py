"""The sweep runner: a dataset through a method, every unit scored, every image's record durable on disk.

Queries: a target's map is of its class prompt (the class name put into the template; TCLIP maps the class
name's words inside it), encoded once for the whole sweep with the class prompts as the label set, or of the
target's own query (a word of the image's caption), encoded with its batch, after the class queries, in a
power-of-two number of slots so that few shapes get compiled. Either way a map depends only on its image, its
query and the label set, not on the batch it runs in.

Pipeline (one process):
- loader threads read and preprocess samples ahead of the device, in dataset order;
- the main thread batches them and dispatches each batch to the devices (asynchronous); while batch k+1 is
  queued on the device it fetches batch k's maps and hands each image to the host threads;
- host threads resample maps to the original size and score the units (GMM, Otsu, metrics);
- each finished record is appended to this process's results file (``store``) as soon as it and the images
  scored before it are done, by whichever thread finishes it; a sample that cannot be read or has no units is
  recorded when it is read, so it may come before images still being scored. The report orders records by
  their dataset index. The first record that cannot be written (a full disk) ends the sweep, in the main thread.
A sample that cannot be read or scored (``ValueError``/``OSError``) is recorded with its error; the sweep goes on.

Resume: the records already on disk (any process's) name the samples that are done; they are skipped (but for
those whose report.html picture could not be written, or among --save-vis's first N without their pictures, run
again for these alone: `UnitGallery`, `UnitPictures`), and a torn last
line left by a kill is dropped, so nothing is lost or counted twice. ``sweep.json`` holds the
sweep's configuration; resuming with a different one is an error (the environment each run that set out to score
samples ran under, library versions and JAX's backend, is recorded there, not compared: `tclip_jax.environment`).
The model in it is told by its ``LoadedClip.fingerprint`` (its config and every weight), not by its origin, the path as typed,
nor its source, how it was stored (an OpenAI .pt and its `tclip convert` folder are one model); a sweep stored
before models had fingerprints is told by its origin (and activation), one stored with the first definition's by
that definition.

A new sweep starts only in a new folder or an empty one (sweeps' locks and file browsers' files aside): anything
else is someone's, which its report and gallery would overwrite. One that stops before its first record leaves the
folder as it found it: it removes what it wrote, and the folder if it made it, also where the process ends at once
(the SIGTERM watchdog's os._exit: `files.at_early_end`). A SIGKILL leaves its sweep.json, results files without a
record and lock files, which a new sweep there replaces (`_killed_before_its_first_record`; process 0 removes them
once every process has checked the folder) and --resume resumes.

Processes of a multi-process sweep refuse together: each takes its lock and checks the folder, and every process
refuses, in one line, where any of them could not (`_locked_and_checked`), before any writes.

Device waiting: a watcher thread notes when each batch finishes. The device is busy for batch k from
max(its dispatch, batch k-1's finish) to its finish; after the first batch (which includes compilation) the
rest of the time it waits on the host (``device_wait_share``). ``throughput-p<process>.json`` holds the rates of
the process's last run that scored samples, whether it ran to its end or was stopped (Ctrl-C, SIGTERM; a SIGKILL
leaves no time to write them), of what that run did.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Optional, TypeVar

import jax
import numpy as np
from tqdm import tqdm

from tclip_jax.checkpoints.load import LoadedClip, is_v1_fingerprint
from tclip_jax.environment import run_environment
from tclip_jax.evaluation.datasets.base import Dataset, LoadedSample, Sample
from tclip_jax.evaluation.options import EvalOptions
from tclip_jax.evaluation.scoring import score_unit
from tclip_jax.files import at_early_end, check_output_folder, unwritten_entries, write_text_atomic
from tclip_jax.image import Geometry
from tclip_jax.methods.base import RESULT_SCHEMA, RESULT_VERSION, Method, Query, QueryArrays, pad_slots
from tclip_jax.methods.devices import DeviceMaps, DispatchedMaps
from tclip_jax.sweep.options import RunOptions
from tclip_jax.sweep.report import CONFIG_FILE, read_config, write_report
from tclip_jax.sweep.sharding import barrier, class_slots, gather_text, owns
from tclip_jax.sweep.store import (LOCKS_GLOB, RESULTS_GLOB, ResultWriter, drop_errors, files_to_retry,
                                  read_all_records, read_records, refuse_held_locks, remove_stale_locks, results_lock,
                                  results_path)
from tclip_jax.sweep.vis import GALLERY_DIR, UnitGallery, UnitPictures
from tclip_jax.synthetic import DATASET_PREFIX, SYNTHETIC_SCENES, heldout_source, is_synthetic_dataset

SAMPLE_ERRORS = (ValueError, OSError)  # bad data: recorded for the sample; anything else stops the sweep
DEFAULT_TEMPLATE = "{}"
VIS_DIR = "vis"  # --save-vis pictures
T = TypeVar("T")


def class_labels(class_names: Sequence[str]) -> tuple[str, ...]:
    """Each class's name in records and reports: its name, or where several classes share it (ImageNet's two
    "crane"s, the bird and the machine), the name and its class index (0-based, in `class_names`; not the dataset's
    label id), so per-class scores keep them apart. Prompts use the names as they are."""
    shared = set(shared_names(class_names))
    return tuple(f"{name} (class {k})" if name in shared else name for k, name in enumerate(class_names))


def shared_names(class_names: Sequence[str]) -> list[str]:
    """The names that several classes share. sweep.json records them: a sweep recorded before such classes were
    told apart holds the bare name for both, so resuming it (no such record) is refused rather than mixed."""
    return sorted(name for name, count in collections.Counter(class_names).items() if count > 1)


def class_queries(class_names: Sequence[str], template: Optional[str] = None) -> list[Query]:
    """Each class name put into ``template`` (one ``{}``; None: the bare name), with the name's span."""
    template = DEFAULT_TEMPLATE if template is None else template
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}' for the class name, got {template!r}")
    start = template.index("{}")
    return [Query(template.replace("{}", name), (start, start + len(name))) for name in class_names]


@dataclasses.dataclass(frozen=True)
class Throughput:
    devices: int                       # local devices the batches were split over
    images: int                        # images this run sent through the device
    batches: int
    wall_seconds: float                # first dispatch to last record, compilation included
    images_per_second: float
    steady_images_per_second: Optional[float]  # after the first batch
    device_wait_share: Optional[float]         # share of the time after the first batch with the device idle


@dataclasses.dataclass(frozen=True)
class SweepResult:
    report: Optional[dict]  # the merged report (process 0; None on the others)
    throughput: Throughput


@dataclasses.dataclass(frozen=True, eq=False)
class _Prepared:
    index: int
    key: str
    loaded: LoadedSample
    pixels: np.ndarray
    geometry: Geometry


def run_sweep(dataset: Dataset, method: Method, out: str | os.PathLike, source: str = "",
              template: Optional[str] = None, evaluation: EvalOptions = EvalOptions(),
              options: RunOptions = RunOptions(), data_folder: Optional[str] = None) -> SweepResult:
    """Runs (or resumes) this process's share of the sweep and, on process 0, writes the merged report.

    ``source`` says where the dataset was read from. With the run (method, model, settings, protocol), dataset,
    the annotations' fingerprint, template, limit (None where it covers the dataset: `recorded_limit`) and
    evaluation options it is stored in ``sweep.json`` and checked
    on resume, where only the limit may change, and only grow, and the folder the data is in (``data_folder``, as
    ``source`` names it), where the annotations' fingerprint is unchanged: a dataset moved or mounted elsewhere.
    The template ``"{}"`` is stored as None: both prompt with the bare class names.
    """
    out, run = refuse_together(lambda: (check_output_folder(out), method.run_info()))  # e.g. --out a file on one host
    template = None if template == DEFAULT_TEMPLATE else template  # the bare names: one spelling, compared on resume
    process, processes = jax.process_index(), jax.process_count()
    shared, limit = shared_names(dataset.class_names), recorded_limit(dataset, options.limit)
    config = json.loads(json.dumps({"schema": RESULT_SCHEMA, "version": RESULT_VERSION, "run": run,
                                    "dataset": dataset.name, "source": source, "template": template,
                                    "classes": len(dataset.class_names), "limit": limit,
                                    "evaluation": evaluation.to_dict(),
                                    **({"data_fingerprint": dataset.fingerprint} if dataset.fingerprint else {}),
                                    **({"units_version": dataset.units_version} if dataset.units_version > 1 else {}),
                                    **({"shared_class_names": shared} if shared else {})}))
    _check_processes_agree(config, data_folder)
    created = not out.exists()
    barrier("tclip-sweep-seen")  # every process has looked before any makes the folder for its lock
    new_sweep = False  # checked, into an empty folder: what is in it from now on this sweep wrote

    def discard_new_sweep() -> bool:
        """A new sweep stopped before its first record leaves the folder as it found it (nothing to resume); whether
        it did. Also run where the process ends at once, past the `except` below (`at_early_end`: a SIGTERM while the
        main thread is blocked in a compilation)."""
        if not (new_sweep and process == 0) or read_all_records(out):
            return False
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:  # made beforehand (`mkdir out` in a job script): a plain rerun must find it empty again
            _remove_new_sweep(out)
        return True

    # Checked and run by no other sweep meanwhile.
    check = functools.partial(_check_config, out, config, options.resume, data_folder, method.clip)
    with _locked_and_checked(out, check, created) as killed_sweep, at_early_end(discard_new_sweep):
        scored = 0  # samples this run recorded that went through the device (not an error)
        rates: list[Throughput] = []  # this run's, however it ends
        try:
            if killed_sweep and process == 0:  # by one process, once every process has checked the folder
                _remove_new_sweep(out)
            new_sweep = killed_sweep or not (out / CONFIG_FILE).exists()
            queries = _Queries(method, class_queries(dataset.class_names, template))  # bad prompts: nothing written
            barrier("tclip-sweep-checked")  # nobody writes before every process has checked
            if process == 0:
                remove_stale_locks(out, processes)
                # The environments of the runs before (recorded, not compared; none for a new sweep, none recorded
                # for one stored before they were); this run's, where samples are left to score (below).
                before = [] if new_sweep else read_config(out).get("environment")
                _write_json(out / CONFIG_FILE, {**config, **({} if before is None else {"environment": before})})
            for path in files_to_retry(out, process, processes):  # a resumed sweep tries its failed samples again
                drop_errors(path)
            barrier("tclip-sweep-retry")
            existing = read_all_records(out)
            done = {record["key"] for record in existing}
            gallery = UnitGallery(out / GALLERY_DIR, existing)  # report.html's best and worst unit per class
            pictures = UnitPictures(out / VIS_DIR, [r for r in existing if r["index"] < options.save_vis])  # --save-vis
            # Recorded, but a picture of theirs is not on disk (it could not be written, or --save-vis asks for more
            # than a run before drew): run again for it.
            redrawn = gallery.undrawn_keys | pictures.undrawn_keys
            own_done = len(read_records(results_path(out, process)))
            total = min(options.limit or dataset.size, dataset.size)
            if process == 0 and len({r["key"] for r in existing if r["index"] < total}) < total:
                # Samples left to score (every process reads the same records): this run's environment, before any
                # process records one, so that a run stopped midway (SIGTERM, a peer's crash) is listed too.
                _note_environment(out)
            barrier("tclip-sweep-start")

            todo = ((sample.index, sample) for sample in dataset.samples(options.limit)
                    if owns(sample.index, process, processes) and (sample.key not in done or sample.key in redrawn))
            share = -(-(total - process) // processes)
            suffix = f" [process {process}/{processes}]" if processes > 1 else ""
            with ResultWriter(results_path(out, process)) as writer, \
                    tqdm(total=max(share - own_done, 0), unit="img", desc=f"sweep {dataset.name}{suffix}",
                         disable=not options.progress) as bar:
                def record(entry: dict) -> None:
                    nonlocal scored
                    if entry["key"] in redrawn:  # its record is on disk: run again for its pictures only
                        return
                    writer.append(entry)
                    scored += "error" not in entry
                    bar.update()

                maps = DeviceMaps(method, jax.local_devices())
                try:
                    _pipeline(todo, method, queries, maps, dataset, evaluation, options, pictures, record,
                              rates.append, gallery)
                finally:
                    maps.close()
        except BaseException:
            # Stopped (Ctrl-C, SIGTERM, an error): a new sweep with no record leaves nothing; one that scored, the
            # rates of what it did.
            if not discard_new_sweep() and scored:
                with contextlib.suppress(OSError):  # (a full disk: its own error is the one to tell)
                    _write_rates(out, process, rates[0])
            raise
        # A resume that scores nothing (nothing left, samples still failing, or report.html pictures redrawn) keeps
        # the rates of the last run that scored (its whole share may have been done by a run that was stopped).
        if scored:
            _write_rates(out, process, rates[0])
        barrier("tclip-sweep-end")  # every process's records are written before process 0 reports them
        return SweepResult(write_report(out) if process == 0 else None, rates[0])


def _note_environment(out: pathlib.Path) -> None:
    """Adds this run's environment (`run_environment`, process 0's) to sweep.json's "environment", the environments
    the runs that set out to score samples ran under, in order, noted before any process scores one (so a run
    stopped midway, on any process, is listed): a run under the environment of the one before it is not listed
    again, and a run with nothing to score (a resume with nothing left, or that redraws pictures) is not listed. None
    stands for the runs of a sweep stored before sweeps recorded them (or a list edited into something else)."""
    config = read_config(out)
    runs = config.get("environment", [None])
    runs = runs if isinstance(runs, list) else [None]
    now = run_environment()
    if not runs or runs[-1] != now:
        _write_json(out / CONFIG_FILE, {**config, "environment": [*runs, now]})


def _write_rates(out: pathlib.Path, process: int, throughput: Throughput) -> None:
    _write_json(out / f"throughput-p{process}.json", dataclasses.asdict(throughput))


def recorded_limit(dataset: Dataset, limit: Optional[int]) -> Optional[int]:
    """The limit sweep.json records: None (every sample) where `limit` covers the whole dataset, so that the report
    says so and a whole split keeps its paper figures; a synthetic sweep's as given, its number of scenes, which
    makes its dataset (and a stored None means the default number)."""
    covers = limit is not None and limit >= dataset.size and not is_synthetic_dataset(dataset.name)
    return None if covers else limit


def _pipeline(todo: Iterable[tuple[int, Sample]], method: Method, queries: "_Queries", maps: DeviceMaps,
              dataset: Dataset, evaluation: EvalOptions, options: RunOptions, pictures: UnitPictures,
              record: Callable[[dict], None], ended: Callable[[Throughput], None],
              gallery: Optional[UnitGallery] = None) -> None:
    """Scores `todo`, giving each record to `record` and, however it ends, this run's rates to `ended`."""
    clock = DeviceClock()
    records = _InOrder(record)
    labels = class_labels(dataset.class_names)
    sizes: list[int] = []
    started = time.perf_counter()
    try:
        with clock, concurrent.futures.ThreadPoolExecutor(options.workers, "tclip-load") as loaders, \
                concurrent.futures.ThreadPoolExecutor(options.workers, "tclip-host") as hosts:
            def score(batch: list[_Prepared], device_maps: DispatchedMaps) -> None:
                """Hand each image of a dispatched batch to the host threads."""
                host_maps = device_maps.host_maps()  # waits for this batch; the next one is already queued
                for prepared, image_maps in zip(batch, host_maps):
                    records.submit(hosts.submit(_evaluate, prepared, image_maps, method, labels,
                                                evaluation, pictures if prepared.index < options.save_vis else None,
                                                gallery))

            prepared = _prepare_ahead(loaders, todo, method, 2 * options.batch_size + options.workers)
            in_flight = None
            for batch in _batches(prepared, options.batch_size, records.record):
                device_maps = maps(np.stack([p.pixels for p in batch]), *queries.for_batch([p.loaded for p in batch]))
                clock.dispatched(device_maps)
                if in_flight is not None:
                    score(*in_flight)
                in_flight = (batch, device_maps)
                sizes.append(len(batch))
                records.wait(2 * options.batch_size)
            if in_flight is not None:
                score(*in_flight)
            records.wait(0)
    finally:  # a run stopped midway too: the rates of what it did (`run_sweep` keeps them where it scored)
        ended(_throughput(clock.spans, sizes, time.perf_counter() - started, len(maps.devices)))


class _InOrder:
    """Records host evaluations in submission order as soon as each is done, whichever thread finishes it.

    So a record reaches the disk while the main thread waits on a slow loader, and a kill loses no finished work.
    The first record that cannot be written (a full disk) stops all recording, and `wait` or `record` raises its
    error in the main thread: where a done-callback's thread wrote it, concurrent.futures would only log the error,
    the record would be lost and the sweep go on.
    """

    def __init__(self, record: Callable[[dict], None]):
        self._record = record
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self._lock = threading.Lock()  # one writer at a time, and the order of the pending queue
        self._write_error: Optional[Exception] = None

    def record(self, entry: dict) -> None:
        with self._lock:
            self._raise_write_error()
            self._record(entry)

    def submit(self, evaluation: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending.append(evaluation)
        evaluation.add_done_callback(lambda _: self._flush())

    def wait(self, keep: int) -> None:
        """Blocks while more than `keep` evaluations are pending; raises a failed evaluation's error, or the
        error of a record that could not be written."""
        while True:
            with self._lock:
                self._raise_write_error()
                front = self._pending[0] if self._pending else None
                if front is None or (len(self._pending) <= keep and not (front.done() and front.exception())):
                    return
            front.result()
            self._flush()

    def _flush(self) -> None:
        with self._lock:  # a failed evaluation stays at the front, for `wait` to raise
            while (self._write_error is None and self._pending and self._pending[0].done()
                   and self._pending[0].exception() is None):
                try:
                    self._record(self._pending[0].result())
                except Exception as err:  # kept for the main thread (`_raise_write_error`)
                    self._write_error = err
                    return
                self._pending.popleft()

    def _raise_write_error(self) -> None:
        if self._write_error is not None:
            raise self._write_error


def _prepare_ahead(pool: concurrent.futures.Executor, todo: Iterable[tuple[int, Sample]], method: Method,
                   lookahead: int) -> Iterator[tuple[int, Sample, concurrent.futures.Future]]:
    """(index, sample, future of its _Prepared) in dataset order, with `lookahead` loads running ahead."""
    window: collections.deque = collections.deque()
    for index, sample in todo:
        window.append((index, sample, pool.submit(_prepare, index, sample, method)))
        if len(window) >= lookahead:
            yield window.popleft()
    yield from window


def _prepare(index: int, sample: Sample, method: Method) -> _Prepared:
    loaded = sample.load()
    pixels, geometry = method.prepare(loaded.image)
    return _Prepared(index, sample.key, loaded, pixels, geometry)


def _batches(prepared: Iterator[tuple[int, Sample, concurrent.futures.Future]], size: int,
             record: Callable[[dict], None]) -> Iterator[list[_Prepared]]:
    """Batches of loaded samples with units, each of one input shape (a method whose input keeps the aspect ratio
    gives images of other shapes other batches); unreadable samples and samples without units are recorded here."""
    batch: list[_Prepared] = []
    for index, sample, future in prepared:
        try:
            item = future.result()
        except SAMPLE_ERRORS as err:
            record(_error_record(index, sample.key, err))
            continue
        if not item.loaded.targets:
            record({"key": item.key, "index": index, "units": []})
            continue
        if batch and item.pixels.shape != batch[0].pixels.shape:
            yield batch
            batch = []
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Queries:
    """The queries of the sweep: every class's, encoded once, then those targets bring themselves, per batch."""

    def __init__(self, method: Method, classes: Sequence[Query]):
        self.method = method
        self.label_set = [q.prompt for q in classes]
        self.classes = method.encode(classes, label_set=self.label_set)

    def for_batch(self, batch: Sequence[LoadedSample]) -> tuple[QueryArrays, np.ndarray]:
        """(queries, rows [B, slots]): row k of image b is the query of its target k (padded with its first)."""
        own = list(dict.fromkeys(t.query for loaded in batch for t in loaded.targets if t.query is not None))
        queries = self.classes
        if own:
            extra = self.method.encode(own, label_set=self.label_set)
            queries = self.classes.extend(extra.take(pad_slots(range(len(own)), class_slots(len(own)))))
        row_of = {query: len(self.classes) + i for i, query in enumerate(own)}
        rows = [[t.class_id if t.query is None else row_of[t.query] for t in loaded.targets] for loaded in batch]
        slots = class_slots(max(map(len, rows)))
        return queries, np.stack([pad_slots(r, slots) for r in rows])


def _evaluate(prepared: _Prepared, image_maps: np.ndarray, method: Method, labels: tuple[str, ...],
              evaluation: EvalOptions, pictures: Optional[UnitPictures],
              gallery: Optional[UnitGallery] = None) -> dict:
    targets = prepared.loaded.targets
    try:
        heatmaps = np.asarray(method.original_maps(image_maps[:len(targets)], prepared.geometry))
        covered = prepared.geometry.covered
        host = method.postprocess(heatmaps, soft_maps=any(t.mask is not None for t in targets), covered=covered)
        units = [{"class_id": t.class_id, "class": labels[t.class_id], **_query_fields(t),
                  **score_unit(t, h, m, evaluation, covered)} for t, h, m in zip(targets, heatmaps, host)]
    except SAMPLE_ERRORS as err:
        return _error_record(prepared.index, prepared.key, err)
    # Pictures only, of final scores; they never change a record.
    if pictures is not None:
        pictures.save(prepared.key, prepared.loaded.image, targets, heatmaps, units)
    if gallery is not None:
        gallery.offer(prepared.index, prepared.key, prepared.loaded.image, targets, heatmaps, units)
    return {"key": prepared.key, "index": prepared.index, "units": units}


def _query_fields(target) -> dict:
    fields = {} if target.group is None else {"group": target.group}
    if target.query is not None:
        fields["prompt"] = target.query.prompt
        fields["span"] = None if target.query.span is None else list(target.query.span)
    return fields


def _error_record(index: int, key: str, err: Exception) -> dict:
    return {"key": key, "index": index, "error": f"{type(err).__name__}: {err}"}


def _remove_new_sweep(out: pathlib.Path) -> None:
    """Removes what a new sweep that recorded nothing wrote into a folder it found empty (`_check_config`)."""
    for path in [out / CONFIG_FILE, *out.glob(RESULTS_GLOB)]:
        path.unlink(missing_ok=True)
    for folder in (GALLERY_DIR, VIS_DIR):
        shutil.rmtree(out / folder, ignore_errors=True)


def _killed_before_its_first_record(out: pathlib.Path) -> bool:
    """Whether `out` holds what a new sweep killed before its first record leaves (SIGKILL runs no cleanup): its
    sweep.json, results files without a record, lock files, and pictures, and nothing else. None of its lock files
    is held but by the sweep that checks `out`: a lock a live sweep holds refuses that one (`_locked_and_checked`)."""
    own = [CONFIG_FILE, GALLERY_DIR, VIS_DIR, *(p.name for p in [*out.glob(RESULTS_GLOB), *out.glob(LOCKS_GLOB)])]
    return not unwritten_entries(out, own) and not read_all_records(out)


def _check_config(out: pathlib.Path, config: dict, resume: bool, data_folder: Optional[str] = None,
                  clip: Optional[LoadedClip] = None) -> bool:
    """Refuses a sweep into `out` that would not be the sweep stored there (or a new one into a folder that is not
    empty); `clip`, the sweep's model, reads a model fingerprint stored by its first definition. Returns whether `out`
    holds what a new sweep killed before its first record left (`_killed_before_its_first_record`), which a new sweep
    replaces: it removes nothing, which its caller does once every process has checked."""
    path = out / CONFIG_FILE
    if path.exists() and not resume and _killed_before_its_first_record(out):
        return True  # nothing to resume: a new sweep starts there, as in the folder before it
    if not path.exists():
        records = sorted(p.name for p in out.glob(RESULTS_GLOB))
        if records:  # a new sweep would keep them and count them as its own
            raise ValueError(f"{out} holds sweep records ({', '.join(records)}) but no {CONFIG_FILE}, which says what "
                             f"they were run with, so they can be neither resumed nor added to: restore {CONFIG_FILE} "
                             "or choose another --out")
        # A new sweep writes report.md and prunes gallery/ to its own pictures: only into an empty folder (but for
        # sweeps' locks and file browsers' files), as `tclip explain` replaces only an empty folder or its own output.
        foreign = unwritten_entries(out, [p.name for p in out.glob(LOCKS_GLOB)])
        if foreign:
            raise ValueError(f"{out} is neither empty nor a sweep (it has no {CONFIG_FILE} and holds "
                             f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), and a new sweep would "
                             "overwrite or delete files there; choose another --out")
        if resume:  # a mistyped --out would start a whole new sweep
            raise ValueError(f"nothing to resume in {out} (no {CONFIG_FILE}); drop --resume to start a sweep there")
        return False
    if not resume:
        raise ValueError(f"{out} already holds a sweep; pass --resume to continue it or choose another --out")
    changed = _config_changes(read_config(out), config, data_folder, clip)
    # samples(limit) are the samples of index below the limit, so a larger one keeps every stored record: a sweep
    # may grow on resume (--limit 50, then 500), never shrink (the records past the new limit would stay in it). A
    # limit past the dataset's end, stored as given before 2026-12-06, grows to None, as it is recorded now.
    stored_limit, limit = changed.get("limit", (None, None))
    grows = "limit" in changed and stored_limit is not None and (limit is None or limit > stored_limit)
    if grows:
        del changed["limit"]
    if changed:
        shrinks = " (a resumed sweep's --limit may grow, not shrink)" if "limit" in changed else ""
        edited = (" (the annotations were edited since the sweep began: its records were scored on the old ones; "
                  "start a new --out)") if "data_fingerprint" in changed else ""
        shared = (" (its records name classes that share a name alike, as sweeps before 2026-12-05 did; start a "
                  "new --out)") if "shared_class_names" in changed else ""
        same_reading = not any(key in ("dataset", "source") for key in changed)  # else said by those
        other_units = (" (the dataset's units are read otherwise since the sweep began: its records hold the old "
                       "ones; start a new --out)") if "units_version" in changed and same_reading else ""
        other_model = (" (not the sweep's model, whatever its path: its weights or activation differ; name the "
                       "sweep's model or start a new --out)") if "run.model.fingerprint" in changed else ""
        # A method's maps version may follow its settings (TCLIP's its input protocol): the maps changed under the
        # sweep only where the method and its settings did not.
        same_method = not any(key in ("run.method", "run.input_protocol") or key.startswith("run.settings.")
                              for key in changed)
        other_maps = (" (the method's maps changed since the sweep began: its records hold the old ones; start a "
                      "new --out)") if "run.maps_version" in changed and same_method else ""
        other_precision = (" (JAX's matmul precision, None its default: set the stored one, e.g. by the environment's "
                           "JAX_DEFAULT_MATMUL_PRECISION)") if "run.model.matmul_precision" in changed else ""
        raise ValueError(f"cannot resume {out}: the sweep there differs in "
                         + "; ".join(f"{key} (stored {old!r}, now {new!r})" for key, (old, new) in changed.items())
                         + shrinks + edited + shared + other_units + other_model + other_maps + other_precision)
    return False


def _check_processes_agree(config: dict, data_folder: Optional[str]) -> None:
    """Refuses, in every process at once, a multi-process sweep whose processes were started with other
    configurations (another --box-rule): they would write into one sweep under process 0's sweep.json. Every process
    takes part (`gather_text`) before anything is written and reaches the same verdict from the same texts, so none
    is left waiting for another that refused. They are compared as a resume compares a configuration with the stored
    one (`_config_changes`): a model or a data folder named by another path on another host is the same."""
    texts = gather_text(json.dumps({"config": config, "data_folder": data_folder}))
    for process, text in enumerate(texts[1:], 1):
        other = json.loads(text)
        changed = _config_changes(json.loads(texts[0])["config"], other["config"], other["data_folder"])
        if changed:
            raise ValueError(f"process {process} was started with another sweep configuration than process 0: "
                             + "; ".join(f"{key} (process 0 {old!r}, process {process} {new!r})"
                                         for key, (old, new) in changed.items())
                             + "; start every process with the same arguments")


@contextlib.contextmanager
def _locked_and_checked(out: pathlib.Path, check: Callable[[], T], created: bool) -> Iterator[T]:
    """Holds this process's lock on `out` (`results_lock`) for the block, taken in the check every process runs
    together (`refuse_together`) with `check`, the folder's (`_check_config`), whose value it yields: a sweep refused
    at one process's lock (another sweep runs there) is refused by every process at once, where the others waited for
    it for ever. A lock of a process this sweep does not have that is held is another sweep's too
    (`refuse_held_locks`). `created`: `out` did not exist when every process looked; a refused sweep leaves it
    removed (each lock removes only a folder its own process made, and the process that made it may let go while
    another's lock is still in it)."""
    with contextlib.ExitStack() as held:
        def locked_check() -> T:
            held.enter_context(results_lock(out, jax.process_index()))
            refuse_held_locks(out, jax.process_count())
            return check()

        try:
            value = refuse_together(locked_check)
        except BaseException:
            held.close()  # its lock let go first
            if created:
                with contextlib.suppress(OSError):  # by the last process to let go: the folder is empty then
                    out.rmdir()
            raise
        yield value


def refuse_together(check: Callable[[], T], errors: tuple[type[Exception], ...] = (OSError, ValueError)) -> T:
    """Runs this process's `check` (of the sweep's folder, `_locked_and_checked`; of the command line's dataset and
    method, `tclip sweep`) and refuses, in every process of a multi-process sweep at once and in the same line, where
    any process's check refused: the processes may disagree where `_check_processes_agree` does not compare them
    (--resume on some only, a --data folder one host lacks) or see the folder otherwise (another host, another sweep's
    lock), and a process that refused alone left the others waiting at the next barrier for ever. Every process takes
    part (`gather_text`) whatever its verdict; a single process raises its own error unchanged. `errors`: the
    exceptions that are refusals (others are bugs, raised as they are). Returns `check`'s value."""
    verdict, error, value = "", None, None
    try:
        value = check()
    except errors as err:
        verdict, error = " ".join((str(err) or type(err).__name__).split()), err
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return value
    refused = [(process, text) for process, text in enumerate(gather_text(verdict)) if text]
    if refused:
        (process, text), others = refused[0], [str(p) for p, _ in refused[1:]]
        also = f" (process{'es' if len(others) > 1 else ''} {', '.join(others)} refused too)" if others else ""
        raise ValueError(f"process {process} of the sweep refused it{also}: {text}") from error
    return value


def _config_changes(stored: dict, config: dict, data_folder: Optional[str] = None,
                    clip: Optional[LoadedClip] = None) -> dict[str, tuple]:
    """{dotted key: (stored, now)} where the sweep configuration `config` is not the sweep `stored` holds
    (`_changed_fields`, after what tells a sweep apart is read from either: weights, not model paths; annotations,
    not the data folder; older sweep.json spellings); `data_folder` as `config`'s source names it."""
    stored.pop("environment", None)  # recorded, not compared (`tclip_jax.environment`)
    fingerprinted = bool(stored.get("data_fingerprint"))  # what tells a moved dataset (below) is the stored one
    if "data_fingerprint" in config:  # a sweep stored before datasets had fingerprints: nothing to check against
        stored.setdefault("data_fingerprint", config["data_fingerprint"])
    model, stored_model = config["run"]["model"], stored.get("run", {}).get("model", {})
    if stored.get("template") == DEFAULT_TEMPLATE:  # stored before "{}" was stored as None, which prompts alike
        stored["template"] = None
    if is_synthetic_dataset(str(stored.get("dataset"))) and stored.get("limit") is None:
        # A synthetic sweep stored before it recorded its number of scenes as its limit swept the default number.
        stored["limit"] = SYNTHETIC_SCENES
    if stored.get("dataset") == config["dataset"] and is_synthetic_dataset(config["dataset"]):
        protocol = config["dataset"][len(DATASET_PREFIX):]
        if stored.get("source") == heldout_source(protocol, opencv=False):
            # Stored before sweeps recorded the OpenCV that drew the scenes: nothing to check against (as a sweep
            # stored before data fingerprints), so taken as drawn with this one, which sweep.json records from now.
            stored["source"] = heldout_source(protocol)
    if "matmul_dtype" in model:
        # Sweeps stored before results recorded the matmul dtype ran float32 matmuls (the command line had no other).
        stored_model.setdefault("matmul_dtype", "float32")
    if "fingerprint" in model:
        recorded = stored_model.get("fingerprint")
        if is_v1_fingerprint(recorded) and clip is not None and clip.is_recorded_as(recorded):
            # Stored by the first definition, which names this model as far as it tells (not a fine-tune of the
            # transformer blocks alone): the sweep's model, whose fingerprint sweep.json records from now on.
            stored_model["fingerprint"] = recorded = model["fingerprint"]
        if recorded is not None:
            # The weights tell the model, not the path as typed (./m.npz is m.npz; a file replaced at the same path
            # is another model) nor how it was stored (an OpenAI .pt and its `tclip convert` folder): the origin and
            # source are kept in sweep.json for people, not compared.
            stored_model.update(origin=model["origin"], source=model["source"])
        else:  # a sweep stored before models had fingerprints (and activations): compared by its origin, as then
            stored_model.update(fingerprint=model["fingerprint"], activation=model["activation"])
    if data_folder and fingerprinted and stored["data_fingerprint"] == config.get("data_fingerprint"):
        # The annotations tell the data, not the folder holding them (moved, or mounted elsewhere on another host):
        # a source that differs only where the folder is named is this one.
        before, named, after = config["source"].partition(data_folder)
        old_source = stored.get("source")
        if (named and isinstance(old_source, str) and len(old_source) > len(before) + len(after)
                and old_source.startswith(before) and old_source.endswith(after)):
            stored["source"] = config["source"]
    projections, stored_projections = config["run"].get("projections"), stored.get("run", {}).get("projections")
    if (isinstance(projections, dict) and isinstance(stored_projections, dict)
            and stored_projections.get("sha256") == projections.get("sha256")):
        # ECLIP's trained projections are told by their digest, not by the path as typed (as the model is).
        stored_projections["file"] = projections["file"]
        stored["run"].get("settings", {})["projections"] = config["run"]["settings"]["projections"]
    if "maps_version" in config["run"]:  # a sweep stored before methods recorded it holds their first maps
        stored.get("run", {}).setdefault("maps_version", 1)
    return _changed_fields(stored, config)


def _changed_fields(stored: dict, now: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (stored value, value now)} of every leaf where two sweep configurations differ."""
    changed = {}
    for key in sorted(stored.keys() | now.keys()):
        old, new = stored.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed.update(_changed_fields(old, new, f"{prefix}{key}."))
        elif old != new:
            changed[prefix + key] = (old, new)
    return changed


def _write_json(path: pathlib.Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class DeviceClock:
    """Notes, on its own thread, when each dispatched batch finishes on the device (anything with
    `block_until_ready`: a jax.Array or `DispatchedMaps`); `spans` once its `with` block is left.

    The block always joins the thread, on an error or Ctrl-C too: a thread left waiting inside the runtime when the
    interpreter exits aborts the process (SIGABRT, "FATAL: exception not rethrown") instead of its exit status."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.spans: list[tuple[float, float]] = []  # (dispatch, finish) per batch, in dispatch order
        self._thread = threading.Thread(target=self._watch, name="tclip-device-clock")

    def __enter__(self) -> "DeviceClock":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._queue.put(None)
        self._thread.join()

    def dispatched(self, maps: DispatchedMaps | jax.Array) -> None:
        self._queue.put((time.perf_counter(), maps))

    def _watch(self) -> None:
        while (item := self._queue.get()) is not None:
            dispatched, maps = item
            maps.block_until_ready()
            self.spans.append((dispatched, time.perf_counter()))


def device_busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Seconds during which a batch was queued on the device, from (dispatch, finish) per batch in dispatch order
    (a batch queued while the one before it runs starts when that one finishes)."""
    previous_finish = [spans[0][0]] + [finish for _, finish in spans[:-1]] if spans else []
    return sum(finish - max(dispatched, previous) for (dispatched, finish), previous in zip(spans, previous_finish))


def device_wait_share(spans: list[tuple[float, float]]) -> Optional[float]:
    """The share of the time from the first batch's finish to the last's during which no batch was queued on the
    device (None for fewer than two batches)."""
    steady = spans[-1][1] - spans[0][1] if len(spans) > 1 else 0.0
    after_first = device_busy_seconds(spans) - (spans[0][1] - spans[0][0]) if spans else 0.0
    return 1.0 - after_first / steady if steady > 0 else None


def _throughput(spans: list[tuple[float, float]], sizes: list[int], wall: float, devices: int) -> Throughput:
    """Rates and the device's idle share from (dispatch, finish) of each batch of `sizes` images."""
    steady = spans[-1][1] - spans[0][1] if len(spans) > 1 else 0.0
    return Throughput(
        devices=devices,
        images=sum(sizes),
        batches=len(sizes),
        wall_seconds=wall,
        images_per_second=sum(sizes) / wall if wall > 0 else 0.0,
        steady_images_per_second=sum(sizes[1:]) / steady if steady > 0 else None,
        device_wait_share=device_wait_share(spans),
    )
