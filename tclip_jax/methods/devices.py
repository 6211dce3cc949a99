"""A numpy batch's maps split over the local devices: the one home of it, for `Method.explain_batch` and sweeps.

Each device takes ceil(B / devices) images of a batch of B (the last share padded by repeating the batch's last
image; devices left without a real image get nothing) and runs `Method.maps_per_image` on them as a single-device
program, dispatched asynchronously from one thread per device (a batch that lands on one device alone, as every
batch does on one device and `explain`'s one image does on any number, is dispatched from the calling thread: no
thread pool is made for it); padded outputs are dropped when the maps are fetched.
Not an SPMD program over a mesh (``shard_map``): XLA compiles a program for two or more partitions through another
pass order (CSE before algebraic simplification), so a 1-device and a 4-device sweep of M2IB differed by up to 4e-7.
One single-device program gives every device count the same bits; the price is one compile per device instead of
one, and a copy of the method's parameters on each device that gets a share (`Method.params_on`, kept).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import jax
import numpy as np

if TYPE_CHECKING:
    from tclip_jax.methods.base import MapOutput, Method, QueryArrays


def batch_devices() -> list[jax.Device]:
    """The devices `Method.explain_batch` splits a batch over: every local device, or the one a
    ``jax.default_device`` context (or JAX's ``jax_default_device`` setting) names, as for any other JAX call."""
    chosen = jax.config.jax_default_device
    if chosen is None:
        return jax.local_devices()
    return [jax.local_devices(backend=chosen)[0] if isinstance(chosen, str) else chosen]


def default_batch_size(devices: int) -> int:
    """`Method.explain_batch`'s batch on ``devices`` devices: the smallest multiple of their count that is at least
    4 (4 on one, two or four devices, 6 on three, 8 on a TPU v2-8), so that every device takes an equal share of
    each full batch (4 on three devices was split 2 + 2, one device idle every batch)."""
    return -(-4 // devices) * devices


# Settings that belong to the thread that set them: `jax.thread_guard` holds the process to that one thread (entered
# in another, JAX refuses: "Nested thread guards in different threads are not supported").
_NOT_CARRIED = frozenset({"jax_thread_guard"})


def thread_config() -> Callable[[], contextlib.AbstractContextManager]:
    """A context that sets, in another thread, every JAX setting this thread's contexts set now
    (`jax.enable_x64`, `jax.default_matmul_precision`, `jax.numpy_dtype_promotion`, `jax.debug_nans`, ...): JAX keeps
    them per thread, and a new thread starts with the global values, so a program dispatched from one would be
    traced otherwise (float64 parameters as float32 without x64) than its caller's and recorded as the caller's.
    A JAX whose internals list no settings (`config_states`, before 0.5) gets the two that change maps, x64 mode and
    the matmul precision, as the public API reads them."""
    try:
        from jax._src import config  # every setting and its thread's value, which no public API lists
        local = [(state, value) for name, state in config.config_states.items()
                 if name not in _NOT_CARRIED and (value := state.get_local()) is not config.config_ext.unset]
    except (ImportError, AttributeError):
        if hasattr(jax, "enable_x64"):
            enable_x64 = jax.enable_x64
        else:
            from jax.experimental import enable_x64
        local = [(enable_x64, jax.config.jax_enable_x64),
                 (jax.default_matmul_precision, jax.config.jax_default_matmul_precision)]

    @contextlib.contextmanager
    def entered():
        with contextlib.ExitStack() as settings:
            for state, value in local:
                settings.enter_context(state(value))  # JAX's own context for it (its hooks included)
            yield

    return entered


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with its last row repeated up to ``rows`` rows."""
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])


class DeviceMaps:
    """``method.maps_per_image`` on each of ``devices``: numpy batches in, per-device maps out (asynchronously).

    The method's parameters are put on a device when a batch first gives it a share, and kept there for its later
    batches and calls (`Method.params_on`); the queries go with each batch. Each batch runs under the JAX settings
    of the thread that dispatches it, as they are then (`thread_config`: its matmul precision, which `run_info`
    records there, x64 mode and any other): a JAX context such as `jax.default_matmul_precision` reaches no other
    thread, so the dispatching threads are given them. The thread pool is made when a batch first spans two devices;
    `close` (or leaving a ``with`` block) shuts it down."""

    def __init__(self, method: Method, devices: Sequence[jax.Device]):
        self.devices = list(devices)
        self._method = method
        self._maps: Callable[..., MapOutput] = method.jitted_maps  # compiled once for every use of the method
        self._dispatchers: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def __call__(self, pixels: np.ndarray, queries: QueryArrays, rows: np.ndarray) -> DispatchedMaps:
        """Maps of ``pixels`` [B, h, w, 3] and query ``rows`` [B, K]: [B, K, h', w'] once fetched.

        Each device takes ceil(B / devices) images (the last share padded); devices left without a real image
        get nothing."""
        count = len(pixels)
        share = -(-count // len(self.devices))
        shares = -(-count // share)
        # one share runs in the calling thread, under its own settings
        caller_config = contextlib.nullcontext if shares == 1 else thread_config()
        pixels, rows = pad_rows(pixels, share * shares), pad_rows(rows.astype(np.int32), share * shares)

        def dispatch(index: int) -> MapOutput:
            device, part = self.devices[index], slice(index * share, (index + 1) * share)
            with caller_config():
                return self._maps(self._method.params_on(device), jax.device_put(pixels[part], device),
                                  jax.device_put(queries, device), jax.device_put(rows[part], device))

        if shares == 1:
            return DispatchedMaps([dispatch(0)], count)
        if self._dispatchers is None:
            self._dispatchers = concurrent.futures.ThreadPoolExecutor(len(self.devices), "tclip-dispatch")
        return DispatchedMaps(list(self._dispatchers.map(dispatch, range(shares))), count)

    def close(self) -> None:
        if self._dispatchers is not None:
            self._dispatchers.shutdown()
            self._dispatchers = None

    def __enter__(self) -> DeviceMaps:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class DispatchedMaps:
    """One batch's `MapOutput`s, still on the devices: one per device share, in batch order; ``count`` real images.

    Fetching them dispatches nothing to a device (`np.asarray` of each part, joined on the host): a device runs
    one thread's work in the order it was dispatched, so a fetch waits for its own batch only."""

    def __init__(self, parts: list[MapOutput], count: int):
        self.parts, self.count = parts, count

    def block_until_ready(self) -> None:
        for part in self.parts:
            part.maps.block_until_ready()

    def host_maps(self) -> np.ndarray:
        """The maps [B, K, h', w'] on the host (waits for the devices); padded images dropped."""
        return _joined([np.asarray(part.maps) for part in self.parts], self.count)

    def host_extras(self) -> Any:
        """The per-image `MapOutput.extras` on the host (a pytree of arrays with a leading batch axis [B, ...],
        padded images dropped; None where the method has none)."""
        parts = [jax.device_get(part.extras) for part in self.parts]
        return jax.tree_util.tree_map(lambda *a: _joined(a, self.count), *parts)


def _joined(parts: Sequence[np.ndarray], count: int) -> np.ndarray:
    """The first ``count`` rows of the parts one after another (one part: not copied)."""
    return (parts[0] if len(parts) == 1 else np.concatenate(parts))[:count]
