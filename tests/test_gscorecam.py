"""gScoreCAM against the official code's outputs (../shared/fixtures/gscorecam) and its options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tclip_jax.checkpoints.load import load_clip
from tclip_jax.image import CLIP_MEAN, CLIP_STD
from tclip_jax.methods import METHODS
from tclip_jax.methods.gscorecam import (DEFAULT_TOPK, GScoreCAM, GScoreCAMSettings, channel_masks, gscorecam_heatmap,
                                         gscorecam_map, normalize2d)

from references import assert_close

IMAGES = ("scene_224", "scene_wide_320x240", "noise_224")

pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.fixture(scope="module")
def ref(fixture_npz):
    return fixture_npz("gscorecam/gscorecam_tiny.npz")


@pytest.fixture(scope="module")
def pixels(ref):
    return np.concatenate([ref[f"{name}/pixel_values"].transpose(0, 2, 3, 1) for name in IMAGES])


def scattered(indices, scores, channels=128):
    """Scores placed at their channels of a zero vector (the official `s`), per text: order-free comparison."""
    out = np.zeros((len(indices), channels), np.float32)
    np.put_along_axis(out, np.asarray(indices), np.asarray(scores), axis=1)
    return out


def check_variant(out, ref, variant, *, same_ranking=True):
    """`same_ranking=False`: the reference ranked differently (or broke ties differently); with k = D only the
    order of `indices` / `scores` can differ, so scores are compared channel by channel."""
    for b, name in enumerate(IMAGES):
        key = f"{name}/{variant}"
        if same_ranking:
            assert_close(out.importance[b], ref[f"{key}/importance"], f"{key} importance")
        if same_ranking:
            np.testing.assert_array_equal(out.indices[b], ref[f"{key}/indices"], err_msg=f"{key} indices")
            assert_close(out.scores[b], ref[f"{key}/scores"], f"{key} scores")
        assert_close(scattered(out.indices[b], out.scores[b]), scattered(ref[f"{key}/indices"], ref[f"{key}/scores"]),
                     f"{key} scores by channel")
        assert_close(out.weights[b], ref[f"{key}/weights"], f"{key} weights")
        assert_close(out.cam_raw[b], ref[f"{key}/cam_raw"], f"{key} cam_raw")
        assert_close(out.maps[b], ref[f"{key}/cam_norm"], f"{key} cam_norm")
        size = tuple(ref[f"{name}/heatmap_size_wh"][::-1])
        expected = ref.get(f"{key}/cam_map")
        if expected is None:  # stored for the patch variants only: step 7 applied to the reference cam_norm
            expected = np.asarray(gscorecam_heatmap(ref[f"{key}/cam_norm"], size))
        assert_close(gscorecam_heatmap(out.maps[b], size), expected, f"{key} cam_map")


@pytest.fixture(scope="module")
def all_channels(tiny_model, ref, pixels):
    """The official default k = 300 > D = 128: every channel (the fixture's k = D variants)."""
    with jax.default_matmul_precision("highest"):
        return gscorecam_map(*tiny_model, pixels, ref["token_ids"])


@pytest.fixture(scope="module")
def small_cls(tiny_model, ref, pixels):
    with jax.default_matmul_precision("highest"):
        return gscorecam_map(*tiny_model, pixels, ref["token_ids"], topk=16, ranking="cls")


def test_adapt_preprocessing_matches_reference(ref, fixture_images, fixtures_dir):
    method = GScoreCAM(load_clip(fixtures_dir / "tiny_openai_clip.npz"), GScoreCAMSettings(topk=128))
    for name in IMAGES:
        pixels, geometry = method.prepare(fixture_images[name])
        assert_close(pixels[None], ref[f"{name}/pixel_values"].transpose(0, 2, 3, 1), f"{name} pixels", tol=1e-5)
        assert geometry.original_hw == fixture_images[name].shape[:2] and geometry.input_hw == (224, 224)
        assert geometry.resized_hw == (224, 224) and geometry.crop_offset_yx == (0, 0)
    # resample=bicubic: the same squash with PIL's bicubic filter, which differs from the official bilinear one
    from PIL import Image

    bicubic = GScoreCAM(method.clip, GScoreCAMSettings(topk=128, resample="bicubic"))
    rgb = fixture_images["scene_wide_320x240"]
    squashed = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255
    pixels = bicubic.prepare(rgb)[0]
    assert_close(pixels, (squashed - CLIP_MEAN) / CLIP_STD, "bicubic pixels", tol=1e-5)
    assert np.abs(pixels - method.prepare(rgb)[0]).max() > 0.1


def test_masks_match_reference(ref):
    for name in IMAGES:
        channels = ref[f"{name}/mask_channels"]
        assert_close(channel_masks(jnp.asarray(ref[f"{name}/activations"][channels]), (224, 224)),
                     ref[f"{name}/masks"], f"{name} masks", tol=1e-5)


def test_every_channel_matches_reference(all_channels, ref):
    """k >= D: all_patch and all_cls (equal bit for bit in the reference), the gradients and activations."""
    out = all_channels
    assert DEFAULT_TOPK > 128 and out.indices.shape == (3, 3, 128)
    for b, name in enumerate(IMAGES):
        assert_close(out.activations[b], ref[f"{name}/activations"], f"{name} activations")
        assert_close(out.grad_tokens[b], ref[f"{name}/grad_tokens"], f"{name} gradient")
        assert_close(out.logits[b], ref[f"{name}/logits_per_text"], f"{name} logits")
        assert (np.asarray(out.grad_tokens[b, :, 1:]) == 0).all()  # CLIP reads the class token only
        # All-zero importance: lax.top_k breaks the ties lowest channel first (torch's CPU order differs).
        assert (np.asarray(out.importance[b]) == 0).all()
        np.testing.assert_array_equal(out.indices[b], np.broadcast_to(np.arange(128), (3, 128)))
        # The CLS ranking the all_cls variant uses.
        assert_close(out.grad_tokens[b, :, 0], ref[f"{name}/all_cls/importance"], f"{name} CLS importance")
    assert_close(out.importance[0], ref["scene_224/all_patch/importance"], "patch importance")
    check_variant(out, ref, "all_patch", same_ranking=False)  # torch's tie order on zeros vs lax.top_k's
    check_variant(out, ref, "all_cls", same_ranking=False)


def test_small_patch_with_injected_tie_order_matches_reference(tiny_model, ref, pixels):
    indices = ref["scene_224/small_patch/indices"][0]
    for name in IMAGES:  # the same tie order for every image and text
        assert (ref[f"{name}/small_patch/indices"] == indices).all()
    out = gscorecam_map(*tiny_model, pixels, ref["token_ids"], topk=16, indices=indices)
    check_variant(out, ref, "small_patch")


def test_small_cls_matches_reference(small_cls, ref):
    check_variant(small_cls, ref, "small_cls")


def test_zero_weight_for_unselected_channels(tiny_model, ref, pixels):
    """Explicit reference from the official small_cls scores: softmax over the selected channels only."""
    out = gscorecam_map(*tiny_model, pixels[:1], ref["token_ids"], topk=16, ranking="cls", zero_unselected=True)
    key = "scene_224/small_cls"
    indices, scores = ref[f"{key}/indices"], ref[f"{key}/scores"].astype(np.float64)
    selected = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights = scattered(indices, selected / selected.sum(axis=1, keepdims=True))
    cam_raw = np.einsum("td,dhw->thw", weights, ref["scene_224/activations"])
    cam = np.maximum(cam_raw, 0) - np.maximum(cam_raw, 0).min(axis=(1, 2), keepdims=True)
    assert_close(out.weights[0], weights, "weights")
    assert np.asarray(out.weights[0]).sum(axis=1) == pytest.approx(1, abs=1e-5)
    assert_close(out.cam_raw[0], cam_raw, "cam_raw")
    assert_close(out.maps[0], cam / (cam.max(axis=(1, 2), keepdims=True) + 1e-8), "cam_norm")
    # The official weighting differs: the 112 unselected channels keep exp(0) each.
    assert not np.allclose(weights, ref[f"{key}/weights"], atol=1e-3)


def test_chunking_does_not_change_the_maps(tiny_model, ref, pixels, all_channels, small_cls):
    for chunk_size, topk, ranking, full in ((48, 300, "patch", all_channels), (5, 16, "cls", small_cls)):
        out = gscorecam_map(*tiny_model, pixels[:1], ref["token_ids"], topk=topk, ranking=ranking,
                            chunk_size=chunk_size)
        for field in ("scores", "weights", "maps"):
            assert_close(getattr(out, field)[0], np.asarray(getattr(full, field)[0]), f"chunk {chunk_size} {field}")


def test_method_gives_the_official_map(fixture_images, ref, fixtures_dir):
    """Through the interface: `adapt` squash, every channel (k = 300 > D), one resize to the original size."""
    with pytest.warns(UserWarning, match="every channel is scored"):
        method = METHODS["gscorecam"](load_clip(fixtures_dir / "tiny_openai_clip.npz"))
    name = "scene_wide_320x240"
    result = method.explain(fixture_images[name], list(ref["texts"]))
    for t, prompt in enumerate(result.prompts):
        heatmap = prompt.phrase.heatmap
        assert heatmap.shape == (240, 320)
        assert_close(heatmap, ref[f"{name}/all_patch/cam_map"][t], f"{prompt.prompt} map")


def test_normalize2d_is_the_official_one_and_keeps_an_all_zero_cam_at_zero():
    """`normalize2D`: (x - min) / (max(x - min) + 1e-8). The epsilon keeps a cam the ReLU left all zero (no channel
    weighted above 0) at zero, where dividing by its spread would give NaN."""
    cam = np.stack([np.array([[-1.0, 1.0], [0.0, 3.0]]), np.zeros((2, 2))]).astype(np.float32)
    expected = np.stack([np.array([[0.0, 2.0], [1.0, 4.0]]) / (4 + 1e-8), np.zeros((2, 2))])
    for as_array in (np.asarray, jnp.asarray):  # the host step normalizes numpy arrays, the device step jax ones
        np.testing.assert_allclose(np.asarray(normalize2d(as_array(cam))), expected, rtol=1e-6, atol=0)


def test_bad_options_are_refused(tiny_model, ref, pixels):
    images, texts = pixels[:1], ref["token_ids"][:1]
    with pytest.raises(ValueError, match="topk must be >= 1"):
        gscorecam_map(*tiny_model, images, texts, topk=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        gscorecam_map(*tiny_model, images, texts, chunk_size=0)
    with pytest.raises(ValueError, match="ranking must be one of"):
        gscorecam_map(*tiny_model, images, texts, ranking="gradient")
    with pytest.raises(ValueError, match="indices must lie in"):
        gscorecam_map(*tiny_model, images, texts, indices=np.array([0, 128]))
    with pytest.raises(ValueError, match="distinct"):
        gscorecam_map(*tiny_model, images, texts, indices=np.array([3, 3]))
    with pytest.raises(ValueError, match="topk must be >= 1"):
        GScoreCAMSettings(topk=0)
    with pytest.raises(ValueError, match="ranking"):
        GScoreCAMSettings.from_dict({"ranking": "gradient"})
    with pytest.raises(ValueError, match="unknown option 'k'"):
        GScoreCAMSettings.parse_assignments(["k=3"])
    assert GScoreCAMSettings.parse_assignments(["ranking=cls", "zero_unselected=true"]) == {
        "ranking": "cls", "zero_unselected": True}
