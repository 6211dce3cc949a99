"""Writing results so that an interruption never leaves a half-written file or folder behind; reading the JSON
and .npz files a user hands over."""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Optional

try:
    import fcntl
except ImportError:  # Windows: no file locks, so staging folders of killed runs are left
    fcntl = None


# What file browsers drop into any folder they show: a run's output folder stays its own with them.
OS_METADATA_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def unwritten_entries(folder: pathlib.Path, written: Iterable[str], files_only: bool = False) -> list[str]:
    """The entries in an existing `folder` that a run writing `written` did not write, file browsers' files aside
    (with `files_only`, a folder among them is not the run's either): what replacing `folder` would delete of
    someone else's. `written` are names, or '/'-joined paths of the files a run writes in a sub-folder of its own,
    whose other entries are not the run's either; entries are returned as such paths."""
    allowed, inside = set(written) | OS_METADATA_FILES, {}
    for name in written:
        sub_folder, _, rest = name.partition("/")
        if rest:
            inside.setdefault(sub_folder, []).append(rest)
    entries = []
    for path in sorted(folder.iterdir()):
        if path.name in inside and path.is_dir() and not path.is_symlink():
            entries += [f"{path.name}/{entry}" for entry in unwritten_entries(path, inside[path.name], files_only)]
        elif path.name not in allowed or (files_only and not path.is_file()):
            entries.append(path.name)
    return entries


def fingerprint(parts: Iterable[bytes | memoryview]) -> str:
    """A short digest that tells data apart (annotations, weights, a list of files), of its byte `parts` in order
    (bytes, or a memoryview of an array's memory, hashed without a copy): what a resumed run compares with what it
    was started on."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def loads_json(text: str | bytes):
    """`json.loads(text)`; arrays or objects nested deeper than Python's parser goes (about a thousand levels, the
    recursion limit: it raises RecursionError) raise `json.JSONDecodeError` as other malformed text does, so that
    every reader names the file as not valid JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        document = text if isinstance(text, str) else text.decode("utf-8", "replace")
        raise json.JSONDecodeError("arrays or objects nested too deeply to read", document, 0) from None


def read_npz(path: str | os.PathLike, only: Optional[Iterable[str]] = None) -> dict:
    """The arrays of the .npz archive at `path` (those named in `only`, if given: the others are not decompressed),
    read without unpickling anything. ValueError naming `path` for a
    file that is not one: one numpy would read only as a pickle (neither an .npz nor an .npy file), an array of
    pickled objects (numpy's errors for these two invite loading the file "unsafely", running code it holds), an
    .npy array, an empty, truncated or corrupt archive (zipfile, zlib and numpy each raise their own types); OSError
    where the file cannot be read at all (missing, no permission)."""
    import numpy as np

    name, names = None, None if only is None else frozenset(only)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                arrays = {}
                for name in loaded.files if only is None else [n for n in loaded.files if n in names]:
                    arrays[name] = loaded[name]
                return arrays
    except OSError:
        raise
    except Exception as err:  # zipfile.BadZipFile, zlib.error, EOFError (an empty file), numpy's ValueErrors
        if isinstance(err, ValueError) and "allow_pickle" in str(err):  # numpy's errors for pickles, and only those
            what = (f"{path}: array {name} holds pickled objects" if name is not None else
                    f"{path} is neither an .npz archive nor an .npy array (numpy would read it as a pickle)")
            raise ValueError(f"{what}, and tclip never unpickles anything") from None
        raise ValueError(f"{path} is a damaged .npz archive (truncated or corrupt?): "
                         f"{err or type(err).__name__}") from None
    raise ValueError(f"{path} is an .npy array, not an .npz archive")


def nonempty_path(value: str | os.PathLike, what: str, names: str) -> pathlib.Path:
    """`value` as a path, refused where it is empty, naming `what` and what to name instead (`names`): pathlib reads
    "" as the current folder, which a run would then read or fill (an unset shell variable in a script)."""
    if not os.fspath(value):
        raise ValueError(f"{what} is empty; name {names}")
    return pathlib.Path(value)


