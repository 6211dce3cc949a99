"""Gaussian blur of soft maps: scipy's ``gaussian_filter(mode="reflect", truncate=4)``, in time that does not
grow with sigma.

Small sigma (``sigma < 2 * MIN_COARSE_SIGMA``): the exact separable filter (`gaussian_blur`, OpenCV, float32).

Larger sigma on a map with an axis shorter than ``SHORT_AXIS_SIGMAS`` sigmas: the exact filter by the discrete
cosine transform (float32: its transforms are orthonormal, so rounding stays ~1e-7 of the range). scipy's
"reflect" mode extends an axis of length n half-sample symmetrically, with period 2n, so its 1-D operator is
diagonal in the orthonormal DCT-II basis, with eigenvalues ``sum_j kernel[j] cos(pi k j / n)``
(`reflect_spectrum`): ``B = C^T diag(spectrum) C`` holds for any sigma, the kernel's reach past the axis and
back included, and costs two 2-D DCTs of the map.

Larger sigma otherwise: a Gaussian pyramid. ``L = max{L : sigma / 2**L >= MIN_COARSE_SIGMA}`` levels of
``cv2.pyrDown`` (5-tap binomial filter and decimation), a dense linear map ``M`` on the coarse grid, and ``L``
levels of ``cv2.pyrUp`` back to full size. Per axis the result is ``A = U M D`` with ``D``/``U`` the exact 1-D
operators of the pyramid steps (read off OpenCV itself) and ``M`` fitted once per (axis length, sigma) by least
squares to ``B``, the 1-D operator of scipy's filter: ``M = pinv(U) B pinv(D)``. The pyramid's own border rule
(reflect-101 about the first sample) cannot express scipy's half-sample reflection, so the input is padded by
``INPUT_MARGIN * 2**L`` reflected pixels per side, exactly and inside the fit, and the output is produced on a
frame ``OUTPUT_MARGIN * 2**L`` pixels wider per side and cropped; the fit then matches ``B`` up to the
pyramid's aliasing. (On axes shorter than ``SHORT_AXIS_SIGMAS`` sigmas the fit is ill-conditioned: ``M`` grows
to 1e7 at sigma 1000 on 43 pixels, and float32 products of it are noise; hence the DCT there. The DCT is
slower than the pyramid on large maps: 12 ms against 5 ms on 300 x 1920 at sigma 38.4.)

Error bound: both operators keep constants (rows sum to 1), so for any input with values in [lo, hi]
``|blur - scipy| <= (e_y * |A_x| + e_x) * (hi - lo) / 2`` with ``e = max_i sum_j |A - B|_ij`` per axis and
``|A| = max_i sum_j |A|_ij``; `error_bound` computes both exactly, and adds to ``e`` a first-order bound of the
float32 rounding of the pyramid's products (``|U| |M| |D|`` times the products' lengths times float32's unit
roundoff). With ``MIN_COARSE_SIGMA = 2.4``, ``e <= 5.2e-4`` (4.1e-4 without rounding) and ``|A| <= 1.01`` for
every axis length (9 to 1920) and sigma (4.8 to 240) measured (tests/test_postprocess.py,
benchmarks/host_step.py), so the blur is within ``5.2e-4 * (hi - lo)`` of scipy's, inside the
``1e-3 * (hi - lo)`` target. The DCT path is exact up to float32 rounding (``e = 0``).

Setup: fitting ``M`` for a new axis length costs 1-60 ms (cached, `axis_plan`).
"""
from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np
import scipy.fft

from tclip_jax.postprocess._scratch import scratch

MIN_COARSE_SIGMA = 2.4   # sigma in coarse-grid pixels at the coarsest pyramid level
INPUT_MARGIN = 4         # input padding, in units of 2**L full-size pixels
OUTPUT_MARGIN = 2        # output frame padding, same units
SHORT_AXIS_SIGMAS = 8    # a map with an axis shorter than this many sigmas is blurred by the DCT


def gaussian_kernel(sigma: float) -> np.ndarray:
    """scipy.ndimage's Gaussian kernel (truncate=4.0), float64, normalized to sum 1."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(image, sigma, mode="reflect")`` of a float32 2-D map, by OpenCV, exactly."""
    if sigma == 0:
        return image
    kernel = gaussian_kernel(sigma).astype(np.float32)
    # cv2.BORDER_REFLECT mirrors with the edge pixel repeated (dcba|abcd), scipy's "reflect".
    return cv2.sepFilter2D(image, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT)


