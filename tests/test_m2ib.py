"""M2IB against the official code's outputs (../shared/fixtures/m2ib): the replayed optimization with the official
noise, the deterministic parts of every case, and the options against explicit reference computations."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tclip_jax.checkpoints.load import load_clip
from tclip_jax.methods import METHODS
from tclip_jax.methods.base import UPSAMPLE_THEN_NORMALIZE, postprocess_maps
from tclip_jax.methods.common import encode_image, patch_grid
from tclip_jax.methods.m2ib import (Hyper, M2IBSettings, bottleneck_position, capacity, m2ib_map,
                                    optimize_bottleneck, torch_adam)
from tclip_jax.model import CLIP, init_params

from references import assert_close

IMAGES = ("scene_224", "scene_wide_320x240", "noise_224")
# Adam's step is lr * m / sqrt(v): for a gradient component near zero it is about lr times the component's sign, so
# float32 rounding differences in the gradient (XLA's reduction order differs by CPU: 1.2e-4 at steps 3-8 on an
# Intel Xeon, under 1e-4 on AMD EPYC) move alpha by more than they move the loss; the losses, capacity, saliency and
# map stay within TOL.
ALPHA_TOL = 3e-4

pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.fixture(scope="module")
def ref(fixture_npz):
    return fixture_npz("m2ib/m2ib_tiny.npz")


@pytest.fixture(scope="module")
def replay(fixture_npz):
    return fixture_npz("m2ib/m2ib_tiny_replay.npz")


def nhwc(pixel_values):
    return np.ascontiguousarray(pixel_values.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def replayed(tiny_model, ref, replay):
    """The official run of scene_224 x "a red circle" with its noise, both sides, at the default layers."""
    assert str(replay["image_name"]) == "scene_224" and str(replay["text"]) == str(ref["texts"][0])
    with jax.default_matmul_precision("highest"):
        return m2ib_map(*tiny_model, nhwc(ref["scene_224/pixel_values"]), ref["token_ids_77"][:1],
                        vision_noise=replay["vision/noise"], text_noise=replay["text/noise"], trace=True)


def test_default_layers_are_three_blocks_from_the_top(tiny_model, ref):
    """The bottleneck's position counts the blocks before it: after block `layer`, layer + 1."""
    config = tiny_model[0].config
    assert M2IBSettings().vlayer is None
    assert bottleneck_position(-3, 12, "vlayer") == bottleneck_position(None, 12, "vlayer") == 10  # after 9 of 12
    assert bottleneck_position(None, config.vision_layers, "vlayer") == ref["vlayer"] + 1 == 4
    assert bottleneck_position(None, config.text_layers, "tlayer") == ref["tlayer"] + 1 == 1


def test_a_tower_shorter_than_three_blocks_gets_the_bottleneck_on_its_input(tiny_model, ref):
    """Unset, a 1- or 2-block tower gets the bottleneck before its first block; named explicitly, -3 must exist.
    Either way a block follows it, so the map depends on the prompt (after the last block it could not: only the
    class token would reach the features)."""
    assert [bottleneck_position(None, layers, "vlayer") for layers in (1, 2)] == [0, 0]
    with pytest.raises(ValueError, match="vlayer must be in"):
        bottleneck_position(-3, 2, "vlayer")
    model, params = tiny_model
    images, texts = nhwc(ref["scene_224/pixel_values"]), ref["token_ids_77"][:2]
    for layers in (1, 2):
        short = CLIP(dataclasses.replace(model.config, vision_layers=layers))
        short_params = init_params(short.config, 1)
        run = m2ib_map(short, short_params, images, texts, steps=2, batch_size=2, text_side=False, trace=True)
        # Two programs computing the same embedding: equal up to float32 rounding, far from the first block's output.
        stream = encode_image(short, short_params, images).residual_stream
        np.testing.assert_allclose(run.vision.layer_features[0], stream[0][0], rtol=0, atol=1e-5)
        assert not np.allclose(run.vision.layer_features[0], stream[1][0], atol=1e-2)
        assert not np.allclose(run.maps[0, 0], run.maps[0, 1], atol=1e-3), f"{layers} blocks: one map per prompt"


@pytest.mark.parametrize("layer", [-1, 1])
def test_the_last_block_is_refused_for_the_bottleneck(tiny_model, ref, layer):
    """After the last block only the class token reaches the image features: every prompt would get one map."""
    model, params = tiny_model
    short = CLIP(dataclasses.replace(model.config, vision_layers=2))
    images, texts = nhwc(ref["scene_224/pixel_values"]), ref["token_ids_77"][:1]
    with pytest.raises(ValueError, match=f"vlayer={layer} is the last block of this 2-block tower"):
        m2ib_map(short, init_params(short.config, 1), images, texts, vlayer=layer, text_side=False)
    with pytest.raises(ValueError, match="tlayer=-1 is the last block"):
        m2ib_map(model, params, images, texts, tlayer=-1)


