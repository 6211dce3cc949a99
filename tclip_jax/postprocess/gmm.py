"""A 2-component 1-D Gaussian mixture fitted to many maps at once, from histograms of all their values.

Pipeline (each step is a pass over the map done in C by OpenCV, then small numpy arrays):

1. Fine histogram of ALL values: the map is scaled to ``FINE_BINS`` integer bins by one OpenCV conversion
   (bin ``k`` holds the values that round to ``lo + k * range / (FINE_BINS - 1)``) and counted by
   ``cv2.calcHist``. Each value is represented by its bin centre plus the uniform in-bin spread
   (``h**2 / 12``, Sheppard's correction), so nothing is subsampled; a group (step 2) holding one value has no
   spread, exactly (an isolated outlier's component: its std, which sets tau, is then reg_covar's, as in
   scikit-learn's fit; with the spread tau was 1.3e-2 of the range off on 224x224 N(0, 1) values and one at 1000,
   now 1.3e-6 to 2.7e-6 over 40 draws; `em_map` sums each component over its own responsibilities: the upper
   one's sums taken as the totals less the lower one's lost digits at its weight, 2e-5, and tau up to 1e-3).
2. Quadrature: the fine bins are grouped ``FINE_BINS // COARSE_BINS`` at a time; each group is replaced by the
   two-point Gauss rule that matches its count and its first three moments (mean, variance, third central
   moment). EM sums of smooth functions of the values (the responsibilities times 1, x, x**2) are then exact
   up to terms in the fourth power of the group width. Where a component is narrower than a group
   (``range / COARSE_BINS``) the responsibilities are not smooth on that scale and the rule is coarser: on a
   64x64 map of one Gaussian blob (a flat background of std 0.12 group widths) tau is 4.9e-4 of the range
   from the exact fit on all values. This is not refined. Nor is a component of several values within one fine bin
   (narrower than ``range / FINE_BINS``): Sheppard's spread widens it, and tau's error grows with range / std (two
   values at 1000 +- 1e-3 among 224x224 N(0, 1) values: 1.2e-2 of the range).
3. The mixture is fitted on these ``2 * COARSE_BINS`` weighted points by the same EM iteration as
   scikit-learn's ``GaussianMixture(2, covariance_type="diag", reg_covar=1e-6)`` on the standardized values
   (zero mean, unit variance), from the same kind of start (the hard split of the global 2-means optimum,
   i.e. Otsu's split of the values), run to convergence: EM steps until the fixed-point residual is below
   ``NEWTON_SWITCH``, then Newton steps on the fixed-point equation ``theta = EM(theta)`` with the EM map's
   analytic Jacobian (each step is accepted only if the residual shrinks, otherwise an EM step is taken),
   until the residual is below ``TOL``. The result is EM's own fixed point (the one plain EM converges to
   from that start), not a different optimum: the Newton steps only start once EM is near it.

A few maps (nearly unimodal ones: random-weight ViT maps, flat scores) leave the Otsu start through a saddle of
the likelihood where EM's rate is ~1: plain EM needs 5,000 to 75,000 steps there and Newton does not apply (the
EM map expands along the escape direction). Maps still unconverged after ``SQUAREM_AFTER`` evaluations take
SQUAREM cycles (Varadhan & Roland 2008, scheme S3) whose extrapolation length is cut back until the likelihood
rises all along the extrapolation path, plain EM being the last resort; on the maps where this was measured
(benchmarks/RESULTS.md, 'GMM fits where EM crawls') they reach plain EM's fixed point in 5-16x fewer evaluations.
A path whose likelihood dips has passed plain EM's fixed point towards another one (often a component collapsed
onto the extreme values, whose likelihood is higher): checking only the end point landed there on 53 of 1973
random small maps. The path check costs 1.1-1.7x more evaluations than the end-point check did (1.7x on the
worst crawling map there), and about twice the time on 224x224 smoothed noise, its likelihoods included.

scikit-learn's default stopping rule (an absolute change of the mean log-likelihood below 1e-3) stops EM
long before its fixed point on these maps: tau moves by up to ~2 % of the map's range after that point. The
converged fit is what "the GMM fitted to the map's values" denotes, it does not depend on the tolerance,
and it is what this module returns.

All maps of a batch are fitted together: every EM/Newton step is a handful of numpy operations on
``[Q, 2 * COARSE_BINS]`` arrays; maps leave the batch as they converge.
"""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
from scipy.special import expit

