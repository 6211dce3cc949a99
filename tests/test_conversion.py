"""Every checkpoint source through the one loader, the converted folder round trip, and bad input."""
import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from tclip_jax.checkpoints import folder as checkpoint
from tclip_jax.cli import main as tclip
from tclip_jax.checkpoints.load import load_clip
from tclip_jax.model import CLIPConfig, to_hf_config
from tclip_jax.checkpoints.convert import ConversionError

SMALL = CLIPConfig(embed_dim=32, image_size=64, patch_size=32, vision_width=64, vision_layers=2, vision_heads=1,
                   vision_mlp_dim=256, vocab_size=49408, context_length=77, text_width=64, text_layers=2,
                   text_heads=1, text_mlp_dim=256)


@pytest.fixture(scope="module")
def openai_state_dict(fixture_npz):
    return fixture_npz("tiny_openai_clip.npz")  # float16, as published


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    tokens = np.zeros((2, 77), np.int32)
    tokens[:, 0], tokens[0, 1:4], tokens[1, 1:3] = 49406, [320, 1746, 2442], [320, 2368]
    tokens[0, 4], tokens[1, 3] = 49407, 49407
    return rng.standard_normal((2, 224, 224, 3)).astype(np.float32), tokens


def outputs(clip, images, tokens):
    with jax.default_matmul_precision("highest"):
        image = clip.model.apply({"params": clip.params}, images, method="encode_image")
        text = clip.model.apply({"params": clip.params}, tokens, method="encode_text")
    return np.asarray(image.tokens), np.asarray(text.tokens)


@pytest.fixture(scope="module")
def reference(fixtures_dir, inputs):
    return outputs(load_clip(fixtures_dir / "tiny_openai_clip.npz"), *inputs)


def assert_same_model(clip, reference, inputs):
    for ours, expected in zip(outputs(clip, *inputs), reference):
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_openai_npz_safetensors_and_pt(tmp_path, openai_state_dict, reference, inputs):
    safetensors.numpy.save_file(openai_state_dict, tmp_path / "tiny.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in openai_state_dict.items()}, tmp_path / "tiny.pt")
    for name in ("tiny.safetensors", "tiny.pt"):
        clip = load_clip(tmp_path / name)
        assert clip.source == "openai" and clip.config.activation == "quick_gelu"
        assert_same_model(clip, reference, inputs)


def scripted_state_dict_module(state_dict):
    """A TorchScript archive holding `state_dict` under its dotted names, like OpenAI's released .pt files."""
    root = torch.nn.Module()
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(value), requires_grad=False))

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, child in root.named_children():
                self.add_module(name, child)
            for name, param in root.named_parameters(recurse=False):
                self.register_parameter(name, param)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    return torch.jit.script(Wrapper())


def test_openai_torchscript_archive(tmp_path, openai_state_dict, reference, inputs):
    scripted_state_dict_module(openai_state_dict).save(str(tmp_path / "ViT-tiny.pt"))
    assert_same_model(load_clip(tmp_path / "ViT-tiny.pt"), reference, inputs)


def test_open_clip_folder_reads_activation_and_heads(tmp_path, openai_state_dict, reference, inputs):
    safetensors.numpy.save_file(openai_state_dict, tmp_path / "open_clip_model.safetensors")
    config = {"model_cfg": {"embed_dim": 64, "quick_gelu": True,
                            "vision_cfg": {"width": 128, "layers": 6, "patch_size": 32, "image_size": 224},
                            "text_cfg": {"width": 128, "heads": 2, "layers": 3}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    clip = load_clip(tmp_path)
    assert clip.source == "open_clip" and clip.config.vision_heads == 2 and clip.config.text_heads == 2
    assert_same_model(clip, reference, inputs)
    config["model_cfg"]["quick_gelu"] = False  # OpenCLIP's own trainings use exact GELU
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    assert load_clip(tmp_path).config.activation == "gelu"


@pytest.mark.parametrize("safe", [True, False])
def test_hugging_face_folder_matches_transformers(tmp_path, safe):
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).eval()
    model.save_pretrained(tmp_path, safe_serialization=safe)
    clip = load_clip(tmp_path)
    assert clip.source == "hf" and clip.config == SMALL
    images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
    expected = getattr(expected, "pooler_output", expected)
    with jax.default_matmul_precision("highest"):
        ours = clip.model.apply({"params": clip.params}, images, method="encode_image").embeds
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-4, rtol=0)


