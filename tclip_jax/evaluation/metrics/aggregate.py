"""Aggregation of per-(image, class) results (hits, IoUs, energy shares) into dataset scores.

- ``micro``: mean over all results, each (image, class) pair weighted equally (e.g. BoxAcc).
- ``per_class``: mean over each class's results; ``macro``: mean of those, each class weighted equally
  (TorchRay's pointing-game accuracy). Only classes that occur are averaged (TorchRay also averages
  classes with no result, as 0).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClassAggregate:
    """Dataset scores; ``per_class`` maps each class to (mean, number of results)."""

    micro: float
    macro: float
    per_class: dict[Hashable, tuple[float, int]]


def aggregate_by_class(values: Sequence[float], class_ids: Sequence[Hashable]) -> ClassAggregate:
    """Micro mean, per-class means and their mean (macro) of ``values`` grouped by ``class_ids``."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("values contains NaN or infinite entries")
    if len(class_ids) != values.size:
        raise ValueError(f"{values.size} values but {len(class_ids)} class ids")
    groups: dict[Hashable, list[float]] = {}
    for value, class_id in zip(values, class_ids):
        groups.setdefault(class_id, []).append(float(value))
    per_class = {c: (float(np.mean(v)), len(v)) for c, v in groups.items()}
    return ClassAggregate(
        micro=float(values.mean()),
        macro=float(np.mean([mean for mean, _ in per_class.values()])),
        per_class=per_class,
    )
