"""Soft maps (GMM threshold) and zero-shot boxes.

Boxes are checked against gScoreCAM's own outputs (../shared/fixtures/metrics); the GMM threshold against
the closed-form intersection of two weighted Gaussian densities.
"""
import functools
import os
import pathlib

import numpy as np
import pytest
from scipy import ndimage, optimize, stats

from tclip_jax.checkpoints.load import LoadedClip
from tclip_jax.methods.tclip import TCLIP
from tclip_jax.methods.tclip.settings import MAX_SIGMA
from tclip_jax.postprocess import (
    GSCORECAM_DUMMY_BOX,
    Box,
    contour_boxes,
    foreground,
    gaussian_intersection,
    gmm_threshold,
    heatmap_box,
    largest_component_box,
    otsu_box,
    soft_map,
    uint8_minmax,
)
from tclip_jax.postprocess.soft import DEFAULT_SIGMA_FRACTION, gaussian_blur

NUM_MAPS = 12


@pytest.fixture(scope="module")
def ref(fixture_npz):
    return fixture_npz("metrics/metrics_reference.npz")


# ---------------------------------------------------------------- boxes vs gScoreCAM


@pytest.mark.parametrize("i", range(NUM_MAPS))
def test_gscorecam_reference(ref, i):
    heatmap = ref[f"heatmap_{i:02d}"]
    np.testing.assert_array_equal(uint8_minmax(heatmap), ref[f"gray_uint8_{i:02d}"])

    otsu_mask, otsu_t = foreground(heatmap)
    assert otsu_t == ref["gscorecam_otsu_threshold"][i]
    assert len(contour_boxes(otsu_mask)) == ref["gscorecam_num_contours_otsu"][i]
    assert heatmap_box(heatmap, rule="contour") == tuple(ref["gscorecam_box_otsu"][i])
    assert otsu_box(heatmap, rule="contour") == tuple(ref["gscorecam_box_otsu"][i])

    fixed_mask, _ = foreground(heatmap, 0.5)
    assert len(contour_boxes(fixed_mask)) == ref["gscorecam_num_contours_thr05"][i]
    assert heatmap_box(heatmap, 0.5, rule="contour") == tuple(ref["gscorecam_box_thr05"][i])


def test_fixed_threshold_rounds_like_python(ref):
    gray = ref["gray_uint8_00"]
    mask, t = foreground(ref["heatmap_00"], 0.5)
    assert t == 128  # round(127.5) is 128 (half to even)
    np.testing.assert_array_equal(mask, gray > 128)


# ---------------------------------------------------------------- box rules on closed-form masks


def _line_and_square() -> np.ndarray:
    mask = np.zeros((60, 60), bool)
    mask[np.arange(5, 55), np.arange(5, 55)] = True  # 50 pixels, bounding box 50 x 50
    mask[2:12, 40:50] = True  # 100 pixels, bounding box 10 x 10
    return mask


def test_component_rule_counts_pixels_contour_rule_counts_box_area():
    mask = _line_and_square()
    heatmap = mask.astype(np.float32)
    assert heatmap_box(heatmap) == Box(40, 2, 50, 12)
    assert heatmap_box(heatmap, rule="contour") == Box(5, 5, 55, 55)
    # box area, not its width + height: a 4x4 square (area 16, w + h 8) beats a 10x1 bar (area 10, w + h 11)
    bar_and_square = np.zeros((30, 30), np.float32)
    bar_and_square[2, 2:12] = 1.0
    bar_and_square[15:19, 15:19] = 1.0
    assert heatmap_box(bar_and_square, rule="contour") == Box(15, 15, 19, 19)


def test_components_are_8_connected():
    mask = np.zeros((20, 20), bool)
    mask[2:5, 2:5] = True
    mask[5:9, 5:9] = True  # touches the first square at one corner only
    assert largest_component_box(mask) == Box(2, 2, 9, 9)


@pytest.mark.parametrize("shape", [(4, 1), (5, 1), (4, 2), (9, 1), (6, 3), (9, 9)])
def test_the_largest_component_equals_scipys_on_thin_and_small_masks(shape):
    """Against scipy's 8-connected labelling (a unique largest component); a 4x1 crop fooled cv2.compare, which
    took the label number for a 4-element Scalar and compared element by element."""
    rng = np.random.default_rng(sum(shape))
    checked = 0
    for _ in range(300):
        mask = rng.random(shape) < 0.5
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        areas = np.bincount(labels.ravel())[1:]
        if count == 0 or (areas == areas.max()).sum() > 1:
            continue
        rows, cols = np.nonzero(labels == 1 + int(np.argmax(areas)))
        assert largest_component_box(mask) == Box(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1), mask
        checked += 1
    assert checked > 50
    big = np.zeros((50, 50), bool)  # a thin vertical foreground inside a large map: its crop is 4x1
    big[10, 20] = big[12, 20] = big[13, 20] = True
    assert largest_component_box(big) == Box(20, 12, 21, 14)


def test_component_tie_goes_to_the_first_in_opencvs_label_order():
    mask = np.zeros((20, 20), bool)
    mask[10:13, 1:4] = True
    mask[2:5, 12:15] = True  # same size, starts on an earlier row
    assert largest_component_box(mask) == Box(12, 2, 15, 5)
    # The foreground starts on an odd row. OpenCV scans rows in pairs (0-1, 2-3, ...), so the vertical pair on rows
    # 1-2 comes first; a crop starting at row 1 would scan rows 1-2 as one pair and meet the horizontal pair (further
    # left, on row 2) first.
    mask = np.zeros((6, 13), bool)
    mask[1:3, 8] = mask[2, 3:5] = True
    mask[3, 10] = True
    assert largest_component_box(mask) == _reference_box(mask.astype(np.float32)) == Box(8, 1, 9, 3)


def test_empty_mask_has_no_component():
    assert largest_component_box(np.zeros((5, 5), bool)) is None


def test_constant_map_boxes():
    heatmap = np.full((30, 40), 0.5, np.float32)
    assert otsu_box(heatmap) == Box(0, 0, 40, 30)
    assert otsu_box(heatmap, rule="contour") == GSCORECAM_DUMMY_BOX


@pytest.mark.parametrize("threshold", [-0.1, 1.0, 1.5])
def test_threshold_outside_unit_interval_is_rejected(threshold):
    with pytest.raises(ValueError, match="threshold"):
        foreground(np.eye(4), threshold)


def test_bad_heatmaps_and_rules_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        otsu_box(np.array([[0.0, np.nan], [1.0, 0.5]]))
    with pytest.raises(ValueError, match="2-D"):
        otsu_box(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="rule"):
        heatmap_box(np.eye(4), rule="biggest")


# ---------------------------------------------------------------- GMM intersection, closed form


def _weighted_pdf_gap(x, means, stds, weights):
    return weights[0] * stats.norm.pdf(x, means[0], stds[0]) - weights[1] * stats.norm.pdf(x, means[1], stds[1])


