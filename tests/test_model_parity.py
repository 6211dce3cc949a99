"""The Flax CLIP against transformers' PyTorch CLIPModel and the official OpenAI-format implementation."""
import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from tclip_jax.model import CLIP, PRESETS, CLIPConfig, param_shapes, to_hf_config
from tclip_jax.checkpoints.convert import convert_state_dict, infer_openai_config

TOL = 1e-4

SMALL = CLIPConfig(embed_dim=32, image_size=64, patch_size=16, vision_width=64, vision_layers=2, vision_heads=4,
                   vision_mlp_dim=128, vocab_size=49408, context_length=77, text_width=48, text_layers=2,
                   text_heads=3, text_mlp_dim=96)


def hf_model(config: CLIPConfig, seed: int = 0) -> transformers.CLIPModel:
    torch.manual_seed(seed)
    hf_config = transformers.CLIPConfig(**to_hf_config(config))
    model = transformers.CLIPModel(hf_config).eval()
    model.set_attn_implementation("eager")  # the only implementation that returns attention probabilities
    # Random init leaves LayerNorms at identity, every Linear bias at 0 and logit_scale at its default; perturb them
    # all (zero biases would leave the conversion's bias rules untested).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "logit_scale" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_state_dict(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def random_inputs(config: CLIPConfig, height: int, width: int, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, height, width, 3)).astype(np.float32)
    lengths = [5, 11, 2][:batch] + [7] * max(0, batch - 3)
    tokens = np.zeros((batch, config.context_length), np.int64)
    for row, n in enumerate(lengths):
        tokens[row, 0] = 49406
        tokens[row, 1:n + 1] = rng.integers(1, 49405, n)
        tokens[row, n + 1] = 49407
    return images, tokens


def compare_with_hf(config: CLIPConfig, height: int, width: int):
    model = hf_model(config)
    params = convert_state_dict(hf_state_dict(model), config, "hf")
    images, tokens = random_inputs(config, height, width)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                    output_hidden_states=True, output_attentions=True,
                    interpolate_pos_encoding=(height, width) != (config.image_size,) * 2)
    clip = CLIP(config)
    with jax.default_matmul_precision("highest"):
        image = clip.apply({"params": params}, images, True, method="encode_image")
        text = clip.apply({"params": params}, tokens, True, method="encode_text")
        logits, _, _ = clip.apply({"params": params}, images, tokens)

    def close(ours, theirs, what):
        err = np.abs(np.asarray(ours) - theirs.numpy()).max()
        assert err < TOL, f"{what}: max abs error {err}"

    vision, text_ref = ref.vision_model_output, ref.text_model_output
    assert len(image.residual_stream) == len(vision.hidden_states) == config.vision_layers + 1
    for i, (ours, theirs) in enumerate(zip(image.residual_stream, vision.hidden_states)):
        close(ours, theirs, f"vision hidden state {i}")
    for i, (ours, theirs) in enumerate(zip(image.attention_probs, vision.attentions)):
        close(ours, theirs, f"vision attention {i}")
    for i, (ours, theirs) in enumerate(zip(text.residual_stream, text_ref.hidden_states)):
        close(ours, theirs, f"text hidden state {i}")
    for i, (ours, theirs) in enumerate(zip(text.attention_probs, text_ref.attentions)):
        close(ours, theirs, f"text attention {i}")
    # transformers v5 replaces each tower's pooler_output by its projection inside CLIPModel.
    close(image.embeds, vision.pooler_output, "image embeds (pooled class token, projected)")
    close(text.embeds, text_ref.pooler_output, "text embeds (pooled end-of-text token, projected)")
    with torch.no_grad():
        image_normed = model.vision_model.post_layernorm(vision.last_hidden_state)
        close(image.tokens_normed, image_normed, "all image tokens after ln_post")
        close(image.tokens, model.visual_projection(image_normed), "all image tokens after ln_post and proj")
        close(text.tokens_normed, text_ref.last_hidden_state, "all text tokens after ln_final")
        close(text.tokens, model.text_projection(text_ref.last_hidden_state), "all projected text tokens")
    close(logits, ref.logits_per_image, "logits per image")
    assert image.grid == (height // config.patch_size, width // config.patch_size)


def test_matches_transformers_small():
    compare_with_hf(SMALL, 64, 64)


def test_matches_transformers_exact_gelu_non_square():
    compare_with_hf(dataclasses.replace(SMALL, activation="gelu"), 48, 96)


def test_matches_transformers_vit_b32():
    compare_with_hf(PRESETS["ViT-B/32"], 224, 224)


def test_matches_official_openai_implementation(fixture_npz):
    """The plain path of the official (OpenAI-format) code as recorded in the CLIP Surgery fixtures."""
    state_dict = {k: v.astype(np.float32) for k, v in fixture_npz("tiny_openai_clip.npz").items()}
    ref = fixture_npz("clip_surgery/clip_surgery_tiny.npz")
    config = infer_openai_config(state_dict)
    assert (config.vision_layers, config.vision_width, config.vision_heads, config.text_layers) == (6, 128, 2, 3)
    params = convert_state_dict(state_dict, config)
    clip = CLIP(config)
    with jax.default_matmul_precision("highest"):
        image = clip.apply({"params": params}, ref["pixel_values"].transpose(0, 2, 3, 1), method="encode_image")
        single = clip.apply({"params": params}, ref["tokens/labels_single"], method="encode_text")
        ensemble = clip.apply({"params": params}, ref["tokens/labels_ensemble"].reshape(-1, 77),
                              method="encode_text")
    np.testing.assert_allclose(image.tokens, ref["plain/image_features_unnorm"], atol=TOL, rtol=0)
    np.testing.assert_allclose(single.embeds, ref["plain/text_embeds_single_unnorm"], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ensemble.embeds).reshape(5, 85, -1),
                               ref["plain/text_embeds_ensemble_per_template_unnorm"], atol=TOL, rtol=0)


