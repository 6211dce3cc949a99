"""TCLIP soft maps: a 2-component Gaussian mixture splits a heatmap's values into background and
foreground; values below the split tau are set to the map's minimum, and the result is Gaussian-blurred.

Conventions:
- tau is where the two *weighted* densities are equal, w1 N(x; m1, s1) = w2 N(x; m2, s2), between the means.
  Taking logs gives a quadratic in x; equal variances make it linear.
- The mixture is fitted with scikit-learn (``random_state=seed``) on the values standardized to zero mean
  and unit variance, so the fit does not depend on the map's scale (``reg_covar`` is an absolute variance);
  the fitted parameters are mapped back to the map's units.
- Maps with more than ``MAX_GMM_SAMPLES`` values are subsampled deterministically to that many evenly
  spaced order statistics (quantiles), which keeps the empirical distribution up to 1 / MAX_GMM_SAMPLES and
  does not depend on the pixel order.
- Fallbacks (recorded in ``GmmFit.fallback``), never an exception for finite input:
  ``"constant"``: all values equal; tau is that value and the soft map is constant.
  ``"no_root_between_means"``: one weighted density dominates the other everywhere between the means,
  or the means coincide (a one-component fit, e.g. on unimodal heavy-tailed values); tau is the map's
  mean, the foreground threshold of Chefer et al., the usual choice when no two-class split is found.
- The blur is ``scipy.ndimage.gaussian_filter``'s (its kernel, truncated at 4 sigma, and its "reflect"
  boundary, which keeps the map's total sum), run separably by OpenCV in float32: several times faster
  than scipy in float64, and equal to it within float32 rounding. The soft map is float32.
  Its default sigma is ``DEFAULT_SIGMA_FRACTION * max(H, W)`` pixels (about 4.5 px on a 224-pixel map), so
  the same smoothing applies at any map resolution; ``sigma=0`` disables it.
"""
from __future__ import annotations

import dataclasses
import functools
import threading

import cv2
import numpy as np
from sklearn.mixture import GaussianMixture
from threadpoolctl import ThreadpoolController

MAX_GMM_SAMPLES = 4096
DEFAULT_SIGMA_FRACTION = 0.02


class _SharedSingleThreadLimit:
    """A one-thread BLAS limit shared by fits running concurrently (maps post-processed on several threads):
    set when the first fit starts, restored when the last ends. One context per thread would restore each
    other's saved limits out of order and could leave the process's BLAS at one thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._limiter = None

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                self._limiter = _threadpool_controller().limit(limits=1)
            self._active += 1

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._limiter.restore_original_limits()


_SINGLE_THREADED_BLAS = _SharedSingleThreadLimit()


@functools.cache
def _threadpool_controller() -> ThreadpoolController:
    """Found once: each `threadpool_limits(...)` call rescans the loaded libraries (about 6 ms)."""
    return ThreadpoolController()


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
    # (x-m1)^2/(2 s1^2) - (x-m2)^2/(2 s2^2) + log(w2 s1 / (w1 s2)) = 0  ->  a x^2 + b x + c = 0
    a = 0.5 / s1**2 - 0.5 / s2**2
    b = m2 / s2**2 - m1 / s1**2
    c = 0.5 * m1**2 / s1**2 - 0.5 * m2**2 / s2**2 + np.log(w2 * s1 / (w1 * s2))
    disc = b * b - 4.0 * a * c
    if disc < 0:
        return None
    # Cancellation-free roots: c / q stays finite as a -> 0 and is then the linear root -c / b.
    q = -0.5 * (b + np.copysign(np.sqrt(disc), b))
    roots = [c / q] if q != 0 else []
    if a != 0:
        roots.append(q / a)
    low, high = min(m1, m2), max(m1, m2)
    between = [float(r) for r in roots if low < r < high]
    return between[0] if between else None


def gmm_threshold(scores: np.ndarray, seed: int = 0) -> GmmFit:
    """Fit a 2-component 1-D Gaussian mixture to the map's values and return tau (see module docstring)."""
    values = _finite_values(scores)
    center, scale = float(values.mean()), float(values.std())
    if scale == 0.0:
        v = float(values[0])
        return GmmFit((v, v), (0.0, 0.0), (1.0, 0.0), v, "constant")
    if values.size > MAX_GMM_SAMPLES:
        values = _evenly_spaced_quantiles(np.asarray(scores).ravel(), MAX_GMM_SAMPLES)
    # "diag" equals "full" for 1-D data and is cheaper; other settings are scikit-learn's defaults.
    gmm = GaussianMixture(n_components=2, covariance_type="diag", random_state=seed)
    with _SINGLE_THREADED_BLAS:  # a 4096-value fit is too small to gain from threads; they oversubscribe cores
        gmm.fit(((values - center) / scale)[:, None])
    order = np.argsort(gmm.means_[:, 0])
    means = tuple(float(center + scale * gmm.means_[k, 0]) for k in order)
    stds = tuple(float(scale * np.sqrt(gmm.covariances_[k, 0])) for k in order)
    weights = tuple(float(gmm.weights_[k]) for k in order)
    tau = gaussian_intersection(means, stds, weights)
    if tau is None:
        return GmmFit(means, stds, weights, center, "no_root_between_means")
    return GmmFit(means, stds, weights, tau, None)


def soft_map(scores: np.ndarray, sigma: float | None = None, seed: int = 0) -> tuple[np.ndarray, GmmFit]:
    """Return the float32 soft map (values < tau set to the minimum, then blurred) and the mixture fit.

    ``sigma`` is in pixels; None means ``DEFAULT_SIGMA_FRACTION * max(H, W)``.
    """
    values = np.asarray(scores)  # in its own dtype: the GMM subsample sorts float32 maps as float32
    if values.ndim != 2:
        raise ValueError(f"scores must be a 2-D map, got shape {values.shape}")
    if sigma is None:
        sigma = DEFAULT_SIGMA_FRACTION * max(values.shape)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    fit = gmm_threshold(values, seed)
    kept = np.where(values < np.float64(fit.tau), values.min(), values).astype(np.float32)  # compared in float64
    return gaussian_blur(kept, sigma), fit


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(image, sigma, mode="reflect")`` of a float32 2-D map, by OpenCV."""
    if sigma == 0:
        return image
    radius = int(4.0 * sigma + 0.5)  # scipy's truncate=4.0
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    # cv2.BORDER_REFLECT mirrors with the edge pixel repeated (dcba|abcd), scipy's "reflect".
    return cv2.sepFilter2D(image, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT)


def _evenly_spaced_quantiles(values: np.ndarray, count: int) -> np.ndarray:
    """np.quantile(values, linspace(0, 1, count)) (linear interpolation, float64) from one sort: several times
    faster. The sort runs in the values' own dtype (float32 maps sort about 3x faster than float64; widening
    keeps the order, so the result is the same)."""
    ordered = np.sort(values)
    position = np.linspace(0.0, ordered.size - 1, count)
    below = np.minimum(np.floor(position).astype(np.int64), ordered.size - 2)
    fraction = position - below
    lower, upper = ordered[below].astype(np.float64), ordered[below + 1].astype(np.float64)
    return lower + fraction * (upper - lower)


def _finite_values(scores: np.ndarray) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("scores is empty")
    if not np.isfinite(values).all():
        raise ValueError("scores contains NaN or infinite values")
    return values
