"""Baseline relevance maps against the official implementations' outputs (../shared/fixtures) and invariants."""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tclip_jax import methods
from tclip_jax.checkpoints.load import LoadedClip
from tclip_jax.methods import METHODS
from tclip_jax.methods.attention import raw_attention_map, rollout_map
from tclip_jax.methods.base import MapPostprocess, postprocess_maps
from tclip_jax.methods.clip_surgery import clip_surgery_map
from tclip_jax.methods.common import text_features
from tclip_jax.methods.decomposition import decomposition_map
from tclip_jax.methods.grad_eclip import grad_cam_map, grad_eclip_map
from tclip_jax.methods.hilacam import hilacam_map
from tclip_jax.methods.similarity import maskclip_map, rclip_map, similarity_map
from tclip_jax.methods import common
from tclip_jax.methods.grad_eclip import last_block_gradients
from tclip_jax.model import CLIP, PRESETS, init_params, l2_normalize
from tclip_jax.model.tokenizer import default_tokenizer
from tclip_jax.image import prepare, upsample_bilinear
from tclip_jax.methods.common import minmax

from references import assert_close

IMAGE_NAMES = ("scene_224", "scene_wide_320x240", "noise_224")

encode_image = jax.jit(common.encode_image, static_argnums=0)


pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.fixture(scope="module")
def surgery_ref(fixture_npz):
    return fixture_npz("clip_surgery/clip_surgery_tiny.npz")


@pytest.fixture(scope="module")
def hilacam_ref(fixture_npz):
    return fixture_npz("hilacam/hilacam_tiny.npz")


@pytest.fixture(scope="module")
def grad_eclip_ref(fixture_npz):
    return fixture_npz("grad_eclip/grad_eclip_tiny.npz")


def nhwc(pixel_values):
    return np.ascontiguousarray(pixel_values.transpose(0, 2, 3, 1))


def assert_maps_close(maps, ref, key, spec):
    """Grid maps [B, T, gh, gw] post-processed at each image's size vs the references [1, H, W, T]."""
    for b, name in enumerate(IMAGE_NAMES):
        reference = ref[f"{key}/{name}"][0].transpose(2, 0, 1)
        assert_close(postprocess_maps(maps[b], reference.shape[1:], spec), reference, f"{key}/{name}")


# ---------------------------------------------------------------- similarity, RCLIP, MaskCLIP, CLIP Surgery

def test_similarity_map_matches_clip_surgery_plain_reference(tiny_model, surgery_ref):
    model, params = tiny_model
    out = similarity_map(model, params, nhwc(surgery_ref["pixel_values"]), surgery_ref["tokens/labels_single"])
    assert_close(out.text_features, surgery_ref["plain/text_features_single"], "text features")
    assert_close(out.similarity, surgery_ref["plain/similarity_single"], "token similarity")
    assert_maps_close(out.maps, surgery_ref, "plain/map_single", METHODS["similarity"].heatmap)


def test_rclip_reverses_the_normalized_similarity_map(tiny_model, surgery_ref):
    model, params = tiny_model
    out = rclip_map(model, params, nhwc(surgery_ref["pixel_values"]), surgery_ref["tokens/labels_single"])
    patches = surgery_ref["plain/similarity_single"][:, 1:].transpose(0, 2, 1).reshape(3, 5, 7, 7)
    low, high = patches.min(axis=(2, 3), keepdims=True), patches.max(axis=(2, 3), keepdims=True)
    assert_close(out.maps, 1 - (patches - low) / (high - low), "rclip maps")