def check_output_folder(out: str | os.PathLike, flag: str = "--out", replaced: bool = False) -> pathlib.Path:
    """`out` as a folder a run can make or fill, checked before the run starts: not a file, not under a file, neither
    it nor a folder above it a link to nothing (or a loop of links), and in a folder this process may write in. With
    `replaced` (the run replaces an existing `out` with a folder it stages beside it, `staged_folder`), the folder
    holding `out` must be writable too. Returns it as a path."""
    out = nonempty_path(out, flag, "a folder ('.' for the current one)")
    _refuse_dangling_links(out, flag)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file, not a folder")
    _check_can_write_in(out if out.exists() else next(p for p in out.parents if p.exists()), out, flag)
    # The replacement is staged beside the folder `out` names: a link's target (`staged_folder` follows it).
    holder = (out.resolve() if out.is_symlink() else out.absolute()).parent
    if replaced and out.exists() and not os.access(holder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {out}: cannot write in {holder}, where its replacement is written before it "
                              "replaces the folder")
    return out


def check_output_file(path: str | os.PathLike, flag: str, make_folders: bool = False) -> pathlib.Path:
    """`path` as a file a run can write (atomically: a temporary file in its folder renamed over it, so the file's
    own write bit does not matter), checked before the run starts: not a folder, and in a folder that exists and
    this process may write in; with `make_folders` (the run makes the missing folders), the nearest existing folder
    above it must be one this process may write in. `flag` names it in the one-line error. Returns it as a path."""
    path = pathlib.Path(path)
    _refuse_dangling_links(path.parent, flag, path)  # a link to a file not yet made is written through: not itself
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder, not a file")
    if not make_folders and not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {path.parent} does not exist")
    _check_can_write_in(next(p for p in path.parents if p.exists()), path, flag)
    return path


def _refuse_dangling_links(folder: pathlib.Path, flag: str, named: Optional[pathlib.Path] = None) -> None:
    """`folder`, or a folder above it, that is a link to nothing (or a loop of links) cannot be made or written
    through: said as that (as `staged_folder` says it), not as mkdir's "File exists", "Too many levels of symbolic
    links" or Path.resolve's RuntimeError. `named`: the output path the flag gave, where it is not `folder`."""
    named = folder if named is None else named
    for link in (folder, *folder.parents):
        if link.exists():
            return
        if link.is_symlink():
            where = "" if link == named else f": {link}"
            raise ValueError(f"{flag} {named}{where} is {_broken_link(link)}; remove it or name another folder")


def _broken_link(link: pathlib.Path) -> str:
    """What a link that leads to no file is, as the refusals say it: "a loop of links" where following it comes back
    to a link already followed (ELOOP), else "a link to nothing"."""
    try:
        os.stat(link)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a loop of links"
    return "a link to nothing"


def _check_can_write_in(existing: pathlib.Path, path: pathlib.Path, flag: str) -> None:
    """`existing`, the nearest existing folder of the output `path`, must be a folder this process may write in."""
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: cannot write in {existing}")


def check_replaceable(folder: pathlib.Path, marker: Optional[str] = None, what: str = "",
                      inputs: Iterable[str | os.PathLike] = ()) -> None:
    """An existing folder a run would replace must not hold the current folder (it cannot be renamed away) nor any
    of the run's `inputs` (replacing it would delete them). With `marker`, the file every output of the run's kind
    (`what`) holds, it must be empty or hold that file: any other folder is not the run's to delete."""
    if not folder.exists():
        return
    if pathlib.Path.cwd().resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{folder} holds the current folder, which cannot be replaced; name another folder")
    held = next((path for path in map(pathlib.Path, inputs)
                 if path.exists() and path.resolve().is_relative_to(folder.resolve())), None)
    if held is not None:
        raise ValueError(f"{folder} holds {held}, which replacing it would delete; name another folder")
    if marker is not None and any(folder.iterdir()) and not (folder / marker).is_file():
        raise ValueError(f"{folder} is not {what} (it has no {marker}) and is not empty, so it is not replaced; "
                         "name another folder")