def pyramid_levels(sigma: float) -> int:
    """Pyramid levels for ``sigma`` (0: blur exactly at full size)."""
    levels = 0
    while sigma / 2 ** (levels + 1) >= MIN_COARSE_SIGMA:
        levels += 1
    return levels


def reflect_indices(n: int, margin: int) -> np.ndarray:
    """Indices into ``range(n)`` of the positions ``-margin .. n + margin - 1`` under scipy's "reflect" mode."""
    r = np.mod(np.arange(-margin, n + margin), 2 * n)
    return np.where(r >= n, 2 * n - 1 - r, r)


def _down_level(n: int) -> np.ndarray:
    """1-D operator of one cv2.pyrDown step on a length-n axis, [(n + 1) // 2, n], read off OpenCV.

    Output j reads the five inputs 2j-2..2j+2 (reflected at the borders): probing with the 8 combs
    ``[i % 8 == r]`` gives each entry exactly, since no two inputs of one output are congruent mod 8.
    """
    k = (n + 1) // 2
    window = 2 * np.arange(k)[:, None] + np.arange(-2, 3)[None, :]
    window = np.abs(window)                                   # reflect-101 (BORDER_DEFAULT) at the start
    window = np.where(window > n - 1, 2 * (n - 1) - window, window)
    out = np.zeros((k, n))
    inputs = np.arange(n)
    for r in range(8):
        probe = cv2.pyrDown((inputs % 8 == r).astype(np.float32)[:, None])[:, 0]
        rows, taps = np.nonzero(window % 8 == r)
        out[rows, window[rows, taps]] = probe[rows]
    return out


def _down_chain(n: int, levels: int) -> np.ndarray:
    """1-D operator of ``levels`` cv2.pyrDown steps on a length-n axis, checked against OpenCV itself."""
    sizes = _chain_sizes(n, levels)
    chain = np.eye(sizes[-1])
    for size in reversed(sizes[:-1]):
        chain = chain @ _down_level(size)
    probe = np.random.default_rng(0).random((n, 1)).astype(np.float32)
    level = probe
    for _ in range(levels):
        level = cv2.pyrDown(level)
    if np.abs(chain @ probe[:, 0].astype(np.float64) - level[:, 0]).max() > 1e-5 or n < 8:
        chain = np.empty((sizes[-1], n))  # not the expected stencil: read the operator column by column
        unit = np.zeros((n, 1), np.float32)
        for j in range(n):
            unit[j] = 1.0
            level = unit
            for _ in range(levels):
                level = cv2.pyrDown(level)
            chain[:, j] = level[:, 0]
            unit[j] = 0.0
    return chain


def _up_chain(sizes: tuple[int, ...]) -> np.ndarray:
    """1-D operator of cv2.pyrUp steps from ``sizes[-1]`` up to ``sizes[0]`` samples: [sizes[0], sizes[-1]]."""
    out = np.empty((sizes[0], sizes[-1]))
    unit = np.zeros((sizes[-1], 1), np.float32)
    for j in range(sizes[-1]):
        unit[j] = 1.0
        level = unit
        for size in sizes[-2::-1]:
            level = cv2.pyrUp(level, dstsize=(1, size))
        out[:, j] = level[:, 0]
        unit[j] = 0.0
    return out


