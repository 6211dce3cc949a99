"""`load_clip`: one entry point from any way of naming a CLIP ViT to (model, params, tokenizer).

Accepted: a converted tclip_jax folder; a Hugging Face CLIPModel folder (`config.json` + `model.safetensors` or
`pytorch_model.bin`, or either's shards and `.index.json`); an OpenCLIP folder (`open_clip_config.json` +
`open_clip_model.safetensors` / `open_clip_pytorch_model.bin`, or that weights file named alone); a single OpenAI
`.pt` (TorchScript or state dict), or an OpenAI/OpenCLIP-format state dict as `.npz`, `.safetensors`, `.bin` or
`.pth`; a Hugging Face hub name (`openai/clip-vit-base-patch32`, or `hf-hub:laion/...` for OpenCLIP repos).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from tclip_jax.checkpoints import folder as checkpoint, sources
from tclip_jax.checkpoints.convert import ConversionError, convert_state_dict, detect_format, infer_openai_config
from tclip_jax.files import fingerprint, killed_swap_leftover, nonempty_path
from tclip_jax.model import CLIP, CLIPConfig, from_hf_config, from_hf_preprocessor
from tclip_jax.model.config import (OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD, PRESET_HUB_NAMES, is_hf_clip_config,
                                    normalization_channels)
from tclip_jax.model.posemb import resize_positional_embedding_open_clip
from tclip_jax.model.tokenizer import ClipTokenizer, default_tokenizer, is_tokenizer_folder

SOURCES = ("tclip", "hf", "openai", "open_clip")
# The small CLIP trained on synthetic scenes that ships with the package; used when no model is named.
DEFAULT_MODEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "data" / "default_model"


class DeviceCopies:
    """A parameter tree's copy on each device it is asked on: put there once and kept while the tree's leaves are
    the same (`TreeLeaves`; a leaf replaced in it, or a tree of other leaves, is put there again). The one keeper of
    parameters on devices: a model's (`LoadedClip.params_on`) and a method's own (`Method.own_params_on`: ECLIP's
    projections, a tree an outside method keeps). A copy of it (`copy.deepcopy` of a LoadedClip) starts empty: a
    device is not copied."""

    def __init__(self):
        self._placed: dict[jax.Device, tuple[TreeLeaves, Any]] = {}

    def of(self, tree: Any, device: jax.Device) -> Any:
        leaves = TreeLeaves.of(tree)
        kept = self._placed.get(device)  # (two threads putting them on one device at once: both copies serve)
        if kept is None or not leaves.same_as(kept[0]):
            kept = self._placed[device] = (leaves, jax.device_put(tree, device))
        return kept[1]

    def __reduce__(self):
        return DeviceCopies, ()


@dataclasses.dataclass(frozen=True)
class LoadedClip:
    model: CLIP          # the Flax module (config and matmul dtype); call it as model.apply({"params": params}, ...)
    params: dict         # float32 parameter tree (its numpy arrays made read-only: `__post_init__`)
    tokenizer: ClipTokenizer
    source: str          # one of SOURCES
    origin: str          # what was named
    # `params` on each device it was asked on (`params_on`); a new LoadedClip (`dataclasses.replace`) starts empty
    _device_copies: DeviceCopies = dataclasses.field(default_factory=DeviceCopies, init=False, repr=False,
                                                     compare=False)

    def __post_init__(self):
        # What is kept from the weights (`fingerprint`, `params_on`, a method's text features) is told by the
        # identity of its leaves (`TreeLeaves`): an array edited in place would leave it stale, so numpy leaves, a
        # loaded tree's or one a user built (`dataclasses.replace(clip, params=...)`), refuse it (`frozen_weight`);
        # new weights are a new tree.
        leaves, structure = jax.tree_util.tree_flatten(self.params)
        frozen = [frozen_weight(leaf) for leaf in leaves]
        if any(a is not b for a, b in zip(frozen, leaves)):  # a leaf copied: the tree holds the copy
            object.__setattr__(self, "params", jax.tree_util.tree_unflatten(structure, frozen))

    def __setstate__(self, state: dict) -> None:
        # a copy (`copy.deepcopy`): numpy copies its arrays writable, so they are made read-only again
        self.__dict__.update(state)
        self.__post_init__()

    @property
    def config(self) -> CLIPConfig:
        return self.model.config

    @property
    def fingerprint(self) -> str:
        """A digest that tells CLIPs apart, whatever path or format named them: "v2-" and the digest of every field
        of the config (but OpenAI's pixel normalization, the only one before the config carried it, so that models
        with it keep their fingerprint) and every parameter (its path in the tree, its shape and its float32 bytes,
        whole). A model that differs anywhere is another model: a fine-tune of its transformer blocks alone, a
        float16-rounded copy (other weights, other maps), one that normalizes its pixels otherwise. What ECLIP's
        projections, encoded prompts and every result record of the model they were made with; computed once for the
        leaves it was computed from (SHA-256 of every byte: 0.6-0.8 s for a ViT-B/32, 151M parameters, and 0.02 s for
        the embedded default model, 7M, on this 2-core VM), and again once a leaf is replaced in the tree, a plain
        nested dict (`params["text"]["projection"] = new`: another model, `TreeLeaves`). `is_v1_fingerprint` tells
        one recorded before it covered the whole model, which `is_recorded_as` compares by its own definition."""
        leaves = TreeLeaves.of(self.params)
        kept = self.__dict__.get("_fingerprint_of")  # (TreeLeaves, fingerprint), kept beside the frozen fields
        if kept is not None and leaves.same_as(kept[0]):
            return kept[1]
        digest = weights_fingerprint(repr(self.config.defining_fields()),
                                     flax.traverse_util.flatten_dict(self.params, sep="/"))
        object.__setattr__(self, "_fingerprint_of", (leaves, digest))
        return digest

    def params_on(self, device: jax.Device) -> dict:
        """`params` on ``device``: put there once and kept while the tree's leaves are these (`DeviceCopies`), for
        the maps of `explain_batch` and sweeps, which would otherwise copy the numpy parameters to the device on
        every call. A device keeps its copy while the model lives (on a CPU device, a second copy in memory); a copy
        of the model (`copy.deepcopy`) starts with none."""
        return self._device_copies.of(self.params, device)

    def is_recorded_as(self, recorded: Any) -> bool:
        """Whether a fingerprint a record holds is this model's: `fingerprint`, or one of the first definition
        (`is_v1_fingerprint`) computed as it was then (the MLP activation and the projections, final layer norms and
        positional embeddings rounded to float16), which tells this model from most others but not from one whose
        transformer blocks alone differ."""
        if not is_v1_fingerprint(recorded):
            return recorded == self.fingerprint
        if not self.config.normalizes_as_openai:  # every result of the first definition had OpenAI's normalization
            return False
        visual, text = self.params["visual"], self.params["text"]
        leaves = [visual["proj"], text["projection"], visual["positional_embedding"], text["positional_embedding"],
                  *jax.tree_util.tree_leaves(visual["ln_post"]), *jax.tree_util.tree_leaves(text["ln_final"])]
        return recorded == fingerprint([self.config.activation.encode(),
                                        *(repr(np.shape(leaf)).encode() + np.asarray(leaf, np.float16).tobytes()
                                          for leaf in leaves)])


@dataclasses.dataclass(frozen=True, eq=False)
class TreeLeaves:
    """A parameter tree as it is now: its structure and its leaves themselves (kept, so that no other array takes
    their ids). What is computed from a tree and kept (`LoadedClip.fingerprint`, `DeviceCopies`, a method's text
    features) keeps this beside it and is computed again where the tree's `TreeLeaves` is not `same_as` it: a leaf
    replaced in the tree (a plain nested dict, `params["text"]["projection"] = new`) or the tree's structure changed.
    Leaves are told by identity, which costs nothing per call; an edit in place is what a `LoadedClip`'s read-only
    arrays refuse."""
    structure: Any
    leaves: tuple

    @classmethod
    def of(cls, tree: Any) -> "TreeLeaves":
        leaves, structure = jax.tree_util.tree_flatten(tree)
        return cls(structure, tuple(leaves))

    def same_as(self, kept: Optional["TreeLeaves"]) -> bool:
        return (kept is not None and self.structure == kept.structure and len(self.leaves) == len(kept.leaves)
                and all(a is b for a, b in zip(self.leaves, kept.leaves)))


FINGERPRINT_PREFIX = "v2-"


def weights_fingerprint(config: str, weights: Mapping[str, Any]) -> str:
    """"v2-" and the digest of a model's `config` (as text) and of every one of its `weights` (by name: its name,
    its shape and its float32 bytes, whole): `LoadedClip.fingerprint`, and ECLIP's of its attention model."""
    def parts():  # a generator: leaves on an accelerator come to the host one at a time, not all at once
        yield config.encode()
        # Sorted names: a tree's key order is the converter's that built it, not the model's.
        for name, leaf in sorted(weights.items()):
            yield f"{name} {np.shape(leaf)}".encode()
            yield memoryview(np.ascontiguousarray(leaf, np.float32))  # float32 leaves on the CPU: no copy

    return FINGERPRINT_PREFIX + fingerprint(parts())