@contextlib.contextmanager
def staged_folder(target: pathlib.Path, overwrite: bool = True,
                  replaces: Optional[Iterable[str]] = None) -> Iterator[pathlib.Path]:
    """Yields a fresh sibling folder of `target`; on success it replaces `target`, on error it is removed.

    The old `target` is moved into a fresh hidden folder beside it (`.NAME.HOST.old.XXXXXXXX/NAME`), the new one
    renamed in, the old one renamed within that folder (to NAME.replaced: from then on it may be half deleted) and
    only then deleted, with Ctrl-C held until that is done: an interruption leaves the old folder or the new one,
    never neither (a resumable run saving its only checkpoint so lost it). What lands gets the modes a plain mkdir /
    open would give under the umask (mkdtemp makes folders 0700 and safetensors writes files 0600, which would keep
    collaborators out). With `replaces` (the names of the old `target` the run replaces), every other entry of it
    that the run did not write is copied into the new folder as it is, modes and links included (a model card, a
    user's notes).
    The staging and old folders are locked while their run lives. SIGKILL runs no cleanup, so the next save of
    `target` on that machine first mends what a killed run left (`_mend_after_killed_runs`): its staging folder is
    removed; its old folder is put back as `target` if `target` is missing and the old one is whole (killed between
    the two renames), and removed otherwise."""
    target = pathlib.Path(target)
    _mend_after_killed_runs(pathlib.Path(os.path.realpath(target)))  # first: a cut-short swap may have moved it
    if target.is_symlink() and not target.exists():
        raise ValueError(f"{target} is {_broken_link(target)}; remove it or name another folder")
    if target.is_symlink():  # the folder it links to is replaced, and the link kept (models/current -> models/v3)
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=_hidden_prefix(target, "staging"), dir=target.parent))
    running = _hold_running_lock(staging)
    moving_aside = None  # the lock on the folder the old target is moved into, while it exists
    try:
        yield staging
        umask = _umask()
        for path in [staging, *staging.rglob("*")]:
            if not path.is_symlink():
                path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if replaces is not None and target.is_dir():
            replaced = set(replaces)
            for path in target.iterdir():
                if path.name in replaced or os.path.lexists(staging / path.name):
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.copytree(path, staging / path.name, symlinks=True)
                else:
                    shutil.copy2(path, staging / path.name, follow_symlinks=False)
        with ctrl_c_held():
            if target.exists():
                _sync_files(staging)  # as write_bytes_atomic: a crash after the swap must not leave empty files
                old = pathlib.Path(tempfile.mkdtemp(prefix=_hidden_prefix(target, "old"), dir=target.parent))
                moving_aside = _hold_running_lock(old)
                try:
                    target.rename(old / target.name)
                except OSError as err:  # the OS's message would name the hidden folder it was moved towards
                    old.rmdir()
                    raise type(err)(err.errno, f"cannot replace {target}: {err.strerror}") from None
                except BaseException:
                    old.rmdir()
                    raise
                staging.rename(target)
                _remove_replaced(old, target)
            else:
                staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        for lock in (running, moving_aside):
            if lock is not None:
                os.close(lock)


def _hidden_prefix(target: pathlib.Path, kind: str) -> str:
    """How `staged_folder`'s hidden folders of `target` of one `kind` begin ("staging": the new folder being written;
    "old": the folder the old `target` is moved into); mkdtemp's random part follows. The machine is named since the
    folder may be on a disk other machines share, whose runs this one cannot see."""
    return f".{target.name}.{socket.gethostname()}.{kind}."


def _hidden_pattern(name: str, kinds: tuple[str, ...] = ("staging", "old")) -> re.Pattern:
    """The full names of `_hidden_prefix`'s folders, the target's name matching the regular expression `name` (its
    group 1). mkdtemp's random part: 8 of [a-z0-9_]; a user's own hidden folder named so is unlikely beyond reason."""
    return re.compile(rf"\.({name})\.{re.escape(socket.gethostname())}\.(?:{'|'.join(kinds)})\.[a-z0-9_]{{8}}")


# A staging or old folder younger than this is kept even when nothing holds its lock: its run may not have taken it
# yet.
_STAGING_GRACE_SECONDS = 60