def test_clip_surgery_matches_reference(tiny_model, surgery_ref):
    model, params = tiny_model
    images = nhwc(surgery_ref["pixel_values"])
    spec = METHODS["clip_surgery"].heatmap
    out = clip_surgery_map(model, params, images, surgery_ref["tokens/labels_ensemble"])
    assert_close(out.image_features, surgery_ref["cs/image_features"], "surgery image features")
    assert_close(out.text_features, surgery_ref["cs/text_features_ensemble"], "ensemble text features")
    assert_close(out.image_features @ out.text_features.T, surgery_ref["cs/similarity_no_feature_surgery"],
                 "architecture surgery only")
    assert_close(out.similarity, surgery_ref["cs/similarity"], "feature surgery over the label set")
    assert_maps_close(out.maps, surgery_ref, "cs/map", spec)


@pytest.mark.parametrize("name, labels, key", [("clip_surgery", "labels", "cs/map"),
                                               ("clip_surgery", None, "cs_redundant/red_circle_ensemble/map"),
                                               ("similarity", "labels", "plain/map_single")])
def test_maps_at_the_original_size_are_the_official_ones_through_the_method(fixtures_dir, fixture_images, surgery_ref,
                                                                            name, labels, key):
    """Through the path explain and sweeps take (prepare, maps, original_maps), not postprocess_maps alone: the
    official get_similarity_map upsamples the grid once, straight to the image's (H, W); upsampling to the model
    input first and resampling that to the image was 1.6e-2 off on the 320x240 image. CLIP Surgery's lone prompt
    (no label set) is the demo's single text, minus the empty prompt's ensemble."""
    from tclip_jax.checkpoints.load import load_clip

    method = METHODS[name](load_clip(fixtures_dir / "tiny_openai_clip.npz"))
    prompts = [str(label) for label in surgery_ref[labels]] if labels else ["a red circle"]
    encoded = method.encode_prompts(prompts)
    for image_name in IMAGE_NAMES:
        pixels, geometry = method.prepare(fixture_images[image_name])
        out = method.jitted_maps(method.params, pixels[None], encoded.queries,
                                 np.arange(len(encoded.queries), dtype=np.int32)[None])
        ours = np.asarray(method.original_maps(out.maps[0], geometry))[encoded.rows[-len(prompts):]]
        assert_close(ours, surgery_ref[f"{key}/{image_name}"][0].transpose(2, 0, 1), f"{key}/{image_name}")


def test_clip_surgery_single_text_with_empty_string_redundancy_matches_reference(tiny_model, surgery_ref):
    """The demo's single-text case: raw prompt minus the empty-string prompt ensemble."""
    model, params = tiny_model
    images = nhwc(surgery_ref["pixel_values"])
    out = clip_surgery_map(model, params, images, surgery_ref["tokens/red_circle_single"],
                           surgery_ref["tokens/empty_ensemble"])
    key = "cs_redundant/red_circle_raw"
    assert_close(out.redundant_features, surgery_ref["cs_redundant/redundant_features"], "empty-string ensemble")
    assert_close(out.text_features, surgery_ref[f"{key}/text_features"], "raw single prompt")
    assert_close(out.similarity, surgery_ref[f"{key}/similarity"], "single prompt minus redundant")
    assert_maps_close(out.maps, surgery_ref, f"{key}/map", METHODS["clip_surgery"].heatmap)


def test_clip_surgery_rejects_bad_options(tiny_model, surgery_ref):
    model, params = tiny_model
    images = nhwc(surgery_ref["pixel_values"][:1])
    with pytest.raises(ValueError, match="at least 2 texts"):
        clip_surgery_map(model, params, images, surgery_ref["tokens/red_circle_single"])
    with pytest.raises(ValueError, match="surgery_blocks"):
        clip_surgery_map(model, params, images, surgery_ref["tokens/labels_single"], surgery_blocks=7)


@pytest.mark.parametrize("layers, words", [(1, "1 block, fewer than the official 6; the surgery path covers it "),
                                           (4, "4 blocks, fewer than the official 6; the surgery path covers all ")])