from tclip_jax.postprocess._scratch import scratch

FINE_BINS = 16384        # histogram bins over [min, max] (16-bit integer image, one cv2.calcHist)
COARSE_BINS = 512        # quadrature groups; each becomes two weighted points
REG_COVAR = 1e-6         # scikit-learn's default, added to the standardized variances
TOL = 1e-8               # fixed-point residual (max over logit weight, means, log variances; standardized units;
                         # a component collapsed onto one value (variance = reg_covar) has log-variance noise ~1e-10)
NEWTON_SWITCH = 1e-3     # residual below which Newton steps on the fixed-point equation are tried
MAX_STEPS = 20000        # EM-map evaluations per map (reached by some white-noise maps: 2 of 10 224x224 N(0, 1) draws)
EM_RUN = 8               # EM steps taken in a row while every map of the batch is far from convergence
SQUAREM_AFTER = 500      # EM-map evaluations after which a map still far from its fixed point is accelerated
SQUAREM_TRIES = 6        # extrapolation lengths tried per SQUAREM cycle (each a quarter of the last) before EM
SQUAREM_PATH_SAMPLES = 8  # points of an extrapolation path whose likelihood must rise (see `squarem_cycle`)
_NEWTON_FRACTIONS = (np.array([1.0]), np.array([0.5, 0.25, 0.125]))  # Newton step lengths, tried in turn
_TINY = 1e-12
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class MapHistograms:
    """Per-map statistics for the batched fit: ``counts`` [Q, FINE_BINS] fine-bin counts (`fine_histogram`),
    ``lo``/``hi`` [Q] the maps' minimum and maximum."""

    counts: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


@dataclasses.dataclass(frozen=True)
class MixtureParams:
    """Fitted components per map in the maps' units, component 0 has the lower mean; ``steps`` EM-map evaluations."""

    means: np.ndarray    # [Q, 2]
    stds: np.ndarray     # [Q, 2]
    weights: np.ndarray  # [Q, 2]
    steps: np.ndarray    # [Q]
    converged: np.ndarray  # [Q] bool


def map_histograms(maps, lo, hi) -> MapHistograms:
    """`MapHistograms` of 2-D maps whose minima and maxima are ``lo`` and ``hi`` (one `fine_histogram` each)."""
    counts = np.empty((len(maps), FINE_BINS), np.float32)
    for row, values in enumerate(maps):
        fine_histogram(values, lo[row], hi[row], out=counts[row])
    return MapHistograms(counts, np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64))