@pytest.mark.parametrize(
    "means, stds, weights",
    [
        ((0.0, 4.0), (1.0, 0.5), (0.7, 0.3)),
        ((-1.0, 2.0), (0.3, 1.5), (0.2, 0.8)),
        ((10.0, 10.5), (0.1, 0.1), (0.5, 0.5)),
        ((0.0, 1.0), (0.2, 0.2), (0.9, 0.1)),
        ((4.0, 0.0), (0.5, 1.0), (0.3, 0.7)),  # the larger mean first
        ((1.0, 0.0), (0.2, 0.2), (0.5, 0.5)),
    ],
)
def test_intersection_equates_weighted_densities(means, stds, weights):
    expected = optimize.brentq(_weighted_pdf_gap, min(means), max(means), args=(means, stds, weights), xtol=1e-14)
    assert gaussian_intersection(means, stds, weights) == pytest.approx(expected, abs=1e-9)


def test_equal_variances_give_the_linear_solution():
    m1, m2, s, w1, w2 = 1.0, 3.0, 0.8, 0.6, 0.4
    expected = 0.5 * (m1 + m2) + s**2 * np.log(w1 / w2) / (m2 - m1)
    assert gaussian_intersection((m1, m2), (s, s), (w1, w2)) == pytest.approx(expected, abs=1e-12)
    assert gaussian_intersection((m1, m2), (s, s), (0.5, 0.5)) == pytest.approx(2.0, abs=1e-12)


@pytest.mark.parametrize("scale", [1e-200, 1e-163, 1e-20, 1e20, 1e150])
def test_the_intersection_scales_with_the_map(scale):
    """Solved in standardised units: the densities of a map of range 1e-163 no longer divide by an underflowed
    variance (a ZeroDivisionError for finite input)."""
    means, stds, weights = (0.0, 4.0), (1.0, 0.5), (0.7, 0.3)
    unit = gaussian_intersection(means, stds, weights)
    scaled = gaussian_intersection(tuple(m * scale for m in means), tuple(v * scale for v in stds), weights)
    # abs=0: approx's default abs=1e-12 would pass any number next to an expected 1e-163
    assert scaled == pytest.approx(unit * scale, rel=1e-12, abs=0)
    blob = np.zeros((40, 40))
    blob[10:20, 10:20] = 1.0
    blob += np.random.default_rng(0).random(blob.shape) * 0.1
    assert gmm_threshold(blob * 1e-163).tau == pytest.approx(gmm_threshold(blob).tau * 1e-163, rel=1e-6, abs=0)


def test_no_intersection_between_the_means():
    # The broad heavy component outweighs the light narrow one even at the narrow one's mean.
    assert gaussian_intersection((0.0, 1.0), (1.0, 0.1), (0.999, 0.001)) is None
    assert gaussian_intersection((2.0, 2.0), (1.0, 0.5), (0.5, 0.5)) is None


def test_intersection_rejects_nonpositive_parameters():
    with pytest.raises(ValueError, match="positive"):
        gaussian_intersection((0.0, 1.0), (0.0, 1.0), (0.5, 0.5))


# ---------------------------------------------------------------- GMM fit


def test_fit_recovers_the_analytic_intersection():
    means, stds, weights = (0.0, 4.0), (1.0, 0.5), (0.7, 0.3)
    rng = np.random.default_rng(0)
    n = 10_000
    values = np.concatenate([rng.normal(means[0], stds[0], 7_000), rng.normal(means[1], stds[1], 3_000)])
    scores = rng.permutation(values).reshape(100, n // 100)

    fit = gmm_threshold(scores)

    analytic = optimize.brentq(_weighted_pdf_gap, 0.0, 4.0, args=(means, stds, weights))
    assert fit.fallback is None
    assert fit.tau == pytest.approx(analytic, abs=0.05)
    np.testing.assert_allclose(fit.means, means, atol=0.05)
    np.testing.assert_allclose(fit.stds, stds, atol=0.05)
    np.testing.assert_allclose(fit.weights, weights, atol=0.02)
    # tau is exactly the intersection of the fitted components
    assert gaussian_intersection(fit.means, fit.stds, fit.weights) == fit.tau
    assert _weighted_pdf_gap(fit.tau, fit.means, fit.stds, fit.weights) == pytest.approx(0.0, abs=1e-12)


def test_fit_ignores_pixel_order():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.0, 1.0, 15_000), rng.normal(5.0, 1.0, 7_500)])
    first = gmm_threshold(values.reshape(150, 150))
    second = gmm_threshold(rng.permutation(values).reshape(150, 150))
    # equal up to the summation order of the standardization's mean and std
    for field in ("means", "stds", "weights", "tau"):
        np.testing.assert_allclose(getattr(first, field), getattr(second, field), rtol=1e-9)
    assert first.fallback is None and 0.0 < first.tau < 5.0


def test_unimodal_values_fall_back_to_the_mean():
    values = np.random.default_rng(2).laplace(0.0, 1.0, (100, 100))
    fit = gmm_threshold(values)
    assert fit.fallback == "no_root_between_means"
    assert fit.tau == pytest.approx(values.mean(), abs=1e-12)


def test_constant_map_falls_back_to_its_value():
    fit = gmm_threshold(np.full((4, 5), 2.5))
    assert fit.fallback == "constant"
    assert fit.tau == 2.5
    soft, soft_fit = soft_map(np.full((4, 5), 2.5), sigma=1.0)
    assert soft_fit == fit
    np.testing.assert_allclose(soft, 2.5, rtol=0, atol=1e-12)


def test_tiny_maps():
    fit = gmm_threshold(np.array([[0.0, 1.0]]))
    assert fit.fallback is None and 0.0 < fit.tau < 1.0
    assert gmm_threshold(np.array([[3.0]])).fallback == "constant"


@pytest.mark.parametrize("bad", [np.array([[0.0, np.nan]]), np.array([[np.inf, 1.0]]), np.zeros((0, 3))])
def test_non_finite_or_empty_scores_are_rejected(bad):
    with pytest.raises(ValueError, match="NaN|empty"):
        gmm_threshold(bad)


# ---------------------------------------------------------------- soft map


@pytest.mark.parametrize("bad, message", [
    (np.array([[-1e308, 1e308], [0.0, 1.0]]), "range of .* overflows float64"),  # finite values, infinite range
    (np.array([[1 + 1j, 2.0], [3.0, 4 - 2j]]), "must be real"),                  # not silently made real
])
def test_maps_without_a_finite_real_range_are_refused_in_one_line(bad, message):
    for call in (gmm_threshold, soft_map, otsu_box, lambda m: soft_maps_and_boxes([m])):
        with pytest.raises(ValueError, match=message) as refused:
            call(bad)
        assert "\n" not in str(refused.value)


