"""The seed papers' metrics (score contrast, grid-searched and fixed-threshold mIoU) against explicit loops on
hand-made maps, and in a sweep's report with --metrics seed."""
import numpy as np
import pytest

from tclip_jax.evaluation.metrics.seed import GRID, seed_unit_scores, summarize_seed


def explicit_unit(relevance, mask, ignore):
    low, high = max(relevance.min(), 0), relevance.max()
    return explicit_counts([[(max(v, 0) - low) / (high - low) for v in row] for row in relevance], mask, ignore)


def explicit_counts(norm, mask, ignore):
    """Score contrast and grid intersections / unions of a normalized map (rows of values), pixel by pixel."""
    cells = [(norm[i][j], bool(mask[i, j])) for i in range(mask.shape[0]) for j in range(mask.shape[1])
             if ignore is None or not ignore[i, j]]
    fg = [v for v, m in cells if m]
    bg = [v for v, m in cells if not m]
    inter = [sum(1 for v, m in cells if m and v > t) for t in GRID]
    union = [sum(1 for v, m in cells if m or v > t) for t in GRID]
    return sum(fg) / len(fg) - sum(bg) / len(bg), inter, union


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_scores_equal_explicit_loops(seed):
    rng = np.random.default_rng(seed)
    relevance = rng.normal(size=(7, 9))
    mask = rng.random((7, 9)) < 0.3
    ignore = (rng.random((7, 9)) < 0.1) if seed else None
    got = seed_unit_scores(relevance, mask, ignore)
    contrast, inter, union = explicit_unit(relevance, mask, ignore)
    assert got["score_contrast"] == pytest.approx(contrast, abs=1e-12)
    assert got["grid_inter"] == inter and got["grid_union"] == union


def test_a_units_seed_scores_leave_its_ignore_pixels_out():
    """score_unit with metrics="seed": a second blob on the ignore region counts neither as background relevance
    nor as predicted foreground."""
    from tclip_jax.evaluation.datasets.base import Target
    from tclip_jax.evaluation.options import EvalOptions
    from tclip_jax.evaluation.scoring import score_unit
    from tclip_jax.methods.base import HostMaps
    from tclip_jax.postprocess import Box

    relevance = np.random.default_rng(0).random((20, 20)) * 0.1
    relevance[5:10, 5:10] = 1.0
    relevance[12:16, 12:16] = 0.8
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    ignore = np.zeros((20, 20), bool)
    ignore[11:17, 11:17] = True
    unit = score_unit(Target(0, mask=mask, ignore=ignore), relevance, HostMaps(None, None, Box(0, 0, 1, 1)),
                      EvalOptions(metrics="seed"))["seed"]
    contrast, inter, union = explicit_unit(relevance, mask, ignore)
    assert unit["score_contrast"] == pytest.approx(contrast, abs=1e-12)
    assert unit["grid_inter"] == inter and unit["grid_union"] == union
    assert (inter[50], union[50]) == (25, 25)


@pytest.mark.parametrize("fill", ["min", "zero", "above", "noise"])
@pytest.mark.parametrize("sign", ["positive", "negative"])
def test_a_centre_cropped_units_seed_scores_and_no_positive_flag_are_the_seen_parts_alone(sign, fill):
    """Under a centre crop (`covered`: rows 1-4, columns 2-6 of 6 x 9) a unit's seed scores normalize the map
    within what the model saw, the cut-off pixels are background of relevance 0 and every labeled pixel counts; a
    map is marked no_positive_relevance when nothing it saw is positive. Whatever the cut-off pixels of the soft map
    hold (the map's minimum, as `original_maps` fills them, zero, values above the seen part, noise), the scores
    are the explicit loop's on the seen part. Scoring the whole raw map, or flagging on its whole maximum, agrees
    with it under the minimum fill (the one the sweep uses), so only the other fills tell them apart."""
    from tclip_jax.evaluation.datasets.base import Target
    from tclip_jax.evaluation.options import EvalOptions
    from tclip_jax.evaluation.scoring import score_unit
    from tclip_jax.methods.base import HostMaps
    from tclip_jax.postprocess import Box

    rng = np.random.default_rng(7)
    mask = rng.random((6, 9)) < 0.4
    mask[2:4, 5:8] = True  # partly cut off
    ignore = rng.random((6, 9)) < 0.1
    ignore &= ~mask
    seen = rng.random((4, 5)) + 0.1
    seen = seen + 2 * mask[1:5, 2:7] if sign == "positive" else -seen  # negative: a soft map of negative cosines
    soft = {"min": np.full((6, 9), seen.min()), "zero": np.zeros((6, 9)), "above": np.full((6, 9), seen.max() + 1),
            "noise": 3 * rng.normal(size=(6, 9))}[fill]
    soft[1:5, 2:7] = seen
    unit = score_unit(Target(0, mask=mask, ignore=ignore), np.zeros((6, 9)), HostMaps(soft, None, Box(0, 0, 1, 1)),
                      EvalOptions(metrics="seed"), covered=(slice(1, 5), slice(2, 7)))
    clipped = [[max(float(v), 0.0) for v in row] for row in seen]
    low, high = min(map(min, clipped)), max(map(max, clipped))
    norm = [[0.0] * 9 for _ in range(6)]
    for i in range(4):
        for j in range(5):
            norm[1 + i][2 + j] = (clipped[i][j] - low) / (high - low) if high > low else 0.0
    contrast, inter, union = explicit_counts(norm, mask, ignore)
    assert unit["seed"]["score_contrast"] == pytest.approx(contrast, abs=1e-12)
    assert unit["seed"]["grid_inter"] == inter and unit["seed"]["grid_union"] == union
    assert unit.get("no_positive_relevance", False) == (high == 0.0) == (sign == "negative")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grid_thresholds_split_a_map_as_foreground_mask_does_at_every_precision(dtype):
    """Pixels on the grid points themselves: float32(0.05) is above the float64 0.05, and `foreground_mask` (as
    the float32 reference code) compares in the map's precision."""
    from tclip_jax.evaluation.metrics import foreground_mask, normalize_relevance

    relevance = np.concatenate([GRID, [1.0]]).astype(dtype).reshape(1, -1)  # already in [0, 1]
    mask = np.random.default_rng(0).random(relevance.shape) < 0.5
    got = seed_unit_scores(relevance, mask)
    for k, t in enumerate(GRID):
        foreground = foreground_mask(normalize_relevance(relevance), float(t))
        assert got["grid_inter"][k] == np.sum(foreground & mask)
        assert got["grid_union"][k] == np.sum(foreground | mask)


