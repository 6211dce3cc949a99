"""Synthetic-scene evaluation: scores of constructed maps, aggregation, and agreement with TCLIP.explain."""
import numpy as np
import pytest

from tclip_jax.methods import METHODS
from tclip_jax.methods.base import postprocess_maps
from tclip_jax.evaluation.synthetic import (
    METRICS,
    VOCABULARY,
    evaluate,
    mask_iou,
    score_heatmap,
    similarity_scores,
    summarize,
    tclip_scores,
)
from tclip_jax.checkpoints.load import load_clip
from tclip_jax.methods.tclip import TCLIP, Settings
from tclip_jax.synthetic import evaluation_units, heldout_seeds, make_scene


@pytest.fixture(scope="module")
def two_object_scene():
    """The first held-out scene with at least two objects, so that one word's map can sit on another object."""
    return next(scene for scene in map(make_scene, heldout_seeds(50)) if len(scene.objects) >= 2)


@pytest.fixture(scope="module")
def clip():
    return load_clip()


def test_a_map_equal_to_the_mask_scores_one_everywhere(two_object_scene):
    for unit in evaluation_units(two_object_scene):
        scores = score_heatmap(unit.gt_mask.astype(np.float32), unit)
        assert scores == {"pointing": 1.0, "energy": 1.0, "box_acc": 1.0, "mask_iou": 1.0}


def test_a_map_on_another_object_scores_zero(two_object_scene):
    units = evaluation_units(two_object_scene)
    for unit in units:
        other = next(u for u in units if not np.array_equal(u.gt_mask, unit.gt_mask))
        scores = score_heatmap(other.gt_mask.astype(np.float32), unit)
        assert scores == {"pointing": 0.0, "energy": 0.0, "box_acc": 0.0, "mask_iou": 0.0}


def test_a_smooth_peak_inside_the_object_points_at_it_and_elsewhere_misses(two_object_scene):
    unit = evaluation_units(two_object_scene)[0]
    rows, cols = np.nonzero(unit.gt_mask)
    outside_rows, outside_cols = np.nonzero(~unit.gt_mask)
    yy, xx = np.mgrid[:unit.gt_mask.shape[0], :unit.gt_mask.shape[1]]

    def bump(r, c):
        return np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * 10.0**2)).astype(np.float32)

    inside = score_heatmap(bump(rows[len(rows) // 2], cols[len(cols) // 2]), unit)
    outside = score_heatmap(bump(outside_rows[0], outside_cols[0]), unit)
    assert inside["pointing"] == 1.0 and outside["pointing"] == 0.0
    assert inside["energy"] > outside["energy"]


def test_mask_iou_counts_pixels():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True   # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, ~a) == 0.0


def test_summarise_means_per_kind_and_over_all_units():
    scores = [dict.fromkeys(METRICS, v) for v in (1.0, 0.0, 1.0)]
    summary = summarize(scores, ["colour", "colour", "shape"])
    for metric in METRICS:
        assert summary["colour"][metric] == 0.5
        assert summary["shape"][metric] == 1.0
        assert summary["overall"][metric] == pytest.approx(2 / 3)


def test_tclip_scores_match_scoring_the_maps_of_tclip_explain(clip):
    scenes = [make_scene(seed) for seed in heldout_seeds(3, offset=500)]
    explainer = TCLIP(clip, Settings(translations=1))
    for scene, scores in zip(scenes, tclip_scores(explainer, scenes)):
        words = explainer.explain(scene.image, scene.caption).prompts[0].word_maps
        expected = [score_heatmap(words[unit.word_index].heatmap, unit, explainer.settings)
                    for unit in evaluation_units(scene)]
        assert [words[u.word_index].text for u in evaluation_units(scene)] == [u.word for u in evaluation_units(scene)]
        assert scores == [pytest.approx(e, abs=1e-6) for e in expected]


def test_similarity_scores_use_the_map_of_the_word_itself(clip):
    """Each unit is scored with its own word's map: the scores of a one-word vocabulary call agree."""
    scene = make_scene(heldout_seeds(1, offset=600)[0])
    (scores,) = similarity_scores(clip, "similarity", [scene])
    from tclip_jax.methods.similarity import similarity_map

    baseline = METHODS["similarity"](clip)
    pixels, _ = baseline.prepare(scene.image)
    for unit, unit_scores in zip(evaluation_units(scene), scores):
        assert unit.word in VOCABULARY
        output = similarity_map(clip.model, clip.params, pixels[None], clip.tokenizer.encode([unit.word]))
        heatmap = np.asarray(postprocess_maps(output.maps, scene.image.shape[:2], baseline.heatmap))[0, 0]
        assert unit_scores == pytest.approx(score_heatmap(heatmap, unit), abs=1e-6)


def test_evaluate_counts_units_per_kind_and_rejects_unknown_methods(clip):
    seeds = heldout_seeds(2, offset=700)
    result = evaluate(clip, seeds, ["rclip"])
    kinds = [u.kind for seed in seeds for u in evaluation_units(make_scene(seed))]
    assert result["units"] == {"colour": kinds.count("colour"), "shape": kinds.count("shape")}
    assert set(result["methods"]["rclip"]) == {"colour", "shape", "overall"}
    with pytest.raises(ValueError, match="unknown methods"):
        evaluate(clip, seeds, ["gradcam"])