def test_a_range_too_small_for_the_histogram_is_refused():
    subnormal = np.array([[0.0, 5e-324], [1e-323, 0.0]])  # fitted to NaN weights before, with a warning
    for call in (gmm_threshold, soft_map):
        with pytest.raises(ValueError, match="too small for the GMM's histogram"):
            call(subnormal)
    assert otsu_box(subnormal) == Box(0, 0, 2, 2)  # boxes: a range below float64's epsilon is a constant map
    assert gmm_threshold(subnormal * 2.0**1000).fallback is None  # the same map rescaled is fitted


# A float32 soft map holds values of largest magnitude within [float32's smallest normal, float32's largest / 2**32]
# (the blur's float32 sums need the headroom), or all zeros.
SOFT_MAP_MAX = float(np.finfo(np.float32).max) / 2.0**32
SOFT_MAP_MIN = float(np.finfo(np.float32).tiny)


@pytest.mark.parametrize("shape, sigma", [((8, 8), 0.0), ((8, 8), 1.0), ((16, 16), 4.8), ((40, 40), 4.8)])
def test_soft_maps_refuse_values_a_float32_soft_map_cannot_hold(shape, sigma):
    # no blur, the separable filter, the DCT, the pyramid; -1 and 1: the largest range, of the negative minimum too
    unit = np.broadcast_to(np.where(np.arange(shape[1]) < shape[1] // 3, -1.0, 1.0), shape)
    at_one = soft_map(unit, sigma)[0].astype(np.float64)
    for bound in (SOFT_MAP_MAX, SOFT_MAP_MIN):  # at the bounds: the unit map's soft map, scaled, to float32 rounding
        for values in (unit * bound, (unit * bound).astype(np.float32)):
            soft, fit = soft_map(values, sigma)
            np.testing.assert_allclose(soft / bound, at_one, rtol=0, atol=1e-6)
            if sigma == 0:
                np.testing.assert_array_equal(soft, np.where(values < fit.tau, values.min(), values))
    assert (soft_map(np.zeros(shape), sigma)[0] == 0).all()
    beyond = [unit * np.nextafter(SOFT_MAP_MAX, np.inf), unit * np.nextafter(SOFT_MAP_MIN, 0.0),
              np.where(unit < 0, -1e40, 1.0), unit * 1e-50, np.full(shape, 1e40)]  # once inf, or all zeros
    for values in beyond:
        for call in (lambda m: soft_map(m, sigma), lambda m: soft_maps_and_boxes([m], sigma)):
            with pytest.raises(ValueError, match=r"beyond what a float32 soft map holds .*; rescale it$") as refused:
                call(values)
            assert "\n" not in str(refused.value)
    # the refusal is the soft map's: the fit alone takes float64 maps, and does not depend on their scale
    for scale in (1e40, 1e-50):
        assert gmm_threshold(unit * scale).tau == pytest.approx(gmm_threshold(unit).tau * scale, rel=1e-9)


@pytest.mark.parametrize("scale", [5e28, 1.0, 1e-37])
def test_a_float64_map_float32_holds_gives_the_float32_maps_soft_map(two_level_map, scale):
    exact = (two_level_map * scale).astype(np.float32)  # float32 values, partly subnormal at 1e-37
    for sigma in (0.0, 2.0, 4.8, 10.0):  # no blur, separable filter, pyramid, DCT (64 < 8 sigmas)
        soft32, fit32 = soft_map(exact, sigma)
        soft64, fit64 = soft_map(exact.astype(np.float64), sigma)
        np.testing.assert_array_equal(soft64, soft32)
        assert fit64.tau == pytest.approx(fit32.tau, abs=1e-6 * scale)


@pytest.fixture(scope="module")
def two_level_map():
    rng = np.random.default_rng(3)
    scores = rng.normal(0.0, 0.1, (64, 64))
    scores[20:40, 25:45] += 1.0
    return scores


def test_soft_map_without_blur_floors_values_below_tau(two_level_map):
    soft, fit = soft_map(two_level_map, sigma=0)
    expected = np.where(two_level_map < fit.tau, two_level_map.min(), two_level_map)
    np.testing.assert_array_equal(soft, expected.astype(np.float32))
    assert 0.2 < fit.tau < 0.8


def test_soft_map_blur_keeps_mass_and_range(two_level_map):
    sharp, _ = soft_map(two_level_map, sigma=0)
    soft, _ = soft_map(two_level_map, sigma=3.0)
    assert soft.dtype == np.float32
    assert soft.sum(dtype=np.float64) == pytest.approx(sharp.sum(dtype=np.float64), rel=1e-6)
    assert sharp.min() - 1e-6 <= soft.min() and soft.max() <= sharp.max() + 1e-6
    np.testing.assert_allclose(soft, ndimage.gaussian_filter(sharp.astype(np.float64), 3.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape, sigma", [((480, 640), 12.8), ((7, 7), 2.5), ((4, 5), 1.0), ((1, 9), 3.0),
                                          ((3, 2), 7.0), ((30, 40), 4.48)])
def test_gaussian_blur_is_scipys_gaussian_filter(shape, sigma):
    # Kernels wider than the map reflect more than once: scipy and OpenCV must agree there too. Sigma 4.48 (the
    # default on a 224-pixel map) has 4 sigma = 17.92: scipy's radius rounds it to 18.
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(gaussian_blur(image, sigma),
                               ndimage.gaussian_filter(image.astype(np.float64), sigma, mode="reflect"),
                               atol=2e-6, rtol=0)


def test_soft_map_default_sigma_scales_with_map_size(two_level_map):
    """README: "default 2 % of the longer side" (a literal here: the constant itself would follow any value)."""
    default, _ = soft_map(two_level_map)
    explicit, _ = soft_map(two_level_map, sigma=0.02 * 64)
    np.testing.assert_array_equal(default, explicit)



def test_the_default_sigma_is_stated_in_one_place(tmp_path):
    """TCLIP's --sigma help, the soft map and benchmarks/host_step.py (the new step, the old one and the scipy
    reference) all read `tclip_jax.postprocess.sigma.DEFAULT_SIGMA_FRACTION`: with it changed before they are
    imported (in a fresh process), each follows; host_step had its own 0.02 and the help said "2%%"."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    script = """
import sys
import numpy as np
import tclip_jax.postprocess.sigma as home
home.DEFAULT_SIGMA_FRACTION = 0.05
import dataclasses
from tclip_jax.methods.tclip.settings import Settings
from tclip_jax.postprocess import DEFAULT_SIGMA_FRACTION, soft_map
sys.path.insert(0, sys.argv[1])
from benchmarks import host_step
shown = {f.name: f.metadata["shown_default"] for f in dataclasses.fields(Settings)}["sigma"]
step = np.zeros((40, 50), np.float32)
step[:, 25:] = 1
print(shown, DEFAULT_SIGMA_FRACTION, [k for k in vars(host_step) if k.endswith("SIGMA_FRACTION")],
      host_step.blur_bound("1920x1080")[1], np.array_equal(soft_map(step)[0], soft_map(step, sigma=2.5)[0]),
      np.allclose(host_step.reference_soft_map(step.astype(np.float64), 0.5), soft_map(step, sigma=2.5)[0],
                  atol=1e-5))
"""
    done = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    levels = blur_module.pyramid_levels(0.05 * 1920)
    assert done.stdout.split() == ["5%%", "of", "the", "image's", "longer", "side", "0.05",
                                   "['DEFAULT_SIGMA_FRACTION']", str(levels), "True", "True"]

def test_soft_map_rejects_bad_input():
    for sigma in (-1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="sigma must be a"):
            soft_map(np.eye(4), sigma=sigma)
    with pytest.raises(ValueError, match="2-D"):
        soft_map(np.arange(5.0))


def test_concurrent_fits_equal_serial_fits_and_leave_blas_threads_as_they_were():
    import concurrent.futures

    import threadpoolctl

    maps = [np.random.default_rng(seed).random((200, 200)) for seed in range(12)]
    serial = [gmm_threshold(m) for m in maps]
    before = [pool["num_threads"] for pool in threadpoolctl.threadpool_info()]
    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        concurrent_fits = list(threads.map(gmm_threshold, maps))
    assert concurrent_fits == serial
    assert [pool["num_threads"] for pool in threadpoolctl.threadpool_info()] == before


def test_scratch_arrays_are_reused_per_name_and_dtype_on_one_thread_and_apart_across_threads():
    import concurrent.futures

    from tclip_jax.postprocess._scratch import scratch

    a = scratch("test_a", (4, 5), np.float32)
    assert a.shape == (4, 5) and a.dtype == np.float32 and a.flags.c_contiguous
    assert np.shares_memory(scratch("test_a", (2, 3), np.float32), a)  # a smaller request reuses it
    assert not np.shares_memory(scratch("test_a", (4, 5), np.float64), a)  # another dtype: its own
    assert not np.shares_memory(scratch("test_b", (4, 5), np.float32), a)  # another name: its own
    assert scratch("test_a", (10, 10), np.float32).shape == (10, 10)  # a larger one grows it
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        other = thread.submit(scratch, "test_a", (4, 5), np.float32).result()
    assert not np.shares_memory(other, scratch("test_a", (4, 5), np.float32))


# ================================================================ batched host step (issue 14)
# References: scikit-learn's GaussianMixture on all values, OpenCV's normalize/Otsu/connectedComponentsWithStats,
# scipy.ndimage.gaussian_filter, and explicit loops.

import cv2  # noqa: E402

from tclip_jax.postprocess import (  # noqa: E402
    heatmap_boxes,
    gmm_thresholds,
    soft_maps,
    soft_maps_and_boxes,
)
from tclip_jax.postprocess import blur as blur_module  # noqa: E402
from tclip_jax.postprocess import gmm as gmm_module  # noqa: E402


def _heatmap_like(seed: int, shape: tuple[int, int], dtype=np.float32) -> np.ndarray:
    """A smooth map with one to three bumps on a textured background, like an aggregated relevance map."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    background = ndimage.gaussian_filter(rng.standard_normal(shape), max(h, w) / 20, mode="reflect")
    out = 0.2 * background / (np.abs(background).max() + 1e-12)
    for _ in range(rng.integers(1, 4)):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8) * w / max(h, w), rng.uniform(0.05, 0.2)
        out += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return (0.1 + 0.3 * out).astype(dtype)


def _sklearn_full_fit_tau(values: np.ndarray) -> float:
    """tau of scikit-learn's GaussianMixture(2) on ALL values, standardized, from the exact global 2-means split
    (the start the histogram fit uses), run to convergence."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(values, np.float64).ravel()
    center, scale = x.mean(), x.std()
    z = np.sort((x - center) / scale)
    n, cumulative, k = z.size, np.cumsum(z), np.arange(1, z.size)
    between = k * (n - k) * (cumulative[:-1] / k - (cumulative[-1] - cumulative[:-1]) / (n - k)) ** 2
    low, high = np.split(z, [int(np.argmax(between)) + 1])
    gmm = GaussianMixture(2, covariance_type="diag", reg_covar=1e-6, tol=1e-12, max_iter=100_000,
                          weights_init=np.array([low.size, high.size]) / n,
                          means_init=np.array([[low.mean()], [high.mean()]]),
                          precisions_init=1.0 / np.array([[low.var() + 1e-6], [high.var() + 1e-6]]),
                          init_params="random_from_data", random_state=0)
    gmm.fit(z[:, None])
    order = np.argsort(gmm.means_[:, 0])
    tau = gaussian_intersection(tuple(center + scale * gmm.means_[order, 0]),
                                tuple(scale * np.sqrt(gmm.covariances_[order, 0])), tuple(gmm.weights_[order]))
    return float(x.mean()) if tau is None else tau


@pytest.mark.parametrize("shape, dtype", [((60, 80), np.float32), ((97, 131), np.float32), ((120, 90), np.float64)])
def test_tau_equals_scikit_learn_fit_on_all_values(shape, dtype):
    maps = [_heatmap_like(seed, shape, dtype) for seed in range(6)]
    for m, fit in zip(maps, gmm_thresholds(maps)):
        assert fit.fallback is None
        assert abs(fit.tau - _sklearn_full_fit_tau(m)) < 1e-4 * float(np.ptp(m))


def test_an_isolated_outlier_is_a_component_of_one_value_as_in_scikit_learns_fit():
    """N(0, 1) values and one at 1000: the outlier's component has one value, variance reg_covar in scikit-learn's
    fit; the histogram fit gave its group Sheppard's in-bin variance, a std 3-4x too wide, which moved tau by 7.6e-3
    of the range here (1.3e-2 on 224x224)."""
    for seed in range(3):
        values = np.random.default_rng(seed).normal(0.0, 1.0, (64, 64))
        values[32, 21] = 1000.0
        assert abs(gmm_threshold(values).tau - _sklearn_full_fit_tau(values)) < 1e-4 * float(np.ptp(values))


@pytest.mark.parametrize("seed", [6, 11])
def test_an_outliers_component_of_weight_2e_5_keeps_its_digits(seed):
    """224x224 N(0, 1) values and one at 1000 (draws where it showed): the M-step took the upper component's sums
    as the totals less the lower one's, which lost digits at its weight 2e-5, so its variance (one value:
    reg_covar's) came out 23 % wide and tau 1.0e-3 (seed 6) and 5.4e-4 (seed 11) of the range from scikit-learn's
    fit on all values."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 1.0, (224, 224))
    values[rng.integers(224), rng.integers(224)] = 1000.0
    fit = gmm_threshold(values)
    assert fit.weights[1] == pytest.approx(1 / values.size, rel=1e-9)
    assert fit.stds[1] == pytest.approx(values.std() * np.sqrt(1e-6), rel=1e-3)  # standardized variance reg_covar
    assert abs(fit.tau - _sklearn_full_fit_tau(values)) < 1e-5 * float(np.ptp(values))


def test_bimodal_histogram_fit_recovers_the_analytic_intersection():
    means, stds, weights = (0.0, 4.0), (1.0, 0.5), (0.7, 0.3)
    rng = np.random.default_rng(5)
    values = np.concatenate([rng.normal(means[0], stds[0], 70_000), rng.normal(means[1], stds[1], 30_000)])
    fit = gmm_threshold(rng.permutation(values).reshape(250, 400))
    assert fit.tau == pytest.approx(_sklearn_full_fit_tau(values), abs=1e-4)
    assert fit.tau == pytest.approx(gaussian_intersection(means, stds, weights), abs=0.03)  # sampling error only


def test_batched_fits_equal_one_map_at_a_time():
    maps = [_heatmap_like(seed, (64, 48)) for seed in range(7)] + [np.full((64, 48), 0.25, np.float32)]
    batched = gmm_thresholds(maps)
    for m, fit in zip(maps, batched):
        single = gmm_threshold(m)
        assert single.fallback == fit.fallback
        # equal up to where each stops: the fixed-point residual tolerance (1e-8, standardized units)
        np.testing.assert_allclose([single.tau, *single.means, *single.stds, *single.weights],
                                   [fit.tau, *fit.means, *fit.stds, *fit.weights], rtol=1e-7, atol=1e-9)
    assert batched[-1].fallback == "constant" and batched[-1].tau == np.float32(0.25)


def _histograms(maps) -> "gmm_module.MapHistograms":
    lo = np.array([float(m.min()) for m in maps])
    hi = np.array([float(m.max()) for m in maps])
    counts = np.stack([gmm_module.fine_histogram(m, a, b) for m, a, b in zip(maps, lo, hi)])
    return gmm_module.MapHistograms(counts, lo, hi)


@pytest.mark.parametrize("offset, reach, scale", [(0.0, 1e-3, 1.0), (145.0, 2.0, 1.0), (1e4, 1e-3, 1.0),
                                                  (0.0, 1e-3, 2.0**-120)])
def test_fine_histogram_counts_every_value_in_its_rounding_bin(offset, reach, scale):
    # A float32 map of range 0.16 far from zero: its float32 products with the bin scale are coarser than a bin.
    # At 145 (900 times the range) they still are float32, of about 1.5e7 with a spacing of 1 (a bin): values move
    # up to about 1.6 bins, and cv2 rounds the maximum to bin FINE_BINS, a spare bin folded into the top one.
    # At 2**-120 (a range of 1.2e-37) the bin scale, 1.3e41, is beyond float32's: all but the minimum were lost.
    m = (_heatmap_like(3, (70, 90)) + np.float32(offset)) * np.float32(scale)
    lo, hi = float(m.min()), float(m.max())
    counts = gmm_module.fine_histogram(m, lo, hi)
    position = (m.astype(np.float64) - lo) * (gmm_module.FINE_BINS - 1) / (hi - lo)
    reference = np.bincount(np.rint(position).astype(np.int64).ravel(), minlength=gmm_module.FINE_BINS)
    assert counts.sum() == m.size
    # float32 arithmetic may move a value across the bin edges within `reach` bins of it, no others: the counts
    # below each edge differ by at most the number of values that near it
    edges = np.arange(gmm_module.FINE_BINS - 1) + 0.5
    ordered = np.sort(position.ravel())
    near_edge = np.searchsorted(ordered, edges + reach) - np.searchsorted(ordered, edges - reach)
    assert np.all(np.abs(np.cumsum(counts) - np.cumsum(reference))[:-1] <= near_edge)


def test_quadrature_reproduces_each_groups_count_and_first_three_moments():
    hists = _histograms([_heatmap_like(4, (50, 60))])
    points, weights, _, center, scale = gmm_module.quadrature_points(hists)
    counts = hists.counts[0].astype(np.float64)
    step = (hists.hi[0] - hists.lo[0]) / (gmm_module.FINE_BINS - 1)
    z = (hists.lo[0] + step * np.arange(gmm_module.FINE_BINS) - center[0]) / scale[0]
    per = gmm_module.FINE_BINS // gmm_module.COARSE_BINS
    sheppard = (step / scale[0]) ** 2 / 12
    for group in range(gmm_module.COARSE_BINS):  # explicit loop over groups
        c, zz = counts[group * per:(group + 1) * per], z[group * per:(group + 1) * per]
        p, w = points[0, 2 * group:2 * group + 2], weights[0, 2 * group:2 * group + 2]
        assert w.sum() == pytest.approx(c.sum() / counts.sum(), abs=1e-15)
        if c.sum() == 0:
            continue
        mean = (c * zz).sum() / c.sum()
        spread = sheppard if c.sum() > 1 else 0.0  # a group of one value has none
        moments = [mean, (c * (zz - mean) ** 2).sum() / c.sum() + spread, (c * (zz - mean) ** 3).sum() / c.sum()]
        rule = [(w * p).sum() / w.sum()]
        rule += [(w * (p - rule[0]) ** 2).sum() / w.sum(), (w * (p - rule[0]) ** 3).sum() / w.sum()]
        np.testing.assert_allclose(rule, moments, rtol=1e-7, atol=1e-13)


def _quadrature(maps):
    points, weights, moments, _, _ = gmm_module.quadrature_points(_histograms(maps))
    return points, weights, gmm_module.initial_params(moments)


def test_em_jacobian_matches_finite_differences():
    points, weights, theta = _quadrature([_heatmap_like(seed, (40, 50)) for seed in range(3)])
    data = gmm_module._Points(points, weights)
    _, jac = gmm_module.em_map(theta, data, jacobian=True)
    eps = 1e-6
    for j in range(5):
        step = np.zeros((5, 1))
        step[j] = eps
        numeric = (gmm_module.em_map(theta + step, data)[0] - gmm_module.em_map(theta - step, data)[0]) / (2 * eps)
        np.testing.assert_allclose(jac[:, :, j], numeric.T, rtol=1e-5, atol=1e-7)


def _plain_em(points, weights, theta, steps):
    """scikit-learn's EM on weighted points (diag covariance, reg_covar 1e-6), written out; theta as in gmm.py.

    points, weights [P] with theta [5], or [Q, P] with theta [5, Q] (Q maps at once)."""
    points, weights = np.atleast_2d(points), np.atleast_2d(weights)
    lw, m1, lv1, m2, lv2 = (np.reshape(t, (-1, 1)) for t in theta)
    for _ in range(steps):
        w1 = 1.0 / (1.0 + np.exp(-lw))
        d1 = w1 * np.exp(-0.5 * (points - m1) ** 2 / np.exp(lv1)) / np.sqrt(np.exp(lv1))
        d2 = (1 - w1) * np.exp(-0.5 * (points - m2) ** 2 / np.exp(lv2)) / np.sqrt(np.exp(lv2))
        r = weights * d1 / (d1 + d2)
        n1 = r.sum(1, keepdims=True)
        m1 = (r * points).sum(1, keepdims=True) / n1
        m2 = ((weights - r) * points).sum(1, keepdims=True) / (1 - n1)
        lv1 = np.log((r * (points - m1) ** 2).sum(1, keepdims=True) / n1 + 1e-6)
        lv2 = np.log(((weights - r) * (points - m2) ** 2).sum(1, keepdims=True) / (1 - n1) + 1e-6)
        lw = np.log(n1 / (1 - n1))
    out = np.concatenate([lw, m1, lv1, m2, lv2], axis=1).T
    return out if np.ndim(theta) == 2 else out[:, 0]


def test_em_then_newton_reaches_plain_ems_fixed_point():
    points, weights, theta = _quadrature([_heatmap_like(seed, (48, 64)) for seed in range(5)])
    fitted, steps, converged = gmm_module.fit_points(points, weights, theta)
    assert converged.all()
    for q in range(points.shape[0]):
        reference = _plain_em(points[q], weights[q], theta[:, q], steps=5000)
        np.testing.assert_allclose(fitted[:, q], reference, atol=1e-8)
    # Stopped short of the fixed point, the fit says so.
    early, steps, converged = gmm_module.fit_points(points, weights, theta, max_steps=3)
    assert (steps <= 3).all() and not converged.any()
    assert (np.abs(early - fitted).max(0) > 1e-6).all()


def test_a_fit_stopped_before_convergence_warns(monkeypatch):
    monkeypatch.setattr(gmm_module, "fit_histograms", functools.partial(gmm_module.fit_histograms, max_steps=3))
    with pytest.warns(RuntimeWarning, match="without converging"):
        gmm_threshold(_heatmap_like(0, (48, 64)))


def _smoothed_noise(seed: int, shape=(48, 64)) -> np.ndarray:
    """A nearly Gaussian, unimodal map: EM from the Otsu start crawls past a saddle (thousands of steps)."""
    return ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.0).astype(np.float32)


