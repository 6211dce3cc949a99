"""TCLIP soft maps: a 2-component Gaussian mixture splits a heatmap's values into background and
foreground; values below the split tau are set to the map's minimum, and the result is Gaussian-blurred.

Conventions:
- tau is where the two *weighted* densities are equal, w1 N(x; m1, s1) = w2 N(x; m2, s2), between the means.
  Taking logs gives a quadratic in x; equal variances make it linear.
- The mixture is fitted to ALL values of the map (`tclip_jax.postprocess.gmm`): one histogram of 16384 bins
  per map, EM on two-point quadratures of its 512 groups of bins, for all maps of a call at once. It is
  scikit-learn's ``GaussianMixture(2, covariance_type="diag")`` EM (``reg_covar=1e-6`` on the values standardized
  to zero mean and unit variance, so the fit does not depend on the map's scale), started from the hard
  split at the global 2-means optimum of the values (Otsu's split), and run to its fixed point instead of
  stopping when the log-likelihood gains less than 1e-3 per value. The fit is deterministic (no random
  start, hence no seed). On 384 held-out maps of the first embedded model (224x224 to 1920x1080)
  tau is within 3.6e-5 (1.5e-4 of the map's range) of scikit-learn's fit on all values from the same start
  run to convergence; scikit-learn's default stop moves tau by up to 0.26 (benchmarks/RESULTS.md, host-step).
  A component narrower than one of the fit's 512 quadrature groups (the flat background of a map with one
  small blob) moves tau further: 4.9e-4 of the range on a 64x64 one-blob map, and one of several values within a
  histogram bin (a few equal outliers) further still, growing with range / std (`tclip_jax.postprocess.gmm`).
- The map that is fitted is the one given: for TCLIP the aggregated map at the original image's size (the
  bilinear resampling of the model-input map), the map the soft map is made of; under a centre crop, only the
  part of it the crop kept (``covered``, `Geometry.covered`), since the rest is fill, not evidence.
- Refused (ValueError, one line): NaN or infinite values, complex ones, a range that overflows float64 and a
  nonzero range too small for the histogram's bins (below ~1e-304 of the values' magnitude); by the functions that
  make soft maps also maps float32 cannot hold to its rounding (largest magnitude above float32's largest over
  2**32, 7.9e28, or nonzero and below float32's smallest normal, 1.2e-38: ``_soft_map_stats``; within a decade
  above 1.2e-38 the blur's subnormal products cost a few more bits, ~2e-6 of the largest magnitude); rescale such maps.
- Fallbacks (recorded in ``GmmFit.fallback``), never an exception for other finite input:
  ``"constant"``: all values equal; tau is that value and the soft map is constant.
  ``"no_root_between_means"``: one weighted density dominates the other everywhere between the means,
  or the means coincide (a one-component fit, e.g. on unimodal heavy-tailed values); tau is the map's
  mean, the foreground threshold of Chefer et al., the usual choice when no two-class split is found.
- The floor compares the map's values with tau exactly (a float32 map value v is floored iff v < tau).
- The blur is ``scipy.ndimage.gaussian_filter(mode="reflect", truncate=4)``. Its default sigma is
  ``DEFAULT_SIGMA_FRACTION * max(H, W)`` pixels (about 4.5 px on a 224-pixel map), so the same smoothing
  applies at any map resolution; ``sigma=0`` disables it. Below sigma 4.8 it is computed exactly
  (separable, OpenCV, float32); above, by a Gaussian pyramid whose error is at most 5.2e-4 of the map's
  range, float32 rounding included, or, when an axis is shorter than 8 sigmas, exactly by the discrete cosine
  transform (`tclip_jax.postprocess.blur`); either way in time that does not grow with sigma. The soft map is
  float32.

The batched functions (`soft_maps`, `gmm_thresholds`, and `soft_maps_and_boxes`, the whole host step of one
image) take [Q, H, W] arrays or sequences of 2-D maps; the single-map functions are thin wrappers. The previous method (scikit-learn on 4096 evenly spaced quantiles)
lives in benchmarks/host_step.py, which measures the two against each other.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import cv2
import numpy as np

from tclip_jax.postprocess import gmm as _gmm
from tclip_jax.postprocess._blas import SINGLE_THREADED_BLAS
from tclip_jax.postprocess.blur import LargeSigmaBlur, gaussian_blur, pyramid_levels
from tclip_jax.postprocess.boxes import (Box, BoxRule, _check_rule, _checked_map, _finite_range, box_in_map,
                                         checked_map_box, covered_window)
from tclip_jax.postprocess.sigma import DEFAULT_SIGMA_FRACTION

__all__ = [
    "DEFAULT_SIGMA_FRACTION", "GmmFit", "gaussian_blur", "gaussian_intersection", "gmm_threshold", "gmm_thresholds",
    "soft_map", "soft_maps", "soft_maps_and_boxes",
]


@dataclasses.dataclass(frozen=True)
class GmmFit:
    """Two-component fit, components sorted by mean; ``fallback`` is None when tau is the intersection."""

    means: tuple[float, float]
    stds: tuple[float, float]
    weights: tuple[float, float]
    tau: float
    fallback: str | None


def gaussian_intersection(
    means: tuple[float, float], stds: tuple[float, float], weights: tuple[float, float]
) -> float | None:
    """The x strictly between the means where w1 N(x; m1, s1) = w2 N(x; m2, s2), or None if there is none.

    At most one such x exists: the log-ratio of the weighted densities is a quadratic whose sign can change
    only once between the means.
    """
    (m1, m2), (s1, s2), (w1, w2) = means, stds, weights
    if min(s1, s2) <= 0 or min(w1, w2) <= 0:
        raise ValueError(f"stds and weights must be positive, got stds {stds}, weights {weights}")
    if m1 == m2:
        return None
    # Solved for u = (x - m1) / s1, so that no power of a std under- or overflows (a map of range 1e-163):
    # u^2/2 - (u - d)^2 / (2 r^2) + log(w2 / (w1 r)) = 0, with r = s2 / s1 and d = (m2 - m1) / s1,
    # i.e. a u^2 + b u + c = 0.
    r, d = s2 / s1, (m2 - m1) / s1
    a = 0.5 - 0.5 / r**2
    b = d / r**2
    c = -0.5 * d**2 / r**2 + np.log(w2 / (w1 * r))
    disc = b * b - 4.0 * a * c
    if not disc >= 0:  # negative, or not a number where r or d overflowed
        return None
    # Cancellation-free roots: c / q stays finite as a -> 0 and is then the linear root -c / b.
    q = -0.5 * (b + np.copysign(np.sqrt(disc), b))
    roots = [c / q] if q != 0 else []
    if a != 0:
        roots.append(q / a)
    low, high = min(0.0, d), max(0.0, d)
    between = [float(m1 + s1 * u) for u in roots if low < u < high]
    return between[0] if between else None


# --------------------------------------------------------------------------------------------- per-map pass


@dataclasses.dataclass(frozen=True)
class _MapStats:
    lo: float
    hi: float


def _map_stats(values: np.ndarray, name: str = "scores") -> _MapStats:
    """Minimum and maximum, checked finite (`_finite_range`) and, unless equal, far enough apart for the GMM's
    histogram: its bins' scale, (FINE_BINS - 1) * max(|lo|, |hi|) / (hi - lo), must be a finite float64."""
    lo, hi = _finite_range(values, name)
    if hi > lo and not math.isfinite((_gmm.FINE_BINS - 1) / (hi - lo) * max(abs(lo), abs(hi), 1.0)):
        raise ValueError(f"the range of {name} ({hi - lo:g}) is too small for the GMM's histogram; rescale it")
    return _MapStats(lo, hi)


