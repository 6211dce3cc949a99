"""Data parallelism: each process takes its own share of the samples and splits its batches over its devices.

- Across processes (``jax.distributed``): sample ``i`` of the dataset's fixed order belongs to process
  ``i % process_count``. Processes never exchange arrays, so each runs at its own pace.
- Within a process: a 1-D ``Mesh`` over the local devices; images are sharded along the batch axis
  (``NamedSharding(mesh, P("batch"))``), the method's parameters replicated. A batch is padded to a
  multiple of the device count by repeating its last image; padded outputs are dropped.
- The number of class slots per image is padded to a power of two, so only a few shapes get compiled.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tclip_jax.methods.base import MapOutput, Method, QueryArrays

BATCH_AXIS = "batch"


def local_mesh() -> Mesh:
    return Mesh(np.array(jax.local_devices()), (BATCH_AXIS,))


def owns(sample_index: int, process_index: int, process_count: int) -> bool:
    return sample_index % process_count == process_index


def barrier(name: str) -> None:
    """Wait for every process (a no-op for a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def class_slots(count: int) -> int:
    """The smallest power of two >= count (>= 1)."""
    return 1 << max(count - 1, 0).bit_length()


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with its last row repeated up to ``rows`` rows."""
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])


class ShardedMaps:
    """``method.maps`` jitted over the mesh: numpy batches in, batch-sharded device arrays out (asynchronously).

    The method's parameters are replicated to every device once, the queries with each batch."""

    def __init__(self, method: Method, mesh: Mesh):
        self.replicated = replicated = NamedSharding(mesh, PartitionSpec())
        self.batched = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
        self.devices = mesh.devices.size
        self.params = jax.device_put(method.params, replicated)
        # Each device maps its share of the batch one image at a time (`Method.maps_per_image`), so an image's
        # maps are the same bits whatever the batch size and device count. Devices never communicate: without
        # the varying-axes check, a gradient with respect to a constant (HilaCAM's zero attention offsets) stays
        # per device instead of being summed over the devices.
        per_device = jax.shard_map(method.maps_per_image, mesh=mesh,
                                   in_specs=(PartitionSpec(), PartitionSpec(BATCH_AXIS), PartitionSpec(),
                                             PartitionSpec(BATCH_AXIS)),
                                   out_specs=PartitionSpec(BATCH_AXIS), check_vma=False)
        self._maps: Callable[..., Any] = jax.jit(per_device,
                                                 in_shardings=(replicated, self.batched, replicated, self.batched),
                                                 out_shardings=self.batched)

    def __call__(self, pixels: np.ndarray, queries: QueryArrays, rows: np.ndarray) -> MapOutput:
        """Maps [B', K, h', w'] of ``pixels`` [B, h, w, 3] and query ``rows`` [B, K], B' = B padded."""
        padded = -(-len(pixels) // self.devices) * self.devices
        pixels, rows = pad_rows(pixels, padded), pad_rows(rows, padded)
        return self._maps(self.params, jax.device_put(pixels, self.batched), jax.device_put(queries, self.replicated),
                          jax.device_put(rows.astype(np.int32), self.batched))
