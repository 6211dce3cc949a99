"""Metrics against the official implementations' outputs (../shared/fixtures/metrics and
../shared/fixtures/decomposition) and closed-form cases."""
import json

import numpy as np
import pytest

from tclip_jax.evaluation.metrics import (
    IGNORE_LABEL,
    TORCHRAY_TOLERANCE,
    aggregate_by_class,
    argmax_point,
    average_precision,
    box_hit,
    box_iou,
    box_ious,
    energy_in_mask,
    energy_pointing_game,
    energy_pointing_game_scorecam,
    foreground_mask,
    imagenet_s,
    mask_box,
    normalize_relevance,
    pointing_game,
    pointing_hit,
    segmentation_scores,
    summarize_segmentation,
)
from tclip_jax.postprocess import foreground

NUM_MAPS = 12
# Official outputs computed in float32 are compared with 1e-6 (absolute for fractions in [0, 1],
# relative for ImageNet-S percentages); integers and booleans exactly.
TOL = 1e-6


@pytest.fixture(scope="module")
def ref(fixture_npz):
    return fixture_npz("metrics/metrics_reference.npz")


@pytest.fixture(scope="module")
def ref_json(fixtures_dir):
    return json.loads((fixtures_dir / "metrics" / "metrics_reference.json").read_text())


@pytest.fixture(scope="module")
def seg_ref(fixture_npz):
    return {k: v for k, v in fixture_npz("decomposition/decomposition_tiny.npz").items() if k.startswith("seg_")}


def _gt_boxes(ref, i):
    return ref["gt_boxes"][i, : ref["gt_num"][i]].tolist()


# ---------------------------------------------------------------- gScoreCAM IoU / BoxAcc


@pytest.mark.parametrize("mode", ["otsu", "thr05"])
def test_box_iou_and_hits_match_gscorecam(ref, ref_json, mode):
    hits = []
    for i in range(NUM_MAPS):
        gt = _gt_boxes(ref, i)
        pred = ref[f"gscorecam_box_{mode}"][i]
        expected = ref[f"gscorecam_iou_{mode}"][i]
        np.testing.assert_allclose(box_ious(pred, gt), expected[: len(gt)], rtol=0, atol=TOL)
        assert np.isnan(expected[len(gt) :]).all()
        hit = box_hit(pred, gt)
        assert hit == ref[f"gscorecam_hit_{mode}"][i]
        assert hit == bool(ref[f"gscorecam_recall_{mode}"][i])  # recall@1 stops at the first hit
        hits.append(hit)
    box_acc = aggregate_by_class(hits, ["object"] * NUM_MAPS).micro
    assert box_acc == pytest.approx(ref_json["summary"][f"gscorecam_boxacc_{mode}"], abs=TOL)


def test_box_iou_closed_form():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == pytest.approx(100 / (100 + 1e-6), abs=1e-15)
    # intersection (5, 0, 9, 9): 5 x 10 = 50 counted inclusively; union 100 + 100 - 50
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / (150 + 1e-6), abs=1e-15)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching: x2 <= x1 is no intersection
    assert box_iou((3, 3, 3, 8), (0, 0, 9, 9)) == 0.0  # a zero-width box has area 0


def test_mask_box_is_the_tight_exclusive_end_box_of_an_explicit_loop():
    """x indexes columns and the end is exclusive, as energy_pointing_game reads the box (scoring's energy_pg)."""
    mask = np.zeros((10, 20), bool)
    mask[2:5, 7:15] = True  # wider than tall, off the diagonal: a transposed box or an inclusive end differs
    mask[4, 3] = True
    pixels = [(x, y) for y in range(10) for x in range(20) if mask[y, x]]
    expected = (min(x for x, _ in pixels), min(y for _, y in pixels),
                max(x for x, _ in pixels) + 1, max(y for _, y in pixels) + 1)
    assert mask_box(mask) == expected == (3, 2, 15, 5)
    rectangle = np.zeros_like(mask)
    rectangle[2:5, 3:15] = True
    saliency = np.random.default_rng(0).random(mask.shape)
    assert energy_pointing_game(saliency, mask_box(mask)) == pytest.approx(energy_in_mask(saliency, rectangle),
                                                                           abs=1e-12)


def test_box_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="4 coordinates"):
        box_iou((0, 0, 1), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="empty"):
        box_hit((0, 0, 1, 1), [])


# ---------------------------------------------------------------- pointing game (TorchRay)


@pytest.mark.parametrize("tolerance", [15, 1, 0])
def test_pointing_game_matches_torchray(ref, ref_json, tolerance):
    hits = []
    for i in range(NUM_MAPS):
        heatmap, mask = ref[f"heatmap_{i:02d}"], ref[f"gt_mask_{i:02d}"]
        assert argmax_point(heatmap) == tuple(ref["pg_point_uv"][i])
        hit = pointing_game(heatmap, mask, tolerance)
        assert (1 if hit else -1) == ref[f"pg_hit_tol{tolerance}"][i]
        hits.append(hit)
    accuracy = aggregate_by_class(hits, [0] * NUM_MAPS).micro
    assert accuracy == pytest.approx(ref_json["summary"][f"pointing_game_acc_tol{tolerance}"], abs=TOL)