# The values a float32 soft map holds to float32's rounding, 2**-24 of the map's largest magnitude: at most float32's
# largest over 2**32, the headroom of the blur's float32 sums (OpenCV's pyramid adds 256 taps' worth before dividing,
# the DCT up to twice an axis's length times a value; OpenCV's axes are below 2**31), and at least float32's smallest
# normal (below it float32 rounds to 2**-150, no longer to 2**-24 of the values, and flushes them to zero). Within
# a decade above that bound the blur's products of values and taps are themselves subnormal: a soft map there is off
# by up to ~2e-6 of its largest magnitude (sigma 10), against ~3e-7 from 1e-37 up (measured 2026-12-07).
_SOFT_MAP_MAX = float(np.finfo(np.float32).max) / 2.0**32
_SOFT_MAP_MIN = float(np.finfo(np.float32).tiny)


def _soft_map_stats(values: np.ndarray, name: str) -> _MapStats:
    """`_map_stats` of a map a float32 soft map is made of, whose largest magnitude must also be 0 or within
    [_SOFT_MAP_MIN, _SOFT_MAP_MAX]; beyond them a soft map came back inf or all zeros, silently (float64 values in the
    cast to float32, float32 ones in the blur's sums)."""
    stats = _map_stats(values, name)
    scale = max(abs(stats.lo), abs(stats.hi))
    if scale != 0 and not _SOFT_MAP_MIN <= scale <= _SOFT_MAP_MAX:
        raise ValueError(f"the values of {name} (largest magnitude {scale:g}) are beyond what a float32 soft map "
                         f"holds ({_SOFT_MAP_MIN:.3g} to {_SOFT_MAP_MAX:.3g}); rescale it")
    return stats