def test_clip_surgery_says_when_a_shallow_model_gets_every_block(tiny_model, layers, words):
    """Unset, surgery_blocks is the official 6 or, with a warning that counts the blocks, all of a shallower tower."""
    model, params = tiny_model
    shallow = dataclasses.replace(model.config, vision_layers=layers)
    clip = LoadedClip(CLIP(shallow), init_params(shallow, 0), default_tokenizer(), "tclip", "test")
    with pytest.warns(UserWarning, match=re.escape(words)):
        METHODS["clip_surgery"](clip)


def test_maskclip_value_path_is_the_block_with_identity_attention(tiny_model, surgery_ref):
    """MaskCLIP's path equals the model's last block with each token attending only to itself."""
    model, params = tiny_model
    images = nhwc(surgery_ref["pixel_values"])
    out = maskclip_map(model, params, images, surgery_ref["tokens/labels_single"])

    @jax.jit
    def self_attending_tokens(params, images):
        probs = common.encode_image(model, params, images).attention_probs
        identity = jnp.broadcast_to(jnp.eye(probs[-1].shape[-1]), probs[-1].shape)
        offsets = tuple(jnp.zeros_like(p) for p in probs[:-1]) + (identity - probs[-1],)
        return common.encode_image(model, params, images, offsets).tokens

    reference = np.asarray(l2_normalize(self_attending_tokens(params, images)) @ out.text_features.T)
    assert_close(out.similarity[:, 1:], reference[:, 1:], "maskclip patch similarity")


def test_maskclip_without_mlp_is_clip_surgerys_mask_clip_variant(tiny_model, surgery_ref):
    """residual_and_mlp=False is CLIP Surgery's commented "mask_clip" path on the last block (its "maskclip 2"),
    written out in float64 numpy as its code runs it: the new path is x += proj(v) with v from qkv(ln_1(x)) (the
    residual kept, `# skip ffn for the new path`), then ln_post and proj."""
    model, params = tiny_model
    config = model.config
    images = nhwc(surgery_ref["pixel_values"])
    out = maskclip_map(model, params, images, surgery_ref["tokens/labels_single"], residual_and_mlp=False)
    block = params["visual"]["transformer"][f"block_{config.vision_layers - 1}"]
    x = np.asarray(encode_image(model, params, images).residual_stream[-2], np.float64)

    def layer_norm(p, y):
        y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + config.layer_norm_eps)
        return y * p["scale"] + p["bias"]

    attn = block["attn"]
    v = layer_norm(block["ln_1"], x) @ attn["value"]["kernel"] + attn["value"]["bias"]
    x = x + v @ attn["out"]["kernel"] + attn["out"]["bias"]
    features = layer_norm(params["visual"]["ln_post"], x) @ params["visual"]["proj"]
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    assert_close(out.similarity[:, 1:], (features @ np.asarray(out.text_features).T)[:, 1:], "mask_clip similarity")


def test_maskclip_maps_version_follows_residual_and_mlp(tiny_model):
    """The maps under residual_and_mlp=False changed (the residual kept since 2026-12-07): their version with them."""
    clip = LoadedClip(*tiny_model, default_tokenizer(), "tclip", "test")
    method = METHODS["maskclip"]
    assert method(clip).maps_version == 2
    assert method(clip, method.Settings(residual_and_mlp=False)).maps_version == 3


# ---------------------------------------------------------------- HilaCAM
def test_hilacam_start_layers_count_from_the_top_as_python_does(tiny_model, hilacam_ref):
    """-1 is the notebook's last block only; -k the last k blocks, as k blocks from n - k (the method took -2 when
    built and refused it at the first image, naming start_layer for start_layer_text)."""
    model, params = tiny_model
    images = nhwc(hilacam_ref["scene_224/pixel_values"])
    vision, text = model.config.vision_layers, model.config.text_layers
    negative = hilacam_map(model, params, images, hilacam_ref["token_ids"], start_layer=-2, start_layer_text=-2)
    counted = hilacam_map(model, params, images, hilacam_ref["token_ids"], start_layer=vision - 2,
                          start_layer_text=text - 2)
    np.testing.assert_array_equal(negative.maps, counted.maps)
    np.testing.assert_array_equal(negative.text_scores, counted.text_scores)
    with pytest.raises(ValueError, match=f"start_layer_text must be in \\[{-text}, {text}\\) for this {text}-block "
                                         "text tower"):
        hilacam_map(model, params, images, hilacam_ref["token_ids"], start_layer=-1, start_layer_text=-text - 1)