def test_squarem_reaches_plain_ems_fixed_point_on_maps_where_em_crawls():
    points, weights, theta = _quadrature([_smoothed_noise(seed) for seed in (0, 4, 5)])
    fitted, steps, converged = gmm_module.fit_points(points, weights, theta)
    assert converged.all()
    for q in range(points.shape[0]):
        reference = _plain_em(points[q], weights[q], theta[:, q], steps=40000)
        assert np.abs(_plain_em(points[q], weights[q], reference, steps=1) - reference).max() < 1e-9  # at rest
        np.testing.assert_allclose(fitted[:, q], reference, atol=1e-6)
    # the accelerated cycles took over: plain EM needs 4,000-11,000 steps on these maps
    assert steps.max() < 3000 and (steps > gmm_module.SQUAREM_AFTER).all()


def test_squarem_stays_in_plain_ems_basin_on_small_maps():
    # Extrapolations used to pass plain EM's fixed point into another basin with a higher likelihood, often a
    # component collapsed onto the minimum: on this map tau became -1.537 instead of plain EM's -1.182.
    rng = np.random.default_rng(12)
    maps = [np.array([[-0.86, 1.95, -0.58, 1.24, -0.37, -1.17, 0.35, -0.19, 0.75, -1.54, 0.44, 0.16]])]
    maps += [m for m in (np.round(rng.standard_normal((1, 12)), 2) for _ in range(300)) if np.ptp(m) > 0]
    points, weights, theta = _quadrature(maps)
    fitted, steps, converged = gmm_module.fit_points(points, weights, theta)
    assert converged.all() and (steps >= gmm_module.SQUAREM_AFTER).sum() >= 5  # some maps are accelerated
    # plain EM on the points that carry weight (12 values: 24 of the 1024), all maps at once
    order = np.argsort(weights == 0, axis=1, kind="stable")[:, :24]
    points, weights = np.take_along_axis(points, order, 1), np.take_along_axis(weights, order, 1)
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-12)
    reference = _plain_em(points, weights, theta, steps=3000)
    at_rest = np.abs(_plain_em(points, weights, reference, steps=1) - reference).max(0) < 1e-10
    assert at_rest[0] and at_rest.mean() > 0.95
    np.testing.assert_allclose(fitted[:, at_rest], reference[:, at_rest], atol=1e-6)


