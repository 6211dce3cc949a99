"""Writing results so that an interruption never leaves a half-written file or folder behind."""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def staged_folder(target: pathlib.Path, overwrite: bool = True) -> Iterator[pathlib.Path]:
    """Yields a fresh sibling folder of `target`; on success it replaces `target`, on error it is removed."""
    target = pathlib.Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary sibling, then rename it over ``path``: a reader sees the old or the new file."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