def test_pointing_tolerance_is_a_strict_distance():
    mask = np.zeros((9, 9), bool)
    mask[4, 6] = True  # 2 px right of the point (u, v) = (4, 4)
    assert not pointing_hit(mask, (4, 4), tolerance=2)
    assert pointing_hit(mask, (4, 4), tolerance=3)
    assert pointing_hit(mask, (6, 4), tolerance=1)
    assert not pointing_hit(mask, (6, 4), tolerance=0)
    # The default is the plain pointing game (tolerance 1): the point's own pixel must be in the mask.
    assert pointing_hit(mask, (6, 4)) and not pointing_hit(mask, (5, 4))
    saliency = np.zeros((9, 9))
    saliency[4, 5] = 1.0  # argmax (u, v) = (5, 4), next to the mask
    assert not pointing_game(saliency, mask) and pointing_game(saliency, mask, tolerance=2)
    assert TORCHRAY_TOLERANCE == 15


def test_argmax_ties_go_to_the_first_pixel_in_row_major_order():
    saliency = np.zeros((4, 5))
    saliency[1, 3] = saliency[2, 0] = saliency[1, 4] = 1.0
    assert argmax_point(saliency) == (3, 1)


def test_pointing_game_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        argmax_point(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="shape"):
        pointing_game(np.zeros((3, 3)), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="tolerance"):
        pointing_hit(np.ones((3, 3), bool), (1, 1), tolerance=-1)
    labels = np.full((3, 3), -1)  # a label map's ignore pixels are not the object
    labels[0, 0] = 1
    with pytest.raises(ValueError, match=r"mask must be boolean or 0/1, got values \[-1  1\]"):
        pointing_hit(labels, (1, 1), tolerance=2)
    assert pointing_hit(labels == 1, (1, 1), tolerance=2) and pointing_hit((labels == 1) * 1, (1, 1), tolerance=2)


# ---------------------------------------------------------------- energy pointing game (Score-CAM)


def test_energy_pointing_game_matches_scorecam(ref, ref_json):
    corrected, original = [], []
    for i in range(NUM_MAPS):
        heatmap, box = ref[f"heatmap_{i:02d}"], ref["gt_boxes"][i, 0]
        corrected.append(energy_pointing_game(heatmap, box))
        original.append(energy_pointing_game_scorecam(heatmap, box))
    np.testing.assert_allclose(corrected, ref["energy_pg_corrected"], rtol=0, atol=TOL)
    np.testing.assert_allclose(original, ref["energy_pg_original"], rtol=0, atol=TOL)
    summary = ref_json["summary"]
    assert np.mean(corrected) == pytest.approx(summary["energy_pg_corrected_mean"], abs=TOL)
    assert np.mean(original) == pytest.approx(summary["energy_pg_original_mean"], abs=TOL)


def test_energy_closed_form():
    saliency = np.full((10, 20), 3.0)  # min-max maps 3 to 0: no energy outside the blob
    saliency[2:4, 5:9] = 5.0
    saliency[2, 5] = 7.0
    # box (x1, y1, x2, y2) = (5, 2, 7, 4) holds rows 2:4, cols 5:7: (1 + 0.5 * 3) of (1 + 0.5 * 7)
    assert energy_pointing_game(saliency, (5, 2, 7, 4)) == pytest.approx(2.5 / 4.5, abs=1e-15)
    assert energy_pointing_game(saliency, (-5, -5, 50, 50)) == pytest.approx(1.0, abs=1e-15)
    mask = np.zeros_like(saliency, bool)
    mask[2:4, 5:7] = True
    assert energy_in_mask(saliency, mask) == pytest.approx(2.5 / 4.5, abs=1e-15)
    with pytest.raises(ValueError, match=r"mask shape \(20, 10\) differs from saliency shape \(10, 20\)"):
        energy_in_mask(saliency, mask.T)  # a transposed mask, not numpy's IndexError


def test_energy_of_a_constant_map_is_the_area_share():
    assert energy_pointing_game(np.full((10, 20), 0.5), (0, 0, 5, 4)) == pytest.approx(20 / 200, abs=1e-15)


def test_scorecam_original_transposes_the_box():
    saliency = np.zeros((6, 8))
    saliency[1, 3] = 1.0  # row 1, column 3
    assert energy_pointing_game(saliency, (3, 1, 4, 2)) == 1.0
    assert energy_pointing_game_scorecam(saliency, (1, 3, 2, 4)) == 1.0
    with pytest.raises(ValueError, match="sums to zero"):
        energy_pointing_game_scorecam(np.zeros((3, 3)), (0, 0, 1, 1))


# ---------------------------------------------------------------- segmentation (Chefer et al. / clip_text_span)


def test_relevance_normalization_matches_reference(seg_ref):
    np.testing.assert_array_equal(normalize_relevance(seg_ref["seg_upsampled"]), seg_ref["seg_normalized"])


def test_segmentation_metrics_match_reference(seg_ref):
    relevance, labels = seg_ref["seg_normalized"], seg_ref["seg_gt_mask"]
    np.testing.assert_array_equal(foreground_mask(relevance), seg_ref["seg_binary_fg"] == 1)

    scores = segmentation_scores(relevance, labels)
    assert scores.pixel_correct == seg_ref["seg_pixel_correct"]
    assert scores.pixel_labeled == seg_ref["seg_pixel_labeled"]
    np.testing.assert_array_equal(scores.area_inter, seg_ref["seg_area_inter"])
    np.testing.assert_array_equal(scores.area_union, seg_ref["seg_area_union"])
    assert scores.ap == pytest.approx(seg_ref["seg_ap"], abs=TOL)
    assert scores.pixel_accuracy == pytest.approx(seg_ref["seg_pixel_accuracy"], abs=TOL)
    np.testing.assert_allclose(scores.iou, seg_ref["seg_iou"], rtol=0, atol=TOL)
    assert scores.miou == pytest.approx(seg_ref["seg_miou"], abs=TOL)

    summary = summarize_segmentation([scores])
    assert summary["pixel_accuracy"] == pytest.approx(seg_ref["seg_pixel_accuracy"], abs=TOL)
    assert summary["miou"] == pytest.approx(seg_ref["seg_miou"], abs=TOL)
    assert summary["map"] == pytest.approx(seg_ref["seg_map"], abs=TOL)