def _mixture_log_likelihood(points, weights, theta):
    """Weighted log-likelihood per map with scipy's normal densities; theta [5, Q] as in gmm.py."""
    lw, m1, lv1, m2, lv2 = (row[:, None] for row in theta)
    w1 = 1.0 / (1.0 + np.exp(-lw))
    density = (w1 * stats.norm.pdf(points, m1, np.exp(0.5 * lv1))
               + (1 - w1) * stats.norm.pdf(points, m2, np.exp(0.5 * lv2)))
    return (weights * np.log(density)).sum(1)


def test_squarem_cycle_never_lowers_the_likelihood():
    points, weights, theta = _quadrature([_smoothed_noise(seed) for seed in range(6)])
    data = gmm_module._Points(points, weights)
    for _ in range(20):
        f, _ = gmm_module.em_map(theta, data)
        after, _, evaluations = gmm_module.squarem_cycle(theta, f, data)
        gain = _mixture_log_likelihood(points, weights, after) - _mixture_log_likelihood(points, weights, theta)
        assert (gain >= -1e-12).all()
        assert (evaluations >= 3).all()
        theta = after


# ---------------------------------------------------------------- boxes and Otsu vs OpenCV, explicit loops


def _reference_box(heatmap, threshold=None, rule="component") -> Box:
    """The box as gScoreCAM / the previous implementation compute it, with OpenCV's own functions."""
    gray = cv2.normalize(heatmap, None, 0, 255, cv2.NORM_MINMAX, cv2.CV_8UC1)
    if threshold is None:
        _, mask = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        _, mask = cv2.threshold(gray, round(threshold * 255), 255, cv2.THRESH_BINARY)
    mask = (mask > 0).astype(np.uint8)
    if rule == "contour":
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            return GSCORECAM_DUMMY_BOX
        rects = [cv2.boundingRect(c) for c in contours]
        x, y, w, h = rects[int(np.argmax([w * h for _, _, w, h in rects]))]
        return Box(x, y, x + w, y + h)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count == 1:
        return Box(0, 0, mask.shape[1], mask.shape[0])
    label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[label, :4])
    return Box(x, y, x + w, y + h)