def test_an_opposite_map_has_negative_contrast():
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    assert seed_unit_scores(np.where(mask, 0.0, 1.0), mask)["score_contrast"] == -1.0
    assert seed_unit_scores(np.where(mask, 1.0, 0.0), mask)["score_contrast"] == 1.0


def test_dataset_scores_equal_explicit_loops():
    rng = np.random.default_rng(3)
    images = []
    for _ in range(5):
        units = []
        for category in rng.choice(["cat", "dog", "bus"], size=int(rng.integers(1, 3)), replace=False):
            units.append((str(category), seed_unit_scores(rng.normal(size=(6, 6)), rng.random((6, 6)) < 0.4)))
        images.append(units)
    got = summarize_seed(images, fixed=0.3)
    contrast, searched, fixed = {}, {}, {}
    for units in images:
        best_t, best = 0, -1.0
        for t in range(len(GRID)):
            mean = sum(u["grid_inter"][t] / u["grid_union"][t] if u["grid_union"][t] else 0.0
                       for _, u in units) / len(units)
            if mean > best:
                best_t, best = t, mean
        for category, u in units:
            contrast.setdefault(category, []).append(u["score_contrast"])
            i, n = searched.get(category, (0, 0))
            searched[category] = (i + u["grid_inter"][best_t], n + u["grid_union"][best_t])
            i, n = fixed.get(category, (0, 0))
            fixed[category] = (i + u["grid_inter"][30], n + u["grid_union"][30])
    assert got["categories"] == len(contrast)
    assert got["msc"] == pytest.approx(np.mean([np.mean(v) for v in contrast.values()]), abs=1e-12)
    assert got["miou_grid"] == pytest.approx(np.mean([i / n for i, n in searched.values()]), abs=1e-12)
    assert got["miou_fixed"] == pytest.approx(np.mean([i / n for i, n in fixed.values()]), abs=1e-12)
    with pytest.raises(ValueError, match="grid point"):
        summarize_seed(images, fixed=0.555)


def test_an_image_whose_best_thresholds_tie_takes_the_lowest():
    """The module's rule, "ties to the lowest". Image 1's mask is two pixels (relevance 1.0 and 0.2) beside two
    background pixels at 0.5: IoU 2/4 for t < 0.2, 1/4 up to 0.5, 1/2 from 0.5, a tie that the lowest threshold
    (t = 0) settles at 2/4; image 2's mask is its map, 4/4 at any t. The category's mIoU is (2 + 4) / (4 + 4); the
    highest of the tied thresholds would give (1 + 4) / (2 + 4)."""
    first, first_mask = np.zeros((4, 4)), np.zeros((4, 4), bool)
    first_mask[0, :2] = True
    first[0, :2], first[1, :2] = (1.0, 0.2), 0.5
    second = np.zeros((4, 4))
    second[2:, 2:] = 1.0
    units = [[("cat", seed_unit_scores(first, first_mask))], [("cat", seed_unit_scores(second, second > 0))]]
    assert summarize_seed(units)["miou_grid"] == pytest.approx(6 / 8, abs=1e-12)


def test_the_fixed_threshold_is_0_5_unless_given():
    # normalized [0, 0.45, 0.9, 1] on mask [0, 0, 1, 1]: `> 0.5` is the mask (IoU 1), `> 0.4` adds a pixel (2/3)
    unit = seed_unit_scores(np.array([[0.0, 0.45, 0.9, 1.0]]), np.array([[False, False, True, True]]))
    summary = summarize_seed([[("cat", unit)]])
    assert summary["fixed_threshold"] == 0.5 and summary["miou_fixed"] == 1.0
    assert summarize_seed([[("cat", unit)]], fixed=0.4)["miou_fixed"] == pytest.approx(2 / 3, abs=1e-12)


def test_sweep_with_seed_metrics_reports_them(fixtures_dir, tmp_path):
    from tclip_jax.cli import main
    import json

    out = tmp_path / "out"
    assert main(["sweep", "synthetic", "--protocol", "bare_words", "--model", str(fixtures_dir / "tiny_openai_clip.npz"),
                 "--limit", "2", "--translations", "1", "--metrics", "seed", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    records = [json.loads(line) for line in (out / "results-p0.jsonl").read_text().splitlines()]
    images = [[(u["class"], u["seed"]) for u in r["units"]] for r in records]
    assert report["seed"] == summarize_seed(images)
    assert "mIoU, grid-searched threshold" in (out / "report.md").read_text()