def test_hilacam_default_settings_give_the_notebooks_default_maps(fixtures_dir, fixture_images, hilacam_ref):
    """The method built with its default settings is the notebook's default (start_layer -1: the last block only),
    through the path explain takes (prepare, maps, original_maps); a default of 0 (every block) passed unseen."""
    from tclip_jax.checkpoints.load import load_clip

    method = METHODS["hilacam"](load_clip(fixtures_dir / "tiny_openai_clip.npz"))
    encoded = method.encode_prompts([str(text) for text in hilacam_ref["texts"]])
    pixels, geometry = method.prepare(fixture_images["scene_224"])
    out = method.jitted_maps(method.params, pixels[None], encoded.queries,
                             np.arange(len(encoded.queries), dtype=np.int32)[None])
    assert_close(np.asarray(method.original_maps(out.maps[0], geometry))[encoded.rows],
                 hilacam_ref["scene_224/last_layer/image_relevance_map_224"], "default settings' maps")


@pytest.mark.parametrize("variant, start_layer", [("last_layer", -1), ("all_layers", 0)])
def test_hilacam_matches_reference(tiny_model, hilacam_ref, variant, start_layer):
    model, params = tiny_model
    images = np.concatenate([nhwc(hilacam_ref[f"{name}/pixel_values"]) for name in IMAGE_NAMES])
    out = hilacam_map(model, params, images, hilacam_ref["token_ids"], start_layer=start_layer,
                      start_layer_text=start_layer)
    spec = METHODS["hilacam"].heatmap
    for b, name in enumerate(IMAGE_NAMES):
        ref = f"{name}/{variant}"
        assert_close(out.maps[b].reshape(3, -1), hilacam_ref[f"{ref}/image_relevance"], f"{ref} image relevance")
        assert_close(out.text_relevance[b], hilacam_ref[f"{ref}/text_relevance"], f"{ref} text relevance")
        assert_close(out.text_scores[b], hilacam_ref[f"{ref}/text_scores"], f"{ref} text scores")
        assert_close(postprocess_maps(out.maps[b], (224, 224), spec), hilacam_ref[f"{ref}/image_relevance_map_224"],
                     f"{ref} upsampled map")
        assert_close(out.logits[b], hilacam_ref[f"{name}/logits_per_image"][0], f"{name} logits", tol=1e-3)


def test_probs_offset_gradient_agrees_with_central_differences(tiny_model, hilacam_ref):
    """The gradient HilaCAM uses (d logit / d attention probabilities) against central differences."""
    model, params = tiny_model
    config = model.config
    image = nhwc(hilacam_ref["scene_224/pixel_values"])
    shape = (config.vision_layers, 1, config.vision_heads, 50, 50)
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(shape).astype(np.float32) * 1e-3
    text = rng.standard_normal(config.embed_dim).astype(np.float32)
    text /= np.linalg.norm(text)   # the logit is linear in the normalized text embedding

    @jax.jit
    def analytic_and_numeric(params, direction):
        logit = lambda offsets: jnp.exp(params["logit_scale"]) * l2_normalize(
            common.encode_image(model, params, image, tuple(offsets)).embeds[0]) @ text
        return jnp.vdot(jax.grad(logit)(jnp.zeros(shape)), direction), (logit(direction) - logit(-direction)) / 2

    analytic, numeric = analytic_and_numeric(params, direction)
    assert abs(analytic) > 1e-3, "the offsets must move the logit"
    assert abs(numeric - analytic) < 1e-3 * abs(analytic) + 1e-5, (float(numeric), float(analytic))