def test_segmentation_threshold_options():
    relevance = np.array([[0.0, 0.2, 0.4], [0.6, 0.8, 1.0]])
    np.testing.assert_array_equal(foreground_mask(relevance), relevance > 0.5)
    # Chefer et al.'s `Res > Res.mean()` is strict: pixels equal to the mean (0.5 here) are background.
    np.testing.assert_array_equal(foreground_mask(np.array([[0.0, 0.5, 1.0, 0.5]])), [[False, False, True, False]])
    np.testing.assert_array_equal(foreground_mask(relevance, 0.7), relevance > 0.7)
    np.testing.assert_array_equal(foreground_mask(relevance, "otsu"), foreground(relevance)[0])
    with pytest.raises(ValueError, match="threshold"):
        foreground_mask(relevance, "median")


def test_segmentation_closed_form_with_ignored_pixels():
    relevance = np.array([[0.9, 0.8, 0.1, 0.0]])
    labels = np.array([[1, 0, 0, -1]])
    scores = segmentation_scores(relevance, labels, threshold=0.5)
    # valid pixels: pred [1, 1, 0], target [1, 0, 0]
    assert (scores.pixel_correct, scores.pixel_labeled) == (2, 3)
    np.testing.assert_array_equal(scores.area_inter, [1, 1])
    np.testing.assert_array_equal(scores.area_union, [2, 2])
    # scores (bg: 1 - relevance): 0.9 fg+ and bg+ (tied), 0.8 fg-, 0.2 bg+, 0.1 fg- and bg-
    # AP = sum over positives' recall steps of precision: 2/3 * 2/2 + 1/3 * 3/4
    assert scores.ap == pytest.approx(11 / 12, abs=1e-12)
    # inverted map: 0.9 fg-, 0.8 bg-, 0.2 fg+, 0.1 bg+  ->  AP = 1/2 * 1/3 + 1/2 * 2/4
    assert average_precision(np.array([[0.2, 0.9]]), np.array([[1, 0]])) == pytest.approx(5 / 12, abs=1e-12)


@pytest.mark.parametrize("threshold", ["mean", "otsu", "gmm"])
def test_a_centre_crops_cut_off_pixels_are_background_of_no_relevance_and_split_no_threshold(threshold):
    """Scoring under `covered` (columns 2-5 of 8 kept): the map is normalized and split there alone; the cut-off
    columns are predicted background with relevance 0, every labeled pixel still counts."""
    from tclip_jax.evaluation.datasets.base import Target
    from tclip_jax.evaluation.options import EvalOptions
    from tclip_jax.evaluation.scoring import score_unit
    from tclip_jax.methods.base import HostMaps
    from tclip_jax.postprocess import Box, gmm_threshold

    rng = np.random.default_rng(3)
    region = np.array([0.1, 0.45, 0.75, 1.1]) + rng.normal(0, 0.02, (6, 4))  # four levels, a column each
    relevance_map = np.full((6, 8), region.min())  # the fill: the map's minimum
    relevance_map[:, 2:6] = region
    mask = np.zeros((6, 8), bool)
    mask[:, 3:7] = True  # half of it cut off
    unit = score_unit(Target(0, mask=mask), relevance_map, HostMaps(relevance_map, None, Box(0, 0, 1, 1)),
                      EvalOptions(threshold=threshold), covered=(slice(0, 6), slice(2, 6)))
    normalized = np.zeros((6, 8))
    normalized[:, 2:6] = (region - region.min()) / (region.max() - region.min())
    inside = normalized[:, 2:6]
    split = {"mean": inside.mean(), "gmm": gmm_threshold(inside).tau}.get(threshold)
    predicted = np.zeros((6, 8), bool)
    predicted[:, 2:6] = foreground(inside)[0] if threshold == "otsu" else inside > split
    np.testing.assert_array_equal(predicted[:, 2:6], np.tile(np.arange(4) >= 2, (6, 1)))  # the bright columns, each way
    assert (unit["pixel_correct"], unit["pixel_labeled"]) == (int((predicted == mask).sum()), 48)
    assert unit["area_inter"] == [int((~predicted & ~mask).sum()), int((predicted & mask).sum())]
    assert unit["area_union"] == [int((~predicted | ~mask).sum()), int((predicted | mask).sum())]
    assert unit["ap"] == pytest.approx(average_precision(normalized, mask.astype(int)), abs=1e-12)
    whole = score_unit(Target(0, mask=mask), relevance_map, HostMaps(relevance_map, None, Box(0, 0, 1, 1)),
                       EvalOptions(threshold=threshold))
    if threshold != "otsu":  # the fill's zeros pull the mean and the fit down a level (Otsu's split stays here)
        assert whole["area_inter"] != unit["area_inter"]


