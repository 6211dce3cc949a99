"""CLIP ViT architecture description: presets, Hugging Face `config.json`, JSON round trip."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

ACTIVATIONS = ("quick_gelu", "gelu")


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
        for width, heads, tower in ((self.vision_width, self.vision_heads, "vision"),
                                    (self.text_width, self.text_heads, "text")):
            if width % heads:
                raise ValueError(f"{tower} width {width} is not divisible by its {heads} heads")

    @property
    def grid_size(self) -> int:
        """Side of the patch grid the positional embedding was trained for."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if values["eot_token_id"] is None:  # the default, left out: a folder earlier versions can read
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
        return cls(**values)


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


def from_hf_config(hf: Mapping[str, Any]) -> CLIPConfig:
    """Reads a Hugging Face `CLIPModel` `config.json` (as a dict); errors name the Hugging Face field."""
    if not isinstance(hf, Mapping) or "vision_config" not in hf or "text_config" not in hf:
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
    vision, text = parts["vision_config"], parts["text_config"]
    activations = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(activations) != 1:
        raise ValueError(f"towers with different activations are not supported: {sorted(map(str, activations))}")
    activation = activations.pop()
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {activation!r}; expected one of {ACTIVATIONS}")
    eps = {vision.get("layer_norm_eps", 1e-5), text.get("layer_norm_eps", 1e-5)}
    if len(eps) != 1:
        raise ValueError(f"towers with different layer_norm_eps are not supported: {sorted(map(str, eps))}")
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
    return CLIPConfig(**values, activation=activation, layer_norm_eps=eps.pop(), eot_token_id=None if highest else eos)


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