def _maps_list(maps) -> list[np.ndarray]:
    if isinstance(maps, np.ndarray):
        if maps.ndim != 3:
            raise ValueError(f"maps must be [Q, H, W] or a sequence of 2-D maps, got shape {maps.shape}")
    return [_checked_map(m, "maps[%d]" % i) for i, m in enumerate(maps)]


# --------------------------------------------------------------------------------------------- GMM


def _fits(values: Sequence[np.ndarray], stats: Sequence[_MapStats]) -> list[GmmFit]:
    """GMM fits of many maps: histograms one map at a time, the mixture fits all at once."""
    fits: list[GmmFit | None] = [None] * len(values)
    varying = []
    for i, (v, s) in enumerate(zip(values, stats)):
        if s.hi == s.lo:
            fits[i] = GmmFit((s.lo, s.lo), (0.0, 0.0), (1.0, 0.0), s.lo, "constant")
        else:
            varying.append(i)
    if not varying:
        return fits
    hists = _gmm.map_histograms([values[i] for i in varying], [stats[i].lo for i in varying],
                                [stats[i].hi for i in varying])
    with SINGLE_THREADED_BLAS:  # re-entrant: the callers may hold it already
        params = _gmm.fit_histograms(hists)
    if not params.converged.all():
        warnings.warn(f"{int((~params.converged).sum())} GMM fit(s) stopped after {_gmm.MAX_STEPS} EM-map "
                      "evaluations without converging; their tau comes from the last step", RuntimeWarning,
                      stacklevel=3)
    for row, i in enumerate(varying):
        fits[i] = fit_of_components(params, row, values[i])
    return fits


def fit_of_components(params: _gmm.MixtureParams, row: int, values: np.ndarray) -> GmmFit:
    """The `GmmFit` of the map ``values`` (not constant) whose mixture is row ``row`` of ``params``: tau where the
    weighted densities cross between the means, else the map's mean (fallback ``"no_root_between_means"``).
    The host step's one way of taking tau from a fit; benchmarks/gmm_crawl.py takes it so too."""
    means = (float(params.means[row, 0]), float(params.means[row, 1]))
    stds = (float(params.stds[row, 0]), float(params.stds[row, 1]))
    weights = (float(params.weights[row, 0]), float(params.weights[row, 1]))
    tau = gaussian_intersection(means, stds, weights)
    if tau is None:
        return GmmFit(means, stds, weights, float(np.mean(values, dtype=np.float64)), "no_root_between_means")
    return GmmFit(means, stds, weights, tau, None)


