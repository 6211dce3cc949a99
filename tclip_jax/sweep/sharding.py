"""Data parallelism: each process takes its own share of the samples and splits its batches over its devices.

- Across processes (``jax.distributed``): sample ``i`` of the dataset's fixed order belongs to process
  ``i % process_count``. Processes never exchange arrays, so each runs at its own pace.
- Within a process: each batch is split over the local devices as `Method.explain_batch` splits its batches
  (`tclip_jax.methods.devices.DeviceMaps`: a single-device program on each device, not one SPMD program, so any
  device count gives the same bits; that module says why).
- The number of class slots per image is padded to a power of two, so only a few shapes get compiled.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils


def owns(sample_index: int, process_index: int, process_count: int) -> bool:
    return sample_index % process_count == process_index


class PeerStopped(ValueError):
    """A collective of the sweep's processes failed: another process stopped (killed, preempted, crashed)."""


_peer_stopped = threading.Event()


def peer_stopped() -> bool:
    """Whether a collective of this process failed because another process stopped (`PeerStopped`). Such a process
    must end at once (os._exit): at exit JAX's shutdown barrier would wait for the stopped one, about 100 s, then
    abort with a fatal error."""
    return _peer_stopped.is_set()


def joined() -> bool:
    """Whether this process runs with others (``jax.distributed`` initialized): one that ends with an error must end
    at once, in turn (`end_in_turn`, os._exit), not through JAX's shutdown barrier, which waits for every process."""
    from jax._src import distributed  # the client, which jax.distributed does not expose

    return distributed.global_state.client is not None


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    """A collective across the processes; its failure (Gloo's "Connection closed by peer", a task's heartbeat
    timeout: a ValueError or JaxRuntimeError) is a `PeerStopped`. What it prints on stdout is dropped: Gloo, as it
    connects the processes (at the first collective), prints "[Gloo] Rank 0 is connected to 1 peer ranks..." there
    from C++, unasked (no setting turns it off), before the report that stdout holds (stderr holds the command's
    one line; Gloo's failures come back as the collective's exception)."""
    with _stdout_dropped():  # outside the `try`: this process's own failure there is no peer's
        try:
            yield
        except Exception as err:
            _peer_stopped.set()
            cause = " ".join(str(err).split())
            shown = f"{cause[:200]}{'...' if len(cause) > 200 else ''}"
            raise PeerStopped(f"another process of the sweep stopped ({shown}), so this one cannot finish it; the "
                              "records written so far are kept: start every process again with --resume") from err


@contextlib.contextmanager
def _stdout_dropped() -> Iterator[None]:
    """While the block runs, what is written to file descriptor 1 is dropped (the sweep prints nothing meanwhile); a
    process started with it closed (no sys.stdout) has nothing to drop."""
    if sys.stdout is not None:
        with contextlib.suppress(OSError, ValueError):  # closed since: nothing of it reaches anyone
            sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # closed
        yield
        return
    dropped = os.open(os.devnull, os.O_WRONLY)
    os.dup2(dropped, 1)
    os.close(dropped)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def barrier(name: str) -> None:
    """Wait for every process (a no-op for a single process)."""
    if jax.process_count() > 1:
        with _collective():
            multihost_utils.sync_global_devices(name)


def gather_text(text: str) -> list[str]:
    """Every process's ``text``, in process order (this one's alone for a single process): every process calls it,
    as a barrier."""
    if jax.process_count() == 1:
        return [text]
    data = np.frombuffer(text.encode(), np.uint8)
    with _collective():
        lengths = multihost_utils.process_allgather(np.int32(len(data)))
        padded = np.zeros(int(lengths.max()), np.uint8)  # allgather takes one shape from every process
        padded[:len(data)] = data
        rows = multihost_utils.process_allgather(padded)
    return [bytes(row[:length]).decode() for row, length in zip(rows, lengths)]


def end_in_turn(grace_s: float) -> None:
    """Called just before a process of a multi-process run ends early (a Ctrl-C or SIGTERM, which a scheduler sends
    every process): the process that hosts JAX's coordination service (process 0) ends last. Once the service is
    gone, every process still running prints the service's fatal-error lines and aborts (SIGABRT), a failure that
    is not its own. So each other process says that it is ending (its stderr closed first: nothing it prints after
    its own last line is its own) and the host waits up to ``grace_s`` seconds for all of them (all but one where
    another process stopped, `peer_stopped`: that one never says so). A no-op without ``jax.distributed``."""
    from jax._src import distributed  # the client and service, which jax.distributed does not expose

    state = distributed.global_state
    if state.client is None:
        return
    if state.service is None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        try:
            state.client.key_value_set(f"{_ENDING}{state.process_id}", "")
        except Exception:  # the host has gone already: nothing left to tell
            pass
        return
    deadline, others = time.monotonic() + grace_s, state.num_processes - 1 - peer_stopped()
    try:  # short waits, so that another Ctrl-C still ends the wait
        while len(state.client.key_value_dir_get(_ENDING)) < others and time.monotonic() < deadline:
            time.sleep(0.05)
    except (KeyboardInterrupt, Exception):  # a failed service (a process stopped): nothing left to wait for
        pass


_ENDING = "tclip/ending/"  # + process id: a key-value entry each process other than the host sets as it ends early


def class_slots(count: int) -> int:
    """The smallest power of two >= count (>= 1)."""
    return 1 << max(count - 1, 0).bit_length()