def is_v1_fingerprint(recorded: Any) -> bool:
    """Whether a recorded model fingerprint is of the first definition (16 hex digits, no prefix; tclip_jax before
    "v2-"), which covered only the MLP activation and the projections, final layer norms and positional embeddings
    rounded to float16: two models that differ in their transformer blocks alone shared it
    (`LoadedClip.is_recorded_as` compares one)."""
    return isinstance(recorded, str) and len(recorded) == 16 and all(c in "0123456789abcdef" for c in recorded)


def load_clip(name_or_path: Optional[str | os.PathLike] = None, *, source: Optional[str] = None,
              activation: Optional[str] = None, dtype: Any = jnp.float32) -> LoadedClip:
    """Loads a CLIP ViT with its tokenizer.

    `name_or_path`: None (the embedded default), a converted folder, a Hugging Face folder or hub name,
    an OpenAI `.pt`, an OpenAI-format `.npz`/`.safetensors` state dict, or an OpenCLIP checkpoint.
    `dtype` is the matmul dtype (parameters stay float32), e.g. `jnp.bfloat16` on TPU.
    """
    dtype = matmul_dtype(dtype)
    if name_or_path is None:
        if not DEFAULT_MODEL_DIR.is_dir():
            raise FileNotFoundError(f"the embedded default model is missing from this installation "
                                    f"({DEFAULT_MODEL_DIR}); name a model explicitly")
        name_or_path = DEFAULT_MODEL_DIR
    converted = load_any(name_or_path, source=source, activation=activation)
    return LoadedClip(CLIP(converted.config, dtype), converted.params,
                      tokenizer_of(converted), converted.source, converted.origin)