def test_vision_replay_matches_every_step(replayed, ref, replay):
    run = replayed.vision
    assert_close(run.layer_features[0], ref["scene_224/vision_layer_features"], "layer features")
    for step in range(10):
        assert_close(run.alpha_used[0, 0, step], replay["vision/alpha_used"][step], f"alpha of step {step}", ALPHA_TOL)
    assert_close(run.losses[0, 0], replay["vision/losses"], "losses")
    assert_close(run.alpha_final[0, 0], replay["vision/alpha_final"], "final alpha", ALPHA_TOL)
    assert_close(run.alpha_last[0, 0], ref["scene_224/vision_alpha_last"][0], "alpha of the map", ALPHA_TOL)
    assert_close(run.capacity[0, 0], ref["scene_224/vision_capacity"][0], "capacity", relative=True)
    assert_close(run.saliency[0, 0], ref["scene_224/vision_saliency"][0], "saliency", relative=True)
    assert_close(replayed.vision_map[0, 0], ref["scene_224/vision_map"][0], "vision map")


def test_text_replay_matches_every_step(replayed, ref, replay):
    run, n = replayed.text, len(ref["text0/token_ids"])
    assert int(replayed.text_lengths[0]) == n
    assert_close(run.layer_features[0, :n], ref["scene_224/text0/text_layer_features"], "layer features")
    for step in range(10):
        assert_close(run.alpha_used[0, 0, step, :n], replay["text/alpha_used"][step], f"alpha of step {step}",
                     ALPHA_TOL)
    assert_close(run.losses[0, 0], replay["text/losses"], "losses")
    assert_close(run.alpha_final[0, 0, :n], replay["text/alpha_final"], "final alpha", ALPHA_TOL)
    assert_close(run.alpha_last[0, 0, :n], ref["scene_224/text0/text_alpha_last"], "alpha of the map", ALPHA_TOL)
    assert_close(run.capacity[0, 0, :n], ref["scene_224/text0/text_capacity"], "capacity", relative=True)
    assert_close(run.saliency[0, 0, :n], ref["scene_224/text0/text_saliency"], "saliency", relative=True)
    assert_close(replayed.text_map[0, 0, :n], ref["scene_224/text0/text_map"], "text map")
    assert (np.asarray(replayed.text_map[0, 0, n:]) == 0).all() and (np.asarray(run.capacity[0, 0, n:]) == 0).all()
    assert (np.asarray(run.alpha_final[0, 0, n:]) == 5).all()  # padding never moves


def test_deterministic_parts_of_every_case(tiny_model, ref):
    """Layer features, features and clean cosines for every image and text (the seeded maps depend on torch's
    noise; one cheap step runs the rest)."""
    images = np.concatenate([nhwc(ref[f"{name}/pixel_values"]) for name in IMAGES])
    out = m2ib_map(*tiny_model, images, ref["token_ids_77"], steps=1, batch_size=1)
    for t in range(3):
        ids = ref[f"text{t}/token_ids"]
        assert (ref["token_ids_77"][t, :len(ids)] == ids).all() and int(out.text_lengths[t]) == len(ids)
        assert_close(out.text_features[t], ref[f"text{t}/text_features"], f"text{t} features")
    for b, name in enumerate(IMAGES):
        assert_close(out.image_features[b], ref[f"{name}/image_features"], f"{name} features")
        assert_close(out.cosine[b], ref[f"{name}/cosine"], f"{name} cosines")
        assert_close(out.vision.layer_features[b], ref[f"{name}/vision_layer_features"], f"{name} layer features")
        for t in range(3):
            n = int(out.text_lengths[t])
            assert_close(out.text.layer_features[t, :n], ref[f"{name}/text{t}/text_layer_features"],
                         f"text{t} layer features")


