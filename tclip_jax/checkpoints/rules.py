"""Name and shape rules from PyTorch CLIP state dicts to tclip_jax parameter paths.

Each table row is (target path in the Flax tree, source key, transform). `{t}` is the tower
(`visual` or `text`), `{i}` the block index; rows with them are expanded per tower and block.
OpenCLIP ViT checkpoints use the OpenAI key names, so they share the OpenAI table.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def same(w: np.ndarray) -> np.ndarray:
    return w


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return w.T


def conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
    return w.transpose(2, 3, 1, 0)


def fused_qkv(part: int, transform: Transform) -> Transform:
    """One third (0 = query, 1 = key, 2 = value) of a fused `in_proj` weight or bias."""
    def take(w: np.ndarray) -> np.ndarray:
        if w.ndim == 0 or w.shape[0] % 3:
            raise ValueError(f"fused in_proj has shape {w.shape}, whose rows are not a multiple of 3")
        return transform(np.split(w, 3, axis=0)[part])
    return take


@dataclasses.dataclass(frozen=True)
class Rule:
    target: str
    source: str
    transform: Transform = same


_BLOCK = "{t}/transformer/block_{i}/"

OPENAI_RULES = (
    Rule("visual/patch_embed/kernel", "visual.conv1.weight", conv),
    Rule("visual/class_embedding", "visual.class_embedding"),
    Rule("visual/positional_embedding", "visual.positional_embedding"),
    Rule("visual/ln_pre/scale", "visual.ln_pre.weight"),
    Rule("visual/ln_pre/bias", "visual.ln_pre.bias"),
    Rule("visual/ln_post/scale", "visual.ln_post.weight"),
    Rule("visual/ln_post/bias", "visual.ln_post.bias"),
    Rule("visual/proj", "visual.proj"),
    Rule("text/token_embedding", "token_embedding.weight"),
    Rule("text/positional_embedding", "positional_embedding"),
    Rule("text/ln_final/scale", "ln_final.weight"),
    Rule("text/ln_final/bias", "ln_final.bias"),
    Rule("text/projection", "text_projection"),
    Rule("logit_scale", "logit_scale"),
    *(Rule(_BLOCK + f"attn/{name}/kernel", "{p}transformer.resblocks.{i}.attn.in_proj_weight",
           fused_qkv(part, linear)) for part, name in enumerate(("query", "key", "value"))),
    *(Rule(_BLOCK + f"attn/{name}/bias", "{p}transformer.resblocks.{i}.attn.in_proj_bias",
           fused_qkv(part, same)) for part, name in enumerate(("query", "key", "value"))),
    Rule(_BLOCK + "attn/out/kernel", "{p}transformer.resblocks.{i}.attn.out_proj.weight", linear),
    Rule(_BLOCK + "attn/out/bias", "{p}transformer.resblocks.{i}.attn.out_proj.bias"),
    Rule(_BLOCK + "ln_1/scale", "{p}transformer.resblocks.{i}.ln_1.weight"),
    Rule(_BLOCK + "ln_1/bias", "{p}transformer.resblocks.{i}.ln_1.bias"),
    Rule(_BLOCK + "ln_2/scale", "{p}transformer.resblocks.{i}.ln_2.weight"),
    Rule(_BLOCK + "ln_2/bias", "{p}transformer.resblocks.{i}.ln_2.bias"),
    Rule(_BLOCK + "fc/kernel", "{p}transformer.resblocks.{i}.mlp.c_fc.weight", linear),
    Rule(_BLOCK + "fc/bias", "{p}transformer.resblocks.{i}.mlp.c_fc.bias"),
    Rule(_BLOCK + "proj/kernel", "{p}transformer.resblocks.{i}.mlp.c_proj.weight", linear),
    Rule(_BLOCK + "proj/bias", "{p}transformer.resblocks.{i}.mlp.c_proj.bias"),
)
# Text-tower keys in OpenAI checkpoints have no prefix.
OPENAI_TOWER_PREFIX = {"visual": "visual.", "text": ""}

HF_RULES = (
    Rule("visual/patch_embed/kernel", "vision_model.embeddings.patch_embedding.weight", conv),
    Rule("visual/class_embedding", "vision_model.embeddings.class_embedding"),
    Rule("visual/positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    Rule("visual/ln_pre/scale", "vision_model.pre_layrnorm.weight"),  # sic: HF's spelling
    Rule("visual/ln_pre/bias", "vision_model.pre_layrnorm.bias"),
    Rule("visual/ln_post/scale", "vision_model.post_layernorm.weight"),
    Rule("visual/ln_post/bias", "vision_model.post_layernorm.bias"),
    Rule("visual/proj", "visual_projection.weight", linear),
    Rule("text/token_embedding", "text_model.embeddings.token_embedding.weight"),
    Rule("text/positional_embedding", "text_model.embeddings.position_embedding.weight"),
    Rule("text/ln_final/scale", "text_model.final_layer_norm.weight"),
    Rule("text/ln_final/bias", "text_model.final_layer_norm.bias"),
    Rule("text/projection", "text_projection.weight", linear),
    Rule("logit_scale", "logit_scale"),
    *(Rule(_BLOCK + f"attn/{name}/kernel", "{p}encoder.layers.{i}.self_attn." + hf + "_proj.weight", linear)
      for name, hf in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "out"))),
    *(Rule(_BLOCK + f"attn/{name}/bias", "{p}encoder.layers.{i}.self_attn." + hf + "_proj.bias")
      for name, hf in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "out"))),
    Rule(_BLOCK + "ln_1/scale", "{p}encoder.layers.{i}.layer_norm1.weight"),
    Rule(_BLOCK + "ln_1/bias", "{p}encoder.layers.{i}.layer_norm1.bias"),
    Rule(_BLOCK + "ln_2/scale", "{p}encoder.layers.{i}.layer_norm2.weight"),
    Rule(_BLOCK + "ln_2/bias", "{p}encoder.layers.{i}.layer_norm2.bias"),
    Rule(_BLOCK + "fc/kernel", "{p}encoder.layers.{i}.mlp.fc1.weight", linear),
    Rule(_BLOCK + "fc/bias", "{p}encoder.layers.{i}.mlp.fc1.bias"),
    Rule(_BLOCK + "proj/kernel", "{p}encoder.layers.{i}.mlp.fc2.weight", linear),
    Rule(_BLOCK + "proj/bias", "{p}encoder.layers.{i}.mlp.fc2.bias"),
)
HF_TOWER_PREFIX = {"visual": "vision_model.", "text": "text_model."}

# Buffers and metadata that carry no weights: keys of these names, alone (OpenAI's archives, OpenCLIP's attn_mask)
# or as a module's (transformers' `text_model.embeddings.position_ids`); `my_position_ids` is no such key.
IGNORED_SOURCE_KEYS = ("position_ids", "input_resolution", "context_length", "vocab_size", "attn_mask")

TABLES = {"openai": (OPENAI_RULES, OPENAI_TOWER_PREFIX), "hf": (HF_RULES, HF_TOWER_PREFIX)}


def expand(fmt: str, layers: dict[str, int]) -> list[Rule]:
    """The table of `fmt` with `{t}`, `{p}` and `{i}` filled in for each tower and block."""
    rules, prefixes = TABLES[fmt]
    expanded = []
    for rule in rules:
        if "{t}" not in rule.target:
            expanded.append(rule)
            continue
        for tower, prefix in prefixes.items():
            for i in range(layers[tower]):
                expanded.append(Rule(rule.target.format(t=tower, i=i),
                                     rule.source.format(p=prefix, i=i), rule.transform))
    return expanded