def frozen_weight(leaf: Any) -> Any:
    """`leaf` read-only through every array it views (a view's flag alone would let the array it views be edited,
    and the view with it); a view of a writable buffer numpy does not own (a `bytearray`, a writable memory map) is
    copied first. A view of an object without a buffer (a converted torch tensor's) is kept: no numpy array can
    write through it. Anything else is returned as it is."""
    if not isinstance(leaf, np.ndarray):
        return leaf
    array = leaf
    while isinstance(array, np.ndarray):
        array.flags.writeable = False
        array = array.base
    if array is not None:
        try:
            writable = not memoryview(array).readonly
        except TypeError:
            writable = False
        if writable:
            leaf = np.array(leaf)
            leaf.flags.writeable = False
    return leaf


def read_only(leaf: Any) -> Any:
    """`leaf`, a numpy array no longer writeable (numpy's flag; anything else as it is), for a result's array
    (`Method.explain`: a copy, or a view of an array the caller may keep writing): results share arrays, so none is
    edited in place. Weights are made read-only through what they view (`frozen_weight`)."""
    if isinstance(leaf, np.ndarray):
        leaf.flags.writeable = False
    return leaf


def matmul_dtype(dtype: Any) -> Any:
    """`dtype` checked as a matmul dtype: float32, bfloat16 or float16, or float64 with JAX's 64-bit mode on (without
    it JAX runs float64 as float32, and results would record a dtype that did not run)."""
    try:
        checked = None if dtype is None else jnp.dtype(dtype)
    except TypeError:
        checked = None
    allowed = [jnp.float32, jnp.bfloat16, jnp.float16] + ([jnp.float64] if jax.config.jax_enable_x64 else [])
    if checked not in [jnp.dtype(d) for d in allowed]:
        x64 = " (float64 needs JAX's x64 mode)" if checked == jnp.float64 else ""
        raise ValueError(f"the matmul dtype must be one of {', '.join(jnp.dtype(d).name for d in allowed)}, got "
                         f"{dtype!r}{x64}")
    return checked


def tokenizer_of(converted: "Converted") -> ClipTokenizer:
    """The checkpoint's tokenizer (its own files, else the packaged CLIP vocabulary), refused if it has tokens the
    model has no embedding for."""
    tokenizer = default_tokenizer() if converted.tokenizer_dir is None else ClipTokenizer(converted.tokenizer_dir)
    if tokenizer.vocab_size > converted.config.vocab_size:
        raise ConversionError(f"{converted.origin}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"token embedding only {converted.config.vocab_size} rows")
    eot = converted.config.eot_token_id
    if eot is not None and eot != tokenizer.eot_id:  # the embedding would be read where no token row has one
        raise ConversionError(f"{converted.origin}: the model reads the text embedding at token {eot} but the "
                              f"tokenizer's end-of-text token is {tokenizer.eot_id}")
    return tokenizer


@dataclasses.dataclass(frozen=True)
class Converted:
    params: dict
    config: CLIPConfig
    tokenizer_dir: Optional[pathlib.Path]  # None: the packaged OpenAI CLIP vocabulary
    source: str                            # one of SOURCES
    origin: str                            # what the user named
    metadata: dict = dataclasses.field(default_factory=dict)  # a converted folder's own (`folder.metadata_of`)


def _tokenizer_dir(folder: pathlib.Path) -> Optional[pathlib.Path]:
    """The folder's tokenizer (a converted folder's `tokenizer/`, or a hub folder's files beside its weights); None
    where it has none, and half of one refused (`is_tokenizer_folder`)."""
    return next((c for c in (folder / checkpoint.TOKENIZER_DIR, folder) if is_tokenizer_folder(c)), None)


def _from_hf_folder(folder: pathlib.Path, weights: pathlib.Path, origin: str, activation: Optional[str]) -> Converted:
    config_path = folder / "config.json"
    hf_config = sources.read_json(config_path)  # its errors name the file already
    try:
        config = from_hf_config(hf_config)
    except ValueError as err:
        raise ConversionError(f"{config_path}: {err}") from None
    preprocessor_path = folder / "preprocessor_config.json"  # where transformers' CLIPProcessor reads it
    if preprocessor_path.is_file():
        preprocessor = sources.read_json(preprocessor_path)  # its errors name the file already
        try:
            config = dataclasses.replace(config, **from_hf_preprocessor(preprocessor, config.image_size))
        except ValueError as err:
            raise ConversionError(f"{preprocessor_path}: {err}") from None
    _check_activation(activation, config.activation, config_path)
    state = sources.read_state_dict(weights)
    checkpoint.warn_if_upcast(state.stored_dtypes, str(weights))
    params = convert_state_dict(state.arrays, config, "hf", str(weights))
    return Converted(params, config, _tokenizer_dir(folder), "hf", origin)


# Image-tower widths of OpenCLIP's ViTs whose heads are not 64 wide (its model_configs: ViT-H, ViT-g, ViT-bigG,
# ViT-e): a state dict does not store the head count, and OpenAI's rule (width / 64) splits these wrongly.
OPEN_CLIP_HEAD_WIDTHS = {1280: ("ViT-H", 80), 1408: ("ViT-g", 88), 1664: ("ViT-bigG", 104), 1792: ("ViT-e", 112)}
# OpenCLIP config fields that change what is computed but not the weight names, with the value this CLIP computes
# (OpenCLIP's default): another value is refused, not ignored (CLIPA pools patches and drops ln_pre, SigLIP and the
# worldwide MetaCLIPs bring other tokenizers and read the text embedding elsewhere). An empty dict counts as None.
_OPEN_CLIP_DEFAULTS = {
    "vision_cfg": {"global_average_pool": False, "pool_type": "tok", "attentional_pool": False, "no_ln_pre": False,
                   "final_ln_after_pool": False, "pos_embed_type": "learnable", "timm_model_name": None,
                   "act_kwargs": None},
    "text_cfg": {"pool_type": "argmax", "no_causal_mask": False, "embed_cls": False, "hf_model_name": None,
                 "hf_tokenizer_name": None, "tokenizer_kwargs": None, "final_ln_after_pool": False,
                 "proj_bias": False, "act_kwargs": None},
}

# Every key OpenCLIP (3.3) takes in each part of a model config: `CLIP.__init__`'s arguments and what `create_model`
# pops (custom_text) or passes to CoCa (multimodal_cfg), and the fields of `CLIPVisionCfg` and `CLIPTextCfg`, with
# the names earlier releases used (global_average_pool, n_queries, input_patchnorm; proj, pooler_type), which hub
# configs written then hold. OpenCLIP raises on any other key, so a misspelt one (head_widht) is refused, not ignored.
_OPEN_CLIP_KEYS = {
    "model_cfg": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                  "nonscalar_logit_scale", "cast_dtype", "output_dict", "custom_text", "multimodal_cfg"},
    "vision_cfg": {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "ls_init_value",
                   "patch_dropout", "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "no_ln_pre",
                   "pos_embed_type", "final_ln_after_pool", "pool_type", "output_tokens", "act_kwargs", "norm_kwargs",
                   "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                   "scale_fc", "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                   "timm_drop", "timm_drop_path", "global_average_pool", "n_queries", "input_patchnorm"},
    "text_cfg": {"context_length", "vocab_size", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "width",
                 "heads", "layers", "mlp_ratio", "ls_init_value", "embed_cls", "pad_id", "eos_id", "no_causal_mask",
                 "final_ln_after_pool", "pool_type", "proj_bias", "proj_type", "output_tokens", "act_kwargs",
                 "norm_kwargs", "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                 "scale_attn", "scale_fc", "hf_model_name", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type",
                 "proj", "pooler_type"},
}

