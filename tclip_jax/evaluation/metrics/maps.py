"""The one input check of every map metric: a non-empty, 2-D, finite map."""
from __future__ import annotations

import numpy as np


def finite_map(values, name: str) -> np.ndarray:
    """`values` as an array (its dtype kept); ValueError naming `name` unless non-empty, 2-D and finite."""
    values = np.asarray(values)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D map, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return values
