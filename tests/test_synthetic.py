"""Synthetic scenes: determinism, mask/pixel agreement, geometry, captions and word targets."""
from collections import Counter

import numpy as np
import pytest

from tclip_jax.synthetic import (
    BACKGROUNDS,
    COLOUR_JITTER,
    COLOURS,
    DEFAULT_SIZE,
    HELDOUT_SEED_START,
    MAX_OBJECTS,
    MIN_SIZE,
    OBJECT_MARGIN,
    RELATIONS,
    SHAPES,
    TRAIN_SEED_START,
    evaluation_units,
    heldout_seeds,
    make_batch,
    make_scene,
    mask_box,
    relations_between,
    train_seeds,
)

SIZES = [DEFAULT_SIZE, (160, 288), (300, 128), MIN_SIZE]
N_SCENES = 120

# What each relation phrase claims about the boxes of "a <phrase> b", written out independently.
RELATION_HOLDS = {
    "to the left of": lambda a, b: a[2] <= b[0],
    "to the right of": lambda a, b: b[2] <= a[0],
    "above": lambda a, b: a[3] <= b[1],
    "below": lambda a, b: b[3] <= a[1],
}


@pytest.fixture(scope="module", params=SIZES, ids=str)
def scenes(request):
    return [make_scene(seed, request.param) for seed in range(N_SCENES)]