def _chain_sizes(n: int, levels: int) -> tuple[int, ...]:
    sizes = [n]
    for _ in range(levels):
        sizes.append((sizes[-1] + 1) // 2)
    return tuple(sizes)


def _filter_columns(matrix: np.ndarray, sigma: float) -> np.ndarray:
    """``B @ matrix`` for scipy's 1-D reflect-mode Gaussian operator B (float64, by OpenCV)."""
    kernel = gaussian_kernel(sigma)
    return cv2.sepFilter2D(np.ascontiguousarray(matrix), cv2.CV_64F, np.ones(1), kernel,
                           borderType=cv2.BORDER_REFLECT)


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """Everything the pyramid blur needs along one axis of length ``n``."""

    n: int
    sigma: float
    levels: int
    margin_in: int
    margin_out: int
    pad_index: np.ndarray      # reflect_indices(n, margin_in)
    up_sizes: tuple[int, ...]  # output-frame sizes from full (n + 2 margin_out) to coarsest
    coarse: np.ndarray         # M [k_out, k_in], float32
    down: np.ndarray           # D P [k_in, n] (float64; for error_bound)
    up: np.ndarray             # U cropped [n, k_out] (float64; for error_bound)


def is_short_axis(n: int, sigma: float) -> bool:
    """Whether an axis of length n is blurred by the DCT rather than the pyramid (see the module doc)."""
    return n < SHORT_AXIS_SIGMAS * sigma


@functools.lru_cache(maxsize=128)
def reflect_spectrum(n: int, sigma: float) -> np.ndarray:
    """Eigenvalues [n] of scipy's 1-D reflect-mode Gaussian operator on a length-n axis, in the orthonormal
    DCT-II basis: ``sum_j kernel[j] cos(pi k j / n)``, from the kernel folded onto the period 2n (one FFT)."""
    kernel = gaussian_kernel(sigma)
    radius = (kernel.size - 1) // 2
    folded = np.zeros(2 * n)
    np.add.at(folded, np.arange(-radius, radius + 1) % (2 * n), kernel)
    return np.fft.rfft(folded)[:n].real


@functools.lru_cache(maxsize=128)
def axis_plan(n: int, sigma: float, levels: int) -> AxisPlan:
    """The fitted coarse operator of a length-n axis (cached: fitting costs ~10-50 ms); not for short axes."""
    scale = 2**levels
    margin_in, margin_out = INPUT_MARGIN * scale, OUTPUT_MARGIN * scale
    pad_index = reflect_indices(n, margin_in)
    down = _down_chain(n + 2 * margin_in, levels)
    padded_down = np.zeros((down.shape[0], n))
    np.add.at(padded_down.T, pad_index, down.T)  # D P, P the exact reflect padding
    up_sizes = _chain_sizes(n + 2 * margin_out, levels)
    up = _up_chain(up_sizes)[margin_out:margin_out + n]
    # Least squares M = pinv(U) B pinv(D P). Where the coarse grid is at most half as fine as the map, D P has
    # full row rank and U, without its columns that only reach the cropped frame, full column rank (both
    # well conditioned: cond < 1e4), and the normal equations are solved; otherwise SVD pseudo-inverses.
    used = np.abs(up).sum(0) > 0
    kept = up[:, used]
    if 2 * padded_down.shape[0] <= n and 2 * kept.shape[1] <= n:
        right = np.linalg.solve(padded_down @ padded_down.T, padded_down).T       # pinv(D P) [n, k_in]
        left = np.linalg.solve(kept.T @ kept, kept.T)                                 # pinv(U) [k_used, n]
    else:
        right, left = np.linalg.pinv(padded_down, rcond=1e-12), np.linalg.pinv(kept, rcond=1e-12)
    fitted = np.zeros((up.shape[1], right.shape[1]))
    fitted[used] = left @ _filter_columns(right, sigma)
    # The Gaussian tails fall below float32's normal range; subnormal factors slow float32 matmuls ~7-fold.
    fitted[np.abs(fitted) < 1e-12] = 0.0
    return AxisPlan(n, sigma, levels, margin_in, margin_out, pad_index, up_sizes,
                    fitted.astype(np.float32), padded_down, up)


def error_bound(n: int, sigma: float) -> tuple[float, float]:
    """(e, |A|) of the blur along an axis of length n: max row sums of |A - B| and |A| (see the module doc),
    e including the pyramid's float32 rounding."""
    levels = pyramid_levels(sigma)
    if levels == 0 or is_short_axis(n, sigma):
        return 0.0, 1.0  # exact up to float32 rounding (OpenCV's separable filter, or the DCT)
    exact = _filter_columns(np.eye(n), sigma)
    plan = axis_plan(n, float(sigma), levels)
    coarse = plan.coarse.astype(np.float64)
    approx = plan.up @ coarse @ plan.down
    # Each float32 product of length k is within k u of the product of the absolute values (Higham's gamma_k):
    # pyrDown sums 5 taps and pyrUp 3 per level, M sums k_in; one more rounding writes the offset input.
    # It is counted twice since e multiplies (hi - lo) / 2 and the pyramid's input spans [0, hi - lo].
    length = 8 * levels + coarse.shape[1] + 1
    magnitude = (np.abs(plan.up) @ np.abs(coarse) @ np.abs(plan.down)).sum(1).max()
    rounding = 2 * length * np.finfo(np.float32).eps / 2 * magnitude
    return float(np.abs(approx - exact).sum(1).max() + rounding), float(np.abs(approx).sum(1).max())


class LargeSigmaBlur:
    """Blurs [H, W] maps of one shape with one sigma (at least ``2 * MIN_COARSE_SIGMA``): by the pyramid, or by
    the DCT when an axis is short (see the module doc); reuses its input buffer between calls."""

    def __init__(self, shape: tuple[int, int], sigma: float):
        self.shape = shape
        self.levels = pyramid_levels(sigma)
        if self.levels == 0:
            raise ValueError(f"sigma {sigma} is small enough for the exact filter")
        if any(is_short_axis(n, sigma) for n in shape):
            self.spectrum = np.outer(*(reflect_spectrum(n, float(sigma)) for n in shape)).astype(np.float32)
            self.margin_in = self.margin_out = (0, 0)
            self.frame = shape
        else:
            self.spectrum = None
            self.y = axis_plan(shape[0], float(sigma), self.levels)
            self.x = axis_plan(shape[1], float(sigma), self.levels)
            self.margin_in = (self.y.margin_in, self.x.margin_in)
            self.margin_out = (self.y.margin_out, self.x.margin_out)
            self.frame = (self.y.up_sizes[0], self.x.up_sizes[0])
        # The padded input is a per-thread scratch array: one LargeSigmaBlur per thread at a time.
        (my, mx), (h, w) = self.margin_in, shape
        self.buffer = scratch("blur_input", (h + 2 * my, w + 2 * mx), np.float32)

    @property
    def output_frame(self) -> tuple[int, int]:
        """Shape of the frame the output is produced in; the map is its centre (see `crop`)."""
        return self.frame

    def crop(self, frame: np.ndarray) -> np.ndarray:
        """The [..., H, W] map inside an output frame."""
        my, mx = self.margin_out
        return frame[..., my:my + self.shape[0], mx:mx + self.shape[1]]

    @property
    def interior(self) -> np.ndarray:
        """View of the input buffer where the map to blur is written before calling `run`."""
        my, mx = self.margin_in
        return self.buffer[my:my + self.shape[0], mx:mx + self.shape[1]]

    def run(self, out_frame: np.ndarray, offset: float = 0.0) -> None:
        """Blurs the map written into `interior`, adds ``offset`` and writes the output frame ``out_frame``.

        Call it with BLAS limited to one thread (see `soft_map`): the coarse products are tiny.
        """
        if self.spectrum is not None:
            coefficients = scipy.fft.dctn(self.buffer, type=2, norm="ortho")
            coefficients *= self.spectrum
            out_frame[...] = scipy.fft.idctn(coefficients, type=2, norm="ortho", overwrite_x=True) + offset
            return
        buf, (h, w) = self.buffer, self.shape
        my, mx = self.margin_in
        # Reflect padding: rows first (interior columns), then whole columns, which fills the corners.
        _reflect_fill(buf[:, mx:mx + w], my, h, axis=0, index=self.y.pad_index)
        _reflect_fill(buf, mx, w, axis=1, index=self.x.pad_index)
        level = buf
        for i in range(self.levels):  # intermediate levels in scratch arrays: fresh ones cost page faults
            level = cv2.pyrDown(level, dst=scratch(f"blur_down{i}", ((level.shape[0] + 1) // 2,
                                                                      (level.shape[1] + 1) // 2), np.float32))
        level = self.y.coarse @ level @ self.x.coarse.T
        if offset:
            level += np.float32(offset)
        for i in range(self.levels - 1, -1, -1):
            shape = (self.y.up_sizes[i], self.x.up_sizes[i])
            dst = out_frame if i == 0 else scratch(f"blur_up{i}", shape, np.float32)
            level = cv2.pyrUp(level, dst=dst, dstsize=shape[::-1])


def _reflect_fill(array: np.ndarray, margin: int, n: int, axis: int, index: np.ndarray) -> None:
    """Fills the ``margin`` entries before and after the ``n`` interior ones along ``axis`` by reflection."""
    a = array if axis == 0 else array.T
    if margin <= n:  # one reflection: flipped slices
        a[:margin] = a[2 * margin - 1:margin - 1:-1] if margin else a[:0]
        a[margin + n:] = a[margin + n - 1:n - 1:-1]
    else:
        a[:margin] = a[margin + index[:margin]]
        a[margin + n:] = a[margin + index[margin + n:]]