# ---------------------------------------------------------------- Grad-ECLIP and Grad-CAM

@pytest.mark.parametrize("name", ["scene_224", "scene_wide_320x240"])
def test_grad_eclip_and_grad_cam_match_reference(tiny_model, grad_eclip_ref, fixture_images, name):
    model, params = tiny_model
    ref = {k.split("/", 1)[1]: v for k, v in grad_eclip_ref.items() if k.startswith(name + "/")}
    images, geometry = prepare(fixture_images[name], METHODS["grad_eclip"].input_protocol, PRESETS["ViT-B/32"])
    assert_close(images[None], nhwc(ref["pixel_values"]), "patch-multiple preprocessing", tol=1e-5)
    images = nhwc(ref["pixel_values"])
    tokens = grad_eclip_ref["token_ids"]
    out = grad_eclip_map(model, params, images, tokens)
    for field, key in (("image_embedding", "image_embedding"), ("cosine", "cosine"),
                       ("patch_cosine", "cosine_patch"), ("qk_similarity", "qk_similarity"),
                       ("cls_attention", "cls_attention"), ("grad_cls_output", "attn_output_grad_cls"),
                       ("maps", "grad_eclip_raw")):
        assert_close(getattr(out, field)[0], ref[key], f"grad_eclip {field}")
    size = geometry.original_hw
    assert_close(minmax(out.maps[0]), ref["grad_eclip_map"], "grad_eclip normalized map")
    assert_close(postprocess_maps(out.maps[0], size, METHODS["grad_eclip"].heatmap),
                 ref["grad_eclip_map_upsampled"], "grad_eclip upsampled map")
    cam = grad_cam_map(model, params, images, tokens)
    assert_close(cam.cosine[0], ref["cosine"], "grad_cam cosine")
    assert_close(cam.maps[0] / ref["grad_cam_raw"].max(), ref["grad_cam_raw"] / ref["grad_cam_raw"].max(),
                 "grad_cam raw map (relative)")
    assert_close(postprocess_maps(cam.maps[0], size, METHODS["gradcam"].heatmap),
                 ref["grad_cam_map_upsampled"], "grad_cam upsampled map")


def test_grad_eclip_weights_bfloat16_projections_by_their_float32_cosine(tiny_model, fixture_images):
    """Under bfloat16 matmuls the q.k cosine and its min-max ran in bfloat16 (a few dozen distinct weights); what a
    method computes from the model's outputs runs in float32 (README's dtype policy): the spatial weight is the
    float32 cosine of the (bfloat16) projections, min-max normalized over the patches, in closed form."""
    model, params = tiny_model
    bf16 = CLIP(model.config, jnp.bfloat16)
    images = prepare(fixture_images["scene_wide_320x240"], "patch_multiple", model.config)[0][None]
    tokens = default_tokenizer().encode(["a red circle", "a green star"], model.config.context_length)
    out = grad_eclip_map(bf16, params, images, tokens)
    trace = last_block_gradients(bf16, params, images, tokens, True).trace
    assert trace.q.dtype == trace.k.dtype == jnp.bfloat16
    q, k = (np.asarray(a, np.float64) for a in (trace.q[0, 0], trace.k[0, 1:]))
    cosine = k @ q / np.linalg.norm(k, axis=1) / np.linalg.norm(q)
    expected = (cosine - cosine.min()) / (cosine.max() - cosine.min())
    assert out.qk_similarity.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out.qk_similarity[0]).ravel(), expected, rtol=0, atol=1e-5)


def test_rebuilt_block_with_the_model_heads_is_the_model_block(tiny_model, surgery_ref):
    """Grad-ECLIP's hand-run last block (`single_head=False`) reproduces the model's."""
    model, params = tiny_model
    images = nhwc(surgery_ref["pixel_values"])
    stream = encode_image(model, params, images).residual_stream
    run = last_block_gradients(model, params, images, surgery_ref["tokens/labels_single"], single_head=False)
    assert_close(run.trace.output, np.asarray(stream[-1]), "last block output")