@pytest.mark.parametrize("threshold", ["mean", "gmm"])
def test_a_units_mask_scores_split_the_normalized_map_and_weigh_the_raw_maps_energy(threshold):
    """A map below zero outside its object (a similarity): the thresholds split the normalized map (negatives
    clipped, min-max), fitted on it, not on the raw values; the energy shares weigh the raw map's min-max scaling,
    in which the weak stripe (-0.05, above the background's -0.3) keeps half the object's energy per pixel."""
    relevance_map = np.full((64, 64), -0.3)
    relevance_map[20:40, 20:40] = 0.2 + np.linspace(0, 0.01, 20)  # the object: the only positive values
    relevance_map[45:55, 5:60] = -0.05
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    from tclip_jax.evaluation.datasets.base import Target

    unit = _unit_scores(relevance_map, None, Target(0, mask=mask), threshold=threshold)
    # Normalized, only the object is above 0, so every split between the background and the object finds it.
    assert unit["area_inter"] == unit["area_union"] == [64 * 64 - 400, 400]
    scaled = (relevance_map - relevance_map.min()) / (relevance_map.max() - relevance_map.min())
    assert unit["energy_pg"] == pytest.approx(scaled[20:40, 20:40].sum() / scaled.sum(), rel=1e-12)
    assert unit["energy_pg"] < 0.9  # the stripe's share: clipped negatives would have left 1.0


def _unit_scores(relevance_map, soft, target, **options):
    from tclip_jax.evaluation.options import EvalOptions
    from tclip_jax.evaluation.scoring import score_unit
    from tclip_jax.methods.base import HostMaps
    from tclip_jax.postprocess import Box

    return score_unit(target, relevance_map, HostMaps(soft, None, Box(0, 0, 1, 1)), EvalOptions(**options))


def test_wrong_attribute_pointing_is_the_pointing_game_of_the_map_the_mask_scores_use():
    """`wrong_pg_hit` points with the same map as `pg_hit` (TCLIP: its soft map; a baseline, with no soft map: its
    heatmap) and the same tolerance, against the object the prompt names wrongly."""
    from tclip_jax.evaluation.datasets.base import Target

    heatmap = np.zeros((20, 20), np.float32)
    heatmap[12:18, 12:18] = 0.9
    heatmap[2, 2] = 1.0  # its argmax: a one-pixel spike on the wrong object
    soft = heatmap.copy()
    soft[2, 2] = 0.3  # the soft map's argmax: (12, 12), on the named object
    mask = np.zeros((20, 20), bool)
    mask[12:18, 12:18] = True
    wrong = np.zeros((20, 20), bool)
    wrong[0:5, 0:5] = True
    target = Target(0, mask=mask, wrong_mask=wrong)
    baseline = _unit_scores(heatmap, None, target)
    assert (baseline["pg_hit"], baseline["wrong_pg_hit"]) == (False, True)
    tclip = _unit_scores(heatmap, soft, target)
    assert (tclip["pg_hit"], tclip["wrong_pg_hit"]) == (True, False)
    # Tolerance 3 (distance < 3): a spike two pixels right of the wrong object points at it, one three pixels off not.
    for column, hit in [(6, True), (7, False)]:
        spiked = np.zeros((20, 20), np.float32)
        spiked[2, column] = 1.0
        assert _unit_scores(spiked, None, target, pg_tolerance=3)["wrong_pg_hit"] is hit


def test_pointing_game_of_a_map_without_positive_relevance_points_at_its_maximum():
    """A soft map of negative cosines normalizes to zeros (scored as an empty mask), but the pointing game reads the
    map itself: its argmax still points at the object, whatever the sign."""
    from tclip_jax.evaluation.datasets.base import Target

    soft = np.full((20, 20), -0.5, np.float32)
    soft[12:18, 12:18] = -0.1
    mask = np.zeros((20, 20), bool)
    mask[12:18, 12:18] = True
    unit = _unit_scores(soft, soft, Target(0, mask=mask))
    assert unit["no_positive_relevance"] and unit["pg_hit"]
    assert unit["pixel_correct"] == int((~mask).sum())  # every pixel predicted background


def test_normalization_of_a_map_without_positive_relevance():
    np.testing.assert_array_equal(normalize_relevance(-np.ones((3, 3))), np.zeros((3, 3)))


def _reference_ap(heatmap, labels):
    """clip_text_span's eval_batch + get_ap_scores, step by step in numpy: clip (torch.clip(Res, 0, Res.max()):
    min above max gives max), min-max with its 0/0 NaN, Res_0_AP = 1 - Res and Res_1_AP = Res with NaN set to 0,
    both channels against the one-hot labels, ignored pixels left out."""
    from sklearn.metrics import average_precision_score

    res = np.minimum(np.maximum(heatmap, 0), heatmap.max())
    with np.errstate(invalid="ignore", divide="ignore"):
        res = (res - res.min()) / (res.max() - res.min())
    channels = np.nan_to_num(np.stack([1 - res, res]), nan=0.0)
    one_hot = np.stack([labels == 0, labels == 1])
    keep = np.broadcast_to(labels != IGNORE_LABEL, channels.shape)
    return float(np.nan_to_num(average_precision_score(one_hot[keep], channels[keep])))


@pytest.mark.parametrize("heatmap", [-np.ones((10, 10)), np.full((10, 10), 0.3), np.zeros((10, 10)),
                                     np.random.default_rng(0).standard_normal((10, 10)),
                                     np.pad(np.ones((1, 1)), ((0, 9), (0, 9)))],
                         ids=["all negative", "constant positive", "zeros", "varied", "varied only where ignored"])
