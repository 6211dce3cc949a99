"""CLIP ViT architecture description (and the pixel normalization its weights were trained with): presets, Hugging
Face `config.json` and `preprocessor_config.json`, JSON round trip."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

ACTIVATIONS = ("quick_gelu", "gelu")
# OpenAI CLIP's pixel normalization, per RGB channel of pixels scaled to [0, 1]: its models', and most OpenCLIP and
# Hugging Face ones'.
OPENAI_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATION_FIELDS = ("image_mean", "image_std")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Shapes and choices of a CLIP ViT (image tower) + causal text transformer."""

    embed_dim: int
    # Image tower.
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_dim: int
    # Text tower.
    vocab_size: int
    context_length: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp_dim: int
    # OpenAI checkpoints use QuickGELU; some OpenCLIP / HF checkpoints use exact GELU.
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Output channels of 3x3 stride-2 convolutions (each followed by `activation`) ahead of the patch embedding,
    # which then covers patch_size / 2**len(stem_channels) of their output: Xiao et al. (2021)'s convolutional
    # stem. () is the linear patch embedding of every released CLIP and of clip_only_model; the default embedded
    # model has a stem (training/RECIPE_SEARCH.md: the runs with and without).
    stem_channels: tuple[int, ...] = ()
    # Where the text embedding is read: None, at the highest token id of the row (OpenAI's and OpenCLIP's argmax,
    # right while end-of-text is the highest id); an id, at its first occurrence (Hugging Face's rule unless its
    # eos_token_id is the legacy 2), right also for tokenizers with tokens added after end-of-text.
    eot_token_id: Optional[int] = None
    # The pixel normalization the weights were trained with: the input protocols compute (pixel / 255 - image_mean)
    # / image_std per RGB channel. OpenAI's unless a checkpoint's preprocessing config says another (OpenCLIP's
    # preprocess_cfg, Hugging Face's preprocessor_config.json: some LAION models use 0.5 and 0.5).
    image_mean: tuple[float, float, float] = OPENAI_IMAGE_MEAN
    image_std: tuple[float, float, float] = OPENAI_IMAGE_STD

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if (isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float))
                or not 0 < self.layer_norm_eps < 1):
            raise ValueError(f"layer_norm_eps must be a small positive number, got {self.layer_norm_eps!r}")
        if self.eot_token_id is not None and (isinstance(self.eot_token_id, bool) or not isinstance(
                self.eot_token_id, int) or not 0 <= self.eot_token_id < self.vocab_size):
            raise ValueError(f"eot_token_id must be None or a token id below vocab_size {self.vocab_size}, got "
                             f"{self.eot_token_id!r}")
        if not isinstance(self.stem_channels, tuple) or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.stem_channels):
            raise ValueError(f"stem_channels must be a tuple of positive integers, got {self.stem_channels!r}")
        if self.patch_size % 2 ** len(self.stem_channels):
            raise ValueError(f"patch_size {self.patch_size} is not divisible by 2**{len(self.stem_channels)}, "
                             f"the downsampling of the {len(self.stem_channels)} stride-2 stem convolutions")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in NORMALIZATION_FIELDS:
            value = getattr(self, name)
            normalization_channels(value, name, name == "image_std")
            if not isinstance(value, tuple) or not all(isinstance(v, float) for v in value):  # one repr, one digest
                raise ValueError(f"{name} must be a tuple of 3 floats, got {value!r}")
        for width, heads, tower in ((self.vision_width, self.vision_heads, "vision"),
                                    (self.text_width, self.text_heads, "text")):
            if width % heads:
                raise ValueError(f"{tower} width {width} is not divisible by its {heads} heads")

    @property
    def grid_size(self) -> int:
        """Side of the patch grid the positional embedding was trained for."""
        return self.image_size // self.patch_size

    @property
    def normalizes_as_openai(self) -> bool:
        """Whether the pixel normalization is OpenAI's, the only one before the config carried it."""
        return (self.image_mean, self.image_std) == (OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD)

    def defining_fields(self) -> dict[str, Any]:
        """Every field, less the pixel normalization where it is OpenAI's, the only one before the config carried it
        (what `LoadedClip.fingerprint` digests, so that such models keep their fingerprint)."""
        values = dataclasses.asdict(self)
        if self.normalizes_as_openai:
            for name in NORMALIZATION_FIELDS:
                del values[name]
        return values

    def to_dict(self) -> dict[str, Any]:
        # The defaults, left out: a folder earlier versions can read (and one they would read wrong, they refuse).
        values = self.defining_fields()
        if values["eot_token_id"] is None:
            del values["eot_token_id"]
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CLIPConfig":
        if not isinstance(values, Mapping):
            raise ValueError(f"a CLIPConfig is a JSON object of its fields, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        missing = sorted(n for n in names - set(values)
                         if cls.__dataclass_fields__[n].default is dataclasses.MISSING)
        if unknown or missing:
            raise ValueError(f"not a tclip_jax CLIPConfig: unknown keys {unknown}, missing keys {missing}")
        if isinstance(values.get("stem_channels"), list):  # JSON has no tuples
            values = {**values, "stem_channels": tuple(values["stem_channels"])}
        values = {**values, **{name: normalization_channels(values[name], name, name == "image_std")
                               for name in NORMALIZATION_FIELDS if name in values}}
        return cls(**values)