def fine_histogram(values: np.ndarray, lo: float, hi: float, out: np.ndarray | None = None) -> np.ndarray:
    """Counts of a 2-D float32/float64 map in ``FINE_BINS`` bins centred on ``lo + k (hi - lo) / (FINE_BINS - 1)``.

    Returns float32 counts (exact integers below 2**24 per bin). A constant map puts everything in bin 0.
    """
    span = hi - lo
    if span <= 0:
        counts = np.zeros(FINE_BINS, np.float32) if out is None else out
        counts[:] = 0
        counts[0] = values.size
        return counts
    scale = (FINE_BINS - 1) / span
    # OpenCV scales a float32 map in float32: far from 0 its products would lose the bin resolution, and a bin scale
    # beyond float32's (a range below ~5e-35) put every value but the minimum past the bins, silently
    if values.dtype == np.float32 and (max(abs(lo), abs(hi)) > 1e3 * span or scale > _FLOAT32_MAX):
        values = values.astype(np.float64)
    # One pass: round(value * scale - lo * scale), saturated to 0..65535.
    index = cv2.addWeighted(values, scale, values, 0.0, -lo * scale, dtype=cv2.CV_16U,
                            dst=scratch("bin_index", values.shape, np.uint16))
    # Two spare bins catch values that rounding pushes to FINE_BINS; they are folded into the top bin.
    hist = cv2.calcHist([index], [0], None, [FINE_BINS + 2], [0, FINE_BINS + 2]).ravel()
    counts = hist[:FINE_BINS].copy() if out is None else out
    if out is not None:
        counts[:] = hist[:FINE_BINS]
    counts[-1] += hist[FINE_BINS:].sum()
    return counts