def gmm_thresholds(maps) -> list[GmmFit]:
    """GMM fits (tau and components) of every map of ``maps`` ([Q, H, W] or a sequence of 2-D maps)."""
    values = _maps_list(maps)
    return _fits(values, [_map_stats(v, "maps[%d]" % i) for i, v in enumerate(values)])


def gmm_threshold(scores: np.ndarray) -> GmmFit:
    """Fit a 2-component 1-D Gaussian mixture to the map's values and return tau (see module docstring).

    Any shape is accepted: its values are what is fitted.
    """
    values = np.asarray(scores)
    values = _checked_map(values if values.ndim == 2 else values.reshape(1, -1), "scores")
    return _fits([values], [_map_stats(values)])[0]


# --------------------------------------------------------------------------------------------- soft maps


def _float32_above(tau: float) -> np.float32:
    """The smallest float32 >= tau: a float32 value v satisfies v < tau iff v < this."""
    t = np.float32(tau)
    if float(t) < tau:
        t = np.nextafter(t, np.float32(np.inf))
    return t


def _write_floored_offset(values: np.ndarray, lo: float, tau: float, dst: np.ndarray) -> None:
    """dst = values - lo where values >= tau, else 0 (float32), with the comparison made exactly."""
    if values.dtype == np.float32:
        t = _float32_above(tau)
        below = np.nextafter(t, np.float32(-np.inf))
        lo32 = np.float32(lo)
        keep_above = np.float32(below - lo32)       # IEEE rounding, as cv2.subtract's
        if keep_above < np.float32(t - lo32):        # v - lo is monotone in v: "v >= t" is "v - lo > keep_above"
            cv2.subtract(values, float(lo32), dst=dst)
            cv2.threshold(dst, float(keep_above), 0.0, cv2.THRESH_TOZERO, dst=dst)
            return
        np.subtract(values, lo32, out=dst)  # the two roundings meet at tau: mask with the exact comparison
        dst[values < t] = 0.0
        return
    np.copyto(dst, np.where(values < np.float64(tau), 0.0, values - lo), casting="same_kind")


def _check_sigma(sigma: float | None, shape: tuple[int, int]) -> float:
    if sigma is None:
        sigma = DEFAULT_SIGMA_FRACTION * max(shape)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.integer, np.floating)):
        raise ValueError(f"sigma must be a number of pixels, got {sigma!r}")
    if not 0 <= sigma < float("inf"):
        raise ValueError(f"sigma must be a finite number >= 0 (pixels), got {sigma}")
    return float(sigma)


class _SoftMapWriter:
    """Writes floored, blurred maps of one shape and sigma into a [Q, H, W] result."""

    def __init__(self, count: int, shape: tuple[int, int], sigma: float):
        self.shape, self.sigma = shape, sigma
        self.blur = LargeSigmaBlur(shape, sigma) if sigma > 0 and pyramid_levels(sigma) > 0 else None
        if self.blur is None:
            self.frames = np.empty((count, *shape), np.float32)
            self.result = self.frames
        else:
            self.frames = np.empty((count, *self.blur.output_frame), np.float32)
            self.result = self.blur.crop(self.frames)  # a view: frames are a few rows/columns larger

    def write(self, index: int, values: np.ndarray, lo: float, tau: float) -> None:
        if self.blur is not None:
            _write_floored_offset(values, lo, tau, self.blur.interior)
            self.blur.run(self.frames[index], offset=lo)
            return
        kept = np.where(values < np.float64(tau), values.dtype.type(lo), values)  # compared in float64
        if self.sigma == 0:
            np.copyto(self.frames[index], kept, casting="same_kind")
        else:
            self.frames[index] = gaussian_blur(kept.astype(np.float32, copy=False), self.sigma)

    def constant(self, index: int, value: float) -> None:
        self.result[index] = np.float32(value)


