"""Per-image results as JSON lines, one file per process, safe against being killed at any moment.

- Each record is one line written with a single ``write``, then flushed and ``fsync``-ed, so a record on disk
  is complete once ``append`` returns. A kill can only leave the last line torn: text after the final newline.
- Reading drops a torn last line; before appending, a writer truncates its own file back to the last newline,
  so the next record starts on a fresh line. Any other unreadable line is corruption and an error.
- ``<out>/results-p<process>.jsonl`` holds one process's records; a report reads all of them.
- A resumed sweep tries its error records again (a missing file may be there now): `drop_errors` rewrites the
  file without them, whole or not at all, before the sweep reads what is done; each process its own file, and
  process 0 also the files of processes a resume on fewer processes does not have (`files_to_retry`).
"""
from __future__ import annotations

import json
import os
import pathlib
import re

from tclip_jax.files import write_bytes_atomic

RESULTS_GLOB = "results-p*.jsonl"


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
            record = json.loads(line)
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
    paths = [results_path(out, process)]
    if process == 0:
        for path in sorted(out.glob(RESULTS_GLOB)):
            written_by = re.fullmatch(r"results-p(\d+)\.jsonl", path.name)
            if written_by and int(written_by[1]) >= processes:
                paths.append(path)
    return paths


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
            if record["key"] in seen:
                raise ValueError(f"sample {record['key']!r} is recorded twice ({seen[record['key']]} and {path})")
            seen[record["key"]] = path
            records.append(record)
    return records


class ResultWriter:
    """Appends records to one results file, each durable before ``append`` returns."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        if path.exists():
            data = path.read_bytes()
            os.truncate(path, len(data) - len(data.split(b"\n")[-1]))  # drop a torn last line
        self._file = open(path, "ab")

    def append(self, record: dict) -> None:
        self._file.write(_line(record))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