def parameter_count(config: CLIPConfig) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(param_shapes(config)))


def test_vit_b32_parameter_count():
    assert parameter_count(PRESETS["ViT-B/32"]) == 151_277_313


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_transformers(name):
    with torch.device("meta"):  # shapes only, nothing allocated
        hf = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(PRESETS[name])))
    assert parameter_count(PRESETS[name]) == sum(p.numel() for p in hf.parameters())


class _QuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


@pytest.mark.parametrize("height, width, activation", [(64, 64, "quick_gelu"), (48, 96, "gelu")])
def test_convolutional_stem_matches_pytorch_convolutions(height, width, activation):
    """stem_channels: transformers' image tower with its patch embedding replaced by PyTorch's Conv2d(3, stride 2,
    padding 1) + activation layers (the model's: QuickGELU, or exact GELU) and a (patch / 4)-sized patch convolution
    gives every hidden state we give."""
    channels = (8, 16)
    plain = dataclasses.replace(SMALL, activation=activation)
    config = dataclasses.replace(plain, stem_channels=channels)
    model = hf_model(plain)
    params = convert_state_dict(hf_state_dict(model), plain, "hf")
    torch.manual_seed(1)
    layers, previous = [], 3
    for out in channels:
        layers += [torch.nn.Conv2d(previous, out, 3, stride=2, padding=1),
                   {"quick_gelu": _QuickGELU, "gelu": torch.nn.GELU}[activation]()]
        previous = out
    rest = SMALL.patch_size // 4
    layers.append(torch.nn.Conv2d(previous, SMALL.vision_width, rest, stride=rest, bias=False))
    stem = torch.nn.Sequential(*layers).eval()
    stem.weight = layers[0].weight  # transformers reads the input dtype from patch_embedding.weight
    model.vision_model.embeddings.patch_embedding = stem
    hwio = lambda conv: conv.weight.detach().numpy().transpose(2, 3, 1, 0)
    params["visual"]["patch_embed"]["kernel"] = hwio(layers[-1])
    for i in range(len(channels)):
        params["visual"][f"stem_{i}"] = {"kernel": hwio(layers[2 * i]), "bias": layers[2 * i].bias.detach().numpy()}
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(lambda s: s.shape, param_shapes(config))
    images, _ = random_inputs(config, height, width)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True,
                                 interpolate_pos_encoding=(height, width) != (config.image_size,) * 2)
    with jax.default_matmul_precision("highest"):
        ours = CLIP(config).apply({"params": params}, images, True, method="encode_image")
    for i, (a, b) in enumerate(zip(ours.residual_stream, ref.hidden_states)):
        assert np.abs(np.asarray(a) - b.numpy()).max() < TOL, f"hidden state {i}"
    assert ours.grid == (height // config.patch_size, width // config.patch_size)


def test_a_stem_has_no_hugging_face_equivalent():
    with pytest.raises(ValueError, match="convolutional stem"):
        to_hf_config(dataclasses.replace(SMALL, stem_channels=(8,)))


def test_stem_model_round_trips_through_a_checkpoint_folder(tmp_path):
    from tclip_jax.checkpoints.folder import flatten, load_checkpoint, save_checkpoint

    config = dataclasses.replace(SMALL, stem_channels=(8, 16))
    rng = np.random.default_rng(3)  # values of the model's shapes (initialising op by op compiles each initialiser)
    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype), param_shapes(config))
    save_checkpoint(tmp_path / "stem", params, config)
    loaded, loaded_config, _ = load_checkpoint(tmp_path / "stem")
    assert loaded_config == config and loaded_config.stem_channels == (8, 16)
    assert flatten(loaded).keys() == flatten(params).keys() and "visual/stem_1/kernel" in flatten(loaded)
    for key, value in flatten(params).items():
        np.testing.assert_array_equal(flatten(loaded)[key], value)