def test_maps_from_the_recorded_alpha_of_every_case(ref):
    """Capacity, saliency and both maps of every (image, text) from the official alpha of the last forward."""
    def run(features, alpha):
        lam = jax.nn.sigmoid(jnp.asarray(alpha))
        cap = capacity(features * lam, (1 - lam) ** 2)
        return cap, jnp.nansum(cap, axis=-1)

    for name in IMAGES:
        cap, saliency = run(ref[f"{name}/vision_layer_features"], ref[f"{name}/vision_alpha_last"])
        assert_close(cap, ref[f"{name}/vision_capacity"], f"{name} capacity", relative=True)
        assert_close(saliency, ref[f"{name}/vision_saliency"], f"{name} saliency", relative=True)
        vision_map = postprocess_maps(patch_grid(saliency, (7, 7)), (224, 224), UPSAMPLE_THEN_NORMALIZE)
        assert_close(vision_map, ref[f"{name}/vision_map"], f"{name} vision map")
        for t in range(3):
            key = f"{name}/text{t}"
            cap, saliency = run(ref[f"{key}/text_layer_features"], ref[f"{key}/text_alpha_last"])
            assert_close(saliency, ref[f"{key}/text_saliency"], f"{key} saliency", relative=True)
            normalize = lambda x: (x - x.min()) / (x.max() - x.min())  # noqa: E731
            assert_close(normalize(normalize(saliency)), ref[f"{key}/text_map"], f"{key} text map")


# ------------------------------------------------------------------------- options, on a toy bottleneck

optimize = jax.jit(optimize_bottleneck, static_argnums=(2, 5))


def toy_problem(seed=0, n=6, width=8, steps=4, batch=3):
    rng = np.random.default_rng(seed)
    features = jnp.asarray(rng.standard_normal((n, width)) * 3 + 1, jnp.float32)
    weight = jnp.asarray(rng.standard_normal((width, 5)), jnp.float32)
    # [batch, n, width] -> [batch, 5], blind to the last token (padding), as the text tower after EOT
    forward = lambda t: jnp.tanh(t[:, :-1].mean(axis=1) @ weight)  # noqa: E731
    target = jnp.asarray(rng.standard_normal(5), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((steps, batch, n, width)), jnp.float32)
    valid = jnp.arange(n) < n - 1  # the last token is padding
    return features, valid, forward, target, noise


def test_estimators_standardize_the_features():
    features, valid, forward, target, noise = toy_problem()
    hyper = Hyper(steps=4, batch_size=3)
    official = optimize(features, valid, forward, target, noise, hyper)
    # The official placeholder: var has no effect.
    for var in (1.0, 4.0):
        same = optimize(features, valid, forward, target, noise, Hyper(var=var, steps=4, batch_size=3))
        assert_close(same["saliency"], np.asarray(official["saliency"]), f"var {var} unused")
    # placeholder with var 1 is the identity; with var 4 it is the official bottleneck on x / 2, output * 2.
    placeholder = lambda var: optimize(  # noqa: E731
        features, valid, forward, target, noise, Hyper(var=var, steps=4, batch_size=3, estimator="placeholder"))
    assert_close(placeholder(1.0)["saliency"], np.asarray(official["saliency"]), "placeholder, var 1")
    explicit = optimize(features / 2, valid, lambda t: forward(t * 2), target, noise, hyper)
    assert_close(placeholder(4.0)["saliency"], np.asarray(explicit["saliency"]), "placeholder, var 4")
    assert not np.allclose(explicit["saliency"], official["saliency"], atol=1e-2)
    # tokens: per-channel mean and (stabilized) std over the valid tokens.
    x = np.asarray(features, np.float64)[:-1]
    mean = x.mean(axis=0)
    std = np.sqrt(np.maximum(((x - mean) ** 2).sum(axis=0), 1e-5) / len(x))
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    tokens = optimize(features, valid, forward, target, noise,
                                 Hyper(steps=4, batch_size=3, estimator="tokens"))
    explicit = optimize((features - mean) / std, valid, lambda t: forward(t * std + mean), target,
                                   noise, hyper)
    for key in ("saliency", "alpha_final", "losses"):
        assert_close(tokens[key], np.asarray(explicit[key]), f"tokens estimator {key}")


def test_final_alpha_and_padding():
    features, valid, forward, target, noise = toy_problem()
    last = optimize(features, valid, forward, target, noise, Hyper(steps=4, batch_size=3, trace=True))
    final = optimize(features, valid, forward, target, noise,
                                Hyper(steps=4, batch_size=3, final_alpha=True))
    assert_close(final["alpha_final"], np.asarray(last["alpha_final"]), "same optimization")
    assert_close(last["alpha_last"], np.asarray(last["alpha_used"][-1]), "the map's alpha is the last forward's")
    for run, alpha in ((last, last["alpha_used"][-1]), (final, last["alpha_final"])):
        lam = jax.nn.sigmoid(alpha)
        expected = np.where(np.asarray(valid)[:, None], capacity(features * lam, (1 - lam) ** 2), 0)
        assert_close(run["capacity"], expected, "capacity of the map's alpha", relative=True)
    assert not np.allclose(last["saliency"], final["saliency"], atol=1e-2)
    # Compression averages over the valid tokens; padding gets no gradient, so it keeps alpha = 5.
    lam = jax.nn.sigmoid(jnp.full(features.shape, 5.0))
    assert float(last["losses"][0, 0]) == pytest.approx(
        float(capacity(features * lam, (1 - lam) ** 2)[:-1].mean()), rel=1e-6)
    assert (np.asarray(last["alpha_final"][-1]) == 5).all()