def test_ap_matches_the_reference_also_for_a_map_of_no_relevance(heatmap):
    """A constant map (a TCLIP soft map of negative cosines) scores every pixel alike in the reference (its NaN
    map zeroed in both channels): AP 0.5 whatever the mask, where scoring zeros as 1 - r and r gave b^2 + (1-b)/2
    for a background share b. A fifth of the pixels foreground, two ignored. A map that varies only on an ignored
    pixel is not constant there: the reference normalizes the whole map, then leaves ignored pixels out, so the
    labeled pixels score 1 - 0 and 0, not all alike (judged on the labeled pixels alone, AP was 0.5)."""
    labels = np.zeros((10, 10), np.int64)
    labels[2:6, 3:8] = 1
    labels[0, :2] = IGNORE_LABEL
    expected = _reference_ap(heatmap, labels)
    normalized = normalize_relevance(heatmap)
    assert segmentation_scores(normalized, labels).ap == pytest.approx(expected, abs=1e-12)
    assert average_precision(normalized, labels) == pytest.approx(expected, abs=1e-12)
    if heatmap.min() == heatmap.max():  # constant as given, before any normalization: the same
        assert average_precision(heatmap, labels) == pytest.approx(expected, abs=1e-12)


def test_a_unit_whose_every_pixel_is_ignored_is_refused_with_a_value_error():
    """A ValueError is an image's error record in a sweep; scikit-learn's IndexError on no pixels ended the sweep."""
    for score in (segmentation_scores, average_precision):
        with pytest.raises(ValueError, match=r"every pixel's label is -1 \(ignore\): nothing to score"):
            score(np.random.default_rng(0).random((4, 4)), np.full((4, 4), -1))


def test_dataset_scores_sum_counts_before_dividing():
    perfect = segmentation_scores(np.array([[1.0, 0.0]]), np.array([[1, 0]]), threshold=0.5)
    wrong = segmentation_scores(np.array([[1.0, 0.0, 0.0, 0.0]]), np.array([[0, 1, 1, 1]]), threshold=0.5)
    summary = summarize_segmentation([perfect, wrong])
    assert summary["pixel_accuracy"] == pytest.approx(2 / 6)  # not the mean of 1 and 0
    # background: inter 1 + 0, union 1 + 4; foreground: inter 1 + 0, union 1 + 4
    assert summary["miou"] == pytest.approx(1 / 5)
    assert summary["map"] == pytest.approx((perfect.ap + wrong.ap) / 2)
    # mAP is the mean of the images' APs (the reference's `mean([seg_ap])`): 1 (perfect), 1/2 (every positive
    # scored 0, every negative 1) and 11/12 (test_segmentation_closed_form_with_ignored_pixels); the median is 11/12.
    third = segmentation_scores(np.array([[0.9, 0.8, 0.1, 0.0]]), np.array([[1, 0, 0, -1]]), threshold=0.5)
    assert (perfect.ap, wrong.ap, third.ap) == pytest.approx((1.0, 0.5, 11 / 12), abs=1e-12)
    assert summarize_segmentation([perfect, wrong, third])["map"] == pytest.approx((1 + 1 / 2 + 11 / 12) / 3, abs=1e-12)


def test_segmentation_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        segmentation_scores(np.array([[np.nan, 0.0]]), np.array([[1, 0]]))
    with pytest.raises(ValueError, match="labels must be"):
        segmentation_scores(np.zeros((2, 2)), np.full((2, 2), 2))
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(np.zeros((2, 2)), np.zeros((2, 3), int))


# ---------------------------------------------------------------- ImageNet-S evaluator


@pytest.fixture(scope="module")
def inets_maps(ref):
    return [ref[f"inets_gt_{k}"] for k in range(3)], [ref[f"inets_pred_{k}"] for k in range(3)]


def test_imagenet_s_matches_evaluator(ref, ref_json, inets_maps):
    log = imagenet_s.evaluate(*inets_maps, num_classes=3)
    expected = ref_json["imagenet_s"]
    np.testing.assert_allclose(log["IoUs"], ref["inets_per_class_iou"], rtol=TOL, atol=0)
    np.testing.assert_allclose(log["IoUs"], expected["IoUs"], rtol=TOL, atol=0)
    for key in ("Acc", "mIoU", "mBIoU", "S", "MS", "ML", "L", "BS", "BMS", "BML", "BL", "FMeasure"):
        assert log[key] == pytest.approx(expected[key], rel=TOL), key


def test_imagenet_s_ignores_predictions_on_ignored_pixels(inets_maps):
    gts, preds = inets_maps
    changed = [p.astype(np.int64) for p in preds]
    changed[0][gts[0] == imagenet_s.IGNORE_ID] = 2
    base = imagenet_s.image_stats(gts[0], preds[0], 3)
    other = imagenet_s.image_stats(gts[0], changed[0], 3)
    np.testing.assert_array_equal(base.area.intersection, other.area.intersection)
    np.testing.assert_array_equal(base.area.pred, other.area.pred)
    assert base.fmeasure == other.fmeasure


