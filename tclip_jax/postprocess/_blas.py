"""Thread hygiene of the host step: one-thread BLAS (its matrix products are tiny; BLAS threads only oversubscribe
cores) and per-thread scratch arrays."""
from __future__ import annotations

import functools
import threading

from threadpoolctl import ThreadpoolController


class SharedSingleThreadLimit:
    """A one-thread BLAS limit shared by calls running concurrently (maps post-processed on several threads):
    set when the first enters, restored when the last leaves. One context per thread would restore each
    other's saved limits out of order and could leave the process's BLAS at one thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._limiter = None

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                self._limiter = threadpool_controller().limit(limits=1, user_api="blas")
            self._active += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._limiter.restore_original_limits()


SINGLE_THREADED_BLAS = SharedSingleThreadLimit()


@functools.cache
def threadpool_controller() -> ThreadpoolController:
    """Found once: each `threadpool_limits(...)` call rescans the loaded libraries (about 6 ms)."""
    return ThreadpoolController()


_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype) -> "np.ndarray":
    """A reusable per-thread, C-contiguous work array (uninitialized), valid until the next request of ``name``
    on this thread: fresh arrays of map size cost page faults on every call."""
    import numpy as np

    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    flat = buffers.get((name, dtype))
    if flat is None or flat.size < size:
        flat = buffers[(name, dtype)] = np.empty(size, dtype)
    return flat[:size].reshape(shape)