# The architecture an OpenCLIP config gives, which the weights must have: CLIPConfig field -> (part, key, OpenCLIP's
# default where it is left out: CLIPVisionCfg's and CLIPTextCfg's; embed_dim has none, CLIP's own argument). OpenCLIP
# builds its model from the config and loads the weights with strict=True (factory.load_checkpoint), so weights of
# other layers, widths, patches or vocabulary are an error there, refused here in one line naming the field (they were
# read as the weights' own model); an MLP is int(width * mlp_ratio) wide. Only the position embeddings are resized
# first (resize_pos_embed, resize_text_pos_embed): an image_size other than the weights' is honoured as OpenCLIP does
# it (`_as_open_clip_config_says`), a context_length other than theirs refused.
_OPEN_CLIP_ARCHITECTURE = {  # ..., and how the weights' value is said in a refusal ("the weights' ...")
    "embed_dim": ("model_cfg", "embed_dim", None, "embeddings are {} wide"),
    "vision_width": ("vision_cfg", "width", 768, "vision tower is {} wide"),
    "text_width": ("text_cfg", "width", 512, "text tower is {} wide"),
    "vision_layers": ("vision_cfg", "layers", 12, "vision tower has {} blocks"),
    "patch_size": ("vision_cfg", "patch_size", 16, "patches are {} pixels wide"),
    "vision_mlp_dim": ("vision_cfg", "mlp_ratio", 4.0, "vision MLPs are {} wide"),
    "image_size": ("vision_cfg", "image_size", 224, None),  # honoured, not refused (`_as_open_clip_config_says`)
    "text_layers": ("text_cfg", "layers", 12, "text tower has {} blocks"),
    "text_mlp_dim": ("text_cfg", "mlp_ratio", 4.0, "text MLPs are {} wide"),
    "context_length": ("text_cfg", "context_length", 77, "text tower has {} positions (OpenCLIP would interpolate its "
                       "position embedding to the config's length, which tclip_jax does not)"),
    "vocab_size": ("text_cfg", "vocab_size", 49408, "vocabulary has {} tokens"),
}
# A hub config's preprocess_cfg (OpenCLIP's PreprocessCfg), read as OpenCLIP 3.3 reads it: `merge_preprocess_dict`
# drops a key PreprocessCfg lacks and a null value (the default stays), so neither can change pixels, and
# `image_transform` makes an empty or zero mean or std OpenAI's and a single number one for all three channels
# (torchvision's Normalize broadcasts a one-item list the same way). Its keys other than mean and std: the values
# that give the pixels the input protocols make (OpenCLIP's defaults, OpenAI's transform; the first is the one they
# compute, "random" interpolation is bicubic outside training; another is refused, not ignored), or None where
# they do not matter here (size: every protocol resizes to the model's input size, its image_size, as OpenCLIP sets
# it from the model; fill_color pads only for resize_mode "longest").
_OPEN_CLIP_PREPROCESS = {"mode": ("RGB",), "interpolation": ("bicubic", "random"), "resize_mode": ("shortest",),
                         "size": None, "fill_color": None}


