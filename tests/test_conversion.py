"""Every checkpoint source through the one loader, the converted folder round trip, and bad input."""
import dataclasses
import json
import pathlib
import pickle
import re
import shutil
import warnings

import huggingface_hub
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from references import first_fingerprint
from test_model_parity import hf_model
from tclip_jax.checkpoints import folder as checkpoint
from tclip_jax.cli import main as tclip
from tclip_jax.checkpoints.load import load_clip, weights_fingerprint
from tclip_jax.image import INPUT_PROTOCOLS, prepare
from tclip_jax.methods import METHODS
from tclip_jax.model import CLIPConfig, to_hf_config
from tclip_jax.checkpoints.convert import ConversionError

# OpenAI CLIP's pixel normalization, as its clip.py `_transform` spells it.
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
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


class QuickGELU(torch.nn.Module):  # OpenAI's clip/model.py's, by name: an archive's class names the activation
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def scripted_state_dict_module(state_dict, activation=QuickGELU):
    """A TorchScript archive holding `state_dict` under its dotted names, like OpenAI's released .pt files, with an
    `activation` module (a class; None: none) as each MLP's `gelu`, where OpenAI's and OpenCLIP's blocks hold it."""
    root = torch.nn.Module()
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
                if part == "mlp" and activation is not None:
                    getattr(module, part).add_module("gelu", activation())
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

    with warnings.catch_warnings():  # torch 2.13 deprecates scripting; OpenAI's releases are such archives
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(Wrapper())


def test_openai_torchscript_archive(tmp_path, openai_state_dict, reference, inputs):
    scripted_state_dict_module(openai_state_dict).save(str(tmp_path / "ViT-tiny.pt"))
    assert_same_model(load_clip(tmp_path / "ViT-tiny.pt"), reference, inputs)


def test_a_torchscript_archives_activation_is_the_class_of_its_mlp_activation_modules(tmp_path, openai_state_dict,
                                                                                       capsys):
    """Every archive was read as QuickGELU; one whose MLPs hold torch's GELU (what OpenCLIP scripts of its GELU
    models) is GELU, one that names neither gets the bare state dict's stated assumption, and an --activation
    that contradicts the archive's is refused."""
    for activation, expected in ((QuickGELU, "quick_gelu"), (torch.nn.GELU, "gelu"), (None, None)):
        path = tmp_path / f"{expected}.pt"
        scripted_state_dict_module(openai_state_dict, activation).save(str(path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clip = load_clip(path)
        assumed = [str(w.message) for w in caught if "does not say its MLP activation" in str(w.message)]
        assert clip.config.activation == (expected or "quick_gelu") and bool(assumed) == (expected is None), assumed
    assert tclip(["convert", str(tmp_path / "gelu.pt"), "--activation", "quick_gelu", "--out",
                  str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"tclip convert: error: {tmp_path / 'gelu.pt'} says the MLP activation is gelu; "
                                       "--activation quick_gelu (activation='quick_gelu') is for state dicts that do "
                                       "not say theirs\n")
    # torch's GELU with the tanh approximation is a GELU class too: read as exact GELU, its maps would be silently off
    scripted_state_dict_module(openai_state_dict, lambda: torch.nn.GELU(approximate="tanh")).save(
        str(tmp_path / "tanh.pt"))
    assert tclip(["convert", str(tmp_path / "tanh.pt"), "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "computes GELU with approximate='tanh'" in message and message.count("\n") == 1, message


class _Block(torch.nn.Module):  # the module kinds of OpenAI's CLIP: attention, layer norm, linear layers
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2)
        self.ln_1 = torch.nn.LayerNorm(8).half()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        self.register_buffer("counts", torch.arange(3))
        self.attn_mask = torch.full((4, 4), float("-inf")).triu(1)  # a plain attribute: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.attn_mask.sum()


class _Archive(torch.nn.Module):
    def __init__(self, write_to: str):
        super().__init__()
        self.blocks = torch.nn.Sequential(_Block(), _Block())
        self.proj = torch.nn.Parameter(torch.randn(8, 6).t())              # stored transposed (strided)
        self.scale = torch.nn.Parameter(torch.randn(5).to(torch.bfloat16))
        self.bias = torch.nn.Parameter(torch.randn(10)[2:7])              # a view at an offset of its storage
        self.hook = _WritesAFileWhenLoaded(write_to)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook(self.blocks(x))


class _WritesAFileWhenLoaded(torch.nn.Module):
    """Code an archive runs under torch.jit.load: its TorchScript __setstate__ writes a file."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.x = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return self.x, self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.path, self.training = state[1], state[2]
        written = torch.from_file(self.path, True, 2, dtype=torch.uint8)
        written.copy_(torch.tensor([72, 73], dtype=torch.uint8))
        self.x = written.float()  # used, or TorchScript drops the write as dead code


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # the reference archives are torch.jit's
def test_torchscript_archives_are_read_without_running_their_code(tmp_path):
    from tclip_jax.checkpoints.sources import read_state_dict

    torch.manual_seed(0)
    marker = tmp_path / "written_by_the_archive"
    torch.jit.script(_Archive(str(marker))).save(str(tmp_path / "archive.pt"))
    state = read_state_dict(tmp_path / "archive.pt")
    assert not marker.exists()  # nothing of the archive ran
    assert state.torchscript and state.stored_dtypes == {"float32", "float16", "bfloat16"}
    expected = torch.jit.load(str(tmp_path / "archive.pt")).state_dict()  # the reference; it runs the code
    assert marker.read_bytes() == b"HI"
    assert list(state.arrays) == list(expected)  # parameters and buffers, not plain attributes, in their order
    for name, tensor in expected.items():
        reference = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
        np.testing.assert_array_equal(state.arrays[name], reference, err_msg=name)
    assert state.arrays["blocks.0.counts"].dtype == np.int64
    # OpenAI's releases were traced, not scripted: the same reading.
    traced = torch.nn.Sequential(_Block(), _Block()).eval()
    torch.jit.trace(traced, torch.randn(3, 8)).save(str(tmp_path / "traced.pt"))
    state = read_state_dict(tmp_path / "traced.pt")
    expected = torch.jit.load(str(tmp_path / "traced.pt")).state_dict()
    assert list(state.arrays) == list(expected) == list(traced.state_dict())
    for name, tensor in expected.items():
        np.testing.assert_array_equal(state.arrays[name], tensor.float().numpy() if tensor.is_floating_point()
                                      else tensor.numpy(), err_msg=name)


class _Expanded(torch.nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.register_buffer("grid", torch.arange(4.0).expand(rows, 1024, 4))  # 4 values, strides 0: rows*4096
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.grid.sum()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_a_damaged_or_hostile_torchscript_archive_is_refused_by_name(tmp_path):
    import zipfile

    from tclip_jax.checkpoints.sources import read_state_dict

    torch.jit.script(_Expanded(2)).save(str(tmp_path / "small.pt"))  # an expanded buffer of a checkpoint's size
    np.testing.assert_array_equal(read_state_dict(tmp_path / "small.pt").arrays["grid"],
                                  torch.arange(4.0).expand(2, 1024, 4).numpy())
    torch.jit.script(_Expanded(1024)).save(str(tmp_path / "bomb.pt"))  # 16 bytes that copy out to 16 MiB
    with pytest.raises(ConversionError, match="repeats its storage of 4 values"):
        read_state_dict(tmp_path / "bomb.pt")
    # A class whose definition is missing from code/ (torch.jit.load refuses it too), or declares no name list.
    with zipfile.ZipFile(tmp_path / "small.pt") as source:
        records = {name: source.read(name) for name in source.namelist()}
    # Linear's definition (its file is mangled, linear/___torch_mangle_N.py, once another test scripted one)
    linear = next(name for name, data in records.items() if name.endswith(".py") and b"class Linear(" in data)
    for name, changed, message in [
            ("no_class.pt", {linear: None}, r"no class definition of __torch__\.torch\.nn\.modules\.linear\..*Linear"),
            ("bad_names.pt", {linear: records[linear].replace(b'__parameters__ = ["weight", "bias", ]',
                                                              b'__parameters__ = "weight"')},
             "Linear.__parameters__ is not a list of names")]:
        with zipfile.ZipFile(tmp_path / name, "w") as target:
            for record, data in {**records, **changed}.items():
                if data is not None:
                    target.writestr(record, data)
        with pytest.raises(ConversionError, match=message):
            read_state_dict(tmp_path / name)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_a_storage_that_unpacks_to_more_than_its_tensor_needs_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A TorchScript archive's storage entry deflated from far more zeros than its values need (1 GiB from 1 MiB
    would do) was read whole into memory before any check: its declared size is checked first."""
    import zipfile

    from tclip_jax.checkpoints.sources import read_state_dict

    torch.jit.script(_Expanded(2)).save(str(tmp_path / "small.pt"))
    with zipfile.ZipFile(tmp_path / "small.pt") as source, zipfile.ZipFile(tmp_path / "bomb.pt", "w") as target:
        storage = next(name for name in source.namelist() if name.endswith("/data/0"))
        for name in source.namelist():
            data = source.read(name)
            if name == storage:
                expected = len(data)
                data += bytes(8 << 20)
            target.writestr(name, data, zipfile.ZIP_DEFLATED if name == storage else zipfile.ZIP_STORED)
    read = []
    real_read = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda archive, name, *args: read.append(
        getattr(name, "filename", name)) or real_read(archive, name, *args))
    with pytest.raises(ConversionError, match=re.escape(f"{tmp_path / 'bomb.pt'}: storage 0 unpacks to "
                                                        f"{expected + (8 << 20)} bytes, more than the {expected} "
                                                        "bytes of its")):
        read_state_dict(tmp_path / "bomb.pt")
    assert storage not in read


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("record", ["data.pkl", "byteorder", "code/"])
def test_a_record_beside_the_storages_that_unpacks_to_too_much_is_refused_before_it_is_read(record, tmp_path,
                                                                                          monkeypatch):
    """The pickle, the byte order and the class definitions are read (or unpickled) whole: a deflated one that
    unpacks past the limit is refused by its declared size, as a storage is (the limit lowered here so that the
    test's records stay small)."""
    import zipfile

    from tclip_jax.checkpoints import torchscript
    from tclip_jax.checkpoints.sources import read_state_dict

    torch.jit.script(_Expanded(2)).save(str(tmp_path / "small.pt"))
    with zipfile.ZipFile(tmp_path / "small.pt") as source:
        records = {name: source.read(name) for name in source.namelist()}
    prefix = next(name for name in records if name.endswith("/data.pkl")).rsplit("/", 1)[0]
    target = next(name for name in records if name.startswith(f"{prefix}/{record}") and
                  (record != "code/" or name.endswith(".py")))
    limit = max(len(data) for data in records.values())
    monkeypatch.setattr(torchscript, "_MAX_RECORD_BYTES", limit)
    read_state_dict(tmp_path / "small.pt")  # every record within the limit: read as before
    padding = b" " * (limit + 1) if record != "data.pkl" else b"."  # a pickle ends at its STOP: what follows is junk
    with zipfile.ZipFile(tmp_path / "bomb.pt", "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data + padding * (name == target), zipfile.ZIP_DEFLATED)
    if record == "data.pkl":  # padded past the limit
        monkeypatch.setattr(torchscript, "_MAX_RECORD_BYTES", len(records[target]))
    read, real_read, real_open = [], zipfile.ZipFile.read, zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda archive, name, *args: read.append(
        getattr(name, "filename", name)) or real_read(archive, name, *args))
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda archive, name, *args, **kwargs: read.append(
        getattr(name, "filename", name)) or real_open(archive, name, *args, **kwargs))
    with pytest.raises(ConversionError, match=re.escape(f"{tmp_path / 'bomb.pt'}: {target} unpacks to ") +
                       r"\d+ bytes, far more than such a record of a model holds; it is not read"):
        read_state_dict(tmp_path / "bomb.pt")
    assert target not in read


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


def save_hugging_face(model, folder, weights):
    """`model` as a Hugging Face folder whose weights are `weights`: one file, or a shard index and its shards."""
    largest_shard = "4MB" if weights.endswith(".index.json") else "5GB"  # the token embedding alone is 12.6 MB
    model.save_pretrained(folder, max_shard_size=largest_shard)
    if weights.startswith("pytorch_model"):  # transformers 5 always writes safetensors, so .bin folders are written
        for path in folder.glob("model*.safetensors*"):  # by torch, as its older releases wrote (and split) them
            path.unlink()
        state = model.state_dict()
        split = huggingface_hub.split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                                                   max_shard_size=largest_shard)
        for filename, names in split.filename_to_tensors.items():
            torch.save({name: state[name] for name in names}, folder / filename)
        if split.is_sharded:
            (folder / weights).write_text(json.dumps({"metadata": split.metadata,
                                                      "weight_map": split.tensor_to_filename}))
    return folder


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                                     "pytorch_model.bin.index.json"])
def test_hugging_face_folder_matches_transformers(tmp_path, inputs, weights):
    model = hf_model(SMALL)  # biases, norms and logit_scale perturbed: every rule of the table moves the output
    save_hugging_face(model, tmp_path, weights)
    shards = [p.name for p in tmp_path.glob("*-of-*")]
    assert sorted(p.name for p in tmp_path.glob("*model*")) == sorted([weights, *shards])
    assert (len(shards) > 1) == weights.endswith(".index.json")
    clip = load_clip(tmp_path)
    assert clip.source == "hf" and clip.config == SMALL
    images = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    tokens = inputs[1]
    with torch.no_grad():
        expected_image = model.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
        expected_text = model.get_text_features(input_ids=torch.from_numpy(tokens).long())
    with jax.default_matmul_precision("highest"):
        ours_image = clip.model.apply({"params": clip.params}, images, method="encode_image").embeds
        ours_text = clip.model.apply({"params": clip.params}, tokens, method="encode_text").embeds
    for ours, expected in [(ours_image, expected_image), (ours_text, expected_text)]:
        np.testing.assert_allclose(ours, getattr(expected, "pooler_output", expected).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("weights", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_a_sharded_hub_repository_is_downloaded_whole_and_alone(tmp_path, monkeypatch, weights):
    """The shards loading reads are fetched, and not the other layouts a repository ships (LAION's hold
    safetensors and .bin shards and OpenCLIP's file, each gigabytes); offline, the local cache is read."""
    import fnmatch

    torch.manual_seed(0)
    repository = save_hugging_face(transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))),
                                   tmp_path / "repository", weights)
    read = sorted(p.name for p in repository.iterdir())
    others = ["open_clip_pytorch_model.bin", "pytorch_model-00001-of-00009.bin" if weights.startswith("model")
              else "model-00001-of-00009.safetensors"]
    for name in others:  # another layout's weights, never read here
        (repository / name).write_bytes(b"not fetched")
    fetched = tmp_path / "snapshot"

    def snapshot_download(repo_id, allow_patterns, local_files_only=False, **_):  # the hub's: the matching files
        assert repo_id == "someone/sharded-clip"
        if not local_files_only:
            fetched.mkdir()
            for path in repository.iterdir():
                if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                    shutil.copy(path, fetched)
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id: [p.name for p in repository.iterdir()])
    downloaded = load_clip("someone/sharded-clip")
    assert sorted(p.name for p in fetched.iterdir()) == read
    direct = load_clip(repository)
    for ours, expected in zip(jax.tree_util.tree_leaves(downloaded.params), jax.tree_util.tree_leaves(direct.params)):
        np.testing.assert_array_equal(ours, expected)

    def offline(repo_id):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    assert load_clip("someone/sharded-clip").config == SMALL  # what the cache holds


