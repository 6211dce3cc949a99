"""Per-thread scratch arrays of the host step: its maps are post-processed on several threads, each reusing its own
work arrays."""
from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A reusable per-thread, C-contiguous work array (uninitialized), valid until the next request of ``name``
    on this thread: fresh arrays of map size cost page faults on every call."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    flat = buffers.get((name, dtype))
    if flat is None or flat.size < size:
        flat = buffers[(name, dtype)] = np.empty(size, dtype)
    return flat[:size].reshape(shape)