def test_init_params_start_stem_kernels_with_he_variance_and_the_temperature_at_clips():
    """Stem kernels: var 2 / fan_in (He): with LeCun's 1 / fan_in the unnormalized stem shrinks the signal at every
    activation. logit_scale: log(1 / 0.07), as OpenAI's model.py (and transformers' logit_scale_init_value, 2.6592)
    start it; training starts from these parameters. (One init_params call, jitted: op by op, each initialiser is a
    compilation of its own; jitted, the values differ from those in the last bits, and the variances and the
    temperature checked here do not see that.)"""
    from tclip_jax.model import init_params

    params = jax.jit(init_params, static_argnums=(0, 1))(dataclasses.replace(SMALL, stem_channels=(32, 64)), 0)
    for name, fan_in in (("stem_0", 3 * 3 * 3), ("stem_1", 3 * 3 * 32)):
        kernel = np.asarray(params["visual"][name]["kernel"])
        assert kernel.var() == pytest.approx(2 / fan_in, rel=0.15)
    assert float(params["logit_scale"]) == pytest.approx(np.log(1 / 0.07), rel=1e-6)
    assert float(params["logit_scale"]) == pytest.approx(transformers.CLIPConfig().logit_scale_init_value, abs=1e-4)
    with jax.enable_x64(True):  # float32 parameters whatever the mode (logit_scale's initializer was float64 then)
        shapes = jax.eval_shape(lambda: init_params(SMALL, 0))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {np.dtype(np.float32)}


def test_the_text_embedding_is_read_at_the_first_end_of_text_id_or_the_highest_id():
    """eot_positions: the first occurrence of the config's eot_token_id (whatever id a tokenizer gives its
    <|endoftext|>), or with None the highest id (OpenAI's argmax)."""
    from tclip_jax.model.clip import eot_positions

    ids = np.array([[3, 5, 9, 5, 0], [7, 1, 5, 2, 9]])
    first_five = [list(row).index(5) for row in ids]
    highest = [int(np.argmax(row)) for row in ids]
    assert eot_positions(ids, 5).tolist() == first_five == [1, 2]
    assert eot_positions(ids, None).tolist() == highest == [2, 4]


@pytest.mark.parametrize("stem, message", [((0,), "positive integers"), ([8], "tuple"),
                                           ((8, 8, 8, 8, 8), "not divisible by 2\\*\\*5")])
def test_bad_stem_is_named(stem, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, stem_channels=stem)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, bool])
def test_pixels_that_are_not_floating_point_are_refused(tiny_model, dtype):
    """Raw 0..255 pixels ran through the model without a word; the dtype is static, so jit refuses them too."""
    model, params = tiny_model
    pixels = np.zeros((1, 224, 224, 3), dtype)
    message = (f"images must be CLIP-normalized floating-point pixels, got {np.dtype(dtype).name}: make them from "
               "uint8 RGB with a method's prepare or tclip_jax.image.prepare")
    with pytest.raises(ValueError, match=message):
        model.apply({"params": params}, pixels, method="encode_image")
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image").embeds)(params, pixels)
    assert np.isfinite(model.apply({"params": params}, pixels.astype(np.float32), method="encode_image").embeds).all()


@pytest.mark.parametrize("intermediates", [False, True])
def test_an_empty_batch_gives_empty_outputs(tiny_model, intermediates):
    """[0, H, W, 3] images and [0, context] token ids (the last chunk of a split list, say) give outputs with no rows,
    as numpy would; the attention's reshape raised ZeroDivisionError. Each call is jitted: the same Python runs on
    the same static shapes (the reshape's size inference fails in tracing as it does op by op), as one program rather
    than a compilation per operation, which for these zero-row shapes, seen nowhere else, cost 2-3 times the CPU."""
    model, params = tiny_model
    config, variables = model.config, {"params": params}
    size = config.image_size
    image = jax.jit(lambda v, x: model.apply(v, x, intermediates, method="encode_image"))(
        variables, np.zeros((0, size, size, 3), np.float32))
    text = jax.jit(lambda v, t: model.apply(v, t, intermediates, method="encode_text"))(
        variables, np.zeros((0, config.context_length), np.int32))
    assert image.embeds.shape == text.embeds.shape == (0, config.embed_dim)
    assert image.tokens.shape == (0, 1 + config.grid_size**2, config.embed_dim)
    assert text.tokens.shape == (0, config.context_length, config.embed_dim) and text.eot_index.shape == (0,)
    if intermediates:
        assert [a.shape[0] for a in (*image.residual_stream, *image.attention_probs, *text.attention_probs)] == \
            [0] * (2 * config.vision_layers + 1 + config.text_layers)
    logits = jax.jit(lambda v, x, t: model.apply(v, x, t)[0])(variables, np.zeros((0, size, size, 3), np.float32),
                                                             np.zeros((2, 5), np.int32))
    assert logits.shape == (0, 2)