@pytest.mark.parametrize("weights", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_a_shard_index_that_does_not_fit_its_shards_is_refused(tmp_path, weights, capsys):
    torch.manual_seed(0)
    folder = save_hugging_face(transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))),
                               tmp_path / "hf", weights)
    index = json.loads((folder / weights).read_text())
    first = next(iter(index["weight_map"].items()))
    other = next(item for item in index["weight_map"].items() if item[1] != first[1])  # a tensor of another shard
    shutil.copy(folder / first[1], tmp_path / "outside")  # there, but not in the folder
    for weight_map, message in [
            ({**index["weight_map"], first[0]: "../outside"}, "names shard '../outside', which is not a file name in "
                                                              "its folder"),
            ({**index["weight_map"], first[0]: str(tmp_path / "outside")}, "which is not a file name in its folder"),
            ({**index["weight_map"], first[0]: "gone.bin"}, f"names shard gone.bin, which is missing from {folder}"),
            ({**index["weight_map"], first[0]: other[1]}, f"places tensor {first[0]} in shard {other[1]}, which does "
                                                         "not hold it"),
            ({**index["weight_map"], first[0]: other[1], other[0]: first[1]}, f"places tensor {first[0]} in shard"),
            ({}, "has no weight_map")]:
        (folder / weights).write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(ConversionError, match=re.escape(message)):
            load_clip(folder)
        capsys.readouterr()
        assert tclip(["convert", str(folder), "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"tclip convert: error: {folder / weights}") and error.count("\n") == 1
        assert not (tmp_path / "out").exists()


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
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err


def test_converting_a_converted_folder_keeps_where_its_weights_came_from(tmp_path, fixtures_dir, reference, inputs):
    from tclip_jax.checkpoints.load import DEFAULT_MODEL_DIR

    source = fixtures_dir / "tiny_openai_clip.npz"
    assert tclip(["convert", str(source), "--out", str(tmp_path / "once")]) == 0
    assert tclip(["convert", str(tmp_path / "once"), "--out", str(tmp_path / "twice"), "--float16"]) == 0
    header = json.loads((tmp_path / "twice" / "tclip_config.json").read_text())
    assert header["source"] == "openai" and header["origin"] == str(source)  # not "tclip" and the folder "once"
    assert_same_model(load_clip(tmp_path / "twice"), reference, inputs)  # the weights are float16-exact
    # The embedded model records how it was trained, not a source: that record is kept, its folder is the origin.
    assert tclip(["convert", str(DEFAULT_MODEL_DIR), "--out", str(tmp_path / "default")]) == 0
    header = json.loads((tmp_path / "default" / "tclip_config.json").read_text())
    trained = json.loads((DEFAULT_MODEL_DIR / "tclip_config.json").read_text())["training"]
    assert header["training"] == trained and (header["source"], header["origin"]) == ("tclip", str(DEFAULT_MODEL_DIR))


def test_convert_refuses_what_loading_its_folder_would_refuse(tmp_path, fixtures_dir, openai_state_dict,
                                                             monkeypatch, capsys):
    too_big = {**openai_state_dict, "ln_final.bias": np.full(128, 1e5, np.float32)}  # beyond float16's 65504
    np.savez(tmp_path / "too_big.npz", **too_big)
    small = {**openai_state_dict, "token_embedding.weight": openai_state_dict["token_embedding.weight"][:1000]}
    np.savez(tmp_path / "small_vocab.npz", **small)
    for source, extra, message in [("too_big.npz", ["--float16"], "text/ln_final/bias: values beyond float16's range"),
                                   ("small_vocab.npz", [], "token embedding only 1000 rows")]:
        assert tclip(["convert", str(tmp_path / source), "--out", str(tmp_path / "out"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert tclip(["convert", str(tmp_path / "too_big.npz"), "--out", str(tmp_path / "out")]) == 0  # float32 holds it
    # A folder holding the current one cannot be replaced: refused before anything is read or moved.
    monkeypatch.chdir(tmp_path / "out")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert tclip(["convert", str(fixtures_dir / "tiny_openai_clip.npz"), "--out", ".", "--overwrite"]) == 2
    assert ". holds the current folder, which cannot be replaced" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and load_clip(tmp_path / "out")


def test_a_hub_folders_own_tokenizer_is_used_and_only_its_files_are_kept(tmp_path):
    from tclip_jax.model.tokenizer import ClipTokenizer, _load_packaged_backend, default_tokenizer

    torch.manual_seed(0)
    hub = tmp_path / "hub"
    transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).eval().save_pretrained(hub)
    # transformers 5 saves tokenizer.json alone: here one whose "red" and "blue" swap ids
    packaged = json.loads(_load_packaged_backend().to_str())
    vocab = packaged["model"]["vocab"]
    vocab["red</w>"], vocab["blue</w>"] = vocab["blue</w>"], vocab["red</w>"]
    (hub / "tokenizer.json").write_text(json.dumps(packaged))
    red = default_tokenizer().encode("red")[0][1]
    blue = default_tokenizer().encode("blue")[0][1]
    assert load_clip(hub).tokenizer.encode("red")[0][1] == blue != red
    assert tclip(["convert", str(hub), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "tokenizer").iterdir()) == ["tokenizer.json"]  # no weights
    assert load_clip(tmp_path / "out").tokenizer.encode("red")[0][1] == blue
    assert ClipTokenizer(tmp_path / "out" / "tokenizer").encode("blue")[0][1] == red


@pytest.mark.parametrize("kept, missing", [("vocab.json", "merges.txt"), ("merges.txt", "vocab.json")])
def test_a_folder_with_half_a_tokenizer_is_refused_naming_the_missing_file(tmp_path, capsys, kept, missing):
    """Its own vocab.json (two ids swapped) without merges.txt, or the reverse, was read as no tokenizer: the packaged
    vocabulary stood in for it, and convert wrote no tokenizer/. transformers' CLIPTokenizer refuses such a folder."""
    from tclip_jax.model.tokenizer import _load_packaged_backend

    torch.manual_seed(0)
    hub = tmp_path / "hub"
    transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).eval().save_pretrained(hub)
    packaged = json.loads(_load_packaged_backend().to_str())["model"]
    vocab = packaged["vocab"]
    vocab["red</w>"], vocab["blue</w>"] = vocab["blue</w>"], vocab["red</w>"]
    files = {"vocab.json": json.dumps(vocab),
             "merges.txt": "\n".join(["#version: 0.2", *(" ".join(m) if isinstance(m, list) else m
                                                          for m in packaged["merges"])])}
    (hub / kept).write_text(files[kept])
    (hub / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    with pytest.raises(ValueError):
        transformers.CLIPTokenizer.from_pretrained(hub)
    with pytest.raises(ValueError, match=f"has {kept} but no {missing}"):
        load_clip(hub)
    capsys.readouterr()
    assert tclip(["convert", str(hub), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"tclip convert: error: tokenizer in {hub} has {kept} but no {missing} (a "
                                       "tokenizer is tokenizer.json, or vocab.json + merges.txt)\n")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    (hub / missing).write_text(files[missing])  # the pair: the folder's own vocabulary
    assert load_clip(hub).tokenizer.encode("red")[0][1] == _load_packaged_backend().token_to_id("blue</w>")


def test_a_folder_with_a_tokenizer_config_and_no_tokenizer_files_is_refused(tmp_path):
    """tokenizer_config.json (a partial download) without tokenizer.json or vocab.json + merges.txt: transformers
    builds a tokenizer of its two special tokens from it; it was read as no tokenizer and the packaged vocabulary stood in. A folder with no tokenizer
    file at all (a model saved alone) still takes the packaged one."""
    torch.manual_seed(0)
    hub = tmp_path / "hub"
    transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).eval().save_pretrained(hub)
    load_clip(hub)
    (hub / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    assert len(transformers.CLIPTokenizer.from_pretrained(hub)) < 49408  # transformers makes no vocabulary of it
    with pytest.raises(ValueError, match="has tokenizer_config.json but neither tokenizer.json nor vocab.json"):
        load_clip(hub)


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


def test_a_model_folder_whose_save_was_killed_mid_swap_is_not_found_with_where_its_previous_copy_waits(
        tmp_path, tiny_model, monkeypatch, capsys):
    """SIGKILL between the save's two renames leaves the folder missing and the previous one hidden beside it (put
    back by the next save): loading it in between says so and where, rather than that the model never was."""
    model, params = tiny_model
    target = tmp_path / "models" / "v3"
    checkpoint.save_checkpoint(target, params, model.config)
    rename = pathlib.Path.rename

    class Killed(BaseException):
        pass

    def killed_at_second_rename(self, new):
        if pathlib.Path(new) == target:
            raise Killed()
        return rename(self, new)

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "rename", killed_at_second_rename)
        with pytest.raises(Killed):
            checkpoint.save_checkpoint(target, params, model.config, overwrite=True)
    assert not target.exists()
    (waiting,) = tmp_path.glob("models/.v3.*.old.*/v3")
    with pytest.raises(FileNotFoundError, match=f"killed.*{re.escape(str(waiting))}"):
        load_clip(target)
    capsys.readouterr()
    assert tclip(["explain", str(tmp_path / "none.png"), "--prompt", "red", "--model", str(target)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(waiting) in error and "Traceback" not in error
    assert checkpoint.load_checkpoint(waiting)[1] == model.config  # the previous copy is whole
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a file, a folder nor a hub name"):
        load_clip(tmp_path / "elsewhere" / "v3")  # a missing folder with no copy waiting: as before


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


def _edit_safetensors(source, target, edit, extra=b""):
    """`source` written as `target` with its header changed by `edit(header, data_length)` and `extra` bytes added
    after its data."""
    data = source.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + size]), data[8 + size:]
    edit(header, len(body))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(len(text).to_bytes(8, "little") + text + body + extra)


def _offsets(header, name, start, end):
    header[name]["data_offsets"] = [start, end]


@pytest.mark.parametrize("edit, extra, message", [
    # visual.proj reads text_projection's bytes (same shape): it loaded as a copy of it.
    (lambda h, n: _offsets(h, "visual.proj", *h["text_projection"]["data_offsets"]), b"",
     "tensor '(visual.proj|text_projection)' starts at byte \\d+ of the data, not at \\d+ where the tensor before it "
     "ends \\(tensors overlap or leave a gap\\)"),
    (lambda h, n: _offsets(h, "visual.proj", *(x - n for x in h["text_projection"]["data_offsets"])), b"",
     "tensor 'visual.proj' has shape \\[128, 64\\] and data_offsets \\[-\\d+, -\\d+\\]; each must be a non-negative "
     "integer"),
    (lambda h, n: _offsets(h, "visual.proj", n - 4, n + 32764), b"",
     "tensor 'visual.proj' has data_offsets \\[\\d+, \\d+\\], outside the \\d+ bytes of data"),
    (lambda h, n: h["visual.proj"].update(shape=[128, 63]), b"", "tensor 'visual.proj' has 32768 bytes of data, but "
                                                                 "its shape \\[128, 63\\] of F32 takes 32256"),
    (lambda h, n: None, b"\0" * 8, "its tensors end at byte \\d+ of the \\d+ bytes of data")])
def test_safetensors_whose_tensors_do_not_tile_the_data_are_refused(tmp_path, openai_state_dict, edit, extra,
                                                                    message, capsys):
    """Offsets were sliced as given: negative or shared ones gave a tensor another's bytes, silently. The safetensors
    library refuses each of these files; so does tclip, in one line naming the tensor."""
    state = {k: v.astype(np.float32) for k, v in openai_state_dict.items()}
    assert state["visual.proj"].shape == state["text_projection"].shape == (128, 64)
    safetensors.numpy.save_file(state, tmp_path / "good.safetensors")
    _edit_safetensors(tmp_path / "good.safetensors", tmp_path / "bad.safetensors", edit, extra)
    with pytest.raises(Exception):  # the reference: the format's own library
        safetensors.numpy.load_file(tmp_path / "bad.safetensors")
    assert tclip(["convert", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(f"error: {re.escape(str(tmp_path / 'bad.safetensors'))}: {message}",
                                                error), error


class _RunsCode:
    """Pickles as a call of os.system, as a hostile checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_files_that_hold_more_than_arrays_are_refused_in_our_words(tmp_path, openai_state_dict, capsys):
    """torch's and numpy's errors for a file that holds more than arrays advise loading it "unsafely" (running the
    code it holds) and were shown as "truncated or corrupt?": tclip never unpickles more than arrays, and says so in
    one line naming the file (and what a pickle asks to load). OpenAI's TorchScript reader refuses in such words."""
    import pickle
    import zipfile

    marker = tmp_path / "code_ran"
    tensors = {k: torch.from_numpy(v) for k, v in openai_state_dict.items()}
    torch.save({**tensors, "hook": _RunsCode(marker)}, tmp_path / "hostile.pt")
    (tmp_path / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "error_page.pt").write_text("<html><body>404 Not Found</body></html>\n")  # a failed download
    np.savez(tmp_path / "objects.npz", x=np.array([_RunsCode(marker)], dtype=object))
    (tmp_path / "garbage.npz").write_bytes(np.random.default_rng(0).bytes(1000))
    with zipfile.ZipFile(tmp_path / "hostile.pt") as source, \
            zipfile.ZipFile(tmp_path / "hostile_archive.pt", "w") as target:  # constants.pkl: read as TorchScript
        for name in source.namelist():
            target.writestr(name, source.read(name))
        target.writestr(f"{source.namelist()[0].split('/')[0]}/constants.pkl", pickle.dumps(()))
    capsys.readouterr()
    for name, message in [
            ("hostile.pt", "is not a weights-only PyTorch checkpoint (its pickle loads posix.system, which is neither "
                           "a tensor nor a plain container), and tclip never unpickles anything else"),
            ("garbage.pt", "is not a PyTorch checkpoint, no pickle of tensors (truncated or corrupt, or another kind "
                           "of file?)"),
            ("error_page.pt", "is not a PyTorch checkpoint, no pickle of tensors (truncated or corrupt, or another "
                              "kind of file?)"),
            ("objects.npz", ": array x holds pickled objects, and tclip never unpickles anything"),
            ("garbage.npz", "is neither an .npz archive nor an .npy array (numpy would read it as a pickle), and tclip "
                            "never unpickles anything"),
            ("hostile_archive.pt", "asks to run posix.system as it is read, which tclip never does (an archive of a "
                                   "model holds tensors and modules only)")]:
        assert tclip(["convert", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        separator = "" if message.startswith(":") else " "
        assert capsys.readouterr().err == f"tclip convert: error: {tmp_path / name}{separator}{message}\n"
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("name", ["tiny.npz", "tiny.safetensors", "tiny.pt", "archive.pt", "converted"])
def test_an_unreadable_checkpoint_is_not_called_truncated(tmp_path, fixtures_dir, openai_state_dict, monkeypatch,
                                                          name):
    """A file this process may not read was "truncated or corrupt?" (and safetensors calls it missing): its
    PermissionError is raised as it is. (Root may read any file, so open is replaced.)"""
    import builtins
    import errno
    import io
    import os
    import pathlib

    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, **openai_state_dict)
    elif name.endswith(".safetensors"):
        safetensors.numpy.save_file(openai_state_dict, path)
    elif name == "tiny.pt":
        torch.save({k: torch.from_numpy(v) for k, v in openai_state_dict.items()}, path)
    elif name == "archive.pt":
        torch.jit.script(_Expanded(2)).save(str(path))
    else:
        clip = load_clip(fixtures_dir / "tiny_openai_clip.npz")
        path = checkpoint.save_checkpoint(path, clip.params, clip.config) / "params.safetensors"
    real_open = builtins.open

    def unreadable(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and pathlib.Path(file) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", unreadable)
    monkeypatch.setattr(io, "open", unreadable)
    with pytest.raises(PermissionError, match=re.escape(f"Permission denied: '{path}'")):
        load_clip(tmp_path / name)


def test_a_safetensors_header_longer_than_its_file_is_named(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes((2**64 - 1).to_bytes(8, "little") + b"{}")
    with pytest.raises(ConversionError, match="header says 18446744073709551615 bytes, more than the file holds"):
        load_clip(tmp_path / "bad.safetensors")


def test_resnet_checkpoint(tmp_path):
    np.savez(tmp_path / "rn50.npz", **{"visual.layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32),
                                       "visual.attnpool.c_proj.weight": np.zeros((8, 8), np.float32)})
    with pytest.raises(ConversionError, match="TCLIP needs a ViT CLIP"):
        load_clip(tmp_path / "rn50.npz")


def test_a_file_that_is_no_clip_state_dict_is_named_with_what_it_is(tmp_path, fixtures_dir, openai_state_dict,
                                                                    capsys):
    """"not a CLIP ViT state dict" named no file; a converted folder's own weights file, and a state dict saved from
    a wrapper (every key prefixed `model.`), got that answer too."""
    said = {"other.npz": ": not a CLIP ViT state dict (neither OpenAI/OpenCLIP nor Hugging Face key names); first "
                         "keys: weight",
            "wrapped.npz": ": every key starts with 'model.', as a model wrapped in another module saves it; save the "
                           "CLIP's own state dict (its keys without 'model.')",
            "converted/params.safetensors": f" holds the weights of a converted tclip_jax folder: pass its folder, "
                                            f"{tmp_path / 'converted'}"}
    np.savez(tmp_path / "other.npz", weight=np.zeros(3, np.float32))
    np.savez(tmp_path / "wrapped.npz", **{f"model.{k}": v for k, v in openai_state_dict.items()})
    assert tclip(["convert", str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(tmp_path / "converted")]) == 0
    capsys.readouterr()
    for name, message in said.items():
        assert tclip(["convert", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == f"tclip convert: error: {tmp_path / name}{message}\n"


def test_a_legacy_pickle_of_another_protocol_is_refused_in_our_words_alone(tmp_path, openai_state_dict, reference,
                                                                             inputs, capsys):
    """torch's weights-only reader cannot read a legacy (pre-zip) torch.save pickle of protocol 4, and warned of its
    protocol to stderr before the refusal, which called it "not a PyTorch checkpoint". Protocol 2, torch's own,
    loads."""
    tensors = {k: torch.from_numpy(v) for k, v in openai_state_dict.items()}
    torch.save(tensors, tmp_path / "legacy4.pt", _use_new_zipfile_serialization=False, pickle_protocol=4)
    torch.save(tensors, tmp_path / "legacy2.pt", _use_new_zipfile_serialization=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tclip(["convert", str(tmp_path / "legacy4.pt"), "--out", str(tmp_path / "out")]) == 2
    assert [str(w.message) for w in caught if "pickle protocol" in str(w.message)] == []
    assert capsys.readouterr().err == (f"tclip convert: error: {tmp_path / 'legacy4.pt'} is a PyTorch pickle of "
                                       "protocol 4 (torch.save's legacy format), which torch's weights-only reader "
                                       "does not read: save it again in torch.save's default format, or as "
                                       "safetensors\n")
    assert_same_model(load_clip(tmp_path / "legacy2.pt"), reference, inputs)


@pytest.mark.parametrize("protocol", [4, 5])  # 3: the weights-only reader reads it and names what it loads
def test_a_plain_python_pickle_is_not_called_torch_saves_legacy_format(tmp_path, openai_state_dict, capsys, protocol):
    """Any pickle of protocol 3 to 5 that torch's weights-only reader could not read was called "torch.save's legacy
    format"; only torch.save's legacy files start with torch's magic number (torch.serialization.MAGIC_NUMBER). A
    pickle.dump of numpy arrays, or of an object that would run code, is a Python pickle, still never unpickled."""
    marker = tmp_path / "ran"
    with open(tmp_path / "arrays.pt", "wb") as file:
        pickle.dump(dict(openai_state_dict), file, protocol=protocol)
    with open(tmp_path / "code.pt", "wb") as file:
        pickle.dump({"a": _RunsCode(marker)}, file, protocol=protocol)
    for name in ("arrays.pt", "code.pt"):
        assert tclip(["convert", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == (f"tclip convert: error: {tmp_path / name} is a Python pickle (protocol "
                                           f"{protocol}), not a PyTorch checkpoint, and tclip never unpickles one: "
                                           "save the weights as safetensors or .npz\n")
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.save({"a": torch.zeros(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False,
               pickle_protocol=protocol)
    assert tclip(["convert", str(tmp_path / "legacy.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "(torch.save's legacy format)" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["ln_final.weight", "visual.positional_embedding", "token_embedding.weight"])
def test_a_key_the_architecture_is_read_from_is_missed_naming_the_file_and_nothing_assumed(tmp_path, openai_state_dict,
                                                                                          capsys, key):
    """A state dict lacking a key whose shape gives the architecture was refused without naming the file (the README:
    missing keys are "reported at once, naming the checkpoint file"), after a warning that its MLP activation was
    assumed, for a file then refused."""
    safetensors.numpy.save_file({k: v for k, v in openai_state_dict.items() if k != key}, tmp_path / "cut.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tclip(["convert", str(tmp_path / "cut.safetensors"), "--out", str(tmp_path / "out")]) == 2
    assert [str(w.message) for w in caught] == []
    err = capsys.readouterr().err
    assert err.startswith(f"tclip convert: error: {tmp_path / 'cut.safetensors'}: ") and key in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


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


def test_keys_that_only_end_in_the_name_of_an_ignored_buffer_are_unexpected(tmp_path, openai_state_dict):
    """Any key ending in position_ids, context_length, vocab_size, input_resolution or attn_mask was skipped without
    a word. The buffers themselves, top-level (OpenAI's archives; OpenCLIP's CLIP.attn_mask) or a module's
    (transformers' embeddings.position_ids, test_a_hugging_face_state_dict_with_the_position_ids...), still are."""
    buffers = {"input_resolution": np.array(224), "context_length": np.array(77), "vocab_size": np.array(49408),
               "attn_mask": np.triu(np.full((77, 77), -np.inf, np.float32), 1),
               "visual.transformer.resblocks.0.attn_mask": np.zeros((50, 50), np.float32)}
    np.savez(tmp_path / "buffers.npz", **openai_state_dict, **buffers)
    load_clip(tmp_path / "buffers.npz", activation="quick_gelu")
    strays = {"my_position_ids": np.zeros(3, np.float32), "text_vocab_size": np.array(49408)}
    np.savez(tmp_path / "strays.npz", **openai_state_dict, **strays)
    with pytest.raises(ConversionError) as error:
        load_clip(tmp_path / "strays.npz", activation="quick_gelu")
    assert "(2 problems)" in str(error.value)
    assert all(f"unexpected key: {key}" in str(error.value) for key in strays)


@pytest.mark.parametrize("key, cut", [("visual.transformer.resblocks.1.attn.in_proj_weight", 383),
                                      ("transformer.resblocks.0.attn.in_proj_bias", None)])
def test_a_fused_in_proj_that_does_not_split_in_three_is_named_with_its_file(key, cut, tmp_path, openai_state_dict,
                                                                            capsys):
    """Rows not a multiple of 3, or none at all (a 0-d array: an IndexError, reported as an internal error)."""
    bad = openai_state_dict[key][:cut] if cut else np.float32(1.0)
    np.savez(tmp_path / "bad.npz", **{**openai_state_dict, key: bad})
    assert tclip(["convert", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"tclip convert: error: openai checkpoint {tmp_path / 'bad.npz'} does not fit "
                                       f"the CLIP config (1 problems): {key}: fused in_proj has shape {bad.shape}, "
                                       "whose rows are not a multiple of 3\n")


@pytest.mark.parametrize("change, message", [
    ("bfloat16", "tensor visual.proj holds raw 2-byte values without a numpy dtype (bfloat16 saved by np.savez loses "
                 "its dtype); save it as float32 or float16, or as safetensors"),
    ("complex", "tensor visual.proj holds complex values; a CLIP's weights are real"),
    ("prefixed twice", "tensor visual.proj is there twice, as visual.proj and module.visual.proj; keep one")])
def test_tensors_that_would_load_wrong_are_named_with_their_file(tmp_path, openai_state_dict, change, message,
                                                                 capsys):
    """numpy reads an ml_dtypes bfloat16 array np.savez wrote as raw bytes (void), which failed with "setting an
    array element with a sequence"; a complex tensor lost its imaginary part and a key with and without
    DataParallel's `module.` prefix kept whichever came later, both silently."""
    import ml_dtypes

    proj = openai_state_dict["visual.proj"].astype(np.float32)
    changed = {"bfloat16": {"visual.proj": proj.astype(ml_dtypes.bfloat16)},
               "complex": {"visual.proj": proj + 1j},
               "prefixed twice": {"module.visual.proj": 2 * proj}}[change]
    np.savez(tmp_path / "bad.npz", **{**openai_state_dict, **changed})
    assert tclip(["convert", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"tclip convert: error: {tmp_path / 'bad.npz'}: {message}\n"


@pytest.mark.parametrize("stored", ["int32 npz", "int64 pt", "visual.proj int8", "visual.proj bool"])
def test_weights_stored_as_integers_or_booleans_are_named_and_integer_buffers_are_not(tmp_path, openai_state_dict,
                                                                                   stored, capsys):
    """They were cast to float32 without a word (rc 0, other weights). OpenAI's archives hold integer buffers
    (input_resolution, context_length, vocab_size) that carry no weights: those convert."""
    if stored.startswith("visual.proj"):
        dtype = stored.split()[1]
        proj = openai_state_dict["visual.proj"]
        changed = {**openai_state_dict, "visual.proj": proj > 0 if dtype == "bool" else proj.astype(dtype)}
    else:
        dtype = stored.split()[0]
        changed = {k: v.astype(dtype) for k, v in openai_state_dict.items()}
    path = tmp_path / ("weights.pt" if stored.endswith("pt") else "weights.npz")
    if path.suffix == ".pt":
        torch.save({k: torch.from_numpy(v) for k, v in changed.items()}, path)
    else:
        np.savez(path, **changed)
    named = [k for k, v in changed.items() if v.dtype != openai_state_dict[k].dtype]
    assert tclip(["convert", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"does not fit the CLIP config ({len(named)} problems): " in error
    assert all(f"{key}: stored as {dtype}, a CLIP's weights are floating point" in error for key in named)
    assert not (tmp_path / "out").exists()
    buffers = {"input_resolution": np.array(224), "context_length": np.array(77), "vocab_size": np.array(49408)}
    np.savez(tmp_path / "buffers.npz", **openai_state_dict, **buffers)
    assert tclip(["convert", str(tmp_path / "buffers.npz"), "--out", str(tmp_path / "out")]) == 0


def test_a_converted_folder_holding_integer_weights_is_refused_naming_them(tmp_path, fixtures_dir):
    out = _converted(tmp_path, fixtures_dir)
    params = safetensors.numpy.load_file(out / "params.safetensors")
    params["visual/proj"] = params["visual/proj"].astype(np.int32)
    safetensors.numpy.save_file(params, out / "params.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="visual/proj: stored as int32, a CLIP's weights are floating"):
        load_clip(out)


def test_nan_weights(tmp_path, openai_state_dict):
    poisoned = dict(openai_state_dict)
    poisoned["visual.transformer.resblocks.2.mlp.c_fc.weight"] = np.full((512, 128), np.nan, np.float16)
    np.savez(tmp_path / "nan.npz", **poisoned)
    with pytest.raises(ConversionError, match="non-finite.*block_2/fc/kernel"):
        load_clip(tmp_path / "nan.npz")


def test_unknown_hub_name_offline(monkeypatch, tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported: its constant is what a later change must set (else
    # the hub is tried, with its retries, for half a minute).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match="nobody/no-such-clip.*`hf download nobody/no-such-clip"):
        load_clip("nobody/no-such-clip")
    # The weights it names are those loading reads: a Hugging Face model's (or its shards), else OpenCLIP's; for an
    # hf-hub: name, OpenCLIP's alone (LAION's repositories hold each layout, gigabytes each).
    with pytest.raises(ConnectionError, match=re.escape("'*.txt' 'model*.safetensors' 'open_clip_model.safetensors' "
                                                        "--local-dir DIR")):
        load_clip("nobody/no-such-clip")
    with pytest.raises(ConnectionError, match=re.escape("'*.txt' 'open_clip_model.safetensors' --local-dir DIR")):
        load_clip("hf-hub:nobody/no-such-clip")


def test_a_timm_clip_repository_is_read_as_its_open_clip_files(tmp_path, openai_state_dict, reference, inputs):
    """timm's CLIP repositories (timm/vit_base_patch16_clip_224.openai) hold timm's config.json and model.safetensors
    (an image tower alone) beside OpenCLIP's files: such a folder was refused as "not a Hugging Face CLIPModel
    config" unless the source was named."""
    folder = _open_clip_folder(tmp_path / "timm", openai_state_dict)
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_clip_224", "num_classes": 512,
                                                    "pretrained_cfg": {"tag": "openai", "input_size": [3, 224, 224]}}))
    safetensors.numpy.save_file({"cls_token": np.zeros((1, 1, 128), np.float32)}, folder / "model.safetensors")
    clip = load_clip(folder)
    assert clip.source == "open_clip"
    assert_same_model(clip, reference, inputs)


def test_an_unreachable_hub_is_one_line_without_the_hub_librarys_retry_logs(monkeypatch, tmp_path, caplog):
    """Offline, huggingface_hub logs each of its retries (ten lines over half a minute) before the one-line error;
    those are silenced, and a repository already in the cache is read without trying the network."""
    import logging

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))

    def unreachable(repo_id):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    with caplog.at_level(logging.WARNING), pytest.raises(ConnectionError, match="cannot fetch 'nobody/clip'"):
        load_clip("nobody/clip")
    assert [r for r in caplog.records if r.name.startswith("huggingface_hub")] == []


def test_hub_names_with_dots_are_hub_names_and_checkpoint_files_are_not(monkeypatch, tmp_path):
    """Hub repository names may hold dots: the repositories below (from OpenCLIP's pretrained table; the second is
    the one it loads OpenAI's weights from) were refused as "neither a file, a folder nor a hub name", with no
    download tried. A missing path ending in a checkpoint file's suffix is still a missing file."""
    from tclip_jax.checkpoints import load as load_module, sources

    asked = []

    def download_from_hub(repo_id, open_clip_first=False):
        asked.append(repo_id)
        raise ConnectionError("stub: no network in tests")

    monkeypatch.setattr(sources, "download_from_hub", download_from_hub)
    monkeypatch.chdir(tmp_path)
    hub_names = ["hf-hub:laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", "hf-hub:timm/vit_base_patch32_clip_224.openai",
                 "openai/clip-vit-base-patch32"]
    for name in hub_names:
        with pytest.raises(ConnectionError, match="stub"):
            load_module.load_any(name)
    assert asked == [name.removeprefix("hf-hub:") for name in hub_names]
    for name in ["models/vit.pt", "models/vit.PTH", "models/vit.bin", "models/vit.npz", "models/vit.safetensors",
                 "models/model.safetensors.index.json"]:
        with pytest.raises(FileNotFoundError, match=f"{re.escape(name)} is neither a file, a folder nor a hub name"):
            load_module.load_any(name)
    assert len(asked) == len(hub_names)


@pytest.mark.parametrize("preset, hub_name", [
    ("ViT-B/32", "openai/clip-vit-base-patch32"), ("ViT-B/16", "openai/clip-vit-base-patch16"),
    ("ViT-L/14", "openai/clip-vit-large-patch14"), ("ViT-L/14@336", "openai/clip-vit-large-patch14-336")])
def test_a_preset_named_as_a_model_says_the_hub_repository_of_its_weights(monkeypatch, tmp_path, capsys, preset,
                                                                           hub_name):
    """The README listed the presets among the names of a model, but `--model ViT-B/32` was taken as a hub repository
    (and ViT-L/14@336 as an invalid one), with `hf download ViT-B/32` advice. A preset is an architecture: the one
    line names the hub repository of OpenAI's weights (Hugging Face's names), with no download tried."""
    from tclip_jax.checkpoints import sources
    from tclip_jax.model import PRESETS

    monkeypatch.setattr(sources, "download_from_hub", lambda *args, **kwargs: pytest.fail("the hub was tried"))
    monkeypatch.chdir(tmp_path)
    assert preset in PRESETS
    assert tclip(["convert", preset, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"tclip convert: error: model not found: {preset} is an architecture preset, "
                                       f"not weights: name OpenAI's {preset} weights by their hub repository, "
                                       f"{hub_name}\n")


def test_a_mistyped_path_that_reads_as_a_hub_name_says_there_is_no_such_folder(monkeypatch, tmp_path, capsys):
    """`models/vit` (no such folder) is also a hub name: when the hub cannot give it either, the one line says that
    there is no local file or folder of that name, not only that the hub could not be reached."""
    from types import SimpleNamespace

    from huggingface_hub.utils import HfHubHTTPError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)

    def unreachable(repo_id):
        raise OSError("[Errno -2] Name or service not known")

    def not_there(repo_id):
        raise HfHubHTTPError("404 Client Error: Repository Not Found",
                             response=SimpleNamespace(headers={}, request=None))

    for list_repo_files, message in [(unreachable, "tclip cannot fetch 'models/vit' from the Hugging Face hub"),
                                     (not_there, "'models/vit' is not a downloadable hub repository: 404")]:
        monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
        assert tclip(["convert", "models/vit", "--out", "out"]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"tclip convert: error: there is no file or folder models/vit in {tmp_path}, and "
                                f"{message}") and error.count("\n") == 1, error


def test_hugging_face_weights_without_config(tmp_path):
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL)))
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match="needs its config.json"):
        load_clip(tmp_path / "hf" / "model.safetensors")


def test_a_hugging_face_model_other_than_clip_is_refused_by_its_model_type(tmp_path, capsys):
    """A MetaCLIP 2 folder has CLIP's weight names, so it loaded as a CLIP; but transformers pools its text at the
    first eos even when that is 2, where CLIP's legacy rule reads the highest id, and it brings its own vocabulary."""
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.MetaClip2Config(text_config=dict(sizes, eos_token_id=2, bos_token_id=0, pad_token_id=1),
                                          vision_config=dict(sizes, image_size=64, patch_size=32), projection_dim=32)
    torch.manual_seed(0)
    transformers.MetaClip2Model(config).save_pretrained(tmp_path / "mc2")
    capsys.readouterr()  # transformers' progress bar
    assert tclip(["convert", str(tmp_path / "mc2"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"tclip convert: error: {tmp_path / 'mc2' / 'config.json'}: model_type "
                                       f"'{config.model_type}' is not supported: only Hugging Face CLIPModel "
                                       "(model_type \"clip\") is read\n")
    transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).save_pretrained(tmp_path / "clip")
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["model_type"] == "clip"
    assert load_clip(tmp_path / "clip").source == "hf"


def test_a_named_source_is_checked_against_what_the_checkpoint_holds(tmp_path, fixtures_dir, openai_state_dict):
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).save_pretrained(tmp_path / "hf")
    _open_clip_folder(tmp_path / "open_clip", openai_state_dict)
    converted = _converted(tmp_path, fixtures_dir)
    for folder, found, wrong in [(tmp_path / "hf", "hf", ("openai", "open_clip", "tclip")),
                                 (tmp_path / "open_clip", "open_clip", ("hf", "openai", "tclip")),
                                 (converted, "tclip", ("hf", "openai", "open_clip"))]:
        assert load_clip(folder, source=found).source == found
        for source in wrong:
            with pytest.raises(ConversionError, match=f"\\(source '{found}'\\), not the '{source}' asked for"):
                load_clip(folder, source=source)
    # A folder with both layouts, as LAION's hub repositories have: the source picks, and detection prefers hf.
    for name in ("open_clip_model.safetensors", "open_clip_config.json"):
        shutil.copy(tmp_path / "open_clip" / name, tmp_path / "hf" / name)
    assert load_clip(tmp_path / "hf").source == "hf"
    assert load_clip(tmp_path / "hf", source="open_clip").source == "open_clip"
    with pytest.raises(ConversionError, match="not the 'openai' asked for"):
        load_clip(tmp_path / "hf", source="openai")
    np.savez(tmp_path / "state.npz", **openai_state_dict)
    for source in ("hf", "tclip"):
        with pytest.raises(ConversionError, match=f"a single state-dict file, .* not the '{source}' asked for"):
            load_clip(tmp_path / "state.npz", source=source)
    assert load_clip(tmp_path / "state.npz", source="open_clip", activation="gelu").source == "open_clip"


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


# Model folders and checkpoints: validated once, at load, with the file and the field named.

def _converted(tmp_path, fixtures_dir):
    out = tmp_path / "converted"
    assert tclip(["convert", str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("change,message", [
    ({"config": None}, r"config: a CLIPConfig is a JSON object"),
    ({"config": [1, 2]}, r"config: a CLIPConfig is a JSON object"),
    ({"config": {"patch_size": 0}}, r"config: patch_size must be a positive integer, got 0"),
    ({"config": {"vision_heads": 0}}, r"config: vision_heads must be a positive integer"),
    ({"config": {"text_width": "128"}}, r"config: text_width must be a positive integer, got '128'"),
    ({"config": {"vision_width": -128}}, r"config: vision_width must be a positive integer, got -128"),
    ({"format": "something"}, r"is not a tclip_jax checkpoint header"),
])
def test_bad_converted_config_names_file_and_field(tmp_path, fixtures_dir, change, message):
    out = _converted(tmp_path, fixtures_dir)
    header = json.loads((out / "tclip_config.json").read_text())
    for key, value in change.items():
        header[key] = {**header[key], **value} if isinstance(value, dict) else value
    (out / "tclip_config.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="tclip_config.json.*" + message):
        load_clip(out)


def test_converted_header_without_config(tmp_path, fixtures_dir):
    out = _converted(tmp_path, fixtures_dir)
    header = json.loads((out / "tclip_config.json").read_text())
    del header["config"]
    (out / "tclip_config.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match=r'tclip_config.json has no "config"'):
        load_clip(out)


@pytest.mark.parametrize("part,key,value,message", [
    ("vision_config", "patch_size", 0, "vision_config.patch_size must be a positive integer"),
    ("text_config", "hidden_size", "64", "text_config.hidden_size must be a positive integer, got '64'"),
    ("vision_config", None, [1], "vision_config must be an object"),
    (None, "projection_dim", None, "projection_dim must be a positive integer, got None"),
    # A list or an object was hashed: "error: unhashable type: 'list'", naming neither the file nor the field.
    ("text_config", "hidden_act", ["gelu"], "text_config.hidden_act must be one of ('quick_gelu', 'gelu'), got "
                                            "['gelu']"),
    ("vision_config", "layer_norm_eps", {"eps": 1e-5}, "vision_config.layer_norm_eps must be a small positive number, "
                                                       "got {'eps': 1e-05}"),
    ("vision_config", "hidden_act", "gelu", "towers with different hidden_act are not supported: ['gelu', "
                                            "'quick_gelu']"),
])
def test_bad_hugging_face_config_names_file_and_field(tmp_path, part, key, value, message):
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if key is None:
        config[part] = value
    else:
        (config if part is None else config[part])[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: " + re.escape(message)):
        load_clip(tmp_path)


def test_a_hugging_face_config_that_leaves_fields_out_gets_transformers_defaults():
    """A config.json without a field (written by hand, or trimmed) reads as transformers reads it: the field takes
    transformers' CLIPConfig default (its activation, layer-norm eps, shapes and end-of-text id)."""
    from tclip_jax.model import from_hf_config

    bare = from_hf_config({"vision_config": {}, "text_config": {}})
    vision, text = transformers.CLIPVisionConfig(), transformers.CLIPTextConfig()
    assert bare.activation == vision.hidden_act == text.hidden_act
    assert bare.layer_norm_eps == vision.layer_norm_eps == text.layer_norm_eps
    assert bare == from_hf_config(transformers.CLIPConfig().to_dict())


def test_a_hugging_face_state_dict_with_the_position_ids_older_transformers_saved_converts():
    """transformers before 4.31 saved each tower's embeddings.position_ids buffer (older Hub pytorch_model.bin files
    hold them; version 5 no longer saves it): indices, no weights."""
    from tclip_jax.checkpoints.convert import convert_state_dict

    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL)))
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    buffers = {f"{tower}.embeddings.position_ids": getattr(model, tower).embeddings.position_ids.numpy()
               for tower in ("text_model", "vision_model")}
    assert not buffers.keys() & state_dict.keys()
    converted = convert_state_dict({**state_dict, **buffers}, SMALL, "hf")
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, convert_state_dict(state_dict, SMALL, "hf"))


def test_a_hugging_face_config_that_is_not_json_is_named_once(tmp_path, capsys):
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).save_pretrained(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config_path.write_text("{not json")
    capsys.readouterr()  # save_pretrained's progress bar
    assert tclip(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"tclip convert: error: {config_path} is not valid JSON: ") and error.count("\n") == 1
    assert error.count("config.json") == 1


@pytest.mark.parametrize("key,value,message", [
    ("text_projection", np.zeros(128, np.float16), r"text_projection must be 2-D \[text width, embed dim\]"),
    ("ln_final.weight", np.zeros((), np.float16), r"ln_final.weight must be 1-D"),
    ("visual.conv1.weight", np.zeros((128, 3, 32), np.float16), r"visual.conv1.weight must be 4-D"),
    ("visual.positional_embedding", np.zeros((51, 128), np.float16), "not 1 \\+ a square grid"),
])
def test_arrays_of_the_wrong_rank_are_named(tmp_path, openai_state_dict, key, value, message):
    np.savez(tmp_path / "bad.npz", **{**openai_state_dict, key: value})
    with pytest.raises(ConversionError, match=message):
        load_clip(tmp_path / "bad.npz")


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path, openai_state_dict):
    small = {**openai_state_dict, "token_embedding.weight": openai_state_dict["token_embedding.weight"][:1000]}
    np.savez(tmp_path / "small_vocab.npz", **small)
    with pytest.raises(ConversionError, match="tokenizer has 49408 tokens but the model's token embedding only 1000"):
        load_clip(tmp_path / "small_vocab.npz")


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    import os

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    with pytest.raises(ConversionError, match="is not a regular file"):
        load_clip(fifo)


def test_bfloat16_checkpoints_say_they_are_upcast(tmp_path, openai_state_dict, reference, inputs):
    import safetensors.torch

    bf16 = {k: torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16) for k, v in openai_state_dict.items()}
    safetensors.torch.save_file(bf16, tmp_path / "bf16.safetensors")
    torch.save(bf16, tmp_path / "bf16.pt")
    for name in ("bf16.safetensors", "bf16.pt"):
        with pytest.warns(UserWarning, match="stores bfloat16 parameters; they are upcast to float32"):
            clip = load_clip(tmp_path / name, activation="quick_gelu")
        expected = {k: v.float().numpy() for k, v in bf16.items()}
        np.testing.assert_array_equal(np.asarray(clip.params["visual"]["proj"]), expected["visual.proj"])


def test_the_activation_of_a_bare_state_dict_is_a_stated_assumption(tmp_path, openai_state_dict):
    np.savez(tmp_path / "bare.npz", **openai_state_dict)
    with pytest.warns(UserWarning, match="does not say its MLP activation; assuming quick_gelu.*--activation gelu"):
        assert load_clip(tmp_path / "bare.npz").config.activation == "quick_gelu"
    with pytest.warns(UserWarning, match="assuming gelu \\(OpenCLIP's\\).*--activation quick_gelu"):  # the other one
        assert load_clip(tmp_path / "bare.npz", source="open_clip").config.activation == "gelu"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named: no warning
        assert load_clip(tmp_path / "bare.npz", activation="gelu").config.activation == "gelu"


def test_a_checkpoint_that_says_its_activation_refuses_another(tmp_path, openai_state_dict):
    safetensors.numpy.save_file(openai_state_dict, tmp_path / "open_clip_model.safetensors")
    config = {"model_cfg": {"embed_dim": 64, "quick_gelu": True,
                            "vision_cfg": {"width": 128, "layers": 6, "patch_size": 32, "image_size": 224},
                            "text_cfg": {"width": 128, "heads": 2, "layers": 3}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    assert load_clip(tmp_path, activation="quick_gelu").config.activation == "quick_gelu"  # agreeing is fine
    with pytest.raises(ConversionError, match="open_clip_config.json says the MLP activation is quick_gelu; "
                                              "--activation gelu"):
        load_clip(tmp_path, activation="gelu")
    del config["model_cfg"]["quick_gelu"]  # unnamed, OpenCLIP builds GELU and lets force_quick_gelu override it
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    assert load_clip(tmp_path).config.activation == "gelu"
    assert load_clip(tmp_path, activation="quick_gelu").config.activation == "quick_gelu"
    converted = checkpoint.save_checkpoint(tmp_path / "converted", load_clip(tmp_path).params,
                                           load_clip(tmp_path).config)
    with pytest.raises(ConversionError, match="tclip_config.json says the MLP activation is gelu"):
        load_clip(converted, activation="quick_gelu")


@pytest.mark.parametrize("run,activation", [("2024_01_01-ViT-B-32", "gelu"), ("ViT-B-32-quickgelu-laion", "quick_gelu")])
def test_open_clip_training_checkpoints_are_recognised(tmp_path, openai_state_dict, run, activation):
    state = {f"module.{k}": torch.from_numpy(v) for k, v in openai_state_dict.items()}  # DDP-prefixed, as OpenCLIP
    torch.save({"epoch": 3, "name": run, "state_dict": state, "optimizer": {}}, tmp_path / "epoch_3.pt")
    with pytest.warns(UserWarning, match=f"OpenCLIP training checkpoint \\(run '{run}'\\).*{activation} is assumed"):
        clip = load_clip(tmp_path / "epoch_3.pt")
    assert clip.source == "open_clip" and clip.config.activation == activation


@pytest.mark.parametrize("version, refused", [("2.5.1+cu121", True), ("1.13.1", True), ("2.6.0", False),
                                              ("2.10.0", False)])
def test_pickles_are_not_read_with_a_torch_whose_weights_only_reader_can_run_code(tmp_path, openai_state_dict,
                                                                                monkeypatch, capsys, version, refused):
    """torch before 2.6 could run code a file holds even with weights_only=True (CVE-2025-32434): with such a torch a
    pickled state dict is refused before torch.load sees it. (2.10 is later than 2.6, though not as text.)"""
    from tclip_jax.checkpoints.sources import read_state_dict

    torch.save({k: torch.from_numpy(v) for k, v in openai_state_dict.items()}, tmp_path / "tiny.pt")
    monkeypatch.setattr(torch, "__version__", version)
    if not refused:
        assert set(read_state_dict(tmp_path / "tiny.pt").arrays) == set(openai_state_dict)
        return

    def unpickled(*args, **kwargs):
        raise AssertionError("torch.load ran")

    monkeypatch.setattr(torch, "load", unpickled)
    assert tclip(["convert", str(tmp_path / "tiny.pt"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"tclip convert: error: reading tiny.pt needs PyTorch 2.6 or later, and torch "
                                       f"{version} is installed, whose torch.load can run code a file holds even with "
                                       "weights_only=True (CVE-2025-32434): install torch>=2.6 (pip install "
                                       "'tclip_jax[convert]'), or convert the checkpoint to safetensors elsewhere\n")
    assert not (tmp_path / "out").exists()


def test_a_hugging_face_folder_asking_for_remote_code_runs_none(tmp_path):
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code_ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    assert load_clip(tmp_path).config == SMALL
    assert not marker.exists()


def test_convert_out_that_is_a_file_or_exists(tmp_path, fixtures_dir, capsys):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    assert tclip(["convert", str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(target)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and target.read_text() == "keep me"
    assert tclip(["convert", str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(target), "--overwrite"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and target.read_text() == "keep me"


def test_tokens_added_after_end_of_text_do_not_move_the_text_embedding(tmp_path):
    """A tokenizer with a token added after end-of-text (textual inversion's `<sks>`, id 49408): the embedding is
    read at end-of-text, as transformers reads it, not at the highest id; a prompt-level method cuts its rows there
    too. A folder whose config names another end-of-text token than its tokenizer's is refused."""
    from tclip_jax.methods.attention import RawAttention
    from tclip_jax.model.tokenizer import _load_packaged_backend

    hub = tmp_path / "hub"
    small = dataclasses.replace(SMALL, vocab_size=49409)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(small))).eval()
    model.config.text_config.eos_token_id = model.text_model.eos_token_id = 49407  # as current releases say
    model.save_pretrained(hub)
    packaged = json.loads(_load_packaged_backend().to_str())
    packaged["added_tokens"].append({"id": 49408, "content": "<sks>", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": True, "special": False})
    (hub / "tokenizer.json").write_text(json.dumps(packaged))
    clip = load_clip(hub)
    assert clip.config.eot_token_id == 49407
    prompts = ["a photo of <sks> dog", "a photo of a dog"]
    ids = clip.tokenizer.encode(prompts, clip.config.context_length)
    assert 49408 in ids[0] and list(ids[0]).index(49408) < list(ids[0]).index(49407)
    with torch.no_grad():
        expected = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    expected = getattr(expected, "pooler_output", expected).numpy()
    with jax.default_matmul_precision("highest"):
        ours = clip.model.apply({"params": clip.params}, ids, method="encode_text").embeds
        features = RawAttention(clip).text_features(prompts)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(features, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    config = json.loads((hub / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 49406
    (hub / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="reads the text embedding at token 49406 but the tokenizer's "
                                              "end-of-text token is 49407"):
        load_clip(hub)
    # The vocabulary's last id is its highest: both rules read the same place, and a release's config written
    # either way is its preset (run records name the architecture).
    from tclip_jax.model import PRESETS, from_hf_config

    for eos in (2, 49407):
        written = to_hf_config(PRESETS["ViT-B/32"])
        written["text_config"]["eos_token_id"] = eos
        assert from_hf_config(written) == PRESETS["ViT-B/32"]


def _openai_layout(model: transformers.CLIPModel) -> dict:
    """A transformers CLIPModel's weights under OpenAI's key names (OpenAI's `model.py` as the layout reference)."""
    hf = {k: v.numpy() for k, v in model.state_dict().items()}
    out = {"visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
           "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
           "visual.proj": hf["visual_projection.weight"].T, "text_projection": hf["text_projection.weight"].T,
           "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
           "logit_scale": hf["logit_scale"]}
    for ours, theirs in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                         ("ln_final", "text_model.final_layer_norm")):
        out[f"{ours}.weight"], out[f"{ours}.bias"] = hf[f"{theirs}.weight"], hf[f"{theirs}.bias"]
    for ours, theirs, layers in (("visual.transformer", "vision_model", model.config.vision_config.num_hidden_layers),
                                 ("transformer", "text_model", model.config.text_config.num_hidden_layers)):
        for i in range(layers):
            o, h = f"{ours}.resblocks.{i}.", f"{theirs}.encoder.layers.{i}."
            for kind in ("weight", "bias"):
                out[o + f"attn.in_proj_{kind}"] = np.concatenate([hf[h + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
                for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[o + f"{a}.{kind}"] = hf[h + f"{b}.{kind}"]
    return {k: np.array(v, order="C") for k, v in out.items()}


def assert_same_image_embeddings(clip, model: transformers.CLIPModel, images: np.ndarray) -> None:
    images = images.astype(np.float32)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
    expected = getattr(expected, "pooler_output", expected)
    with jax.default_matmul_precision("highest"):
        ours = clip.model.apply({"params": clip.params}, images, method="encode_image").embeds
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-4, rtol=0)


def assert_same_text_embeddings(clip, model: transformers.CLIPModel, tokens: np.ndarray) -> None:
    with torch.no_grad():
        expected = model.get_text_features(input_ids=torch.from_numpy(tokens).long())
    expected = getattr(expected, "pooler_output", expected)
    with jax.default_matmul_precision("highest"):
        ours = clip.model.apply({"params": clip.params}, tokens, method="encode_text").embeds
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-4, rtol=0)


def _open_clip_folder(folder, state_dict, vision=None, text=None, **model_cfg):
    folder.mkdir(exist_ok=True)
    safetensors.numpy.save_file(state_dict, folder / "open_clip_model.safetensors")
    config = {"model_cfg": {"embed_dim": 64, "quick_gelu": True,
                            "vision_cfg": {"width": 128, "layers": 6, "patch_size": 32, "image_size": 224,
                                           **(vision or {})},
                            "text_cfg": {"width": 128, "heads": 2, "layers": 3, **(text or {})}, **model_cfg}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("tower, key, value", [
    ("vision", "pool_type", "avg"), ("vision", "global_average_pool", True), ("vision", "no_ln_pre", True),
    ("text", "pool_type", "eos"), ("text", "no_causal_mask", True), ("text", "hf_tokenizer_name", "facebook/xlm-v-base"),
    ("text", "act_kwargs", {"approximate": "tanh"})])
def test_open_clip_configs_that_compute_otherwise_are_refused(tmp_path, openai_state_dict, tower, key, value):
    """Fields that change what OpenCLIP computes but not its weight names (CLIPA's pooling, the worldwide
    MetaCLIPs' tokenizer and end-of-text pooling) were ignored: the class token was read where OpenCLIP averages."""
    folder = _open_clip_folder(tmp_path / "oc", openai_state_dict, **{tower: {key: value}})
    with pytest.raises(ConversionError, match=f"open_clip_config.json: model_cfg.{tower}_cfg.{key} = "
                                              f"{re.escape(json.dumps(value))} is not supported"):
        load_clip(folder)


@pytest.mark.parametrize("config, message", [
    ([1], "an OpenCLIP config is a JSON object, got list"),
    ({"model_cfg": 3}, "model_cfg must be an object, got int"),
    ({"model_cfg": {"vision_cfg": [1]}}, "model_cfg.vision_cfg must be an object, got list"),
    ({"model_cfg": {"vision_cfg": {"head_width": 0}}}, "model_cfg.vision_cfg.head_width must be a positive integer"),
    ({"model_cfg": {"vision_cfg": {"head_width": "80"}}}, "head_width must be a positive integer, got \"80\""),
    ({"model_cfg": {"text_cfg": {"width": 128, "heads": 0}}}, "text_cfg.heads must be a positive integer, got 0"),
    ({"model_cfg": {"text_cfg": {"width": 128, "heads": 3}}}, "width 128 is not divisible by its 3 heads"),
    ({"model_cfg": {"text_cfg": {"norm_kwargs": {"eps": 0}}}}, "norm_kwargs.eps must be a small positive number"),
    ({"model_cfg": {"quick_gelu": "yes"}}, "quick_gelu must be true or false"),
    # OpenCLIP's dataclasses and CLIP(**model_cfg) raise on a key they do not have: a typo was silently ignored.
    ({"model_cfg": {"vision_cfg": {"head_widht": 32}}}, "model_cfg.vision_cfg has keys OpenCLIP 3.3 does not take: "
                                                        "head_widht"),
    ({"model_cfg": {"text_cfg": {"head": 4}}}, "model_cfg.text_cfg has keys OpenCLIP 3.3 does not take: head"),
    ({"model_cfg": {"quickgelu": True}}, "model_cfg has keys OpenCLIP 3.3 does not take: quickgelu"),
    ({"preprocess_cfg": {"mean": [0.5, 0.5, 0.5]}}, "neither model_cfg nor a bare OpenCLIP model config")])
def test_a_malformed_open_clip_config_is_named(tmp_path, openai_state_dict, config, message, capsys):
    folder = _open_clip_folder(tmp_path / "oc", openai_state_dict)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    assert tclip(["convert", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "open_clip_config.json: " in err and message in err, err


def test_a_bare_open_clip_model_config_is_read_as_open_clip_reads_it(tmp_path, inputs):
    """An open_clip_config.json without the model_cfg wrapper (the layout of OpenCLIP's model_configs/*.json, which
    its get_model_config reads whole as the model config) was read as all defaults: GELU and 64-wide heads where it
    said quick_gelu, 32-wide image heads and 4 text heads. The same weights in transformers are the reference."""
    small = dataclasses.replace(SMALL, vision_heads=2, text_heads=4)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(small))).eval()
    folder = _open_clip_folder(tmp_path / "oc", _openai_layout(model),
                               vision={"width": 64, "layers": 2, "patch_size": 32, "image_size": 64, "head_width": 32},
                               text={"width": 64, "heads": 4, "layers": 2}, embed_dim=32,
                               init_logit_scale=2.6592, cast_dtype=None)  # keys OpenCLIP's CLIP takes, accepted
    config = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    clip = load_clip(folder)
    assert clip.config == small
    assert_same_image_embeddings(clip, model, np.random.default_rng(1).standard_normal((2, 64, 64, 3)))
    assert_same_text_embeddings(clip, model, inputs[1])


@pytest.mark.parametrize("text, heads", [({"width": 128, "layers": 2, "mlp_ratio": 2}, 8),
                                         ({"heads": 16, "layers": 1, "mlp_ratio": 2}, 16)])
def test_open_clip_text_heads_default_as_open_clip_builds_them(tmp_path, inputs, text, heads):
    """A text_cfg that leaves out heads or width gets CLIPTextCfg's defaults (width 512, heads 8), as OpenCLIP's
    TextTransformer is built with text_cfg.heads: heads were width / 64 (2 for width 128; 8 for 16 given at 512).
    The same weights in transformers with OpenCLIP's head count are the reference."""
    width = text.get("width", 512)
    small = dataclasses.replace(SMALL, text_width=width, text_layers=text["layers"], text_heads=heads,
                                text_mlp_dim=2 * width)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(small))).eval()
    with torch.no_grad():  # transformers' init leaves attention near uniform, which hides a wrong head split
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    folder = _open_clip_folder(tmp_path / "oc", _openai_layout(model), embed_dim=32, text=text,
                               vision={"width": 64, "layers": 2, "patch_size": 32, "image_size": 64})
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"] = text  # _open_clip_folder fills in width and heads
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    clip = load_clip(folder)
    assert clip.config.text_heads == heads
    assert_same_text_embeddings(clip, model, inputs[1])


def test_open_clip_config_widths_are_checked_against_the_weights(tmp_path, openai_state_dict, capsys):
    """The head split is taken from the config's widths (OpenCLIP's defaults where left out), so weights of other
    widths, which OpenCLIP would not load into the model it builds, are refused."""
    folder = _open_clip_folder(tmp_path / "oc", openai_state_dict)
    config = json.loads((folder / "open_clip_config.json").read_text())
    del config["model_cfg"]["text_cfg"]["width"]
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    assert tclip(["convert", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"tclip convert: error: {folder / 'open_clip_config.json'}: model_cfg.text_cfg.width is 512 (OpenCLIP's "
        "default 512 where it is left out) but the weights' text tower is 128 wide\n")


@pytest.mark.parametrize("part, key, value, weights", [
    ("vision", "layers", 5, "vision tower has 6 blocks"), ("text", "layers", 12, "text tower has 3 blocks"),
    ("vision", "patch_size", 16, "patches are 32 pixels wide"), ("model", "embed_dim", 512, "embeddings are 64 wide"),
    ("vision", "mlp_ratio", 2, "vision MLPs are 512 wide"), ("text", "mlp_ratio", 8.0, "text MLPs are 512 wide"),
    ("text", "context_length", 64, "text tower has 77 positions"),
    ("text", "vocab_size", 1000, "vocabulary has 49408 tokens"),
    ("vision", "image_size", 240, None), ("vision", "image_size", [224, 256], None)])
def test_open_clip_config_architecture_is_checked_against_the_weights(tmp_path, openai_state_dict, capsys, part, key,
                                                                      value, weights):
    """Every architecture field of an open_clip_config.json but the widths was ignored: the weights (6 image blocks,
    3 text blocks, 32-pixel patches, 64-wide embeddings, 512-wide MLPs, 77 positions, 49408 tokens) loaded as their
    own model whatever it said. OpenCLIP builds its model from the config and loads the weights with strict=True, which
    refuses them; here one line names the file and the field."""
    folder = _open_clip_folder(tmp_path / "oc", openai_state_dict)
    original = (folder / "open_clip_config.json").read_text()
    config = json.loads(original)
    (config["model_cfg"] if part == "model" else config["model_cfg"][f"{part}_cfg"])[key] = value
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    assert tclip(["convert", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    where = f"model_cfg.{key}" if part == "model" else f"model_cfg.{part}_cfg.{key}"
    assert err.startswith(f"tclip convert: error: {folder / 'open_clip_config.json'}: {where} ")
    assert len(err.splitlines()) == 1 and (weights is None or f"but the weights' {weights}" in err), err
    assert not (tmp_path / "out").exists()
    config = json.loads(original)
    del config["model_cfg"]["vision_cfg"]["layers"]  # OpenCLIP's default, 12
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="model_cfg.vision_cfg.layers is 12 .OpenCLIP's default 12 where it is "
                                              "left out. but the weights' vision tower has 6 blocks"):
        load_clip(folder)


@pytest.mark.parametrize("image_size", [320, [96, 96]])
def test_an_open_clip_image_size_resizes_the_position_embedding_as_open_clip_does(tmp_path, openai_state_dict,
                                                                                  image_size):
    """A config's image_size other than the weights' (224: 7x7 patches of 32) was ignored; OpenCLIP builds the model
    at that size and resize_pos_embed resizes the weights' position embedding to its grid before loading them:
    torch's F.interpolate, bicubic, align_corners=False, antialias=True (resize_pos_embed's default since January
    2023; without it, as this resize was first written, 0.033 off at 320), the reference."""
    folder = _open_clip_folder(tmp_path / "oc", openai_state_dict, vision={"image_size": image_size})
    with pytest.warns(UserWarning, match="model_cfg.vision_cfg.image_size is .* but the weights' position embedding "
                                         "is for 224 .7x7 patches.: resized to"):
        clip = load_clip(folder)
    side = image_size if isinstance(image_size, int) else image_size[0]
    grid = side // 32
    assert clip.config == dataclasses.replace(load_clip(_open_clip_folder(tmp_path / "same", openai_state_dict)).config,
                                              image_size=side)
    posemb = torch.from_numpy(openai_state_dict["visual.positional_embedding"].astype(np.float32))
    grid_part = posemb[1:].reshape(1, 7, 7, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid_part, size=(grid, grid), mode="bicubic", align_corners=False,
                                              antialias=True).permute(0, 2, 3, 1).reshape(grid * grid, -1)
    expected = torch.cat([posemb[:1], resized]).numpy()
    np.testing.assert_allclose(clip.params["visual"]["positional_embedding"], expected, atol=1e-6, rtol=0)


def test_open_clip_layer_norm_eps_matches_transformers(tmp_path):
    """norm_kwargs.eps (SigLIP-era configs say 1e-6) was ignored; the same weights in a Hugging Face CLIPModel with
    that eps are the reference."""
    small = dataclasses.replace(SMALL, layer_norm_eps=1e-2)  # large enough to matter at float32
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(small))).eval()
    folder = _open_clip_folder(tmp_path / "oc", _openai_layout(model),
                               vision={"width": 64, "layers": 2, "patch_size": 32, "image_size": 64,
                                       "norm_kwargs": {"eps": 1e-2}},
                               text={"width": 64, "heads": 1, "layers": 2, "norm_kwargs": {"eps": 1e-2}},
                               embed_dim=32)
    clip = load_clip(folder)
    assert clip.config.layer_norm_eps == 1e-2
    assert_same_image_embeddings(clip, model, np.random.default_rng(1).standard_normal((2, 64, 64, 3)))


def test_the_weights_file_of_an_open_clip_folder_named_alone_is_read_as_its_config_says(tmp_path, inputs):
    """`load_clip(FOLDER/open_clip_model.safetensors)` read the file as a bare OpenAI state dict: OpenAI's 64-wide
    heads, eps 1e-5 and an assumed activation, where the open_clip_config.json beside it says 2 image heads, 4 text
    heads, eps 1e-2 and GELU. The same weights in transformers are the reference."""
    small = dataclasses.replace(SMALL, vision_heads=2, text_heads=4, layer_norm_eps=1e-2, activation="gelu")
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(small))).eval()
    norm = {"norm_kwargs": {"eps": 1e-2}}
    folder = _open_clip_folder(tmp_path / "oc", _openai_layout(model), embed_dim=32, quick_gelu=False,
                               vision={"width": 64, "layers": 2, "patch_size": 32, "image_size": 64, "head_width": 32,
                                       **norm},
                               text={"width": 64, "heads": 4, "layers": 2, **norm})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is assumed
        clip = load_clip(folder / "open_clip_model.safetensors")
    assert clip.config == small and clip.source == "open_clip"
    assert_same_image_embeddings(clip, model, np.random.default_rng(1).standard_normal((2, 64, 64, 3)))
    assert_same_text_embeddings(clip, model, inputs[1])


GREY = np.full((96, 96, 3), 128, np.uint8)  # bicubic resizing keeps it 128: its input is the normalization alone


def test_the_pixel_normalization_an_open_clip_config_gives_is_the_models(tmp_path, openai_state_dict):
    """preprocess_cfg's mean and std (OpenCLIP's pretrained table gives LAION's ViT-L-14 laion2B-s32B-b82K
    Inception's, 0.5 and 0.5) were ignored: every image was normalized with OpenAI's. The model's config carries
    them, every input protocol uses them, and a converted folder and the model's fingerprint record them."""
    folder = _open_clip_folder(tmp_path / "oc", openai_state_dict)
    config = json.loads((folder / "open_clip_config.json").read_text())
    plain = load_clip(folder)  # without preprocess_cfg: OpenCLIP's default, OpenAI's
    config["preprocess_cfg"] = {"size": 224, "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    clip = load_clip(folder)
    for protocol in INPUT_PROTOCOLS:
        np.testing.assert_allclose(prepare(GREY, protocol, clip.config)[0], (128 / 255 - 0.5) / 0.5, atol=1e-6)
        assert np.abs(prepare(GREY, protocol, plain.config)[0] - (128 / 255 - np.array(OPENAI_MEAN)) / OPENAI_STD
                      ).max() < 1e-6
    np.testing.assert_allclose(METHODS["similarity"](clip).prepare(GREY)[0], (128 / 255 - 0.5) / 0.5, atol=1e-6)
    assert clip.fingerprint != plain.fingerprint  # what a sweep records: results of one are not the other's
    # The first fingerprint definition covered no normalization: every result recorded with it had OpenAI's.
    assert plain.is_recorded_as(first_fingerprint(plain)) and not clip.is_recorded_as(first_fingerprint(clip))
    assert tclip(["convert", str(folder), "--out", str(tmp_path / "out")]) == 0
    converted = load_clip(tmp_path / "out")
    assert converted.config == clip.config and converted.fingerprint == clip.fingerprint


def open_clip_normalization(preprocess_cfg):
    """OpenCLIP 3.3's mean and std for a hub config's preprocess_cfg, per channel, by its own lines: factory.py
    merges it over PreprocessCfg()'s defaults with merge_preprocess_dict, which keeps the keys PreprocessCfg has
    whose value is not None; image_transform takes `mean or OPENAI_DATASET_MEAN` and makes a number `(mean,) * 3`
    (std alike); torchvision's Normalize broadcasts a one-item list over the channels."""
    cfg = {"mean": OPENAI_MEAN, "std": OPENAI_STD}
    cfg.update({k: v for k, v in preprocess_cfg.items()
                if k in {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"} and v is not None})
    mean = cfg["mean"] or OPENAI_MEAN
    if not isinstance(mean, (list, tuple)):
        mean = (mean,) * 3
    std = cfg["std"] or OPENAI_STD
    if not isinstance(std, (list, tuple)):
        std = (std,) * 3
    return np.broadcast_to(np.asarray(mean, float), 3), np.broadcast_to(np.asarray(std, float), 3)


@pytest.mark.parametrize("preprocess_cfg", [
    {"mean": 0.5, "std": 0.25}, {"mean": [0.5], "std": [0.25]}, {"mean": None, "std": None},
    {"mean": 0, "std": 0.0}, {"mean": [], "std": []}, {"mean": [0.4, 0.5, 0.6], "std": 0.3, "men": [0.5] * 3},
    {"interpolation": "random", "resize_mode": None, "mode": None, "crop_pct": 0.9, "interpolation_mode": "nearest"}])
def test_an_open_clip_preprocess_cfg_is_read_as_open_clip_reads_it(tmp_path, openai_state_dict, preprocess_cfg):
    """Values OpenCLIP takes were refused: a number or null for mean or std, interpolation "random" (bicubic
    outside training), a null mode or resize_mode, a key PreprocessCfg lacks (which OpenCLIP drops: it changes no
    pixel). Each gives the normalization OpenCLIP computes (open_clip_normalization) and OpenCLIP's bicubic resize."""
    folder = _open_clip_folder(tmp_path / "oc", openai_state_dict)
    plain = load_clip(folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({**config, "preprocess_cfg": preprocess_cfg}))
    clip = load_clip(folder)
    mean, std = open_clip_normalization(preprocess_cfg)
    pixels = prepare(GREY, "whole", clip.config)[0]
    np.testing.assert_allclose(pixels, np.broadcast_to((128 / 255 - mean) / std, pixels.shape), atol=1e-6)
    noise = np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8)  # resized: bicubic, as without it
    np.testing.assert_allclose(prepare(noise, "center_crop", clip.config)[0] * std + mean,
                               prepare(noise, "center_crop", plain.config)[0] * OPENAI_STD + OPENAI_MEAN, atol=1e-5)


# What `LoadedClip.fingerprint` digested of a config before it carried the pixel normalization: every field then.
FIELDS_BEFORE_NORMALIZATION = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers",
                               "vision_heads", "vision_mlp_dim", "vocab_size", "context_length", "text_width",
                               "text_layers", "text_heads", "text_mlp_dim", "activation", "layer_norm_eps",
                               "stem_channels", "eot_token_id")


def test_a_folder_converted_before_the_config_carried_a_normalization_is_openais_and_keeps_its_fingerprint(
        tmp_path, fixtures_dir):
    """Folders converted before were written for OpenAI's normalization (the only one then): they load with it, and
    a model with it keeps the fingerprint the sweeps that ran it recorded, so they resume."""
    out = _converted(tmp_path, fixtures_dir)
    header = json.loads((out / checkpoint.CONFIG_FILE).read_text())
    assert not set(header["config"]) & {"image_mean", "image_std"}  # as earlier versions wrote (and read) it
    clip = load_clip(out)
    assert (clip.config.image_mean, clip.config.image_std) == (OPENAI_MEAN, OPENAI_STD)
    before = repr({name: getattr(clip.config, name) for name in FIELDS_BEFORE_NORMALIZATION})
    assert clip.fingerprint == weights_fingerprint(before, checkpoint.flatten(clip.params))


@pytest.mark.parametrize("mean, std", [(None, None), ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])])
def test_the_pixel_normalization_of_a_hugging_face_preprocessor_config_is_transformers(tmp_path, fixture_images,
                                                                                       mean, std):
    """A Hugging Face folder's preprocessor_config.json image_mean and image_std were ignored. transformers'
    CLIPImageProcessor, saved into the folder, is the reference for the center_crop protocol (its transform)."""
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).save_pretrained(tmp_path)
    normalization = {} if mean is None else {"image_mean": mean, "image_std": std}
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size=64, **normalization)
    processor.save_pretrained(tmp_path)
    clip = load_clip(tmp_path)
    for name in ("scene_224", "noise_224"):
        expected = processor(images=fixture_images[name], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(prepare(fixture_images[name], "center_crop", clip.config)[0], expected, atol=1e-5)


@pytest.mark.parametrize("sizes", [{"size": 64, "crop_size": 64},
                                   {"size": {"shortest_edge": 64}, "crop_size": [64, 64]}])
def test_the_sizes_of_a_hugging_face_preprocessor_config_are_read_as_transformers_reads_them(tmp_path, sizes):
    """A preprocessor_config.json's size and crop_size were never read: another size (e.g. the shortest edge to 96
    on a 64-pixel model) loaded silently, and transformers computed other pixels (refused now, in
    test_a_pixel_preprocessing_the_protocols_do_not_compute_is_refused_in_one_line). The forms transformers reads as
    the model's input size are accepted: an int (older hub configs', e.g. 224), a [height, width] crop; the
    reference is transformers' CLIPImageProcessor of the folder, on a non-square image."""
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", **sizes}))
    clip = load_clip(tmp_path)
    image = np.random.default_rng(0).integers(0, 256, (120, 90, 3), np.uint8)
    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
    expected = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(prepare(image, "center_crop", clip.config)[0], expected, atol=1e-5)


@pytest.mark.parametrize("file, part, value, message", [
    ("open_clip_config.json", "preprocess_cfg", {"resize_mode": "squash"},
     'preprocess_cfg.resize_mode = "squash" is not supported (the input protocols compute "shortest"'),
    ("open_clip_config.json", "preprocess_cfg", {"interpolation": "bilinear"},
     'preprocess_cfg.interpolation = "bilinear" is not supported'),
    ("open_clip_config.json", "preprocess_cfg", {"std": [0.5, 0, 0.5]}, "preprocess_cfg.std must be 3 positive"),
    ("open_clip_config.json", "preprocess_cfg", {"mean": [0.5, 0.5]},
     "preprocess_cfg.mean must be 3 numbers (one per RGB channel) or one for all three, got [0.5, 0.5]"),
    ("open_clip_config.json", "preprocess_cfg", {"mean": "0.5"}, "preprocess_cfg.mean must be 3 numbers"),
    ("open_clip_config.json", "preprocess_cfg", {"interpolation": "nearest"},
     'preprocess_cfg.interpolation = "nearest" is not supported (the input protocols compute "bicubic"'),
    ("open_clip_config.json", "preprocess_cfg", {"mode": "L"}, 'preprocess_cfg.mode = "L" is not supported'),
    ("open_clip_config.json", "preprocess_cfg", [0.5], "preprocess_cfg must be an object, got list"),
    ("preprocessor_config.json", None, {"resample": 2}, "resample = 2 is not supported (the input protocols compute "
                                                        "3 (3: bicubic))"),
    ("preprocessor_config.json", None, {"do_center_crop": False}, "do_center_crop = False is not supported"),
    ("preprocessor_config.json", None, {"use_square_size": True}, "use_square_size = True is not supported"),
    ("preprocessor_config.json", None, {"image_std": [1, 1]}, "image_std must be 3 numbers"),
    ("preprocessor_config.json", None, [1], "a preprocessor config is a JSON object, got list"),
    ("preprocessor_config.json", None, {"size": {"shortest_edge": 96}, "crop_size": 64},
     "size = {'shortest_edge': 96} is not supported (the input protocols resize the shortest edge to the model's "
     "input size, {'shortest_edge': 64})"),
    ("preprocessor_config.json", None, {"size": 64, "crop_size": {"height": 48, "width": 48}},
     "crop_size = {'height': 48, 'width': 48} is not supported (the input protocols crop a square of the model's "
     "input size, {'height': 64, 'width': 64})"),
    ("preprocessor_config.json", None, {"size": {"height": 64, "width": 64}, "crop_size": 64},
     "size = {'height': 64, 'width': 64} is not supported"),
    ("preprocessor_config.json", None, {"size": [64, 64], "crop_size": 64}, "size = [64, 64] is not supported"),
    ("preprocessor_config.json", None, {"size": 64}, "crop_size left out (transformers' 224) is not supported")])
def test_a_pixel_preprocessing_the_protocols_do_not_compute_is_refused_in_one_line(tmp_path, openai_state_dict,
                                                                                 file, part, value, message, capsys):
    if file == "open_clip_config.json":
        folder = _open_clip_folder(tmp_path / "oc", openai_state_dict)
        config = json.loads((folder / file).read_text())
        config[part] = value
    else:
        folder = tmp_path / "hf"
        transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(SMALL))).save_pretrained(folder)
        config = value
    (folder / file).write_text(json.dumps(config))
    capsys.readouterr()  # transformers' progress bars
    assert tclip(["convert", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{file}: " in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_bare_state_dict_at_an_open_clip_wide_head_width_gets_its_heads(tmp_path, monkeypatch):
    """A state dict does not store its head count: OpenCLIP's ViT-H/g/bigG/e split their width into heads wider than
    64 (ViT-H: 16 of 80, not OpenAI's rule's 20 of 64). Tried at a small width given the same standing; the
    reference is transformers with the true head count."""
    import tclip_jax.checkpoints.load as load_module

    small = dataclasses.replace(SMALL, vision_width=128, vision_heads=4, vision_mlp_dim=256)  # 32-wide heads
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(small))).eval()
    safetensors.numpy.save_file(_openai_layout(model), tmp_path / "bare.safetensors")
    monkeypatch.setitem(load_module.OPEN_CLIP_HEAD_WIDTHS, 128, ("ViT-test", 32))
    with pytest.warns(UserWarning, match="does not store its head count; its image tower's width 128 is "
                                         "OpenCLIP's ViT-test, so 4 heads of 32 are assumed"):
        clip = load_clip(tmp_path / "bare.safetensors", activation="quick_gelu")
    assert clip.config.vision_heads == 4
    assert_same_image_embeddings(clip, model, np.random.default_rng(1).standard_normal((1, 64, 64, 3)))


def test_a_width_that_64_wide_heads_do_not_divide_names_where_the_head_width_is_given(tmp_path, capsys):
    """A bare state dict 96 wide was told to "pass the head dimension", which no flag or argument takes: the message
    names the documented way, an OpenCLIP folder's config, and that way loads it (transformers as the reference)."""
    small = dataclasses.replace(SMALL, vision_width=96, vision_heads=2, vision_mlp_dim=192)  # 48-wide heads
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**to_hf_config(small))).eval()
    state_dict = _openai_layout(model)
    safetensors.numpy.save_file(state_dict, tmp_path / "bare.safetensors")
    assert tclip(["convert", str(tmp_path / "bare.safetensors"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"tclip convert: error: {tmp_path / 'bare.safetensors'}: vision width 96 is not a multiple of 64, the width "
        "of its heads (a state dict does not store it: OpenAI's 64, unless the open_clip_config.json of an OpenCLIP folder holding the weights gives "
        "model_cfg.vision_cfg.head_width)\n")
    folder = _open_clip_folder(tmp_path / "oc", state_dict,
                               vision={"width": 96, "layers": 2, "patch_size": 32, "image_size": 64, "head_width": 48,
                                       "mlp_ratio": 2},
                               text={"width": 64, "heads": 1, "layers": 2}, embed_dim=32)
    clip = load_clip(folder)
    assert clip.config.vision_heads == 2
    assert_same_image_embeddings(clip, model, np.random.default_rng(1).standard_normal((1, 64, 64, 3)))


def test_convert_overwrite_replaces_only_a_converted_checkpoint_that_does_not_hold_the_source(tmp_path, fixtures_dir,
                                                                                           capsys):
    source = fixtures_dir / "tiny_openai_clip.npz"
    models = tmp_path / "models"  # a user's folder: the checkpoint to convert and notes
    models.mkdir()
    shutil.copy(source, models / "tiny.npz")
    (models / "notes.txt").write_text("my notes")
    converted = tmp_path / "converted"
    assert tclip(["convert", str(source), "--out", str(converted)]) == 0
    (tmp_path / "linked").symlink_to(models)
    capsys.readouterr()
    for source_named, out, message in [
            (models / "tiny.npz", models, f"{models} holds {models / 'tiny.npz'}, which replacing it would delete"),
            (tmp_path / "linked" / "tiny.npz", models, f"{models} holds {tmp_path / 'linked' / 'tiny.npz'}, which"),
            (source, models, f"{models} is not a converted checkpoint (it has no tclip_config.json) and is not empty"),
            (models, models, f"{models} is not a converted checkpoint (it has no tclip_config.json), and tclip convert "
                             "works in place only on a converted folder; name another --out")]:
        before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
        assert tclip(["convert", str(source_named), "--out", str(out), "--overwrite"]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"tclip convert: error: {message}") and error.count("\n") == 1
        assert sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == before
    (tmp_path / "empty").mkdir()
    for out in (converted, tmp_path / "empty"):  # what --overwrite is for
        assert tclip(["convert", str(source), "--out", str(out), "--overwrite", "--float16"]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["params.safetensors", "tclip_config.json"]
    # A converted folder converted in place is read whole before it is replaced: the same model (float16-exact
    # weights), stored as float32 now.
    before = load_clip(converted)
    assert tclip(["convert", str(converted), "--out", str(converted), "--overwrite"]) == 0
    after = load_clip(converted)
    assert after.config == before.config
    for ours, theirs in zip(jax.tree_util.tree_leaves(after.params), jax.tree_util.tree_leaves(before.params)):
        np.testing.assert_array_equal(ours, theirs)
    # A model card or log beside the weights (the embedded models have both) is not convert's to delete.
    (converted / "README.md").write_text("the model's card")
    assert tclip(["convert", str(converted), "--out", str(converted), "--overwrite", "--float16"]) == 2
    assert "holds README.md, which tclip convert does not write" in capsys.readouterr().err
    assert (converted / "README.md").read_text() == "the model's card"


def test_a_write_that_fails_while_saving_the_weights_is_said_in_one_line(tmp_path, fixtures_dir):
    """safetensors raises its own SafetensorError when a write fails ("I/O error: No space left on device (os error
    28)" on a full disk), which the command line said as an internal error with status 1: it is the OSError it
    wraps, said in one line with status 2 as every other full disk, and nothing is left behind. The real library
    fails here on a file-size limit (EFBIG, "File too large (os error 27)"), which needs no full disk."""
    import errno
    import os
    import subprocess
    import sys

    out = tmp_path / "converted"
    limited = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "  # the weights are 17 MB
               "from tclip_jax.cli import program; sys.exit(program())")
    done = subprocess.run([sys.executable, "-c", limited, "convert", str(fixtures_dir / "tiny_openai_clip.npz"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert (done.returncode, done.stdout) == (2, "")
    assert re.fullmatch(rf"tclip convert: error: \[Errno {errno.EFBIG}\] {os.strerror(errno.EFBIG)}: "
                        rf"'{re.escape(str(tmp_path))}/\.converted\.[^/]+/params\.safetensors'",
                        done.stderr.splitlines()[-1])  # after a warning of the fixture's unstated activation
    assert list(tmp_path.iterdir()) == []


def test_convert_overwrite_checks_the_folder_holding_out_before_loading(tmp_path, fixtures_dir, monkeypatch, capsys):
    """--overwrite writes the new folder beside --out, then swaps them: a folder holding --out that this process may
    not write in was found only after the model was loaded, in a message naming the hidden staging folder. (As root
    every access check passes, so os.access is replaced.)"""
    import os
    import pathlib

    import tclip_jax.checkpoints.load as load_module

    source, parent = fixtures_dir / "tiny_openai_clip.npz", tmp_path / "models"
    out = parent / "converted"
    assert tclip(["convert", str(source), "--out", str(out)]) == 0
    capsys.readouterr()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: pathlib.Path(path) != parent and real_access(path, mode))
    monkeypatch.setattr(load_module, "load_any", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    parent.chmod(0o555)
    try:
        assert tclip(["convert", str(source), "--out", str(out), "--overwrite"]) == 2
    finally:
        parent.chmod(0o755)
    assert capsys.readouterr().err == (f"tclip convert: error: --out {out}: cannot write in {parent}, where its "
                                       "replacement is written before it replaces the folder\n")
    assert sorted(p.name for p in parent.iterdir()) == ["converted"]


def test_a_second_convert_into_an_out_in_use_is_refused_as_one_after_it_is(tmp_path, fixtures_dir, monkeypatch,
                                                                           capsys):
    """Two converts into one new --out at once both found it absent, and the later replaced the earlier's folder,
    both reporting success: while a convert writes --out, a second into it (here started as the first loads its
    source) is refused in one line, as one started after it is; the folder is the first's, with nothing beside."""
    import os

    import tclip_jax.checkpoints.load as load_module

    source, out = fixtures_dir / "tiny_openai_clip.npz", tmp_path / "models" / "converted"
    second = []
    real_load_any = load_module.load_any

    def load_any(*args, **kwargs):
        if not second:  # the first run's load; the second run's own goes on
            second.append("started")
            second.append(tclip(["convert", str(source), "--float16", "--out", str(out)]))
            second.append(capsys.readouterr().err.strip().splitlines())
        return real_load_any(*args, **kwargs)

    monkeypatch.setattr(load_module, "load_any", load_any)
    assert tclip(["convert", str(source), "--out", str(out)]) == 0
    _, code, err = second
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"tclip convert: error: another tclip convert (process {os.getpid()} ") and \
        f" is running in {out} " in err[0], err
    stored = safetensors.numpy.load_file(out / checkpoint.PARAMS_FILES[0])
    assert {array.dtype for array in stored.values()} == {np.dtype(np.float32)}  # the first's, not the float16 one
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["converted"]
    capsys.readouterr()
    assert tclip(["convert", str(source), "--float16", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"tclip convert: error: --out {out} already exists; pass --overwrite to "
                                       "replace it\n")


def test_convert_overwrite_through_a_link_checks_the_folder_holding_its_target(tmp_path, fixtures_dir, monkeypatch,
                                                                               capsys):
    """A link's target is replaced (staged beside it), so the folder holding the target must be writable, not the
    one holding the link. (As root every access check passes, so os.access is replaced.)"""
    import os
    import pathlib

    import tclip_jax.checkpoints.load as load_module

    source, models, links = fixtures_dir / "tiny_openai_clip.npz", tmp_path / "models", tmp_path / "links"
    assert tclip(["convert", str(source), "--out", str(models / "v3")]) == 0
    links.mkdir()
    (links / "current").symlink_to(models / "v3", target_is_directory=True)
    capsys.readouterr()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: pathlib.Path(path) != models and real_access(path, mode))
    monkeypatch.setattr(load_module, "load_any", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert tclip(["convert", str(source), "--out", str(links / "current"), "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"tclip convert: error: --out {links / 'current'}: cannot write in {models}, "
                                       "where its replacement is written before it replaces the folder\n")


def test_convert_overwrite_refuses_a_users_file_inside_the_tokenizer_folder(tmp_path, fixtures_dir, capsys):
    """The check of what --overwrite would delete looked at the folder's top level only: notes a user put beside the
    tokenizer files convert writes were deleted with them."""
    from tclip_jax.model.tokenizer import _load_packaged_backend

    source = fixtures_dir / "tiny_openai_clip.npz"
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "tokenizer.json").write_text(_load_packaged_backend().to_str())
    clip = load_clip(source)
    out = checkpoint.save_checkpoint(tmp_path / "out", clip.params, clip.config, tokenizer_dir=tmp_path / "hub")
    (out / "tokenizer" / "my_notes.txt").write_text("my notes")
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    capsys.readouterr()
    assert tclip(["convert", str(source), "--out", str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"tclip convert: error: {out} holds tokenizer/my_notes.txt, which tclip "
                                       "convert does not write and replacing the folder would delete; move them or "
                                       "choose another --out\n")
    assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    (out / "tokenizer" / "my_notes.txt").unlink()  # what convert wrote alone: replaced
    assert tclip(["convert", str(source), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["params.safetensors", "tclip_config.json"]


def test_a_config_reading_the_highest_id_is_written_as_earlier_versions_wrote_it():
    """eot_token_id None is the default and left out of the JSON, so that folders converted now load in earlier
    installs (which refuse unknown keys); an id round-trips."""
    assert "eot_token_id" not in SMALL.to_dict() and CLIPConfig.from_dict(SMALL.to_dict()) == SMALL
    named = dataclasses.replace(SMALL, eot_token_id=49407)
    assert CLIPConfig.from_dict(json.loads(json.dumps(named.to_dict()))) == named


def test_a_cached_repository_is_used_only_if_it_holds_the_layout_asked_for(tmp_path, monkeypatch):
    """An hf-hub: name asks for OpenCLIP's file: a cache holding only the Hugging Face layout of the repository (from
    a load by its plain name) is not enough, so the file is fetched."""
    from tclip_jax.checkpoints.sources import download_from_hub

    cached = tmp_path / "cached"
    cached.mkdir()
    (cached / "config.json").write_text("{}")
    (cached / "model.safetensors").write_bytes(b"")
    fetched = []

    def snapshot_download(repo_id, allow_patterns, local_files_only=False, **_):
        if not local_files_only:
            fetched.append(allow_patterns)
        return str(cached)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo_id: ["config.json", "model.safetensors", "open_clip_model.safetensors"])
    assert download_from_hub("laion/clip") == cached and fetched == []  # the Hugging Face layout is cached
    download_from_hub("laion/clip", open_clip_first=True)
    assert fetched == [["*.json", "*.txt", "open_clip_model.safetensors"]]