def _hold_running_lock(path: pathlib.Path) -> Optional[int]:
    """Takes an exclusive lock on a staging or old folder (`staged_folder`) for its run's whole life (the system
    drops it however the run ends, SIGKILL too), so that `_folders_of_ended_runs` tells a killed run's folder from a
    live one's, whatever process-id space either runs in (a container beside the host). None where the file system
    has no locks (the folder is then never taken for a killed run's)."""
    if fcntl is None:
        return None
    folder = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(folder)
        return None
    return folder


def _mend_after_killed_runs(target: pathlib.Path) -> None:
    """Mends what runs on this machine that saved `target` left when they were killed with no chance to clean up
    (SIGKILL, the out-of-memory killer), all hidden: a staging folder, as large as what it was writing (a model's
    gigabytes), is removed; an old folder (`staged_folder`) is put back as `target` if `target` is missing and it
    is whole, and removed otherwise. A folder whose lock is held belongs to a run still writing, and is kept."""
    for path in _folders_of_ended_runs(target):
        if _holds_whole_old(path, target) and not os.path.lexists(target):  # killed between its two renames
            try:
                (path / target.name).rename(target)
            except OSError:  # left as it is: it is the only copy
                continue
        with contextlib.suppress(OSError):
            _remove_tree(path)


def mend_killed_swaps(folder: pathlib.Path) -> None:
    """`staged_folder`'s mending of what a killed swap left (`_mend_after_killed_runs`), for every folder in `folder`
    that one hid: for a run that chooses its output folders by what `folder` holds (tclip explain) or goes on from
    what it holds (train-eclip's checkpoint), before it looks, so that a folder a killed swap hid is found in its
    place rather than taken for a free name or a missing checkpoint."""
    hidden = _hidden_pattern(".+", kinds=("old",))
    if folder.is_dir():
        for name in {found.group(1) for found in map(hidden.fullmatch, os.listdir(folder)) if found}:
            _mend_after_killed_runs(pathlib.Path(os.path.realpath(folder / name)))


def killed_swap_leftover(target: str | os.PathLike) -> Optional[pathlib.Path]:
    """Where the previous `target` waits when a save of it on this machine was killed between `staged_folder`'s two
    renames (hidden beside it, `target` missing; the next save puts it back), or None: for a reader's "not found"
    message, which says so rather than that the folder never was."""
    target = pathlib.Path(os.path.realpath(target))
    if os.path.lexists(target) or not target.parent.is_dir():
        return None
    pattern = _hidden_pattern(re.escape(target.name))
    return next((path / target.name for path in sorted(target.parent.iterdir())
                 if pattern.fullmatch(path.name) and _holds_whole_old(path, target)), None)


def _holds_whole_old(path: pathlib.Path, target: pathlib.Path) -> bool:
    """`path` is a hidden folder `staged_folder` moved the old `target` into, and that old folder is still whole
    (not yet renamed NAME.replaced for deletion)."""
    return path.name.startswith(_hidden_prefix(target, "old")) and (path / target.name).is_dir()


def _folders_of_ended_runs(target: pathlib.Path) -> Iterator[pathlib.Path]:
    """The staging and old folders of `target` (`staged_folder`) that no live run holds, each yielded while its lock
    is taken here. None where the file system has no locks."""
    if fcntl is None or not target.parent.is_dir():
        return
    pattern = _hidden_pattern(re.escape(target.name))
    for path in target.parent.iterdir():
        if not pattern.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        try:
            if time.time() - path.stat().st_mtime < _STAGING_GRACE_SECONDS:
                continue
            folder = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live run's (or no locks here)
            continue
        else:
            yield path
        finally:
            os.close(folder)


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Holds a Ctrl-C (or a SIGTERM) that comes during the block and raises it after (a folder swap, a native
    library's start-up, where an exception leaves things half done). Only the main thread is
    interrupted by one (Python runs signal handlers there), and only there can a handler be set, so other threads
    just run the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signals = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]  # None: set outside
    previous = {s: signal.signal(s, lambda number, _: held.append(number)) for s in signals}  # Python, not restorable
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(held):
            signal.raise_signal(number)  # what the previous handler would have done, now


