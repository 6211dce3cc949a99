"""One-thread BLAS for the host step: its matrix products are tiny, and BLAS threads only oversubscribe cores."""
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
