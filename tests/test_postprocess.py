"""Soft maps (GMM threshold) and zero-shot boxes.

Boxes are checked against gScoreCAM's own outputs (../shared/fixtures/metrics); the GMM threshold against
the closed-form intersection of two weighted Gaussian densities.
"""
import numpy as np
import pytest
from scipy import ndimage, optimize, stats

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
from tclip_jax.postprocess.soft_map import DEFAULT_SIGMA_FRACTION, MAX_GMM_SAMPLES, gaussian_blur

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


def test_components_are_8_connected():
    mask = np.zeros((20, 20), bool)
    mask[2:5, 2:5] = True
    mask[5:9, 5:9] = True  # touches the first square at one corner only
    assert largest_component_box(mask) == Box(2, 2, 9, 9)


def test_component_tie_goes_to_first_in_row_major_order():
    mask = np.zeros((20, 20), bool)
    mask[10:13, 1:4] = True
    mask[2:5, 12:15] = True  # same size, starts on an earlier row
    assert largest_component_box(mask) == Box(12, 2, 15, 5)


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
    ],
)
def test_intersection_equates_weighted_densities(means, stds, weights):
    expected = optimize.brentq(_weighted_pdf_gap, means[0], means[1], args=(means, stds, weights), xtol=1e-14)
    assert gaussian_intersection(means, stds, weights) == pytest.approx(expected, abs=1e-9)


def test_equal_variances_give_the_linear_solution():
    m1, m2, s, w1, w2 = 1.0, 3.0, 0.8, 0.6, 0.4
    expected = 0.5 * (m1 + m2) + s**2 * np.log(w1 / w2) / (m2 - m1)
    assert gaussian_intersection((m1, m2), (s, s), (w1, w2)) == pytest.approx(expected, abs=1e-12)
    assert gaussian_intersection((m1, m2), (s, s), (0.5, 0.5)) == pytest.approx(2.0, abs=1e-12)


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


def test_subsampled_fit_ignores_pixel_order():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.0, 1.0, 15_000), rng.normal(5.0, 1.0, 7_500)])
    assert values.size > MAX_GMM_SAMPLES
    first = gmm_threshold(values.reshape(150, 150), seed=3)
    second = gmm_threshold(rng.permutation(values).reshape(150, 150), seed=3)
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
                                          ((3, 2), 7.0)])
def test_gaussian_blur_is_scipys_gaussian_filter(shape, sigma):
    # Kernels wider than the map reflect more than once: scipy and OpenCV must agree there too.
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(gaussian_blur(image, sigma),
                               ndimage.gaussian_filter(image.astype(np.float64), sigma, mode="reflect"),
                               atol=2e-6, rtol=0)


def test_soft_map_default_sigma_scales_with_map_size(two_level_map):
    default, _ = soft_map(two_level_map)
    explicit, _ = soft_map(two_level_map, sigma=DEFAULT_SIGMA_FRACTION * 64)
    np.testing.assert_array_equal(default, explicit)


def test_soft_map_rejects_bad_input():
    with pytest.raises(ValueError, match="sigma"):
        soft_map(np.eye(4), sigma=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        soft_map(np.arange(5.0))


def test_gmm_subsample_equals_numpy_quantiles():
    from tclip_jax.postprocess.soft_map import _evenly_spaced_quantiles

    values = np.random.default_rng(3).standard_normal(10_007)
    for dtype in (np.float64, np.float32):  # float32 maps are sorted as float32, the quantiles taken in float64
        typed = values.astype(dtype)
        np.testing.assert_allclose(_evenly_spaced_quantiles(typed, 4096),
                                   np.quantile(typed.astype(np.float64), np.linspace(0.0, 1.0, 4096)),
                                   atol=1e-12, rtol=0)


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