def test_imagenet_s_perfect_prediction():
    gt = np.zeros((40, 40), np.int64)
    gt[5:13, 5:16] = 1  # 88 px of 1600: ceil(5.5) = 6 % -> MS (the evaluator's math.ceil; rounded down it were S)
    gt[20:40, 0:40] = 2  # 800 px: 50 % -> ML
    log = imagenet_s.evaluate([gt], [gt], num_classes=3)
    # class 3 never occurs: its IoU is 0 and still counts in mIoU
    np.testing.assert_allclose(log["IoUs"], [100, 100, 100, 0], atol=1e-6)
    assert log["mIoU"] == pytest.approx(75.0, abs=1e-6)
    assert log["Acc"] == 100.0
    assert log["FMeasure"] == pytest.approx(100.0, abs=1e-9)
    assert log["MS"] == pytest.approx(100.0, abs=1e-6) and log["ML"] == pytest.approx(100.0, abs=1e-6)
    assert np.isnan(log["S"]) and np.isnan(log["L"])


def _official_size_percent(counts):
    """metric.py's IoUDifferentSizeGPU[WithBoundary] on the int64 tensor torch.bincount gives: its own line,
    {class: ceil(100.0 * counts[c] / sum(counts))}, run by torch."""
    import math

    import torch

    counts = torch.from_numpy(np.asarray(counts, np.int64))
    return {c: math.ceil(100.0 * counts[c] / sum(counts)) for c in range(1, len(counts)) if counts[c] > 0}


def test_imagenet_s_size_buckets_use_the_evaluators_float32_percent():
    """A class of exactly half the valid pixels of 1,342,182: the evaluator's float32 percent is 50.0000038 -> 51,
    bucket L (exact arithmetic: 50, ML). The percent is torch's on the evaluator's own expression, for those counts
    and random ones near every whole percent (totals past 2**24 included, where float32 rounds the count)."""
    pytest.importorskip("torch")
    total, half = 1_342_182, 671_091
    assert _official_size_percent([total - half, half]) == {1: 51}
    gt = np.zeros((1159, 1159), np.int64)  # 1,343,281 pixels, 1,099 of them ignored: 1,342,182 valid
    gt.reshape(-1)[:half] = 1
    gt.reshape(-1)[-1099:] = imagenet_s.IGNORE_ID
    stats = imagenet_s.image_stats(gt, gt, num_classes=1)
    assert [int(bucket.gt[1]) for bucket in stats.buckets] == [0, 0, 0, half]  # L
    rng = np.random.default_rng(0)
    for _ in range(1000):
        total = int(rng.integers(100, 1 << 27))
        count = total * int(rng.integers(1, 101)) // 100 + int(rng.integers(-1, 2))
        count = min(max(count, 1), total)
        counts = [total - count, count]
        assert imagenet_s._size_percent(np.array([count]), total).tolist() == [_official_size_percent(counts)[1]], \
            counts


def test_imagenet_s_acc_counts_the_largest_predicted_foreground_class_if_gt_and_prediction_both_have_it():
    """The evaluator: ``img_label = argmax(area_output[1:]) + 1``, a hit iff ``area_target[img_label] > 0`` and
    ``area_output[img_label] > 0``; a prediction of background only is a miss, however much background it gets
    right."""
    gt = np.zeros((20, 20), np.int64)
    gt[5:10, 5:10] = 1
    assert imagenet_s.evaluate([gt], [np.zeros_like(gt)], 2)["Acc"] == 0.0
    pred = np.zeros_like(gt)
    pred[5:7, 5:10] = 1  # 10 px of class 1, the rest background: class 1 is the largest foreground class
    assert imagenet_s.evaluate([gt], [pred], 2)["Acc"] == 100.0
    pred[15:, 15:] = 2  # 25 px of class 2, absent from the GT, outnumber class 1
    assert imagenet_s.evaluate([gt], [pred], 2)["Acc"] == 0.0


def _official_acc(gts, preds, num_classes):
    """evaluator.py's image-level accuracy, pixel by pixel: per image, the histograms ``area_output`` and
    ``area_target`` of ids 0..num_classes over the pixels whose GT is not ignored (``torch.histc``, which counts no id
    outside that range), ``img_label = torch.argmax(area_output[1:]) + 1`` (the first of equal maxima), a hit iff
    ``area_target[img_label] > 0`` and ``area_output[img_label] > 0``; ``ACC / len(loader.dataset)``, in percent:
    every image counts in the denominator."""
    hits = 0
    for gt, pred in zip(gts, preds):
        output, target = [0] * (num_classes + 1), [0] * (num_classes + 1)
        for g, p in zip(gt.reshape(-1).tolist(), pred.reshape(-1).tolist()):
            if g == imagenet_s.IGNORE_ID:
                continue
            target[g] += 1
            if 0 <= p <= num_classes:
                output[p] += 1
        label = 1
        for c in range(2, num_classes + 1):
            if output[c] > output[label]:
                label = c
        hits += target[label] > 0 and output[label] > 0
    return 100 * hits / len(gts)


def test_imagenet_s_acc_counts_every_image_and_takes_the_first_of_tied_predicted_classes():
    """Two cases the evaluator fixture lacks, against the evaluator's Acc loop transcribed (`_official_acc`): images
    whose GT is only background and ignore count in the denominator (the first, with class 1 predicted, and the last,
    predicted all background: argmax of zeros is class 1, absent); a prediction with as many pixels of class 1 as of
    class 2 takes class 1, the first (the second image: class 1 is in its GT, so a hit; the last of the tie were a
    miss). The third image is a plain hit. Acc = 2 hits of 4 images."""
    gts, preds = [], []
    for k in range(4):
        gts.append(np.zeros((12, 12), np.int64))
        preds.append(np.zeros((12, 12), np.int64))
    gts[0][:3] = imagenet_s.IGNORE_ID   # background and ignore only
    preds[0][5:8, 5:8] = 1
    gts[1][2:6, 2:6] = 1                # class 1 in the GT; classes 1 and 2 predicted on 6 pixels each
    preds[1][2:4, 2:5] = 1
    preds[1][8:10, 8:11] = 2
    gts[2][6:, 6:] = 2                  # class 2 in the GT and the largest predicted
    preds[2][7:, 7:] = 2
    preds[2][0, :3] = 3
    gts[3][9:] = imagenet_s.IGNORE_ID   # background and ignore only, predicted all background
    expected = _official_acc(gts, preds, num_classes=3)
    assert expected == 50.0
    assert imagenet_s.evaluate(gts, preds, num_classes=3)["Acc"] == expected