def _chroma(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(int)
    return pixels.max(axis=-1) - pixels.min(axis=-1)


def _scale(scene) -> float:
    return min(scene.image.shape[:2]) / DEFAULT_SIZE


def test_same_seed_gives_same_scene():
    for seed in (0, 7, HELDOUT_SEED_START + 3):
        a, b = make_scene(seed), make_scene(seed)
        np.testing.assert_array_equal(a.image, b.image)
        assert a.caption == b.caption and a.background == b.background
        assert [(o.colour, o.shape, o.rgb, o.box) for o in a.objects] == [(o.colour, o.shape, o.rgb, o.box) for o in b.objects]
        for oa, ob in zip(a.objects, b.objects):
            np.testing.assert_array_equal(oa.mask, ob.mask)


def test_different_seeds_give_different_scenes():
    scenes = [make_scene(seed) for seed in range(50)]
    assert len({s.image.tobytes() for s in scenes}) == 50
    assert len({s.caption for s in scenes}) >= 40


def test_image_and_masks_have_requested_geometry(scenes):
    for scene in scenes:
        h, w = scene.image.shape[:2]
        assert scene.image.dtype == np.uint8 and scene.image.shape == (h, w, 3)
        assert 1 <= len(scene.objects) <= MAX_OBJECTS
        for obj in scene.objects:
            assert obj.mask.dtype == bool and obj.mask.shape == (h, w)
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_non_square_scenes_use_their_full_width():
    h, w = 128, 320
    right_edges = [obj.box[2] for seed in range(60) for obj in make_scene(seed, (h, w)).objects]
    assert max(right_edges) > 2 * h


def test_mask_pixels_have_the_objects_colour(scenes):
    palette = np.array(list(COLOURS.values()))
    for scene in scenes:
        for obj in scene.objects:
            assert obj.mask.any()
            assert (scene.image[obj.mask] == obj.rgb).all()
            distances = np.abs(palette - np.array(obj.rgb)).max(axis=1)  # L-inf
            assert list(COLOURS)[int(distances.argmin())] == obj.colour
            assert distances.min() <= COLOUR_JITTER


def test_no_object_colour_outside_object_masks(scenes):
    for scene in scenes:
        union = np.logical_or.reduce([obj.mask for obj in scene.objects])
        outside = scene.image[~union]
        object_chroma = min(_chroma(np.array(obj.rgb)) for obj in scene.objects)
        assert _chroma(outside).max() < object_chroma / 2
        for obj in scene.objects:
            assert np.abs(outside.astype(int) - np.array(obj.rgb)).max(axis=1).min() > 40


def test_boxes_are_tight_around_masks(scenes):
    for scene in scenes:
        for obj in scene.objects:
            ys, xs = np.nonzero(obj.mask)
            assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert mask_box(obj.mask) == obj.box


def test_objects_are_disjoint_with_a_margin(scenes):
    for scene in scenes:
        margin = OBJECT_MARGIN * _scale(scene)
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                assert not (a.mask & b.mask).any()
                A, B = a.box, b.box
                assert max(B[0] - A[2], A[0] - B[2], B[1] - A[3], A[1] - B[3]) >= margin


def test_colours_and_shapes_are_unique_within_a_scene(scenes):
    for scene in scenes:
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        assert len({o.shape for o in scene.objects}) == len(scene.objects)


def _object_named(scene, shape: str):
    (obj,) = [o for o in scene.objects if o.shape == shape]
    return obj


def test_relation_words_are_true(scenes):
    for scene in scenes:
        words = scene.caption.split()
        for phrase, holds in RELATION_HOLDS.items():
            n = len(phrase.split())
            for i in range(1, len(words) - n):
                if words[i:i + n] == phrase.split():
                    # "... <colour> <shape> <phrase> a/an <colour> <shape> ..."
                    subject = _object_named(scene, words[i - 1])
                    reference = _object_named(scene, words[i + n + 2])
                    assert holds(subject.box, reference.box), scene.caption


def test_every_colour_and_shape_word_has_its_objects_target(scenes):
    for scene in scenes:
        words = scene.caption.split()
        colour_words = [i for i, w in enumerate(words) if w in COLOURS]
        shape_words = [i for i, w in enumerate(words) if w in SHAPES]
        # Every object is named once and no word is ambiguous.
        assert len(colour_words) == len(shape_words) == len(scene.objects)
        assert len({words[i] for i in colour_words}) == len(colour_words)
        assert len({words[i] for i in shape_words}) == len(shape_words)
        assert set(scene.word_targets) == set(colour_words) | set(shape_words)
        for index, target in scene.word_targets.items():
            assert target.word_index == index and target.word == words[index]
            obj = scene.objects[target.object_index]
            named = obj.colour if target.kind == "colour" else obj.shape
            assert target.kind in ("colour", "shape") and named == target.word
            np.testing.assert_array_equal(target.mask, obj.mask)
            assert target.box == obj.box


def test_evaluation_units_cover_every_colour_and_shape_word():
    for seed in range(30):
        scene = make_scene(seed)
        units = evaluation_units(scene)
        words = scene.caption.split()
        assert len(units) == 2 * len(scene.objects)
        assert [u.word_index for u in units] == sorted(scene.word_targets)
        for unit in units:
            assert unit.prompt == scene.caption and unit.word == words[unit.word_index]
            assert unit.image is scene.image
            target = scene.word_targets[unit.word_index]
            assert unit.kind == target.kind == ("colour" if unit.word in COLOURS else "shape")
            np.testing.assert_array_equal(unit.gt_mask, target.mask)
            assert unit.gt_box == target.box == mask_box(unit.gt_mask)


def test_scenes_cover_all_colours_shapes_backgrounds_counts_and_relations():
    scenes = [make_scene(seed) for seed in range(500)]
    objects = [o for s in scenes for o in s.objects]
    colours, shapes = Counter(o.colour for o in objects), Counter(o.shape for o in objects)
    assert set(colours) == set(COLOURS) and set(shapes) == set(SHAPES)
    # Roughly uniform: no colour or shape is rare.
    assert min(colours.values()) > 0.5 * len(objects) / len(COLOURS)
    assert min(shapes.values()) > 0.5 * len(objects) / len(SHAPES)
    assert set(Counter(s.background for s in scenes)) == set(BACKGROUNDS)
    assert set(Counter(len(s.objects) for s in scenes)) == set(range(1, MAX_OBJECTS + 1))
    assert all(any(f" {phrase} " in s.caption for s in scenes) for phrase in RELATIONS)
    assert len(COLOURS) >= 5 and len(SHAPES) >= 4


def test_object_sizes_vary_within_the_visible_range():
    extents = [max(o.box[2] - o.box[0], o.box[3] - o.box[1]) for seed in range(300) for o in make_scene(seed).objects]
    # At patch 32 on 224 every object spans at least one patch; sizes spread over roughly 40-100 px.
    assert min(extents) >= 32 and max(extents) <= 130
    assert min(extents) < 50 and max(extents) > 90


def test_relations_between_is_the_side_of_the_boxes():
    a, b = (0, 0, 10, 10), (20, 0, 30, 10)
    assert relations_between(a, b) == ["to the left of"]
    assert relations_between(b, a) == ["to the right of"]
    assert relations_between((0, 0, 10, 10), (20, 20, 30, 30)) == ["to the left of", "above"]
    assert relations_between((20, 20, 30, 30), (0, 0, 10, 10)) == ["to the right of", "below"]
    assert relations_between((0, 0, 10, 10), (5, 5, 15, 15)) == []


def test_make_batch_stacks_the_scenes_of_its_seeds():
    seeds = [3, 1, HELDOUT_SEED_START]
    images, captions = make_batch(seeds, size=(96, 128))
    assert images.shape == (3, 96, 128, 3) and images.dtype == np.uint8
    for image, caption, seed in zip(images, captions, seeds):
        scene = make_scene(seed, (96, 128))
        np.testing.assert_array_equal(image, scene.image)
        assert caption == scene.caption


def test_train_and_heldout_seeds_are_disjoint():
    train, held = train_seeds(1000), heldout_seeds(1000)
    assert train[0] == TRAIN_SEED_START and held[0] == HELDOUT_SEED_START
    assert not set(train) & set(held)
    assert train_seeds(10, offset=HELDOUT_SEED_START - TRAIN_SEED_START - 10).stop == HELDOUT_SEED_START
    with pytest.raises(ValueError):
        train_seeds(11, offset=HELDOUT_SEED_START - TRAIN_SEED_START - 10)


@pytest.mark.parametrize(
    "call",
    [
        lambda: make_scene(-1),
        lambda: make_scene(1.5),
        lambda: make_scene(True),
        lambda: make_scene(0, size=MIN_SIZE - 1),
        lambda: make_scene(0, size=(224, MIN_SIZE - 1)),
        lambda: make_scene(0, size=(224, 224, 3)),
        lambda: make_scene(0, size=(224.0, 224)),
        lambda: make_scene(0, size=None),
        lambda: make_batch([]),
        lambda: make_batch([0, -5]),
        lambda: train_seeds(-1),
        lambda: heldout_seeds(5, offset=-1),
        lambda: mask_box(np.zeros((8, 8), bool)),
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