_AT_EARLY_END: list = []  # the cleanups of the blocks running now (`at_early_end`), innermost last
_AT_EARLY_END_LOCK = threading.Lock()


@contextlib.contextmanager
def at_early_end(cleanup: Callable[[], None]) -> Iterator[None]:
    """While the block runs, `cleanup` (what the block does as it ends, or some of it) is also one of the cleanups
    `run_early_end_cleanups` runs where the process ends at once (os._exit) past the block's own end: the command
    line's SIGTERM watchdog does, when the main thread, blocked in native code (an XLA compilation), runs no Python
    signal handler for its grace period. It may then run in another thread while the block's own end runs too, so
    it must do no harm done twice."""
    with _AT_EARLY_END_LOCK:
        _AT_EARLY_END.append(cleanup)
    try:
        yield
    finally:
        with _AT_EARLY_END_LOCK, contextlib.suppress(ValueError):  # already taken by run_early_end_cleanups
            _AT_EARLY_END.remove(cleanup)


def run_early_end_cleanups() -> None:
    """Runs the cleanups of the blocks still running (`at_early_end`), innermost first, each once, just before the
    process ends at once; one that fails does not keep the others from running."""
    while True:
        with _AT_EARLY_END_LOCK:
            if not _AT_EARLY_END:
                return
            cleanup = _AT_EARLY_END.pop()
        try:
            cleanup()
        except Exception:  # the process ends now whatever is left: the next run mends or refuses it
            pass


@functools.cache
def _umask() -> int:
    """The process umask, read on first use (reading it means setting it and setting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary sibling, then rename it over ``path``: a reader sees the old or the new file."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
    """`write_text_atomic` for bytes."""
    with atomic_file(path) as file:
        file.write(data)


def write_safetensors(path: pathlib.Path, arrays: dict) -> None:
    """`safetensors.numpy.save_file(arrays, path)`, a failed write (a full disk) raised as the OSError it is, as
    Python's own writes raise it: the library raises its SafetensorError ("I/O error: No space left on device (os
    error 28)"), which reads as a bug. The file is written straight from the arrays' memory: not as
    `write_bytes_atomic(path, safetensors.numpy.save(arrays))`, whose bytes would hold the arrays twice more (measured:
    800 MB more at the peak for 400 MB of arrays, and a ViT-L checkpoint is 1.7 GB). Callers write into a
    `staged_folder`, which is what keeps the write atomic."""
    import safetensors.numpy  # on first use: the command line's parser imports this module

    try:
        safetensors.numpy.save_file(arrays, path)
    except safetensors.SafetensorError as err:
        failed = re.search(r"\(os error (\d+)\)", str(err))
        if failed is None:  # not a failed write (a bad array): the library's error, as it is
            raise
        number = int(failed.group(1))
        raise OSError(number, os.strerror(number), str(path)) from None


# The picture formats `write_image` writes, by the suffix of the path (in any case), as OpenCV names them.
_IMAGE_FORMATS = {".png": ".png", ".jpg": ".jpg", ".jpeg": ".jpg"}


def write_image(path: pathlib.Path, rgb, jpeg_quality: int = 88) -> None:
    """A uint8 RGB picture [H, W, 3] as a PNG file where `path` ends in ".png", or a JPEG of `jpeg_quality` where
    it ends in ".jpg" or ".jpeg" (in any case; any other suffix is refused, not written as another format), written
    atomically (`write_bytes_atomic`): a report or page never shows half a picture, and a failed write leaves the
    picture that was there."""
    path = pathlib.Path(path)
    suffix = _IMAGE_FORMATS.get(path.suffix.lower())
    if suffix is None:
        raise ValueError(f"{path}: a picture is written as .png, .jpg or .jpeg, not as "
                         f"{path.suffix or 'a file without a suffix'}")
    import cv2  # on first use: the command line's parser imports this module
    import numpy as np

    from tclip_jax.image import check_rgb

    check_rgb(rgb)  # OpenCV would cast a float picture to uint8 with a warning (a black or white picture)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if suffix == ".jpg" else []
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    encoded, data = cv2.imencode(suffix, bgr, params)
    if not encoded:
        raise OSError(f"could not encode {path}")
    write_bytes_atomic(path, data.tobytes())


def write_files_together(files: dict[pathlib.Path, bytes]) -> None:
    """Writes files that belong together (data and the record that describes them), in order, the last being the
    one whose presence says the set is there (the data), so that a failure leaves the old set or none, never a mix nor
    the last without the others: each is written to a temporary sibling first (`atomic_file`'s, removed if any write
    fails: a full disk leaves the old set), and only then, with Ctrl-C and SIGTERM held, is the old last file removed
    and each temporary renamed over its file, the last one last. Only a crash among the renames (SIGKILL) can leave the
    others without the last, which a reader finds missing."""
    written: list[tuple[pathlib.Path, pathlib.Path]] = []  # (temporary, path)
    try:
        for path, data in files.items():
            path = _written_path(path)
            written.append((_temporary_of(path), path))
            with _temporary_file(*written[-1]) as file:
                file.write(data)
        with ctrl_c_held():
            written[-1][1].unlink(missing_ok=True)  # the old set is not whole once another of its files is replaced
            for temporary, path in written:
                os.replace(temporary, path)
    except BaseException:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
        raise


def _written_path(path: pathlib.Path) -> pathlib.Path:
    """The file a write to `path` replaces: the file a link names (the link is kept)."""
    path = pathlib.Path(path)
    return pathlib.Path(os.path.realpath(path)) if path.is_symlink() else path


def _temporary_of(path: pathlib.Path) -> pathlib.Path:
    """The temporary sibling `path` is written to before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def _temporary_file(temporary: pathlib.Path, path: pathlib.Path) -> Iterator[BinaryIO]:
    """`temporary`, open for writing, with the permission bits of the `path` it will replace (if there is one); its
    data reach the disk when the block ends."""
    with open(temporary, "wb") as file:
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(file.fileno(), stat.S_IMODE(os.stat(path).st_mode))
        yield file
        file.flush()
        os.fsync(file.fileno())