def _open_clip_channels(value: Any, key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
    """preprocess_cfg's `key` (mean or std) as OpenCLIP's `image_transform` takes it (`mean or OPENAI_DATASET_MEAN`,
    a number for all three channels, as is a one-item list); ValueError naming the key otherwise."""
    if value is None or (isinstance(value, (int, float, list)) and not isinstance(value, bool) and not value):
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not (isinstance(value, list) and len(value) in (1, 3)):
        raise ValueError(f"{key} must be 3 numbers (one per RGB channel) or one for all three, got {json.dumps(value)}")
    return normalization_channels(value * (3 // len(value)), key, key == "std")


def _open_clip_config(folder: pathlib.Path) -> tuple[Optional[str], bool, dict, dict]:
    """(activation, whether the config names it, `infer_openai_config` arguments: head dimensions, layer-norm
    epsilon, pixel normalization; the architecture it says, which the weights must have: `_OPEN_CLIP_ARCHITECTURE`'s
    fields, each as (its key, its value as written, the CLIPConfig field's value, whether left out)) from an OpenCLIP
    hub folder's `open_clip_config.json`, if any. Without `quick_gelu` in it OpenCLIP builds GELU, which its
    `force_quick_gelu` (here --activation) may override. The model config is the file's `model_cfg`, or the whole
    file when it is a bare model config (`open_clip/model_configs/*.json`), as OpenCLIP's `get_model_config` reads
    it."""
    path = folder / "open_clip_config.json"
    if not path.is_file():
        return None, False, {}, {}

    def section(parent: Any, key: str, where: str) -> dict:
        value = parent.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConversionError(f"{path}: {where}{key} must be an object, got {type(value).__name__}")
        return value

    config = sources.read_json(path)
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: an OpenCLIP config is a JSON object, got {type(config).__name__}")
    if "model_cfg" in config:
        model_cfg = config["model_cfg"]
        if not isinstance(model_cfg, dict):
            raise ConversionError(f"{path}: model_cfg must be an object, got {type(model_cfg).__name__}")
    elif "vision_cfg" in config or "text_cfg" in config:
        model_cfg = config
    else:
        raise ConversionError(f"{path}: neither model_cfg nor a bare OpenCLIP model config (vision_cfg, text_cfg)")
    towers = {name: section(model_cfg, name, "model_cfg.") for name in _OPEN_CLIP_DEFAULTS}
    for part, keys in _OPEN_CLIP_KEYS.items():
        unknown = sorted(set(model_cfg if part == "model_cfg" else towers[part]) - keys)
        if unknown:
            where = "model_cfg" if part == "model_cfg" else f"model_cfg.{part}"
            raise ConversionError(f"{path}: {where} has keys OpenCLIP 3.3 does not take: {', '.join(unknown)}")
    vision = towers["vision_cfg"]
    if "layers" in vision and not isinstance(vision["layers"], int):
        raise ConversionError("this is a ResNet CLIP checkpoint; TCLIP needs a ViT CLIP (patch tokens)")
    for tower, defaults in _OPEN_CLIP_DEFAULTS.items():
        for key, default in defaults.items():
            value = towers[tower].get(key, default)
            if value != default and not (default is None and value == {}):
                raise ConversionError(f"{path}: model_cfg.{tower}.{key} = {json.dumps(value)} is not supported "
                                      f"(tclip_jax's CLIP computes {json.dumps(default)}, OpenCLIP's default)")

    def positive_int(tower: str, key: str, default: Optional[int] = None) -> Optional[int]:
        value = towers[tower].get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConversionError(f"{path}: model_cfg.{tower}.{key} must be a positive integer, got "
                                  f"{json.dumps(value)}")
        return value

    # OpenCLIP's defaults where a key is left out (CLIPVisionCfg, CLIPTextCfg): the image tower's heads are
    # head_width wide, the text tower has `heads` heads, whatever their width.
    choices = {"vision_head_dim": positive_int("vision_cfg", "head_width", 64)}
    architecture = {}  # CLIPConfig field -> (the config's key, its value as written, the field's value, left out)
    for field, (part, key, default, _) in _OPEN_CLIP_ARCHITECTURE.items():
        where, parent = (f"model_cfg.{key}", model_cfg) if part == "model_cfg" else (f"model_cfg.{part}.{key}",
                                                                                    towers[part])
        if key not in parent and default is None:
            continue
        value = parent.get(key, default)
        if key == "mlp_ratio":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConversionError(f"{path}: {where} must be a positive number, got {json.dumps(value)}")
            width = architecture[f"{part.removesuffix('_cfg')}_width"][2]  # given or defaulted above
            architecture[field] = (where, value, int(width * value), key not in parent)
            continue
        written = value
        if key == "image_size" and isinstance(value, list) and len(value) == 2:  # OpenCLIP's to_2tuple: [h, w]
            if value[0] != value[1]:
                raise ConversionError(f"{path}: {where} = {json.dumps(value)} is not supported (tclip_jax's CLIP "
                                      "takes square inputs)")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{path}: {where} must be a positive integer, got {json.dumps(written)}")
        architecture[field] = (where, written, value, key not in parent)
    text_width, text_heads = architecture["text_width"][2], positive_int("text_cfg", "heads", 8)
    if text_width % text_heads:
        raise ConversionError(f"{path}: model_cfg.text_cfg.width {text_width} is not divisible by its "
                              f"{text_heads} heads")
    choices["text_head_dim"] = text_width // text_heads
    epsilons = set()
    for tower in towers:
        norm = section(towers[tower], "norm_kwargs", f"model_cfg.{tower}.")
        if set(norm) - {"eps"}:
            raise ConversionError(f"{path}: model_cfg.{tower}.norm_kwargs {json.dumps(norm)} is not supported "
                                  "(only eps)")
        eps = norm.get("eps", 1e-5)  # torch's LayerNorm default
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConversionError(f"{path}: model_cfg.{tower}.norm_kwargs.eps must be a small positive number, "
                                  f"got {json.dumps(eps)}")
        epsilons.add(eps)
    if len(epsilons) > 1:
        raise ConversionError(f"{path}: towers with different layer-norm eps are not supported: {sorted(epsilons)}")
    choices["layer_norm_eps"] = epsilons.pop()
    quick_gelu = model_cfg.get("quick_gelu", False)
    if not isinstance(quick_gelu, bool):
        raise ConversionError(f"{path}: model_cfg.quick_gelu must be true or false, got {json.dumps(quick_gelu)}")
    preprocess = section(config, "preprocess_cfg", "") if model_cfg is not config else {}
    for key, computed in _OPEN_CLIP_PREPROCESS.items():
        if computed is not None and preprocess.get(key) is not None and preprocess[key] not in computed:
            raise ConversionError(f"{path}: preprocess_cfg.{key} = {json.dumps(preprocess[key])} is not supported "
                                  f"(the input protocols compute {json.dumps(computed[0])}, OpenCLIP's default)")
    for key, field, default in (("mean", "image_mean", OPENAI_IMAGE_MEAN), ("std", "image_std", OPENAI_IMAGE_STD)):
        try:  # OpenCLIP's default where left out: OpenAI's
            choices[field] = _open_clip_channels(preprocess.get(key), key, default)
        except ValueError as err:
            raise ConversionError(f"{path}: preprocess_cfg.{err}") from None
    return ("quick_gelu" if quick_gelu else "gelu"), "quick_gelu" in model_cfg, choices, architecture


def _from_openai_state_dict(path: pathlib.Path, source: Optional[str], origin: str, activation: Optional[str],
                            tokenizer_dir: Optional[pathlib.Path] = None,
                            open_clip_config: Optional[tuple[pathlib.Path, dict]] = None, **choices) -> Converted:
    """A state dict with OpenAI key names: OpenAI's releases (QuickGELU) and OpenCLIP's (mostly exact GELU).

    `activation` comes from the caller (a flag, or an OpenCLIP config); otherwise a TorchScript archive's is the
    one its modules' classes name (OpenAI's releases: QuickGELU; OpenCLIP's scripted GELU models: torch's GELU), an
    OpenCLIP training checkpoint is GELU unless its run name says quickgelu, and a bare state
    dict is assumed QuickGELU with a warning, since nothing in it says which. `choices`: what an OpenCLIP config
    says (`infer_openai_config`'s head dimensions and layer-norm epsilon); without one, heads are OpenAI's 64 wide
    except at the widths of OpenCLIP's ViTs with wider heads (`OPEN_CLIP_HEAD_WIDTHS`, with a warning).
    `open_clip_config`: that config's path and the architecture it says (`_open_clip_config`), which the weights
    must have."""
    state = sources.read_state_dict(path)
    if detect_format(state.arrays, str(path)) == "hf":
        raise ConversionError(f"{path} is a Hugging Face state dict, which needs its config.json: "
                              "pass the folder holding both")
    config_path, architecture = open_clip_config or (None, {})
    for field, key in (("vision_width", "visual.conv1.weight"), ("text_width", "ln_final.weight")):
        found = np.shape(state.arrays.get(key, ()))[:1]  # a missing key is reported with the others, later
        if field in architecture and found:  # the heads were split at the config's width: checked before
            _check_open_clip_field(config_path, architecture, field, found[0])
    checkpoint.warn_if_upcast(state.stored_dtypes, str(path))
    if state.training_run is not None:
        source = source or "open_clip"
    source = source or "openai"
    named = _torchscript_activation(state.module_classes, path)
    if named is not None:
        _check_activation(activation, named, path)
    assumed = []  # what is assumed, said once the weights are read: not for a file then refused
    if activation is None:
        if named is not None:
            activation = named
        elif state.training_run is not None:
            activation = "quick_gelu" if "quickgelu" in state.training_run.lower() else "gelu"
            assumed.append(f"{path} is an OpenCLIP training checkpoint (run {state.training_run!r}); its activation "
                           f"is not stored, so {activation} is assumed from the run name (set --activation / "
                           "activation= if it is wrong)")
        else:
            activation, other = ("gelu", "quick_gelu") if source == "open_clip" else ("quick_gelu", "gelu")
            assumed.append(f"{path} does not say its MLP activation; assuming {activation} "
                           f"({'OpenCLIP' if source == 'open_clip' else 'OpenAI'}'s). A model trained with "
                           f"{other} needs --activation {other} (activation='{other}')")
    width = np.shape(state.arrays.get("visual.conv1.weight", ()))[:1]
    if "vision_head_dim" not in choices and width and width[0] in OPEN_CLIP_HEAD_WIDTHS:
        name, choices["vision_head_dim"] = OPEN_CLIP_HEAD_WIDTHS[width[0]]
        assumed.append(f"{path} does not store its head count; its image tower's width {width[0]} is OpenCLIP's "
                       f"{name}, so {width[0] // choices['vision_head_dim']} heads of {choices['vision_head_dim']} "
                       "are assumed (a folder with its open_clip_config.json says otherwise)")
    config = infer_openai_config(state.arrays, activation=activation, path=str(path), **choices)
    arrays = state.arrays
    if config_path is not None:
        config, arrays = _as_open_clip_config_says(config_path, architecture, config, arrays)
    params = convert_state_dict(arrays, config, "openai", str(path))
    for message in assumed:
        warnings.warn(message, stacklevel=3)
    return Converted(params, config, tokenizer_dir, source, origin)


def _check_open_clip_field(config_path: pathlib.Path, architecture: dict, field: str, found: int) -> None:
    """Refuses weights whose `field` (a CLIPConfig field) is not what the OpenCLIP config says, naming its key."""
    where, written, expected, left_out = architecture[field]
    if expected == found:
        return
    _, _, default, weights_have = _OPEN_CLIP_ARCHITECTURE[field]
    notes = [f"OpenCLIP's default {default} where it is left out"] if left_out else []
    if field.endswith("_mlp_dim"):  # mlp_ratio: the width it gives
        notes.append(f"MLPs {expected} wide")
    said = f" ({'; '.join(notes)})" if notes else ""
    raise ConversionError(f"{config_path}: {where} is {json.dumps(written)}{said} but the weights' "
                          + weights_have.format(found))


def _as_open_clip_config_says(config_path: pathlib.Path, architecture: dict, config: CLIPConfig,
                              arrays: dict) -> tuple[CLIPConfig, dict]:
    """(`config`, read off the weights, and the weights) as OpenCLIP builds and loads them from its config: any
    architecture field the config gives that the weights do not have is refused, but an image_size, for which
    OpenCLIP's `resize_pos_embed` resizes the weights' position embedding to the config's grid before loading them
    (torch's bicubic with antialias=True, its default since January 2023: Keys' a = -0.5, widened when it shrinks,
    as `jax.image.resize`'s antialiased bicubic: `posemb.resize_positional_embedding_open_clip`; not the resize
    the model runs at other input sizes, which follows transformers'), with a warning, since the model then runs at
    that size."""
    for field in architecture:
        if field != "image_size":
            _check_open_clip_field(config_path, architecture, field, getattr(config, field))
    where, written, image_size, _ = architecture["image_size"]
    if image_size == config.image_size:
        return config, arrays
    if image_size % config.patch_size:
        raise ConversionError(f"{config_path}: {where} is {json.dumps(written)}, not a multiple of the patch size "
                              f"{config.patch_size} (tclip_jax's CLIP takes whole patches)")
    old, new = config.grid_size, image_size // config.patch_size
    warnings.warn(f"{config_path}: {where} is {json.dumps(written)} but the weights' position embedding is for "
                  f"{config.image_size} ({old}x{old} patches): resized to {new}x{new} as OpenCLIP does "
                  "(resize_pos_embed, antialiased bicubic), and the model runs at that size", stacklevel=4)
    posemb = resize_positional_embedding_open_clip(arrays["visual.positional_embedding"], old, new)
    return dataclasses.replace(config, image_size=image_size), {**arrays, "visual.positional_embedding": posemb}


def load_any(name_or_path: str | os.PathLike, source: Optional[str] = None,
             activation: Optional[str] = None) -> Converted:
    """Resolves `name_or_path` (see the module docstring). `source` forces the format; `activation`
    sets the activation of state dicts that do not say it; a checkpoint that says its own refuses another one."""
    if source is not None and source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    origin = os.fspath(name_or_path)
    path = nonempty_path(origin, "the model's path", "a file, a folder ('.' for the current one) or a hub "
                         "name").expanduser()
    if path.exists() and not path.is_dir():
        sources.require_regular_file(path)
    if not path.exists():
        if (leftover := killed_swap_leftover(path)) is not None:
            raise FileNotFoundError(f"model not found: {origin}; a save into it was killed while it replaced the "
                                    f"folder, and the previous one waits in {leftover} (the next save into {origin} "
                                    "puts it back, or move it back yourself)")
        if origin in PRESET_HUB_NAMES:  # 'ViT-B/32' reads as a hub name, and is none
            raise FileNotFoundError(f"model not found: {origin} is an architecture preset, not weights: name OpenAI's "
                                    f"{origin} weights by their hub repository, {PRESET_HUB_NAMES[origin]}")
        if not _is_hub_name(origin):
            raise FileNotFoundError(f"model not found: {origin} is neither a file, a folder nor a hub name")
        open_clip = origin.startswith("hf-hub:") or source == "open_clip"
        folder = sources.download_from_hub(origin.removeprefix("hf-hub:"), open_clip_first=open_clip)
        converted = load_any(folder, "open_clip" if origin.startswith("hf-hub:") else source, activation)
        return dataclasses.replace(converted, origin=origin)
    if path.is_dir():
        if checkpoint.is_checkpoint(path):
            if source not in (None, "tclip"):
                raise _wrong_source(path, source, "tclip", "a converted tclip_jax folder")
            params, config, header = checkpoint.load_checkpoint(path)
            _check_activation(activation, config.activation, path / checkpoint.CONFIG_FILE)
            return Converted(params, config, _tokenizer_dir(path), "tclip", origin, checkpoint.metadata_of(header))
        # A hub repository may hold both layouts (LAION's do): the named source picks one.
        hf_weights, open_clip_weights = sources.hf_folder_files(path), sources.open_clip_folder_files(path)
        if (source is None and hf_weights is not None and open_clip_weights is not None
                and not is_hf_clip_config(sources.read_json(path / "config.json"))):
            hf_weights = None  # timm's CLIP repositories: its image tower's config.json and weights beside OpenCLIP's
        if hf_weights is not None and source in (None, "hf"):
            return _from_hf_folder(path, hf_weights, origin, activation)
        if open_clip_weights is not None and source in (None, "open_clip"):
            return _from_open_clip_folder(path, open_clip_weights, origin, activation)
        if hf_weights is not None:
            raise _wrong_source(path, source, "hf", "a Hugging Face folder")
        if open_clip_weights is not None:
            raise _wrong_source(path, source, "open_clip", "an OpenCLIP folder")
        raise FileNotFoundError(
            f"{path} is not a CLIP checkpoint folder: expected {checkpoint.CONFIG_FILE} (converted), "
            f"config.json + one of {sources.HF_WEIGHT_FILES} (Hugging Face), or one of "
            f"{sources.OPEN_CLIP_WEIGHT_FILES} (OpenCLIP)")
    if path.name in checkpoint.PARAMS_FILES and checkpoint.is_checkpoint(path.parent):  # its own names, and config
        raise ConversionError(f"{path} holds the weights of a converted tclip_jax folder: pass its folder, "
                              f"{path.parent}")
    if source in ("tclip", "hf"):  # a single file holds OpenAI key names, whoever trained it
        raise ConversionError(f"{path} is a single state-dict file, which can be openai or open_clip, not the "
                              f"{source!r} asked for ({'a converted' if source == 'tclip' else 'a Hugging Face'} "
                              "model is a folder)")
    if (source in (None, "open_clip") and path.name in sources.OPEN_CLIP_WEIGHT_FILES
            and (path.parent / "open_clip_config.json").is_file()):  # the weights of an OpenCLIP folder, named
        return _from_open_clip_folder(path.parent, path, origin, activation)
    return _from_openai_state_dict(path, source, origin, activation)


def _from_open_clip_folder(folder: pathlib.Path, weights: pathlib.Path, origin: str,
                           activation: Optional[str]) -> Converted:
    """The OpenCLIP folder's `weights`, read as its `open_clip_config.json` (if any) says."""
    config_activation, stated, choices, architecture = _open_clip_config(folder)
    if stated:
        _check_activation(activation, config_activation, folder / "open_clip_config.json")
    return _from_openai_state_dict(weights, "open_clip", origin, activation or config_activation,
                                   _tokenizer_dir(folder), (folder / "open_clip_config.json", architecture), **choices)


# The classes of the MLP activation modules of CLIP archives (TorchScript's qualified names): OpenAI's and
# OpenCLIP's QuickGELU (clip/model.py, open_clip/transformer.py), and torch's GELU (OpenCLIP's default act_layer).
_ACTIVATION_CLASS_ENDINGS = {".QuickGELU": "quick_gelu", "__torch__.torch.nn.modules.activation.GELU": "gelu"}


def _torchscript_activation(classes: frozenset[str], path: pathlib.Path) -> Optional[str]:
    """The MLP activation a TorchScript archive's module classes name, or None where they name none (a bare state
    dict's assumption then applies); both is refused."""
    named = {activation for name in classes for ending, activation in _ACTIVATION_CLASS_ENDINGS.items()
             if name.endswith(ending)}
    if len(named) > 1:
        raise ConversionError(f"{path} has both QuickGELU and GELU modules; a CLIP's blocks have one activation")
    return named.pop() if named else None


def _check_activation(asked: Optional[str], stated: str, where: pathlib.Path) -> None:
    """The activation flag is for state dicts that do not say theirs; one that contradicts a checkpoint's own is
    refused, not obeyed silently (and not ignored silently)."""
    if asked is not None and asked != stated:
        raise ConversionError(f"{where} says the MLP activation is {stated}; --activation {asked} (activation="
                              f"{asked!r}) is for state dicts that do not say theirs")


def _wrong_source(path: pathlib.Path, asked: str, found: str, what: str) -> ConversionError:
    """The error for a named source that the folder does not hold: a forced format is checked, never ignored."""
    return ConversionError(f"{path} is {what} (source {found!r}), not the {asked!r} asked for; leave the source out "
                           "to detect it")


def _is_hub_name(name: str) -> bool:
    """'owner/repo' or 'hf-hub:owner/repo', as opposed to a local path that does not exist. Repository names may
    hold dots (`laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K`, `timm/vit_base_patch32_clip_224.openai`): only a
    checkpoint file's suffix makes a name a missing file."""
    parts = name.removeprefix("hf-hub:").split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))
            and not parts[1].lower().endswith((*sources.STATE_DICT_SUFFIXES, ".json")))