def _box_test_maps():
    rng = np.random.default_rng(11)
    maps = [_heatmap_like(seed, shape) for seed, shape in enumerate([(31, 47), (64, 64), (101, 77), (240, 320)])]
    maps += [rng.random((33, 45)).astype(np.float32), rng.random((80, 60))]  # many small components
    quantised = np.zeros((40, 50), np.float32)  # equal blobs: ties between components, starting at odd offsets
    quantised[3:8, 5:10] = quantised[11:16, 31:36] = quantised[27:32, 17:22] = 1.0
    maps.append(quantised)
    blobs = np.zeros((60, 60), np.float32)  # more than _FEW_LABELS components; the largest is not label 1
    for k in range(15):
        blobs[4 * k:4 * k + 2, 2:4] = 1.0  # 4 pixels each
    blobs[30:33, 40:45] = 1.0  # 15 pixels
    maps.append(blobs)
    levels = np.zeros((30, 30), np.float32)  # three equally filled levels: Otsu ties
    levels[:, 10:20], levels[:, 20:] = 0.5, 1.0
    maps += [levels, np.full((12, 20), 3.0, np.float32), np.eye(17, dtype=np.float64)]
    # Nearly constant maps: OpenCV's float32 conversion cancels to below -0.5 near the minimum (no abs allowed).
    maps += [np.array([[1.1726227, 1.1726228]], np.float32),
             np.array([[1.0000000175655621, 1.0000000863178922, 1.000000054146122]]),
             (1.0 + 1e-7 * rng.random((20, 30))).astype(np.float32), 5.0 + 1e-9 * rng.random((25, 18))]
    return maps