def test_imagenet_s_fmeasure_counts_every_nonzero_predicted_id_as_foreground():
    """FMeasureGPU thresholds ``output > 0``: an id beyond num_classes (left out of the IoU histograms) is still
    predicted foreground."""
    gt = np.zeros((20, 20), np.int64)
    gt[5:10, 5:10] = 1  # 25 px
    pred = gt.copy()
    pred[0, 0] = 7  # a false positive with an id beyond num_classes = 2
    precision, recall, beta = 25 / 26, 1.0, 0.3
    expected = 100 * (1 + beta) * precision * recall / (beta * precision + recall)
    assert imagenet_s.evaluate([gt], [pred], 2)["FMeasure"] == pytest.approx(expected, rel=1e-12)


def test_boundary_band_is_the_inner_ring():
    labels = np.zeros((30, 30), np.int64)
    labels[10:20, 10:20] = 4
    boundary = imagenet_s.boundary_labels(labels, dilation_ratio=0.02)  # round(0.02 * 42.4) = 1 step
    square = np.zeros((30, 30), bool)
    square[10:20, 10:20] = True
    ring = square.copy()
    ring[11:19, 11:19] = False
    np.testing.assert_array_equal(boundary == 5, ring)
    # background: the image border and the ring just outside the square
    outer = np.zeros((30, 30), bool)
    outer[[0, -1], :] = outer[:, [0, -1]] = True
    outer[9:21, 9:21] = True
    outer[10:20, 10:20] = False
    np.testing.assert_array_equal(boundary == 1, outer)


def test_decode_label_png():
    rgb = np.zeros((1, 2, 3), np.uint8)
    rgb[0, 0] = (232, 3, 0)
    rgb[0, 1] = (7, 0, 0)
    np.testing.assert_array_equal(imagenet_s.decode_label_png(rgb), [[1000, 7]])


def test_imagenet_s_rejects_bad_input():
    with pytest.raises(ValueError, match="integer"):
        imagenet_s.image_stats(np.zeros((4, 4)), np.zeros((4, 4)), 3)
    with pytest.raises(ValueError, match="shape"):
        imagenet_s.image_stats(np.zeros((4, 4), int), np.zeros((4, 5), int), 3)


# ---------------------------------------------------------------- aggregation


def test_aggregate_micro_and_per_class_mean():
    result = aggregate_by_class([1, 0, 1, 1, 0], ["cat", "cat", "dog", "cat", "bird"])
    assert result.micro == pytest.approx(3 / 5)
    assert result.per_class == {"cat": (pytest.approx(2 / 3), 3), "dog": (1.0, 1), "bird": (0.0, 1)}
    assert result.macro == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_aggregate_rejects_bad_input():
    with pytest.raises(ValueError, match="class ids"):
        aggregate_by_class([1, 0], ["a"])
    with pytest.raises(ValueError, match="non-empty"):
        aggregate_by_class([], [])
    with pytest.raises(ValueError, match="NaN"):
        aggregate_by_class([np.nan], ["a"])


def test_a_model_with_non_finite_embeddings_gets_no_retrieval_or_held_out_figures(fixtures_dir):
    """argmax over NaN similarities picks the first pair, which scored a broken model 1/n; its held-out sweep
    scored none of its scenes, and a summary over the scenes left looked like a result."""
    import dataclasses

    import jax

    from tclip_jax.checkpoints.load import load_clip
    from tclip_jax.evaluation.retrieval import global_embeddings, retrieval_top1
    from tclip_jax.image import whole_image
    from tclip_jax.methods.tclip import TCLIP, Settings
    from tclip_jax.sweep.heldout import synthetic_report
    from tclip_jax.synthetic import retrieval_scenes

    clip = load_clip(fixtures_dir / "tiny_openai_clip.npz")
    broken = dataclasses.replace(clip, params=jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf * np.nan if "ln_post" in jax.tree_util.keystr(path) else leaf, clip.params))
    scenes = retrieval_scenes(3)
    images, captions = [s.image for s in scenes], [s.caption for s in scenes]
    assert retrieval_top1(clip, images, captions)["pairs"] == 3
    with pytest.raises(ValueError, match="embeddings are not finite for 3 images and 0 captions of 3"):
        retrieval_top1(broken, images, captions)
    # One infinite weight: every image embedding normalizes to zeros and one NaN (inf / inf), the rest finite.
    proj = np.array(clip.params["visual"]["proj"])
    proj[:, 0] = 0
    proj[0, 0] = np.inf
    one_inf = dataclasses.replace(clip, params={**clip.params, "visual": {**clip.params["visual"], "proj": proj}})
    pixels = np.stack([whole_image(image, clip.config.image_size)[0] for image in images])
    ids = clip.tokenizer.encode(captions, clip.config.context_length)
    embeds = np.asarray(global_embeddings(one_inf.model, one_inf.params, pixels, ids)[0])
    assert (np.isfinite(embeds).sum(1) == embeds.shape[1] - 1).all()
    with pytest.raises(ValueError, match="embeddings are not finite for 3 images and 0 captions of 3"):
        retrieval_top1(one_inf, images, captions)
    with pytest.raises(ValueError, match="2 of 2 held-out scenes failed under protocol captions; the first, "):
        synthetic_report(TCLIP(broken, Settings(translations=1)), "captions", 2)