def normalization_channels(value: Any, name: str, positive: bool = False) -> tuple[float, float, float]:
    """`value` (a JSON list) as a normalization's three per-channel floats; ValueError naming `name` otherwise. A
    standard deviation (`positive`) must be above 0."""
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {value!r}")
    if positive and min(value) <= 0:
        raise ValueError(f"{name} must be 3 positive numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _openai_vit(embed_dim, image_size, patch_size, vision_width, vision_layers, text_width, text_layers):
    # OpenAI ViTs: 64-dim heads, MLP ratio 4, 77-token context, 49408-token vocabulary.
    return CLIPConfig(
        embed_dim=embed_dim, image_size=image_size, patch_size=patch_size,
        vision_width=vision_width, vision_layers=vision_layers, vision_heads=vision_width // 64,
        vision_mlp_dim=4 * vision_width,
        vocab_size=49408, context_length=77, text_width=text_width, text_layers=text_layers,
        text_heads=text_width // 64, text_mlp_dim=4 * text_width)


PRESETS: dict[str, CLIPConfig] = {
    "ViT-B/32": _openai_vit(512, 224, 32, 768, 12, 512, 12),
    "ViT-B/16": _openai_vit(512, 224, 16, 768, 12, 512, 12),
    "ViT-L/14": _openai_vit(768, 224, 14, 1024, 24, 768, 12),
    "ViT-L/14@336": _openai_vit(768, 336, 14, 1024, 24, 768, 12),
}
# A preset names an architecture (a record names a model's by it), not weights: OpenAI's weights of each are these
# Hugging Face hub repositories, which `load_clip` and --model take.
PRESET_HUB_NAMES = {"ViT-B/32": "openai/clip-vit-base-patch32", "ViT-B/16": "openai/clip-vit-base-patch16",
                    "ViT-L/14": "openai/clip-vit-large-patch14", "ViT-L/14@336": "openai/clip-vit-large-patch14-336"}


# CLIPConfig field -> (part of the Hugging Face config, its key, the default Hugging Face's CLIPConfig has).
_HF_FIELDS = {
    "embed_dim": (None, "projection_dim", 512),
    "image_size": ("vision_config", "image_size", 224),
    "patch_size": ("vision_config", "patch_size", 32),
    "vision_width": ("vision_config", "hidden_size", 768),
    "vision_layers": ("vision_config", "num_hidden_layers", 12),
    "vision_heads": ("vision_config", "num_attention_heads", 12),
    "vision_mlp_dim": ("vision_config", "intermediate_size", 3072),
    "vocab_size": ("text_config", "vocab_size", 49408),
    "context_length": ("text_config", "max_position_embeddings", 77),
    "text_width": ("text_config", "hidden_size", 512),
    "text_layers": ("text_config", "num_hidden_layers", 12),
    "text_heads": ("text_config", "num_attention_heads", 8),
    "text_mlp_dim": ("text_config", "intermediate_size", 2048),
}


def is_hf_clip_config(hf: Any) -> bool:
    """Whether a `config.json` (as read) is a Hugging Face CLIPModel's, two towers' (another model's, timm's say,
    has neither vision_config nor text_config)."""
    return isinstance(hf, Mapping) and "vision_config" in hf and "text_config" in hf


def from_hf_config(hf: Mapping[str, Any]) -> CLIPConfig:
    """Reads a Hugging Face `CLIPModel` `config.json` (as a dict); errors name the Hugging Face field."""
    if not is_hf_clip_config(hf):
        raise ValueError("not a Hugging Face CLIPModel config: it has no vision_config / text_config")
    # Models with CLIP's weight names but other computations (MetaCLIP 2 pools at the first eos even when it is 2,
    # and brings its own XLM-V vocabulary) pass every weight check, so the model type itself is checked.
    model_type = hf.get("model_type", "clip")
    if model_type != "clip":
        raise ValueError(f"model_type {model_type!r} is not supported: only Hugging Face CLIPModel (model_type "
                         "\"clip\") is read")
    parts = {None: hf, "vision_config": hf["vision_config"], "text_config": hf["text_config"]}
    for name in ("vision_config", "text_config"):
        if not isinstance(parts[name], Mapping):
            raise ValueError(f"{name} must be an object, got {type(parts[name]).__name__}")
    text = parts["text_config"]

    def both_towers(key: str, default: Any, valid, expected: str) -> Any:
        """The towers' `key`, each checked (a list or an object is named, not hashed), and the same in both."""
        values = [parts[tower].get(key, default) for tower in ("vision_config", "text_config")]
        for tower, value in zip(("vision_config", "text_config"), values):
            if not valid(value):
                raise ValueError(f"{tower}.{key} must be {expected}, got {value!r}")
        if values[0] != values[1]:
            raise ValueError(f"towers with different {key} are not supported: {values}")
        return values[0]

    activation = both_towers("hidden_act", "quick_gelu", lambda v: isinstance(v, str) and v in ACTIVATIONS,
                             f"one of {ACTIVATIONS}")
    eps = both_towers("layer_norm_eps", 1e-5, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                      and 0 < v < 1, "a small positive number")
    values = {}
    for field, (part, key, default) in _HF_FIELDS.items():
        value = parts[part].get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key if part is None else part + '.' + key} must be a positive integer, got {value!r}")
        values[field] = value
    eos = text.get("eos_token_id", 49407)  # transformers' CLIPTextConfig default (2 before version 5)
    if isinstance(eos, bool) or not isinstance(eos, int) or eos < 0:
        raise ValueError(f"text_config.eos_token_id must be a token id, got {eos!r}")
    # transformers reads the embedding at the highest id for the legacy eos_token_id 2 (configs written before it
    # knew the real one), else at the first eos_token_id: the same place when that is the vocabulary's last id.
    highest = eos in (2, values["vocab_size"] - 1)
    return CLIPConfig(**values, activation=activation, layer_norm_eps=eps, eot_token_id=None if highest else eos)


# Hugging Face CLIPImageProcessor fields that change the pixels but that no input protocol computes otherwise, with
# the value the protocols compute (transformers' default): another value is refused, not ignored. Its sizes
# (`_refuse_other_hf_sizes`) must be the input size of the weights, which every protocol resizes to.
_HF_PREPROCESSOR_DEFAULTS = {"do_resize": True, "resample": 3, "do_center_crop": True, "do_rescale": True,
                             "rescale_factor": 1 / 255, "do_convert_rgb": True,
                             "use_square_size": False}  # True: transformers resizes `size` to a square


def from_hf_preprocessor(hf: Mapping[str, Any], image_size: int) -> dict[str, tuple[float, float, float]]:
    """The `CLIPConfig` normalization fields a Hugging Face `preprocessor_config.json` (as a dict) of a model of input
    size `image_size` gives: its image_mean and image_std (transformers' defaults, OpenAI's, where left out; none at
    all where do_normalize is false). Errors name the field."""
    if not isinstance(hf, Mapping):
        raise ValueError(f"a preprocessor config is a JSON object, got {type(hf).__name__}")
    refuse_other_hf_values(hf, _HF_PREPROCESSOR_DEFAULTS, "the input protocols compute")
    normalization = hf_normalization(hf, OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD)
    _refuse_other_hf_sizes(hf, image_size)
    return normalization


def _refuse_other_hf_sizes(hf: Mapping[str, Any], image_size: int) -> None:
    """Refuses a CLIPImageProcessor `size` other than the shortest edge resized to `image_size` and a `crop_size`
    other than an `image_size` square, what every input protocol computes (its resize and center crop), read as
    transformers reads them (`get_size_dict`: a number is the shortest edge of `size`, the side of a square
    `crop_size`; a [height, width] pair; 224 where left out): one line naming the field."""
    expected = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    for key, computed in expected.items():
        value = hf.get(key, 224)
        read = value
        if isinstance(value, int) and not isinstance(value, bool):
            read = {"shortest_edge": value} if key == "size" else {"height": value, "width": value}
        elif isinstance(value, list) and len(value) == 2:
            read = {"height": value[0], "width": value[1]}
        if read != computed:
            doing = ("resize the shortest edge to" if key == "size" else "crop a square of") + " the model's input size"
            given = f"{key} = {value!r}" if key in hf else f"{key} left out (transformers' {value!r})"
            raise ValueError(f"{given} is not supported (the input protocols {doing}, {computed!r})")


def refuse_other_hf_values(hf: Mapping[str, Any], computed: Mapping[str, Any], computes: str) -> None:
    """Refuses a Hugging Face image processor config (a dict) whose field in `computed` (transformers' default where
    left out) is not the value there, what the pixels fed in are computed as (`computes` says by what): one line
    naming the field, not a field ignored."""
    for key, default in computed.items():
        value = hf.get(key, default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, (int, float)) or (
                not math.isclose(value, default, rel_tol=1e-6)):  # rescale_factor may be written rounded
            about = " (3: bicubic)" if key == "resample" else ""
            raise ValueError(f"{key} = {value!r} is not supported ({computes} {default!r}{about})")


def hf_normalization(hf: Mapping[str, Any], default_mean: tuple[float, float, float],
                     default_std: tuple[float, float, float]) -> dict[str, tuple[float, float, float]]:
    """image_mean and image_std as a Hugging Face image processor's config (a dict) gives them: its own, the
    processor's defaults (`default_mean`, `default_std`) where left out, none at all (0 and 1) where do_normalize is
    false. Errors name the field."""
    if not isinstance(hf, Mapping):
        raise ValueError(f"a preprocessor config is a JSON object, got {type(hf).__name__}")
    normalize = hf.get("do_normalize", True)
    if not isinstance(normalize, bool):
        raise ValueError(f"do_normalize must be true or false, got {normalize!r}")
    if not normalize:
        return {"image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}
    return {name: normalization_channels(hf.get(name, default), name, name == "image_std")
            for name, default in (("image_mean", default_mean), ("image_std", default_std))}


def to_hf_config(config: CLIPConfig) -> dict[str, Any]:
    """The Hugging Face `CLIPModel` config dict with the same architecture (used by parity tests)."""
    if config.stem_channels:
        raise ValueError("a model with a convolutional stem (stem_channels) has no Hugging Face CLIPModel equivalent")
    return {
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": 2.6592,
        "vision_config": {
            "image_size": config.image_size, "patch_size": config.patch_size,
            "hidden_size": config.vision_width, "num_hidden_layers": config.vision_layers,
            "num_attention_heads": config.vision_heads, "intermediate_size": config.vision_mlp_dim,
            "hidden_act": config.activation, "layer_norm_eps": config.layer_norm_eps,
            "projection_dim": config.embed_dim,
        },
        "text_config": {
            "vocab_size": config.vocab_size, "max_position_embeddings": config.context_length,
            "hidden_size": config.text_width, "num_hidden_layers": config.text_layers,
            "num_attention_heads": config.text_heads, "intermediate_size": config.text_mlp_dim,
            "hidden_act": config.activation, "layer_norm_eps": config.layer_norm_eps,
            "projection_dim": config.embed_dim, "bos_token_id": 49406,
            "eos_token_id": 2 if config.eot_token_id is None else config.eot_token_id,  # 2: the highest id
            "pad_token_id": 1,
        },
    }