@pytest.mark.parametrize("threshold", [None, 0.3, 0.5])
@pytest.mark.parametrize("rule", ["component", "contour"])
def test_boxes_equal_opencv_reference(rule, threshold):
    maps = _box_test_maps()
    assert heatmap_boxes(maps, rule, threshold) == [_reference_box(m, threshold, rule) for m in maps]


def test_otsu_threshold_and_uint8_map_are_opencvs():
    rng = np.random.default_rng(12)
    maps = _box_test_maps() + [rng.integers(0, 511, (29, 31)).astype(np.float32) / 2]  # exact .5 roundings
    for a, d, c1, c2 in rng.integers(1, 60, (40, 4)):  # three spikes, symmetric counts: exact Otsu ties
        maps.append(np.array([a] * c1 + [a + d] * c2 + [a + 2 * d] * c1, np.float32)[None])
    for m in maps:
        gray = cv2.normalize(m, None, 0, 255, cv2.NORM_MINMAX, cv2.CV_8UC1)
        np.testing.assert_array_equal(uint8_minmax(m), gray)
        mask, t = foreground(m)
        t_cv, mask_cv = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert t == t_cv
        np.testing.assert_array_equal(mask, mask_cv > 0)


def test_more_components_than_16_bit_labels():
    mask = np.zeros((530, 530), bool)
    mask[::2, ::2] = True  # 70225 isolated pixels
    mask[100:110, 200:230] = True  # the largest
    mask[300, 10:101] = True  # wider than the largest, fewer pixels
    assert largest_component_box(mask) == _reference_box(mask.astype(np.float32))


# ---------------------------------------------------------------- blur vs scipy


@pytest.mark.parametrize("n", [9, 20, 30, 40, 64, 101, 224, 375, 480])
@pytest.mark.parametrize("sigma", [4.8, 5.5, 6.4, 9.6, 12.8, 19.2, 38.4, 76.8])
def test_pyramid_blur_error_bound(n, sigma):
    # exact 1-D operators of the pyramid and of scipy's filter, plus float32 rounding; the 2-D error is
    # (e_y |A_x| + e_x) / 2 of the range
    e, norm = blur_module.error_bound(n, sigma)
    assert blur_module.pyramid_levels(sigma) >= 1
    assert e <= 5.2e-4 and norm <= 1.01