def test_adam_is_torchs():
    """`torch_adam` against torch.optim.Adam (lr 1, defaults) on a fixed gradient sequence, and against
    optax.adam, which differs only by its float32 bias corrections."""
    rng = np.random.default_rng(0)
    grads = (rng.standard_normal((10, 50)) * np.logspace(-9, 1, 50)).astype(np.float32)
    start = rng.standard_normal(50).astype(np.float32)

    def run(optimizer):
        params, state, path = jnp.asarray(start), optimizer.init(jnp.asarray(start)), []
        for g in grads:
            updates, state = optimizer.update(jnp.asarray(g), state, params)
            params = optax.apply_updates(params, updates)
            path.append(np.asarray(params))
        return np.stack(path)

    ours = run(torch_adam(1.0, 10))
    assert np.abs(ours - run(optax.adam(1.0))).max() < 1e-3
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.tensor(start))
    adam = torch.optim.Adam([param], lr=1)
    expected = []
    for g in grads:
        param.grad = torch.tensor(g)
        adam.step()
        expected.append(param.detach().numpy().copy())
    assert np.abs(ours - np.stack(expected)).max() < 2e-6


# ------------------------------------------------------------------------- the Method and bad options

def test_method_maps_are_deterministic(fixture_images, fixtures_dir):
    method = METHODS["m2ib"](load_clip(fixtures_dir / "tiny_openai_clip.npz"), M2IBSettings(steps=3, batch_size=2))
    assert method.input_protocol == "center_crop"
    pixels, _ = method.prepare(fixture_images["scene_224"])
    queries = method.encode_prompts(["a red circle", "a cat"]).queries
    rows = np.array([[0, 1]], np.int32)
    first = np.asarray(method.jitted_maps(method.params, pixels[None], queries, rows).maps)
    again = np.asarray(method.jitted_maps(method.params, pixels[None], queries, rows).maps)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (1, 2, 224, 224) and first.min() == 0 and first.max() == 1
    assert not np.allclose(first[0, 0], first[0, 1])


def test_bad_options_are_refused(tiny_model, ref, fixtures_dir):
    images, texts = nhwc(ref["scene_224/pixel_values"]), ref["token_ids_77"][:1]
    with pytest.raises(ValueError, match="vlayer must be in"):
        m2ib_map(*tiny_model, images, texts, vlayer=6)
    with pytest.raises(ValueError, match="tlayer must be in"):
        m2ib_map(*tiny_model, images, texts, tlayer=-4)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        m2ib_map(*tiny_model, images, texts, steps=0)
    with pytest.raises(ValueError, match="var must be > 0"):
        m2ib_map(*tiny_model, images, texts, var=0.0)
    with pytest.raises(ValueError, match="estimator must be one of"):
        m2ib_map(*tiny_model, images, texts, estimator="dataset")
    with pytest.raises(ValueError, match="vision_noise must be"):
        m2ib_map(*tiny_model, images, texts, vision_noise=np.zeros((10, 10, 49, 128), np.float32))
    with pytest.raises(ValueError, match="text-side map needs token ids"):
        m2ib_map(*tiny_model, images, np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        M2IBSettings(batch_size=0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        M2IBSettings(beta=-1.0)
    for name in ("beta", "var", "lr"):  # all three run in float32: 1e300 would run as inf
        with pytest.raises(ValueError, match=f"^{name} must be a finite number that float32 holds"):
            M2IBSettings(**{name: 1e300})
        with pytest.raises(ValueError, match=f"^{name} must be a finite number that float32 holds"):
            m2ib_map(*tiny_model, images, texts, **{name: 2.0 ** 128})
        with pytest.raises(ValueError, match=f"^{name} must be a finite number that float32 holds"):
            M2IBSettings(**{name: 1e-50})  # float32 holds it as 0
    M2IBSettings(beta=0.0)  # no compression: meaningful
    with pytest.raises(ValueError, match="steps=1 reads the map from the initial alpha"):
        M2IBSettings(steps=1)
    M2IBSettings(steps=1, final_alpha=True)
    with pytest.raises(ValueError, match="vlayer must be in"):
        METHODS["m2ib"](load_clip(fixtures_dir / "tiny_openai_clip.npz"), M2IBSettings(vlayer=9))
    assert M2IBSettings.parse_assignments(["estimator=tokens", "final_alpha=true", "beta=0.5"]) == {
        "estimator": "tokens", "final_alpha": True, "beta": 0.5}