def soft_maps(maps, sigma: float | None = None, covered: tuple[slice, slice] | None = None
              ) -> tuple[np.ndarray, list[GmmFit]]:
    """Soft maps [Q, H, W] float32 and GMM fits of maps of one shape ([Q, H, W] or a sequence of 2-D maps).

    ``sigma`` is in pixels; None means ``DEFAULT_SIGMA_FRACTION * max(H, W)``. With the pyramid blur the
    result is a view into a slightly larger buffer (``np.ascontiguousarray`` it where C order is needed).
    ``covered``: fitted there alone, as `soft_maps_and_boxes`.
    """
    values, window, regions, stats, sigma = _checked_maps(maps, sigma, "soft_maps", covered)
    with SINGLE_THREADED_BLAS:
        fits = _fits(regions, stats)
        return _write_soft_maps(values, stats, fits, sigma, window), fits


def _checked_maps(maps, sigma: float | None, caller: str, covered=None):
    """(the maps as 2-D arrays of one shape, their `covered_window` (None: all of them), the windows' values,
    their min/max stats, sigma in pixels), each checked once."""
    values = _maps_list(maps)
    if not values:
        raise ValueError("no maps given")
    shape = values[0].shape
    if any(v.shape != shape for v in values):
        raise ValueError(f"{caller} needs maps of one shape, got {sorted({v.shape for v in values})}")
    sigma = _check_sigma(sigma, shape)
    window = covered_window(shape, covered)
    regions = values if window is None else [v[window] for v in values]
    return values, window, regions, [_soft_map_stats(r, "maps[%d]" % i) for i, r in enumerate(regions)], sigma


def _write_soft_maps(values, stats, fits, sigma: float, window=None) -> np.ndarray:
    """The soft maps of ``values`` under their fits; outside ``window`` a map counts as its window's minimum."""
    writer = _SoftMapWriter(len(values), values[0].shape, sigma)
    for i, (v, s, fit) in enumerate(zip(values, stats, fits)):
        if fit.fallback == "constant":
            writer.constant(i, s.lo)
            continue
        if window is not None:  # floored to the minimum whatever it holds there (the crop's fill, NaN)
            inside, v = v[window], np.full(v.shape, s.lo, v.dtype)
            v[window] = inside
        writer.write(i, v, s.lo, fit.tau)
    return writer.result


def soft_map(scores: np.ndarray, sigma: float | None = None, covered: tuple[slice, slice] | None = None
             ) -> tuple[np.ndarray, GmmFit]:
    """Return the float32 soft map (values < tau set to the minimum, then blurred) and the mixture fit.

    ``sigma`` is in pixels; None means ``DEFAULT_SIGMA_FRACTION * max(H, W)``. ``covered``: fitted there alone, as
    `soft_maps_and_boxes`.
    """
    values = np.asarray(scores)
    if values.ndim != 2:
        raise ValueError(f"scores must be a 2-D map, got shape {values.shape}")
    soft, fits = soft_maps([values], sigma, covered)
    return soft[0], fits[0]


def soft_maps_and_boxes(maps, sigma: float | None = None, rule: BoxRule = "component",
                        covered: tuple[slice, slice] | None = None) -> tuple:
    """(soft maps [Q, H, W] float32, GMM fits, boxes) of maps of one shape: `soft_maps` and `boxes` together,
    sharing each map's validation and min/max pass (boxes at Otsu's threshold). Same results as calling the two.

    ``covered`` (rows, columns; `Geometry.covered`): the part of each map the model saw, where a centre crop cut
    the rest off. The mixture, tau, the minimum and the boxes come from there alone; outside it each soft map is
    its minimum, blurred with the rest (what the map holds there is never read).
    """
    _check_rule(rule)
    values, window, regions, stats, sigma = _checked_maps(maps, sigma, "soft_maps_and_boxes", covered)
    found: list[Box] = [box_in_map(checked_map_box(r, rule=rule), window) for r in regions]
    with SINGLE_THREADED_BLAS:
        fits = _fits(regions, stats)
        return _write_soft_maps(values, stats, fits, sigma, window), fits, found