@pytest.mark.parametrize("shape", [(10, 10), (43, 69), (9, 300), (120, 500)])
@pytest.mark.parametrize("sigma", [30.0, 180.0, MAX_SIGMA])
def test_large_sigma_blur_equals_scipy_up_to_the_largest_setting(shape, sigma):
    # an axis shorter than the kernel's reach: the pyramid's fit there is ill-conditioned (float32 noise)
    rng = np.random.default_rng(14)
    image = rng.random(shape).astype(np.float32)
    image[: shape[0] // 2, : shape[1] // 3] = 0.0
    (ey, ay), (ex, _) = blur_module.error_bound(shape[0], sigma), blur_module.error_bound(shape[1], sigma)
    bound = (ey * ay + ex) / 2 + 1e-6  # float32 output
    blur = blur_module.LargeSigmaBlur(shape, sigma)
    blur.interior[...] = image
    frame = np.empty(blur.output_frame, np.float32)
    blur.run(frame, offset=0.25)
    reference = ndimage.gaussian_filter(image.astype(np.float64), sigma, mode="reflect", truncate=4.0)
    assert np.abs(blur.crop(frame) - 0.25 - reference).max() <= bound * float(np.ptp(image))
    soft, fit = soft_map(image, sigma=sigma)
    floored = np.where(image < np.float64(fit.tau), image.min(), image).astype(np.float64)
    reference = ndimage.gaussian_filter(floored, sigma, mode="reflect", truncate=4.0)
    assert np.abs(soft - reference).max() <= bound * float(np.ptp(image))


@pytest.mark.parametrize("shape, sigma", [((480, 640), 12.8), ((375, 500), 10.0), ((37, 101), 38.4), ((9, 300), 6.0)])
def test_pyramid_blur_equals_scipy_within_its_bound(shape, sigma):
    rng = np.random.default_rng(13)
    h, w = shape
    images = [(rng.random(shape) > 0.5).astype(np.float32), np.zeros(shape, np.float32), rng.random(shape)]
    images[1][h // 4:h // 2, w // 3:] = 1.0
    images[1][0, 0] = images[1][-1, -1] = 1.0
    (ey, ay), (ex, _) = blur_module.error_bound(h, sigma), blur_module.error_bound(w, sigma)
    bound = (ey * ay + ex) / 2 + 1e-6  # float32 rounding
    pyramid = blur_module.LargeSigmaBlur(shape, sigma)
    for image in images:
        pyramid.interior[...] = image
        frame = np.empty(pyramid.output_frame, np.float32)
        pyramid.run(frame)
        reference = ndimage.gaussian_filter(image.astype(np.float64), sigma, mode="reflect", truncate=4.0)
        assert np.abs(pyramid.crop(frame) - reference).max() <= bound * float(np.ptp(image))


@pytest.mark.parametrize("shape", [(480, 640), (300, 200)])
def test_soft_maps_are_scipys_blur_of_the_floored_map(shape):
    maps = np.stack([_heatmap_like(seed, shape) for seed in range(3)])
    soft, fits = soft_maps(maps)
    sigma = DEFAULT_SIGMA_FRACTION * max(shape)
    for m, s, fit in zip(maps, soft, fits):
        floored = np.where(m < np.float64(fit.tau), m.min(), m).astype(np.float64)
        reference = ndimage.gaussian_filter(floored, sigma, mode="reflect", truncate=4.0)
        assert np.abs(s - reference).max() <= 5e-4 * float(np.ptp(m))


# tau 0.5 is a float32; float32(0.3) lies above 0.3, float32(0.7) below 0.7
@pytest.mark.parametrize("tau", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_floor_compares_with_tau_exactly(tau, dtype):
    from tclip_jax.postprocess.soft import _SoftMapWriter, _write_floored_offset

    t32 = np.float32(tau) if float(np.float32(tau)) >= tau else np.nextafter(np.float32(tau), np.float32(1))
    edge = [np.nextafter(t32, np.float32(-1)), t32, np.nextafter(t32, np.float32(1)), tau]
    for lo in (-0.7, -0.25, 0.1):  # subtraction exact or rounding
        values = np.array([[lo, *edge, 0.9]] * 3, np.float32).astype(dtype)
        exact = values.astype(np.float64)
        floored = exact < tau
        # the pyramid's input: the offset map, zero where floored
        out = np.empty(values.shape, np.float32)
        _write_floored_offset(values, float(values[0, 0]), tau, out)
        np.testing.assert_array_equal(out == 0, floored)
        np.testing.assert_array_equal(out[~floored], (exact - exact[0, 0]).astype(np.float32)[~floored])
        # the exact blur's input (sigma 0: the floored map itself)
        writer = _SoftMapWriter(1, values.shape, 0.0)
        writer.write(0, values, float(values[0, 0]), tau)
        np.testing.assert_array_equal(writer.result[0], np.where(floored, exact[0, 0], exact).astype(np.float32))


def test_batched_host_step_equals_single_map_functions():
    maps = np.stack([_heatmap_like(seed, (120, 160)) for seed in range(4)] + [np.full((120, 160), 2.0, np.float32)])
    soft, fits, found = soft_maps_and_boxes(maps)
    for m, s, fit, box in zip(maps, soft, fits, found):
        single_soft, single_fit = soft_map(m)
        np.testing.assert_allclose(s, single_soft, rtol=0, atol=1e-6)
        assert fit.tau == pytest.approx(single_fit.tau, rel=1e-7) and fit.fallback == single_fit.fallback
        assert box == heatmap_box(m) == _reference_box(m)
    np.testing.assert_array_equal(soft[-1], np.float32(2.0))


@pytest.mark.parametrize("rule", ["component", "contour"])
def test_the_host_step_fits_and_boxes_within_the_covered_window_alone(rule, tiny_model):
    # What lies outside the part of the image the model saw (a centre crop's fill, here NaN and values above the
    # maps') must not move tau, the minimum, Otsu's threshold or the box: each is the window's own, boxes in the
    # whole map's coordinates, and the soft map is the window's floored map, its minimum outside, blurred whole.
    shape, window = (150, 200), (slice(10, 140), slice(37, 163))
    maps = np.stack([_heatmap_like(seed, shape) for seed in range(3)] + [np.full(shape, 2.0, np.float32)])
    maps[:, :, :37] = np.nan
    maps[:, :, 163:] = 1e3
    maps[:, :10] = -1e3
    soft, fits, found = soft_maps_and_boxes(maps, rule=rule, covered=window)
    sigma = DEFAULT_SIGMA_FRACTION * max(shape)
    for m, s, fit, box in zip(maps, soft, fits, found):
        region = m[window]
        alone = gmm_threshold(region)
        assert fit.tau == pytest.approx(alone.tau, rel=1e-9) and fit.fallback == alone.fallback  # batched: last bits
        x1, y1, x2, y2 = _reference_box(region, None, rule)
        assert box == (x1 + 37, y1 + 10, x2 + 37, y2 + 10)
        floored = np.full(shape, region.min(), np.float64)
        floored[window] = np.where(region < np.float64(fit.tau), region.min(), region)
        reference = ndimage.gaussian_filter(floored, sigma, mode="reflect", truncate=4.0)
        assert np.abs(s - reference).max() <= 5e-4 * max(float(np.ptp(region)), 1e-6)
    assert heatmap_boxes(maps, rule, covered=window) == found
    assert heatmap_box(maps[0], rule=rule, covered=window) == otsu_box(maps[0], rule, window) == found[0]
    # TCLIP's boxes-only host step (the sweep's under a centre crop) passes the window on: it needs no weights
    tclip = TCLIP(LoadedClip(tiny_model[0], None, None, "", ""), TCLIP.Settings(box_rule=rule))
    assert [out.box for out in tclip.postprocess(list(maps), soft_maps=False, covered=window)] == found
    alone_soft, alone_fits = soft_maps(maps, covered=window)
    np.testing.assert_array_equal(alone_soft, soft)
    assert [f.tau for f in alone_fits] == [f.tau for f in fits]
    one_soft, one_fit = soft_map(maps[0], covered=window)
    np.testing.assert_allclose(one_soft, soft[0], rtol=0, atol=1e-6)
    assert one_fit.tau == pytest.approx(fits[0].tau, rel=1e-9)
    # A window of the whole map is no window.
    whole = maps[:3, 10:140, 37:163]
    assert soft_maps_and_boxes(whole, rule=rule, covered=(slice(0, 130), slice(None)))[2] == heatmap_boxes(whole, rule)


@pytest.mark.parametrize("covered", [(slice(5, 5), slice(None)), (slice(0, 10, 2), slice(None)), (slice(0, 3),),
                                     [slice(0, 3), slice(0, 3)], (slice(0, 9), slice(None)),
                                     (slice(-3, None), slice(None)), (slice(0, 240), slice(40, 280))])
def test_a_covered_window_that_is_no_window_is_refused(covered):
    with pytest.raises(ValueError, match="covered"):
        soft_maps_and_boxes(np.zeros((1, 8, 8)), covered=covered)
    with pytest.raises(ValueError, match="covered"):
        heatmap_boxes(np.zeros((1, 8, 8)), covered=covered)


def test_batched_inputs_are_validated():
    with pytest.raises(ValueError, match="one shape"):
        soft_maps([np.zeros((3, 4)), np.zeros((4, 3))])
    with pytest.raises(ValueError, match="NaN"):
        soft_maps_and_boxes(np.array([[[0.0, np.nan], [1.0, 2.0]]]))
    with pytest.raises(ValueError, match="rule"):
        soft_maps_and_boxes(np.zeros((1, 4, 4)), rule="biggest")


def test_batched_host_step_is_thread_safe():
    import concurrent.futures

    images = [np.stack([_heatmap_like(10 * i + k, (150, 200)) for k in range(3)]) for i in range(6)]
    serial = [soft_maps_and_boxes(maps) for maps in images]
    with concurrent.futures.ThreadPoolExecutor(4) as threads:
        concurrent_results = list(threads.map(soft_maps_and_boxes, images))
    for (soft_a, fits_a, boxes_a), (soft_b, fits_b, boxes_b) in zip(serial, concurrent_results):
        np.testing.assert_array_equal(soft_a, soft_b)
        assert fits_a == fits_b and boxes_a == boxes_b