def test_convert_command_round_trip(tmp_path, fixtures_dir, reference, inputs, capsys):
    out = tmp_path / "converted"
    assert tclip(["convert", str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    clip = load_clip(out)
    assert clip.source == "tclip"
    for ours, expected in zip(outputs(clip, *inputs), reference):
        np.testing.assert_array_equal(ours, expected)  # float32 storage: bit-identical
    # An existing folder is not replaced unless asked.
    assert tclip(["convert", str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_compressed_float16_checkpoint(tmp_path, fixtures_dir, reference, inputs):
    clip = load_clip(fixtures_dir / "tiny_openai_clip.npz")  # weights are float16-exact already
    folder = checkpoint.save_checkpoint(tmp_path / "fp16", clip.params, clip.config,
                                        storage_dtype=np.float16, compressed=True)
    assert (folder / "params.npz").is_file()
    for ours, expected in zip(outputs(load_clip(folder), *inputs), reference):
        np.testing.assert_array_equal(ours, expected)


def test_jit_and_vmap(fixtures_dir, inputs):
    clip = load_clip(fixtures_dir / "tiny_openai_clip.npz")
    images, _ = inputs

    def embed(x):
        return clip.model.apply({"params": clip.params}, x, method="encode_image").tokens

    with jax.default_matmul_precision("highest"):
        eager = embed(images)
        np.testing.assert_allclose(jax.jit(embed)(images), eager, atol=1e-5, rtol=0)
        stacked = np.stack([images, images[::-1]])  # an extra leading axis, like translated copies
        looped = np.stack([embed(x) for x in stacked])
        np.testing.assert_allclose(jax.vmap(embed)(stacked), looped, atol=1e-5, rtol=0)


# Bad input: every error names the problem.

def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no_such_model.pt"):
        load_clip("no_such_model.pt")


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_truncated_file(tmp_path, openai_state_dict, suffix):
    full = tmp_path / f"full{suffix}"
    if suffix == ".npz":
        np.savez(full, **openai_state_dict)
    elif suffix == ".safetensors":
        safetensors.numpy.save_file(openai_state_dict, full)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in openai_state_dict.items()}, full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ConversionError, match="cut"):
        load_clip(cut)


def test_resnet_checkpoint(tmp_path):
    np.savez(tmp_path / "rn50.npz", **{"visual.layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32),
                                       "visual.attnpool.c_proj.weight": np.zeros((8, 8), np.float32)})
    with pytest.raises(ConversionError, match="TCLIP needs a ViT CLIP"):
        load_clip(tmp_path / "rn50.npz")


def test_wrong_shapes_and_unexpected_keys_listed_together(tmp_path, openai_state_dict):
    broken = dict(openai_state_dict)
    broken["visual.proj"] = np.zeros((128, 65), np.float16)
    broken["visual.extra_head.weight"] = np.zeros(3, np.float16)
    del broken["visual.ln_post.bias"]
    np.savez(tmp_path / "broken.npz", **broken)
    with pytest.raises(ConversionError) as error:
        load_clip(tmp_path / "broken.npz")
    message = str(error.value)
    assert "missing key: visual.ln_post.bias" in message
    assert "unexpected key: visual.extra_head.weight" in message
    assert "shape mismatch" in message and "visual.proj" in message


def test_nan_weights(tmp_path, openai_state_dict):
    poisoned = dict(openai_state_dict)
    poisoned["visual.transformer.resblocks.2.mlp.c_fc.weight"] = np.full((512, 128), np.nan, np.float16)
    np.savez(tmp_path / "nan.npz", **poisoned)
    with pytest.raises(ConversionError, match="non-finite.*block_2/fc/kernel"):
        load_clip(tmp_path / "nan.npz")


def test_unknown_hub_name_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match="nobody/no-such-clip.*huggingface-cli download"):
        load_clip("nobody/no-such-clip")


def test_hugging_face_weights_without_config(tmp_path):
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL)))
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match="needs its config.json"):
        load_clip(tmp_path / "hf" / "model.safetensors")


def test_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CLIP checkpoint folder"):
        load_clip(tmp_path)


def test_corrupt_converted_checkpoint(tmp_path, fixtures_dir):
    out = tmp_path / "converted"
    assert tclip(["convert", str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(out)]) == 0
    params = out / "params.safetensors"
    params.write_bytes(params.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        load_clip(out)