@contextlib.contextmanager
def atomic_file(path: pathlib.Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through, for data written in parts (an .npz): it is a temporary sibling that
    is renamed over ``path`` when the block ends, and removed if the block fails. The data reach the disk before the
    rename, so that a crash right after it cannot leave an empty file where the old one was (a sweep rewrites its
    results file so). As writing the file in place would: a link is written through (the file it names is
    replaced and the link kept, as `staged_folder` does a folder's), and a file replaced keeps its permission bits
    (a new one gets those the umask gives)."""
    path = _written_path(path)
    temporary = _temporary_of(path)
    try:
        with _temporary_file(temporary, path) as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _sync_files(folder: pathlib.Path) -> None:
    """Makes the data of every regular file under `folder` reach the disk."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as file:
                os.fsync(file.fileno())


def _remove_replaced(old: pathlib.Path, target: pathlib.Path) -> None:
    """Deletes the folder `target` replaced (`_remove_tree`); what cannot go is left with a warning: `target` is
    written, and that must not read as a failure."""
    try:
        (old / target.name).rename(old / f"{target.name}.replaced")  # from now on maybe half deleted: not put back
        _remove_tree(old)
    except OSError as err:
        warnings.warn(f"{target} is written, but the folder it replaced could not be removed: {old} is left ({err})",
                      stacklevel=4)


def _remove_tree(folder: pathlib.Path) -> None:
    """Deletes `folder`, making its read-only sub-folders writable first (they are the user's)."""
    def writable_then_again(function, path, *_):
        parent = os.path.dirname(path)
        os.chmod(parent, stat.S_IMODE(os.stat(parent).st_mode) | stat.S_IWUSR | stat.S_IXUSR)
        function(path)

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=writable_then_again)
    else:
        shutil.rmtree(folder, onerror=writable_then_again)


@contextlib.contextmanager
def held_lock(path: pathlib.Path, what: str, where: pathlib.Path, make_folder: bool = False) -> Iterator[None]:
    """Holds an exclusive lock on the file ``path`` (made if need be; its folder too with ``make_folder``) for the
    block: a second `what` (e.g. "sweep") working in ``where`` is refused at once, in one line. The file names its
    holder and is removed when the block ends (the lock itself goes with the process however it ends), and so are
    the folders made for it that the block leaves empty: a run refused or stopped before it wrote anything leaves
    the disk as it found it, also where the process ends at once (`at_early_end`)."""
    with _folders_made_for(path.parent) if make_folder else contextlib.nullcontext():
        with _locked(path, what, where, make_folder):
            yield


@contextlib.contextmanager
def _locked(path: pathlib.Path, what: str, where: pathlib.Path, make_folder: bool) -> Iterator[None]:
    """`held_lock` but for the folders it made."""
    if fcntl is None:
        raise ValueError(f"a {what} needs POSIX file locks (fcntl), which this system does not have")
    while True:
        try:
            if make_folder:  # each time: a holder that ended may have removed it
                path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            if isinstance(err, PermissionError) and (path.exists() or where.exists()):
                # another user's, left by a run that was killed (beside a folder not made yet: convert's)
                raise ValueError(f"cannot open {path}, the lock of a {what} in {where} ({err.strerror}): if no "
                                 f"{what} runs there, remove it") from None
            if not where.exists():
                # `check_output_folder` passed, yet the folder cannot be made (root under /proc, where access()
                # allows everything): said of --out, not of a lock file or folder the user never named.
                raise type(err)(f"--out {where}: cannot create it: {err.strerror}") from None
            raise
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal = _held_elsewhere(lock, path, what, where)
            os.close(lock)
            raise refusal from None
        try:
            if os.path.samestat(os.fstat(lock), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(lock)  # the file was removed by the holder as it ended: lock the one there now
    try:
        os.ftruncate(lock, 0)  # a killed holder's longer text would trail ours
        os.write(lock, f"process {os.getpid()} on {socket.gethostname()}".encode())
        with at_early_end(functools.partial(path.unlink, missing_ok=True)):  # still held as the process ends
            yield
    finally:
        path.unlink(missing_ok=True)  # while held: one that opened it meanwhile finds it gone once it locks it
        os.close(lock)


def refuse_if_held(path: pathlib.Path, what: str, where: pathlib.Path) -> None:
    """Refuses, in `held_lock`'s line, where a process holds the lock ``path`` (a `what` runs in ``where``); takes
    nothing and removes nothing. It tries a shared lock, which only a holder's exclusive lock stops, so processes that
    look at one file at once do not refuse each other. A file that is not there, or that this process cannot open,
    is not known to be held."""
    if fcntl is None:
        return
    try:
        lock = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _held_elsewhere(lock, path, what, where) from None
    finally:
        os.close(lock)  # and with it the shared lock


def _held_elsewhere(lock: int, path: pathlib.Path, what: str, where: pathlib.Path) -> ValueError:
    """The refusal of a `what` in ``where`` whose lock ``path`` (open as ``lock``) another process holds, naming the
    holder as the file does."""
    holder = os.read(lock, 200).decode(errors="replace")
    held = path.name if path.parent == where else path  # a lock beside the folder is named with its path
    return ValueError(f"another {what}{f' ({holder})' if holder else ''} is running in {where} (it holds {held}); "
                      "wait for it to end or choose another --out")


@contextlib.contextmanager
def held_lock_beside(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """`held_lock` for a run that replaces the folder `folder` whole (`staged_folder`), on the hidden file
    ``.NAME.lock`` beside it: a lock inside would be swapped away with the old folder (a second run would then lock
    the new one's). For a link, beside the folder it names, which is what is replaced."""
    folder = pathlib.Path(folder)
    target = folder.resolve() if folder.is_symlink() else folder
    with held_lock(target.parent / f".{target.name}.lock", what, folder, make_folder=True):
        yield


@contextlib.contextmanager
def _folders_made_for(folder: pathlib.Path) -> Iterator[None]:
    """For a block that may make `folder` and the folders above it: those that did not exist before it and are
    empty when it ends are removed."""
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first

    def remove_empty() -> None:
        for path in made:
            try:
                path.rmdir()
            except FileNotFoundError:  # never made after all
                continue
            except OSError:  # not empty: the run saved something there
                break

    try:
        with at_early_end(remove_empty):
            yield
    finally:
        remove_empty()