# ---------------------------------------------------------------- attention maps

def test_raw_attention_and_rollout(tiny_model, fixtures_dir, surgery_ref):
    """The map functions, and the methods with their default settings (the class-token attention of the last block;
    the rollout of every block), against closed forms."""
    from tclip_jax.checkpoints.load import load_clip

    model, params = tiny_model
    config = model.config
    images = nhwc(surgery_ref["pixel_values"])
    tokens = surgery_ref["tokens/labels_single"]
    probs = encode_image(model, params, images).attention_probs
    raw = raw_attention_map(model, params, images, tokens)
    assert raw.maps.shape == (3, 5, 7, 7)
    assert_close(raw.maps[:, 4].reshape(3, -1), np.asarray(probs[-1].mean(axis=1)[:, 0, 1:]), "raw attention")
    # Per block the rollout factor is (A + I) / 2 (A = head-mean probabilities, row-stochastic), applied
    # on the left of the earlier blocks' product.
    factor = lambda layer: np.asarray((probs[layer].mean(axis=1) + jnp.eye(50)) / 2)
    last_two = rollout_map(model, params, images, tokens, start_layer=config.vision_layers - 2)
    assert_close(last_two.matrix, factor(-1) @ factor(-2), "two-block rollout")
    assert_close(last_two.maps[:, 2].reshape(3, -1), np.einsum("bk,bkp->bp", factor(-1)[:, 0], factor(-2)[..., 1:]),
                 "rollout map")
    assert_close(last_two.matrix.sum(axis=-1), np.ones((3, 50), np.float32), "rollout rows sum to 1")
    every_block = functools.reduce(np.matmul, [factor(layer) for layer in reversed(range(config.vision_layers))])
    clip = load_clip(fixtures_dir / "tiny_openai_clip.npz")
    for name, expected in (("attention", probs[-1].mean(axis=1)[:, 0, 1:]), ("rollout", every_block[:, 0, 1:])):
        method = METHODS[name](clip)
        encoded = method.encode_prompts(["a red circle"])
        grid = method.grid_maps(method.params, images, encoded.queries)
        assert_close(grid[:, 0].reshape(3, -1), np.asarray(expected), f"{name} with default settings")


# ---------------------------------------------------------------- registry and protocols

def test_registry_lists_every_method_with_its_protocol():
    """Every shipped method is registered under its own name; a method added with one more registry line (the README's
    example, test_methods.py) leaves this test passing."""
    registered = {name: methods.get(name) for name in methods.REGISTRY}
    assert set(registered) >= {"tclip", "similarity", "rclip", "maskclip", "clip_surgery", "hilacam", "attention",
                               "rollout", "gradcam", "grad_eclip", "decomposition", "gscorecam", "m2ib", "eclip"}
    assert all(method.name == name for name, method in registered.items())
    assert len(METHODS["clip_surgery"].templates) == 85
    with pytest.raises(ValueError, match="unknown method"):
        methods.get("nope")


# The map functions that accept text features in place of token ids (all but HilaCAM), and their ensembles.
FEATURE_MAPS = {"similarity": similarity_map, "rclip": rclip_map, "maskclip": maskclip_map,
                "clip_surgery": clip_surgery_map, "attention": raw_attention_map, "rollout": rollout_map,
                "gradcam": grad_cam_map, "grad_eclip": grad_eclip_map, "decomposition": decomposition_map}


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_text_features_computed_once_give_the_token_id_maps(tiny_model, surgery_ref, name):
    model, params = tiny_model
    images = nhwc(surgery_ref["pixel_values"][:1])
    token_ids = surgery_ref["tokens/labels_ensemble" if METHODS[name].templates else "tokens/labels_single"]
    features = text_features(model, params, token_ids)
    assert_close(FEATURE_MAPS[name](model, params, images, features).maps,
                 np.asarray(FEATURE_MAPS[name](model, params, images, token_ids).maps), f"{name} maps")


