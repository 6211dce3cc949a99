"""training/image_tower_probe.py: the features it probes are the model's own tokens, and both diagnostics detect a
property the shipped model and a short supervised run are known to have (colour)."""
import pathlib
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "training"))
import image_tower_probe as itp  # noqa: E402
import train_default  # noqa: E402

from tclip_jax.checkpoints.load import load_clip  # noqa: E402
from scipy import stats  # noqa: E402

from tclip_jax.image import clip_normalize, resize_rgb, upsample_bilinear  # noqa: E402
from tclip_jax.methods.tclip import TCLIP  # noqa: E402
from tclip_jax.methods.tclip.relevance import token_embeddings  # noqa: E402
from tclip_jax.methods.tclip.settings import DEFAULT_TRIM  # noqa: E402
from tclip_jax.methods.tclip.translations import translation_offsets  # noqa: E402
from tclip_jax.sweep.heldout import grounding_scores, synthetic_report  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    return load_clip()


def touches(mask: np.ndarray, cell: int, patch: int) -> bool:
    """Whether `mask` (square, a whole number of `patch`-pixel patches) has a pixel in `cell` of its patch grid
    (row-major)."""
    row, column = divmod(cell, mask.shape[1] // patch)
    return bool(mask[patch * row:patch * (row + 1), patch * column:patch * (column + 1)].any())


def test_scenes_hold_one_object_and_labels_name_it():
    images, labels, scenes = itp.one_object_scenes(12, itp.PROBE_SEEDS)
    assert images.shape == (12, 224, 224, 3)
    for i, scene in enumerate(scenes):
        assert len(scene.objects) == 1
        assert itp.LABELS["shape"][labels["shape"][i]] == scene.objects[0].shape
        assert itp.LABELS["colour"][labels["colour"][i]] == scene.objects[0].colour


def test_centre_patch_is_the_token_under_the_mask_centroid(shipped):
    patch = shipped.config.patch_size  # the scenes are drawn at the model's input size (224 px)
    side = shipped.config.image_size // patch
    images, _, scenes = itp.one_object_scenes(3, itp.PROBE_SEEDS)
    features = itp.tower_features(shipped.model, shipped.params, images, scenes, chunk=2)
    for i, scene in enumerate(scenes):
        out = shipped.model.apply({"params": shipped.params}, clip_normalize(images[i:i + 1]), method="encode_image")
        ys, xs = np.nonzero(scene.objects[0].mask)
        cell = (int(ys.mean() / patch), int(xs.mean() / patch))
        centre = np.asarray(out.tokens[0, 1 + cell[0] * side + cell[1]])
        np.testing.assert_allclose(features["centre_patch"][i], centre, atol=1e-5)
        np.testing.assert_allclose(features["class_embedding"][i], np.asarray(out.embeds[0]), atol=1e-5)
        # The far patch: of the cells without an object pixel, the first farthest from the centre cell.
        mask = scene.objects[0].mask
        far = max((k for k in range(side * side) if not touches(mask, k, patch)),
                  key=lambda k: ((k // side - cell[0]) ** 2 + (k % side - cell[1]) ** 2, -k))
        np.testing.assert_allclose(features["far_patch"][i], np.asarray(out.tokens[0, 1 + far]), atol=1e-5)


def test_probe_finds_colour_in_the_shipped_tower(shipped):
    """The shipped model grounds colour words (pointing 0.97): its patch tokens must carry the colour."""
    accuracy = itp.probe(shipped.model, shipped.params, train_count=240, test_count=120)
    assert set(accuracy) == {f"{label}/{feature}" for label in itp.LABELS
                             for feature in ("class_embedding", "mean_patch", "centre_patch", "far_patch")}
    assert accuracy["colour/centre_patch"] >= 0.9


def test_supervised_training_teaches_a_small_tower_colour_beside_shape():
    config = train_default.TrainConfig(image_size=64, patch_size=16, vision_layers=1, embed_dim=32)
    records = list(itp.supervised(config, ("colour", "shape"), steps=120, batch_size=32, test_count=120, every=60))
    assert [r["step"] for r in records] == [60, 120]
    assert set(records[-1]["heldout_accuracy"]) == {"colour", "shape"}
    assert records[-1]["heldout_accuracy"]["colour"] >= 3 / len(itp.LABELS["colour"])  # three times chance
    assert jax.numpy.isfinite(records[-1]["loss"])


def test_supervised_heads_start_at_zero_or_random():
    config = train_default.TrainConfig(image_size=64, patch_size=16, vision_layers=1, embed_dim=32)
    first = {random: next(itp.supervised(config, ("colour", "shape"), steps=1, batch_size=8, test_count=8,
                                         random_heads=random))["loss"] for random in (False, True)}
    # The first step's loss is taken before any update: zero heads give uniform predictions, ln 6 + ln 7.
    np.testing.assert_allclose(first[False], np.log(6) + np.log(7), rtol=1e-6)
    assert abs(first[True] - first[False]) > 0.01


def test_scene_style_narrows_object_sizes_and_rejects_several_objects():
    def extents(style):
        _, _, scenes = itp.one_object_scenes(8, itp.PROBE_SEEDS, style=style)
        return [max(np.ptp(np.nonzero(s.objects[0].mask)[0]), np.ptp(np.nonzero(s.objects[0].mask)[1])) + 1
                for s in scenes]

    assert min(extents(itp.EASY_OBJECTS)) >= 60
    assert max(extents(itp.dataclasses.replace(itp.ONE_OBJECT, size_range=(24.0, 30.0)))) <= 40
    with pytest.raises(ValueError, match="counts"):
        itp.one_object_scenes(2, 0, style=itp.PLAIN_STYLE)


def test_probe_feeds_the_tower_its_own_input_size(monkeypatch):
    sizes, draw = [], itp.one_object_scenes
    monkeypatch.setattr(itp, "one_object_scenes",
                        lambda count, start, size=224, style=itp.ONE_OBJECT: sizes.append(size) or draw(count, start,
                                                                                                       size, style))
    config = train_default.model_config(train_default.TrainConfig(image_size=64, patch_size=16, vision_layers=1,
                                                                  embed_dim=32))
    accuracy = itp.probe(itp.CLIP(config), itp.init_params(config, 0), train_count=24, test_count=12)
    assert sizes == [64, 64] and all(0 <= value <= 1 for value in accuracy.values())


def test_position_share_is_the_variance_of_the_per_position_means(shipped):
    count = 6
    shares = itp.position_shares(shipped.model, shipped.params, count)
    layers = shipped.config.vision_layers
    assert list(shares) == ["input", *[f"block_{i}" for i in range(1, layers + 1)], "output"]
    scenes = [itp.make_scene(itp.HELDOUT_SEED_START + i, None, itp.TRAINING_STYLE) for i in range(count)]
    images = np.stack([resize_rgb(scene.image, (224, 224)) for scene in scenes])
    out = itp.encode_images(shipped.model, shipped.params, images, intermediates=True)
    for stage, tokens in (("input", out.residual_stream[0]), (f"block_{layers}", out.residual_stream[layers]),
                          ("output", out.tokens)):
        tokens = np.asarray(tokens[:, 1:], np.float64)
        cells = tokens.shape[1]
        units = [[tokens[i, p] / np.linalg.norm(tokens[i, p]) for p in range(cells)] for i in range(count)]
        overall = sum(sum(row) for row in units) / (count * cells)
        total = sum(float(((u - overall) ** 2).sum()) for row in units for u in row) / (count * cells)
        between = sum(float(((sum(units[i][p] for i in range(count)) / count - overall) ** 2).sum())
                      for p in range(cells)) / cells
        assert shares[stage] == pytest.approx(between / total, rel=1e-9) and 0 < shares[stage] < 1, stage


def word_vector(clip, prefix: str, word: str) -> np.ndarray:
    """Mean unit embedding of `word`'s pieces at the end of the prompt `prefix word`."""
    tokenizer = clip.tokenizer
    text = f"{prefix} {word}".strip()
    ids = tokenizer.encode([text])
    start = 1 + int((tokenizer.encode([prefix])[0] > 0).sum()) - 2  # after SOT and the prefix's pieces
    end = int(np.nonzero(ids[0] == tokenizer.eot_id)[0][0])
    return np.asarray(token_embeddings(clip.model, clip.params, ids))[0, start:end].mean(0)


def test_word_accuracy_asks_the_probe_question_of_the_text_tower(shipped):
    """An explicit loop: each scene's centre patch against the unit embeddings of every word's pieces (averaged)."""
    count = 12
    accuracy = itp.word_accuracy(shipped, count=count)
    images, labels, scenes = itp.one_object_scenes(count, itp.PROBE_SEEDS + itp.PROBE_FIT_SCENES)
    patches = itp.tower_features(shipped.model, shipped.params, images, scenes)["centre_patch"]
    shapes, colours = itp.LABELS["shape"], itp.LABELS["colour"]
    expected = {"shape": [], "colour": [], "shape_in_caption": []}
    for patch, shape, colour in zip(patches, labels["shape"], labels["colour"]):
        expected["shape"].append(np.argmax([patch @ word_vector(shipped, "", w) for w in shapes]) == shape)
        expected["colour"].append(np.argmax([patch @ word_vector(shipped, "", w) for w in colours]) == colour)
        expected["shape_in_caption"].append(
            np.argmax([patch @ word_vector(shipped, f"a {colours[colour]}", w) for w in shapes]) == shape)
    assert accuracy == pytest.approx({name: np.mean(hits) for name, hits in expected.items()}, abs=1e-9)


def test_word_locality_compares_the_own_words_s_at_the_object_with_the_background(shipped):
    """An explicit loop over each scene's patches and its mask's pixels."""
    patch = shipped.config.patch_size
    side = shipped.config.image_size // patch
    count = 12
    locality = itp.word_locality(shipped, count=count)
    images, labels, scenes = itp.one_object_scenes(count, itp.PROBE_SEEDS + itp.PROBE_FIT_SCENES)
    expected = {}
    for label, words in itp.LABELS.items():
        vectors = [word_vector(shipped, "", w) for w in words]
        at_object, background, peaks = [], [], []
        for image, own, scene in zip(images, labels[label], scenes):
            out = shipped.model.apply({"params": shipped.params}, clip_normalize(image[None]), method="encode_image")
            tokens = np.asarray(out.tokens[0, 1:])
            similarity = tokens @ vectors[own] / np.linalg.norm(tokens, axis=1)
            mask = scene.objects[0].mask
            touched = [touches(mask, k, patch) for k in range(side * side)]
            ys, xs = np.nonzero(mask)
            at_object.append(similarity[int(ys.mean() / patch) * side + int(xs.mean() / patch)])
            background.extend(s for s, t in zip(similarity, touched) if not t)
            peaks.append(touched[int(np.argmax(similarity))])
        expected.update({f"{label}_at_object": np.mean(at_object), f"{label}_background": np.mean(background),
                         f"{label}_peak_on_object": np.mean(peaks)})
    assert locality == pytest.approx(expected, abs=1e-5)
    assert locality["colour_peak_on_object"] > 0.5  # the shipped model's colour words find their object


def test_caption_words_in_caption_pointing_is_the_gate_scorers(shipped):
    """Inside captions, `caption_words` must score what the captions gate scores: the sweep's own report over the
    same held-out scenes is the reference."""
    count = 4
    words = itp.caption_words(shipped, count)
    gate = grounding_scores(synthetic_report(TCLIP(shipped), "captions", count))
    for kind in ("colour", "shape"):
        assert words[kind]["units"] == gate[kind]["units"]
        np.testing.assert_allclose(words[kind]["in_caption"], gate[kind]["pointing_game"], atol=1e-12)
        by_objects = np.array(list(words[kind]["by_objects"].values()))
        assert by_objects[:, 2].sum() == words[kind]["units"]
        np.testing.assert_allclose(by_objects[:, :2].T @ by_objects[:, 2] / words[kind]["units"],
                                   [words[kind]["in_caption"], words[kind]["alone"]], atol=1e-12)
        assert 0 <= words[kind]["own_alone_nearest"] <= 1 and -1 <= words[kind]["cosine_to_alone"] <= 1
    assert all(-1 <= value <= 1 for value in words["map_correlation"].values())


@pytest.mark.parametrize("scorer", itp.STAND_INS)
def test_stand_in_map_is_the_trimmed_mean_of_the_shifted_back_patch_scores(scorer):
    """Reference: each copy built, scored and shifted back with explicit loops, and scipy's trimmed mean over the
    copies that reach each pixel."""
    patch, size = 16, 64
    mask = np.zeros((size, size), bool)
    mask[13:38, 21:30] = True  # not aligned to the patch grid
    offsets = translation_offsets(patch)
    expected_copies = []
    for dy, dx in offsets:
        copy = np.zeros_like(mask)  # copy[y, x] = mask[y - dy, x - dx], zero outside
        for y in range(size):
            for x in range(size):
                if 0 <= y - dy < size and 0 <= x - dx < size:
                    copy[y, x] = mask[y - dy, x - dx]
        grid = np.zeros((size // patch, size // patch))
        for row in range(size // patch):
            for column in range(size // patch):
                share = copy[patch * row:patch * (row + 1), patch * column:patch * (column + 1)].mean()
                grid[row, column] = share if scorer == "coverage" else float(share > 0)
        upsampled = np.asarray(upsample_bilinear(grid, (size, size)))
        back = np.full((size, size), np.nan)  # read at (y + dy, x + dx): the copy's pixel showing (y, x)
        for y in range(size):
            for x in range(size):
                if 0 <= y + dy < size and 0 <= x + dx < size:
                    back[y, x] = upsampled[y + dy, x + dx]
        expected_copies.append(back)
    stacked = np.stack(expected_copies)
    expected = np.array([[stats.trim_mean(stacked[~np.isnan(stacked[:, y, x]), y, x], DEFAULT_TRIM)
                          for x in range(size)] for y in range(size)])
    got = itp.stand_in_map(mask, scorer, patch, offsets, DEFAULT_TRIM)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="scorer"):
        itp.stand_in_map(mask, "oracle", patch, offsets, DEFAULT_TRIM)


def test_box_sizes_model_accuracy_is_the_gate_scorers(shipped):
    """The model's BoxAcc in `box_sizes` must be the gate's: the sweep's own report over the same scenes."""
    count = 2
    sizes = itp.box_sizes(shipped, count)
    for protocol in itp.BOX_PROTOCOLS:
        gate = grounding_scores(synthetic_report(TCLIP(shipped), protocol, count))["all"]
        result = sizes[protocol]
        assert result["all"]["units"] == gate["units"]
        np.testing.assert_allclose(result["all"]["model"], gate["box_accuracy"], atol=1e-12)
        by_side = list(result["by_side"].values())
        assert sum(part["units"] for part in by_side) == gate["units"]
        assert list(result["misses"]) == list(itp.MISS_KINDS)
        assert sum(result["misses"].values()) == round(gate["units"] * (1 - gate["box_accuracy"]))
        for name in ("model", *itp.STAND_INS):
            np.testing.assert_allclose(sum(part[name] * part["units"] for part in by_side) / gate["units"],
                                       result["all"][name], atol=1e-12)
    # The shipped model grounds bare words: its S is higher on patches its object fills than on untouched ones.
    assert sizes["bare_words"]["share_profile"]["0"] < sizes["bare_words"]["share_profile"]["0.75-1"]


def test_a_missed_box_lies_around_its_object_or_elsewhere():
    referents = [(10, 10, 20, 20), (100, 100, 140, 120)]  # centres (15, 15) and (120, 110), end exclusive
    assert itp.miss_kind((0, 0, 60, 60), referents, True) == "around"  # too large, around the first
    assert itp.miss_kind((115, 105, 121, 111), referents, False) == "around"  # too small, on the second's centre
    assert itp.miss_kind((16, 16, 90, 90), referents, True) == "elsewhere, peak on its object"
    assert itp.miss_kind((0, 0, 15, 15), referents, False) == "elsewhere, peak elsewhere"  # the centre is excluded


def test_share_profile_bins_rescaled_scores_by_the_covered_share():
    patch = 16
    mask = np.zeros((32, 48), bool)  # a 2 x 3 patch grid, row-major cells 0..5
    mask[:16, :16] = True            # cell 0: all of it
    mask[:8, 16:24] = True           # cell 1: 64 of 256 pixels, 0.25 (the bin closed above)
    mask[16:28, 40:48] = True        # cell 5: 96 of 256 pixels, 0.375
    others = np.zeros_like(mask)
    others[20, 20] = True            # cell 4 holds another object: left out
    scores = np.array([5.0, 3.0, 1.0, 2.0, 9.0, 4.0])
    floor = np.median([1.0, 2.0])    # untouched and free: cells 2 and 3
    scale = 9.0 - floor              # the highest score is cell 4's
    profile = itp.share_profile(scores, mask, others, patch)
    assert profile == pytest.approx({"0": ((1.0 - floor) + (2.0 - floor)) / 2 / scale, "0-0.25": (3.0 - floor) / scale,
                                     "0.25-0.5": (4.0 - floor) / scale, "0.75-1": (5.0 - floor) / scale})


def test_a_missing_checkpoint_folder_is_one_line_before_any_probe(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["image_tower_probe.py", "position", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as raised:
        itp.main()
    assert raised.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"image_tower_probe.py: error: checkpoint folder "
                                                            f"{tmp_path / 'none'} not found"]


@pytest.mark.parametrize("arguments, message", [
    (["position", "{tmp}"], "{tmp} is not a CLIP checkpoint folder"),  # it exists, but holds no checkpoint
    (["supervised", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["supervised", "--learning-rate", "-1"], "--learning-rate must be finite and > 0, got -1"),
    (["supervised", "--learning-rate", "inf"], "--learning-rate must be finite and > 0, got inf"),
    (["supervised", "--object-sizes", "inf", "inf"], "--object-sizes needs finite 0 < MIN <= MAX, got inf inf"),
    (["supervised", "--object-sizes", "20", "nan"], "--object-sizes needs finite 0 < MIN <= MAX, got 20 nan"),
])
def test_bad_arguments_are_one_line_before_any_probe(tmp_path, monkeypatch, capsys, arguments, message):
    monkeypatch.setattr(sys, "argv", ["image_tower_probe.py", *(a.format(tmp=tmp_path) for a in arguments)])
    with pytest.raises(SystemExit) as raised:
        itp.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert raised.value.code == 2 and len(err) == 1  # one line, not under argparse's usage block
    assert err[-1].startswith("image_tower_probe.py: error: ") and message.format(tmp=tmp_path) in err[-1]


def test_supervised_set_overrides_accumulate_as_in_the_training_script(monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(itp, "supervised", lambda config, *args, **kwargs: trained.append(config) or iter(()))
    monkeypatch.setattr(sys, "argv", ["image_tower_probe.py", "supervised", "--steps", "1",
                                      "--set", "vision_layers=1", "--set", "stem_channels=8,16", "patch_size=8"])
    itp.main()
    [config] = trained  # every --set's fields, not only the last --set's
    assert (config.vision_layers, config.stem_channels, config.patch_size) == (1, (8, 16), 8)