def test_retrieval_counts_the_paired_caption_and_with_true_of_any_true_caption_as_an_explicit_loop(fixtures_dir):
    """Top-1 of each image's own caption, and of any caption `true_of` marks true of it (and the reverse), against
    a loop over one image and one caption at a time."""
    import jax

    from tclip_jax.checkpoints.load import load_clip
    from tclip_jax.evaluation.retrieval import retrieval_top1
    from tclip_jax.image import whole_image
    from tclip_jax.synthetic import retrieval_scenes

    clip = load_clip(fixtures_dir / "tiny_openai_clip.npz")
    scenes = retrieval_scenes(6)
    images, captions = [s.image for s in scenes], [s.caption for s in scenes]
    embed = jax.jit(lambda pixels, ids: clip.model.apply({"params": clip.params}, pixels, ids)[1:])  # one by one
    pixels = [whole_image(image, clip.config.image_size)[0][None] for image in images]
    ids = [clip.tokenizer.encode([caption], clip.config.context_length) for caption in captions]
    image_embeds = [np.asarray(embed(p, ids[0])[0][0]) for p in pixels]
    text_embeds = [np.asarray(embed(pixels[0], i)[1][0]) for i in ids]
    similarity = np.array([[i @ t for t in text_embeds] for i in image_embeds])
    true_of = np.eye(6, dtype=bool)
    true_of[0, similarity[0].argmax()] = True  # image 0's best caption counts as true of it, whichever it is
    true_of[similarity[:, 1].argmax(), 1] = True  # and caption 1's best image
    measured = retrieval_top1(clip, images, captions, true_of)
    expected_pairs = [similarity[i].argmax() == i for i in range(6)], [similarity[:, j].argmax() == j for j in range(6)]
    assert measured["image_to_text_top1"] == pytest.approx(np.mean(expected_pairs[0]))
    assert measured["text_to_image_top1"] == pytest.approx(np.mean(expected_pairs[1]))
    assert measured["image_to_true_text_top1"] == pytest.approx(np.mean([true_of[i, similarity[i].argmax()]
                                                                        for i in range(6)]))
    assert measured["text_to_true_image_top1"] == pytest.approx(np.mean([true_of[similarity[:, j].argmax(), j]
                                                                        for j in range(6)]))
    assert measured["image_to_true_text_top1"] >= measured["image_to_text_top1"]
    assert "image_to_true_text_top1" not in retrieval_top1(clip, images, captions)
    with pytest.raises(ValueError, match="diagonal"):
        retrieval_top1(clip, images, captions, ~np.eye(6, dtype=bool))


def test_retrieval_over_several_chunks_is_the_explicit_loop_over_all_pairs(monkeypatch):
    """More pairs than one device call takes (RETRIEVAL_CHUNK), the last chunk short: every pair is embedded once
    and compared with every other, as a loop over the pairs does. Random unit embeddings stand for the model's."""
    import types

    from tclip_jax.evaluation import retrieval

    pairs, rng = 2 * retrieval.RETRIEVAL_CHUNK + 22, np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    image_table = unit(rng.normal(size=(pairs, 8)))
    text_table = unit(image_table + rng.normal(scale=0.3, size=(pairs, 8)))  # mostly nearest its own image
    # image i is the array [i], caption i the text "i": the embeddings are looked up by index
    monkeypatch.setattr(retrieval, "prepare", lambda image, protocol, config: (image, None))
    monkeypatch.setattr(retrieval, "global_embeddings", lambda model, params, pixels, ids: (
        image_table[pixels[:, 0]], text_table[ids[:, 0]]))
    tokenizer = types.SimpleNamespace(encode=lambda texts, length: np.array([[int(t)] for t in texts]))
    config = types.SimpleNamespace(context_length=1)
    clip = types.SimpleNamespace(config=config, tokenizer=tokenizer, model=None, params=None)
    true_of = np.eye(pairs, dtype=bool) | (rng.random((pairs, pairs)) < 0.05)
    measured = retrieval.retrieval_top1(clip, [np.array([i]) for i in range(pairs)], [str(i) for i in range(pairs)],
                                        true_of)
    similarity = [[float(image_table[i] @ text_table[j]) for j in range(pairs)] for i in range(pairs)]
    best_text = [max(range(pairs), key=lambda j: similarity[i][j]) for i in range(pairs)]
    best_image = [max(range(pairs), key=lambda i: similarity[i][j]) for j in range(pairs)]
    expected = {"pairs": pairs,
                "image_to_text_top1": sum(best_text[i] == i for i in range(pairs)) / pairs,
                "text_to_image_top1": sum(best_image[j] == j for j in range(pairs)) / pairs,
                "image_to_true_text_top1": sum(true_of[i, best_text[i]] for i in range(pairs)) / pairs,
                "text_to_true_image_top1": sum(true_of[best_image[j], j] for j in range(pairs)) / pairs}
    assert measured == pytest.approx(expected)
    assert 0 < expected["image_to_text_top1"] < 1  # neither all nor none right