def test_text_features_of_the_wrong_width_or_for_hilacam_are_refused(tiny_model, surgery_ref):
    model, params = tiny_model
    images = nhwc(surgery_ref["pixel_values"][:1])
    features = text_features(model, params, surgery_ref["tokens/labels_single"])
    with pytest.raises(ValueError, match="text features must be"):
        similarity_map(model, params, images, features[:, :-1])
    with pytest.raises(ValueError, match="HilaCAM needs token ids"):
        hilacam_map(model, params, images, features)
    with pytest.raises(ValueError, match="at least 2 texts"):  # minus its own mean, one text is all zeros
        decomposition_map(model, params, images, features[:1])


def test_prepare_follows_each_protocol(tiny_model, fixture_images, surgery_ref, hilacam_ref):
    model, _ = tiny_model
    config = model.config
    for b, name in enumerate(IMAGE_NAMES):
        whole, _ = prepare(fixture_images[name], "whole", config)
        assert_close(whole, nhwc(surgery_ref["pixel_values"])[b], f"whole image {name}", tol=1e-5)
        crop, _ = prepare(fixture_images[name], "center_crop", config)
        assert_close(crop[None], nhwc(hilacam_ref[f"{name}/pixel_values"]), f"center crop {name}", tol=1e-5)
    with pytest.raises(ValueError, match="input protocol"):
        prepare(fixture_images["scene_224"], "stretch", config)


def test_postprocess_orders():
    maps = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)), jnp.float32)
    normalize_first, upsample_first = MapPostprocess(normalize_first=True), MapPostprocess(normalize_first=False)
    # At an odd integer scale every grid centre is an output pixel centre, so bilinear upsampling keeps the
    # extremes and both orders agree (min-max is affine); at other scales they differ.
    assert_close(postprocess_maps(maps, (9, 12), normalize_first),
                 np.asarray(postprocess_maps(maps, (9, 12), upsample_first)), "orders at scale 3")
    assert not np.allclose(postprocess_maps(maps, (8, 10), normalize_first),
                           postprocess_maps(maps, (8, 10), upsample_first))
    # clip_negative: negatives become 0 and the min-max is then a division by the maximum.
    upsampled = np.asarray(upsample_bilinear(maps, (8, 10)))
    clipped = postprocess_maps(maps, (8, 10), MapPostprocess(normalize_first=False, clip_negative=True))
    expected = np.maximum(upsampled, 0) / upsampled.max(axis=(1, 2), keepdims=True)
    assert_close(clipped, expected, "clip_negative")


def test_prompts_the_model_cannot_tell_apart_are_one_member_of_a_label_set(fixtures_dir, fixture_images):
    """"a red circle" and "A red  circle " are one text to CLIP: as two members of CLIP Surgery's label set their
    surgery subtracted each from the other and every map was zero (box: the whole image). They count once: the
    map is the single-prompt map; the decomposition, which needs two texts that differ, refuses them."""
    from tclip_jax.checkpoints.load import load_clip

    clip = load_clip(fixtures_dir / "tiny_openai_clip.npz")
    image = fixture_images["scene_wide_320x240"]
    surgery = METHODS["clip_surgery"](clip)
    alone = surgery.explain(image, ["a red circle"]).prompts[0].phrase.heatmap
    for twin in ("A red circle", "a red  circle "):
        maps = [p.phrase.heatmap for p in surgery.explain(image, ["a red circle", twin]).prompts]
        assert np.ptp(maps[0]) > 0
        np.testing.assert_array_equal(maps[0], alone)
        np.testing.assert_array_equal(maps[1], alone)
    with pytest.raises(ValueError, match="needs at least 2 that differ; got 1"):
        METHODS["decomposition"](clip).explain(image, ["a red circle", "A red circle"])