def quadrature_points(hists: MapHistograms) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-point Gauss rules of the coarse groups, in standardized units.

    Returns ``(points [Q, 2G], weights [Q, 2G] summing to 1 per map, group_moments [3, Q, G], center [Q],
    scale [Q])`` where group_moments are each group's (weight, weight * mean, weight * E[z**2]) and
    ``z = (value - center) / scale``; center and scale are the binned data's mean and standard deviation.
    """
    counts = hists.counts.astype(np.float64)
    q = counts.shape[0]
    per = FINE_BINS // COARSE_BINS
    total = counts.sum(1)
    k = np.arange(FINE_BINS, dtype=np.float64)
    step = (hists.hi - hists.lo) / (FINE_BINS - 1)  # value per fine bin
    # Binned data's mean and variance in bin units (uniform in-bin spread adds 1/12).
    mean_k = counts @ k / total
    var_k = counts @ (k * k) / total - mean_k**2 + 1.0 / 12.0
    var_k = np.maximum(var_k, 1.0 / 12.0)
    center = hists.lo + step * mean_k
    scale = step * np.sqrt(var_k)
    # z = a + b * k
    b = 1.0 / np.sqrt(var_k)
    a = -mean_k * b
    # Group moments about the group's centre, in bin units: one matmul for all maps and groups.
    offsets = np.arange(per, dtype=np.float64) - (per - 1) / 2.0
    powers = np.stack([np.ones(per), offsets, offsets**2, offsets**3], axis=1)
    s = (counts.reshape(q * COARSE_BINS, per) @ powers).reshape(q, COARSE_BINS, 4)
    n = s[..., 0]
    safe = np.where(n > 0, n, 1.0)
    mean_d = s[..., 1] / safe
    e2 = s[..., 2] / safe
    # A group of one value has no spread about its mean (a component of that value alone has variance 0, as
    # scikit-learn's fit on the values gives it: Sheppard's term there set its std, and tau, off by a bin width).
    var_d = np.maximum(e2 - mean_d**2, 0.0) + np.where(n == 1, 0.0, 1.0 / 12.0)
    third_d = s[..., 3] / safe - 3.0 * mean_d * e2 + 2.0 * mean_d**3
    bin_centers = (np.arange(COARSE_BINS) * per + (per - 1) / 2.0)[None, :]
    m = a[:, None] + b[:, None] * (bin_centers + mean_d)
    v = (b**2)[:, None] * var_d
    t = (b**3)[:, None] * third_d
    sd = np.sqrt(v)
    skew = t / np.where(v > 0, v * sd, 1.0)  # t = v = 0 for one value
    root = np.sqrt(1.0 + 0.25 * skew**2)
    d1, d2 = sd * (0.5 * skew - root), sd * (0.5 * skew + root)  # d1 < 0 < d2
    p1 = np.where(d2 > d1, d2 / np.where(d2 > d1, d2 - d1, 1.0), 0.5)  # one value: two halves at it
    w = n / total[:, None]
    points = np.stack([m + d1, m + d2], axis=2).reshape(q, 2 * COARSE_BINS)
    weights = np.stack([w * p1, w * (1.0 - p1)], axis=2).reshape(q, 2 * COARSE_BINS)
    moments = np.stack([w, w * m, w * (m * m + v)])
    return points, weights, moments, center, scale


def initial_params(moments: np.ndarray) -> np.ndarray:
    """Parameters [5, Q] of the hard split at the global 2-means optimum over the groups (Otsu's split).

    theta = (logit w1, mean1, log var1, mean2, log var2), standardized units, component 1 below the split.
    """
    w, wm, wm2 = moments
    n_left = np.cumsum(w, 1)[:, :-1]
    s_left = np.cumsum(wm, 1)[:, :-1]
    n_all = w.sum(1, keepdims=True)
    s_all = wm.sum(1, keepdims=True)
    valid = (n_left > _TINY) & (n_all - n_left > _TINY)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(valid, (s_left * n_all - n_left * s_all) ** 2 / (n_left * (n_all - n_left)), -1.0)
    split = np.argmax(between, axis=1)
    left = np.arange(w.shape[1])[None, :] <= split[:, None]
    n1 = np.maximum((w * left).sum(1), _TINY)
    n2 = np.maximum(n_all[:, 0] - n1, _TINY)
    m1 = (wm * left).sum(1) / n1
    m2 = (s_all[:, 0] - (wm * left).sum(1)) / n2
    v1 = np.maximum((wm2 * left).sum(1) / n1 - m1**2, 0.0) + REG_COVAR
    v2 = np.maximum((wm2.sum(1) - (wm2 * left).sum(1)) / n2 - m2**2, 0.0) + REG_COVAR
    return np.stack([np.log(n1 / n2), m1, np.log(v1), m2, np.log(v2)])


class _Points:
    """The fit's data for a set of maps: design rows [1, x, x**2] and power rows x**0..x**4 of the points."""

    def __init__(self, points: np.ndarray, weights: np.ndarray):
        self.weights = weights
        self.half_weights = 0.5 * weights
        self.design = np.stack([np.ones_like(points), points, points * points], axis=2)   # [Q, P, 3]
        squares = points * points
        self.powers = np.stack([self.design[:, :, 0], points, squares, squares * points, squares * squares],
                               axis=1)                                                    # [Q, 5, P]

    def take(self, index: np.ndarray) -> "_Points":
        out = _Points.__new__(_Points)
        out.weights, out.design, out.powers = self.weights[index], self.design[index], self.powers[index]
        out.half_weights = self.half_weights[index]
        return out


def em_map(theta: np.ndarray, data: _Points, jacobian: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """One EM step theta -> F(theta) for all maps ([5, Q]) and, if asked, its Jacobian dF/dtheta [Q, 5, 5].

    E-step: the responsibility of component 1 is expit(g), g(x) = gamma + beta x + alpha x**2 the log ratio of
    the weighted densities. M-step as scikit-learn's (diagonal covariance, reg_covar added to the variances), each
    component's sums taken over its own responsibilities, as scikit-learn's are: the upper one's as the totals less
    the lower one's lost digits at a small weight (a few outliers' component, 2e-5: its variance, reg_covar's,
    came out up to 30 % wide, tau up to 1e-3 of the range off on 224x224 maps).
    (Written with few numpy calls: at ~10 maps per image they cost as much as the arithmetic.)
    """
    lw, m1, lv1, m2, lv2 = theta
    q = theta.shape[1]
    iv1, iv2 = np.exp(-lv1), np.exp(-lv2)
    coef = np.empty((q, 3, 1))                                                    # (gamma, beta, alpha)
    coef[:, 0, 0] = lw - 0.5 * lv1 + 0.5 * lv2 - 0.5 * m1 * m1 * iv1 + 0.5 * m2 * m2 * iv2
    coef[:, 1, 0] = m1 * iv1 - m2 * iv2
    coef[:, 2, 0] = 0.5 * (iv2 - iv1)
    half_tanh = np.tanh(0.5 * np.matmul(data.design, coef)[:, :, 0])              # expit(g) = (1 + t) / 2
    spread_w = data.half_weights * half_tanh
    resp = np.stack([data.half_weights + spread_w, data.half_weights - spread_w], axis=2)  # w r, w (1 - r)
    (s0, n2), (s1, u1), (s2, u2) = np.matmul(data.powers[:, :3], resp).transpose(1, 2, 0)
    s0 = np.minimum(np.maximum(s0, _TINY), 1.0 - _TINY)
    n2 = np.minimum(np.maximum(n2, _TINY), 1.0 - _TINY)
    out = np.empty((5, q))
    mean1 = np.divide(s1, s0, out=out[1])
    mean2 = np.divide(u1, n2, out=out[3])
    var1 = np.maximum(s2 / s0 - mean1 * mean1, 0.0) + REG_COVAR
    var2 = np.maximum(u2 / n2 - mean2 * mean2, 0.0) + REG_COVAR
    np.log(s0 / n2, out=out[0])
    np.log(var1, out=out[2])
    np.log(var2, out=out[4])
    if not jacobian:
        return out, None
    # sum_p w r (1 - r) x^k, k = 0..4, with r (1 - r) = (1 - t**2) / 4; dS/dtheta = H C with H[i, k] =
    # spread[i + k] (Hankel) and C[k] = d(gamma, beta, alpha)_k / dtheta.
    spread = np.matmul(data.powers, (data.half_weights * (1.0 - half_tanh * half_tanh))[:, :, None])[:, :, 0]
    spread *= 0.5
    hankel = np.lib.stride_tricks.sliding_window_view(spread, 3, axis=1)  # [Q, 3, 3], hankel[:, i, k] = spread[i + k]
    c = np.zeros((q, 3, 5))
    c[:, 0, 0] = 1.0
    c[:, 0, 1] = -m1 * iv1
    c[:, 0, 2] = -0.5 + 0.5 * m1 * m1 * iv1
    c[:, 0, 3] = m2 * iv2
    c[:, 0, 4] = 0.5 - 0.5 * m2 * m2 * iv2
    c[:, 1, 1] = iv1
    c[:, 1, 2] = -m1 * iv1
    c[:, 1, 3] = -iv2
    c[:, 1, 4] = m2 * iv2
    c[:, 2, 2] = 0.5 * iv1
    c[:, 2, 4] = -0.5 * iv2
    inv0, inv2 = 1.0 / s0, 1.0 / n2
    df = np.zeros((q, 5, 3))
    df[:, 0, 0] = inv0 + inv2
    df[:, 1, 0] = -mean1 * inv0
    df[:, 1, 1] = inv0
    df[:, 2, 0] = (2.0 * mean1 * mean1 - s2 * inv0) * inv0 / var1
    df[:, 2, 1] = -2.0 * mean1 * inv0 / var1
    df[:, 2, 2] = inv0 / var1
    df[:, 3, 0] = mean2 * inv2
    df[:, 3, 1] = -inv2
    df[:, 4, 0] = (u2 * inv2 - 2.0 * mean2 * mean2) * inv2 / var2
    df[:, 4, 1] = 2.0 * mean2 * inv2 / var2
    df[:, 4, 2] = -inv2 / var2
    return out, df @ (hankel @ c)


def _em_run_one(theta: np.ndarray, data: _Points, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` EM steps of one map (`em_map` with Q = 1, fewer numpy calls); returns the last two iterates."""
    design, powers, half_w = data.design[0], data.powers[0, :3], data.half_weights[0]
    lw, m1, lv1, m2, lv2 = (float(v) for v in theta)
    coef = np.empty(3)
    previous = theta
    for _ in range(count):
        previous = (lw, m1, lv1, m2, lv2)
        iv1, iv2 = math.exp(-lv1), math.exp(-lv2)
        coef[0] = lw - 0.5 * lv1 + 0.5 * lv2 - 0.5 * m1 * m1 * iv1 + 0.5 * m2 * m2 * iv2
        coef[1] = m1 * iv1 - m2 * iv2
        coef[2] = 0.5 * (iv2 - iv1)
        spread_w = half_w * np.tanh(0.5 * (design @ coef))
        (s0, n2), (s1, u1), (s2, u2) = (powers @ np.stack([half_w + spread_w, half_w - spread_w], 1)).tolist()
        s0, n2 = min(max(s0, _TINY), 1.0 - _TINY), min(max(n2, _TINY), 1.0 - _TINY)
        m1, m2 = s1 / s0, u1 / n2
        lw = math.log(s0 / n2)
        lv1 = math.log(max(s2 / s0 - m1 * m1, 0.0) + REG_COVAR)
        lv2 = math.log(max(u2 / n2 - m2 * m2, 0.0) + REG_COVAR)
    return np.array(previous, dtype=np.float64)[:, None], np.array([lw, m1, lv1, m2, lv2])[:, None]


def log_likelihood(theta: np.ndarray, data: _Points) -> np.ndarray:
    """Weighted mean log-density [Q, ...] of the points under theta [5, Q, ...] (any number of parameter sets per
    map), up to the constant -log(2 pi) / 2."""
    lw, m1, lv1, m2, lv2 = (row[..., None] for row in theta)
    shape = (theta.shape[1],) + (1,) * (theta.ndim - 2) + (data.weights.shape[1],)
    x, weights = data.design[:, :, 1].reshape(shape), data.weights.reshape(shape)
    log_w1, log_w2 = -np.logaddexp(0.0, -lw), -np.logaddexp(0.0, lw)
    density1 = log_w1 - 0.5 * lv1 - 0.5 * (x - m1) ** 2 * np.exp(-lv1)
    density2 = log_w2 - 0.5 * lv2 - 0.5 * (x - m2) ** 2 * np.exp(-lv2)
    return (weights * np.logaddexp(density1, density2)).sum(-1)


def squarem_cycle(theta: np.ndarray, f: np.ndarray, data: _Points) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One SQUAREM cycle from theta [5, Q] with f = F(theta): returns (theta', F(theta'), EM-map evaluations [Q]).

    With r = F(theta) - theta and v = F(F(theta)) - 2 F(theta) + theta, the extrapolation theta - 2 a r + a**2 v
    (a = -|r| / |v|, at most -1) is followed by one EM step; a is quartered until the likelihood rises all along
    the extrapolation path (at ``SQUAREM_PATH_SAMPLES`` evenly spaced a' in (0, a]) and that step's likelihood is
    not below theta's. A path that dips has passed a maximum: beyond it lies another EM basin (often a component
    collapsed onto the extreme values), whose higher likelihood would otherwise be accepted. a = -1 is
    F(F(theta)), so the last resort is three plain EM steps, which never lower the likelihood.
    """
    q = theta.shape[1]
    f2, _ = em_map(f, data)
    r = f - theta
    v = f2 - f - r
    alpha = np.minimum(-np.sqrt((r * r).sum(0) / np.maximum((v * v).sum(0), _TINY * _TINY)), -1.0)
    base = log_likelihood(theta, data)
    out = np.empty_like(theta)
    accepted = np.zeros(q, bool)
    evaluations = np.ones(q, np.int64)
    pending = np.nonzero(alpha < -1.0)[0]
    fractions = np.arange(1, SQUAREM_PATH_SAMPLES + 1) / SQUAREM_PATH_SAMPLES
    for _ in range(SQUAREM_TRIES):
        if not pending.size:
            break
        a = alpha[pending][:, None] * fractions                                        # [k, samples]
        path = theta[:, pending, None] - 2.0 * a * r[:, pending, None] + a * a * v[:, pending, None]
        tries = path[:, :, -1]
        sub = data.take(pending)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # wild tries are discarded
            try_f, _ = em_map(tries, sub)
            ok = np.isfinite(try_f).all(0) & np.isfinite(path).all((0, 2))
            rows = np.nonzero(ok)[0]
            along = log_likelihood(np.concatenate([path[:, rows], try_f[:, rows, None]], 2), sub.take(rows))
            ok[rows] = (np.diff(np.concatenate([base[pending[rows], None], along], 1), axis=1) >= 0.0).all(1)
        evaluations[pending] += 1
        out[:, pending[ok]] = try_f[:, ok]
        accepted[pending[ok]] = True
        pending = pending[~ok]
        alpha[pending] /= 4.0
        pending = pending[alpha[pending] < -1.0]
    rest = np.nonzero(~accepted)[0]
    if rest.size:
        out[:, rest], _ = em_map(f2[:, rest], data.take(rest))
        evaluations[rest] += 1
    new_f, _ = em_map(out, data)
    return out, new_f, evaluations + 1


def fit_points(points: np.ndarray, weights: np.ndarray, theta: np.ndarray, tol: float = TOL,
               newton_switch: float = NEWTON_SWITCH, max_steps: int = MAX_STEPS,
               squarem_after: float = SQUAREM_AFTER) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs EM, then Newton on EM's fixed-point equation, from ``theta`` [5, Q] until the residual is < tol.

    Maps whose residual |F(theta) - theta| is >= ``newton_switch`` take ``EM_RUN`` EM steps. Below it, the EM
    map's Jacobian J is evaluated, and if EM contracts there (spectral radius of J < 1, as at a local
    maximum, not near a saddle) the Newton step theta + t (I - J)^-1 (F(theta) - theta) is tried with t = 1,
    then with t = 1/2, 1/4, 1/8 together; the first (smallest-residual) one that shrinks the residual is
    kept; otherwise the map takes ``EM_RUN`` EM steps before the next try, or, once it has used
    ``squarem_after`` EM-map evaluations, one `squarem_cycle` (``math.inf``: plain EM throughout). EM alone
    converges to the same fixed point, linearly; near a fixed point with a slow rate (hundreds of EM steps on
    some maps) Newton takes a few steps, and past a saddle where EM crawls (thousands) SQUAREM does. A map
    stops after ``max_steps`` evaluations. Returns (F(theta) at the last iterate, i.e. one more EM step as
    scikit-learn ends with, [5, Q]; EM-map evaluations per map [Q]; converged [Q]).
    """
    data = _Points(points, weights)
    q = points.shape[0]
    theta = theta.astype(np.float64).copy()
    f, _ = em_map(theta, data)
    residual = np.abs(f - theta).max(0)
    steps = np.ones(q, np.int64)
    converged = residual < tol
    active = np.nonzero(~converged & np.isfinite(residual))[0]
    work = data.take(active)            # compacted when a quarter of its maps have finished
    rows = np.arange(active.size)       # rows of `work` holding the active maps, in `active` order
    while active.size:
        sub = work if rows.size == len(work.weights) else work.take(rows)
        th, fa, res = theta[:, active], f[:, active], residual[active]
        accepted = np.zeros(active.size, bool)
        idx = np.nonzero(res < newton_switch)[0]
        if idx.size:
            _, jac = em_map(th[:, idx], sub.take(idx), jacobian=True)
            steps[active[idx]] += 1
            system = np.eye(5)[None] - jac
            ok = np.isfinite(system).all((1, 2))
            ok[ok] &= np.abs(np.linalg.eigvals(jac[ok])).max(1) < 1.0
            ok[ok] &= np.abs(np.linalg.det(system[ok])) > 1e-14
            idx, system = idx[ok], system[ok]
        if idx.size:
            # The full Newton step; where it does not shrink the residual (it can overshoot along a slow EM
            # mode, where the fixed-point map is not yet linear) 1/2, 1/4 and 1/8 of it are tried together.
            delta = np.linalg.solve(system, (fa - th)[:, idx].T[:, :, None])[:, :, 0].T          # [5, k]
            for fractions in _NEWTON_FRACTIONS:
                tries = th[:, idx, None] + delta[:, :, None] * fractions                        # [5, k, t]
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # wild tries are discarded
                    try_f, _ = em_map(tries.reshape(5, -1), sub.take(np.repeat(idx, fractions.size)))
                steps[active[idx]] += 1
                try_f = try_f.reshape(tries.shape)
                try_res = np.abs(try_f - tries).max(0)                                          # [k, t]
                try_res[~np.isfinite(try_res)] = np.inf
                best = np.argmin(try_res, axis=1)
                keep = try_res[np.arange(idx.size), best] < res[idx]
                chosen, best = idx[keep], best[keep]
                accepted[chosen] = True
                th[:, chosen] = tries[:, keep, best]
                fa[:, chosen] = try_f[:, keep, best]
                res[chosen] = try_res[keep, best]
                idx, delta = idx[~keep], delta[:, ~keep]
                if not idx.size:
                    break
        em = np.nonzero(~accepted)[0]
        is_slow = steps[active[em]] >= squarem_after
        slow, em = em[is_slow], em[~is_slow]
        if slow.size:  # one SQUAREM cycle each
            th[:, slow], fa[:, slow], evaluations = squarem_cycle(th[:, slow], fa[:, slow], sub.take(slow))
            res[slow] = np.abs(fa[:, slow] - th[:, slow]).max(0)
            steps[active[slow]] += evaluations
        if em.size:  # EM_RUN EM steps in a row, no bookkeeping in between
            run = int(min(EM_RUN, max_steps - steps[active[em]].max()))
            if run > 0:
                if em.size == 1:  # a slow map left alone: the same steps with scalar M-steps
                    th_em, f_em = _em_run_one(fa[:, em[0]], sub.take(em), run)
                else:
                    sub_em = sub if em.size == active.size else sub.take(em)
                    th_em, f_em = th[:, em], fa[:, em]
                    for _ in range(run):
                        th_em, (f_em, _) = f_em, em_map(f_em, sub_em)
                th[:, em], fa[:, em] = th_em, f_em
                res[em] = np.abs(f_em - th_em).max(0)
                steps[active[em]] += run
        theta[:, active], f[:, active], residual[active] = th, fa, res
        finished = (res < tol) | (steps[active] >= max_steps) | ~np.isfinite(res)
        converged[active[finished]] = res[finished] < tol
        active, rows = active[~finished], rows[~finished]
        if active.size and rows.size <= 0.75 * len(work.weights):
            work, rows = work.take(rows), np.arange(active.size)
    return f, steps, converged


def fit_histograms(hists: MapHistograms, **fit_options) -> MixtureParams:
    """Fits every map of ``hists`` (``fit_options``: `fit_points`' keywords); the components are returned in the
    maps' units, sorted by mean."""
    points, weights, moments, center, scale = quadrature_points(hists)
    theta, steps, converged = fit_points(points, weights, initial_params(moments), **fit_options)
    lw, m1, lv1, m2, lv2 = theta
    w1 = expit(lw)
    means = center[:, None] + scale[:, None] * np.stack([m1, m2], 1)
    stds = scale[:, None] * np.sqrt(np.exp(np.stack([lv1, lv2], 1)))
    weights_out = np.stack([w1, 1.0 - w1], 1)
    order = np.argsort(means, axis=1, kind="stable")
    take = np.take_along_axis
    return MixtureParams(take(means, order, 1), take(stds, order, 1), take(weights_out, order, 1), steps, converged)
