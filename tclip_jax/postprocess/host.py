"""The whole host step of TCLIP for the maps of one image: soft maps, GMM fits and boxes in one pass."""
from __future__ import annotations

from tclip_jax.postprocess import soft_map as _soft
from tclip_jax.postprocess._blas import SINGLE_THREADED_BLAS
from tclip_jax.postprocess.boxes import Box, BoxRule, _check_rule, box_from_range


def soft_maps_and_boxes(maps, sigma: float | None = None, seed: int = 0, rule: BoxRule = "component",
                        threshold: float | None = None) -> tuple:
    """(soft maps [Q, H, W] float32, GMM fits, boxes) of maps of one shape: `soft_maps` and `boxes` together,
    sharing each map's validation and min/max pass. Same results as calling the two."""
    _check_rule(rule, threshold)
    values = _soft._maps_list(maps)
    if not values:
        raise ValueError("no maps given")
    shape = values[0].shape
    if any(v.shape != shape for v in values):
        raise ValueError(f"soft_maps_and_boxes needs maps of one shape, got {sorted({v.shape for v in values})}")
    sigma = _soft._check_sigma(sigma, shape)
    stats = [_soft._map_stats(v, "maps[%d]" % i) for i, v in enumerate(values)]
    found: list[Box] = [box_from_range(v, s.lo, s.hi, threshold, rule) for v, s in zip(values, stats)]
    with SINGLE_THREADED_BLAS:
        fits = _soft._fits(values, stats)
        return _soft._write_soft_maps(values, stats, fits, sigma), fits, found
