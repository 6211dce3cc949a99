"""Per-image results as JSON lines, one file per process, safe against being killed at any moment.

- Each record is one line written unbuffered (a write cut short goes on with the rest), then ``fsync``-ed, so a
  record on disk is complete once ``append`` returns. A kill, or a write that fails (a full disk), can only leave
  the last line torn: text after the final newline; the sweep stops at the first write that fails.
- Reading drops a torn last line; before appending, a writer truncates its own file back to the last newline,
  so the next record starts on a fresh line. Any other unreadable line is corruption and an error.
- ``<out>/results-p<process>.jsonl`` holds one process's records; a report reads all of them.
- A resumed sweep tries its error records again (a missing file may be there now): `drop_errors` rewrites the
  file without them, whole or not at all, before the sweep reads what is done; each process its own file, and
  process 0 also the files of processes a resume on fewer processes does not have (`files_to_retry`).
- A sweep holds ``<out>/results-p<process>.lock`` (`results_lock`, an exclusive ``flock``) for its whole run, so a
  second sweep into the same folder, or a second --resume of it, is refused instead of writing the same file. A
  killed process leaves its lock file (not the lock); process 0 of a resume on fewer processes removes those of the
  processes it does not have (`remove_stale_locks`). One of those that is held is a live process's: another sweep,
  or what is left of one whose other processes were killed, still runs there, and a sweep there is refused
  (`refuse_held_locks`).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
from collections.abc import Iterator

from tclip_jax.files import held_lock, loads_json, refuse_if_held, write_bytes_atomic

RESULTS_GLOB = "results-p*.jsonl"
LOCKS_GLOB = "results-p*.lock"


def results_path(out: pathlib.Path, process_index: int) -> pathlib.Path:
    return out / f"results-p{process_index}.jsonl"


def read_records(path: pathlib.Path) -> list[dict]:
    """The complete records of one results file, in file order; a torn last line is dropped."""
    if not path.exists():
        return []
    complete = path.read_bytes().split(b"\n")[:-1]  # whatever follows the last newline is torn
    records = []
    for number, line in enumerate(complete, start=1):
        try:
            record = loads_json(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: line {number} is not a JSON record ({err}); the file is corrupt") from None
        problem = _record_problem(record)
        if problem:
            raise ValueError(f"{path}: line {number} is not a result record ({problem}); the file is corrupt")
        records.append(record)
    return records


def files_to_retry(out: pathlib.Path, process: int, processes: int) -> list[pathlib.Path]:
    """The results files whose error records `process` drops on a resume: its own, and for process 0 those of
    processes this run does not have (a sweep resumed on fewer processes), which no other process touches."""
    return [results_path(out, process), *(_files_of_processes_from(out, ".jsonl", processes) if process == 0 else [])]


def _files_of_processes_from(out: pathlib.Path, suffix: str, first: int) -> list[pathlib.Path]:
    """The files ``results-p<process><suffix>`` under ``out`` of processes ``first`` and above."""
    return [path for path in sorted(out.glob(f"results-p*{suffix}"))
            if (owner := re.fullmatch(rf"results-p(\d+){re.escape(suffix)}", path.name)) and int(owner[1]) >= first]


def drop_errors(path: pathlib.Path) -> None:
    """Rewrites one results file without its error records (and a torn last line)."""
    records = read_records(path)
    kept = [record for record in records if "error" not in record]
    if len(kept) < len(records):
        write_bytes_atomic(path, b"".join(map(_line, kept)))


def _line(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode() + b"\n"


def _record_problem(record) -> str:
    if not isinstance(record, dict):
        return "not an object"
    if not isinstance(record.get("key"), str):
        return "no 'key'"
    if isinstance(record.get("index"), bool) or not isinstance(record.get("index"), int) or record["index"] < 0:
        return "no 'index'"
    if not isinstance(record.get("units"), list) and not isinstance(record.get("error"), str):
        return "neither 'units' nor 'error'"
    return ""


def read_all_records(out: pathlib.Path) -> list[dict]:
    """Every process's records under ``out``; a key recorded twice is an error."""
    records, seen = [], {}
    for path in sorted(out.glob(RESULTS_GLOB)):
        for record in read_records(path):
            key = record["key"]
            if key in seen:
                where = f"twice in {path}" if seen[key] == path else f"in both {seen[key]} and {path}"
                raise ValueError(f"sample {key!r} is recorded {where}: the records in {out} are not one sweep's (two "
                                 "sweeps wrote into it at once, which sweeps before 2026-12-05 did not prevent, or "
                                 "results files were copied into it), so they cannot be resumed or reported; run "
                                 "the sweep again in a new --out")
            seen[key] = path
            records.append(record)
    return records


@contextlib.contextmanager
def results_lock(out: pathlib.Path, process_index: int) -> Iterator[None]:
    """Holds this process's lock on ``out`` for the block, making the folder if need be: a second sweep into it is
    refused at once, in one line (`files.held_lock`)."""
    with held_lock(out / f"results-p{process_index}.lock", "sweep", out, make_folder=True):
        yield


def refuse_held_locks(out: pathlib.Path, processes: int) -> None:
    """Refuses, in `results_lock`'s line, a sweep on ``processes`` processes into ``out`` where a lock of a process
    it does not have (``processes`` and above) is held: another sweep runs there, whose lower processes, those whose
    locks this sweep takes, have ended or not yet locked theirs. Takes and removes nothing (`files.refuse_if_held`), so
    every process of the sweep may look at once."""
    for path in _files_of_processes_from(out, ".lock", processes):
        refuse_if_held(path, "sweep", out)


def remove_stale_locks(out: pathlib.Path, processes: int) -> None:
    """Removes the lock files of processes ``processes`` and above, which a killed sweep run on more processes
    left: each is taken first (`files.held_lock`, which removes it as it lets go), so one still held is left."""
    for path in _files_of_processes_from(out, ".lock", processes):
        with contextlib.suppress(ValueError):  # held, or another user's: not ours to remove
            with held_lock(path, "sweep", out):
                pass


class ResultWriter:
    """Appends records to one results file, each durable before ``append`` returns."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        if path.exists():
            data = path.read_bytes()
            os.truncate(path, len(data) - len(data.split(b"\n")[-1]))  # drop a torn last line
        self._file = open(path, "ab", buffering=0)  # unbuffered: nothing of a failed write is left to write later

    def append(self, record: dict) -> None:
        line = memoryview(_line(record))
        try:
            while line:  # a write cut short (a full disk) goes on with the rest, which then raises
                line = line[self._file.write(line):]
            os.fsync(self._file.fileno())
        except OSError as err:  # which file: a full disk's error names none
            raise OSError(err.errno, err.strerror, str(self.path)) from None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
