"""State dict -> tclip_jax params, checked against `jax.eval_shape` of the model's init."""
from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np

from tclip_jax.checkpoints.folder import param_problems, unflatten
from tclip_jax.model import CLIPConfig
from tclip_jax.checkpoints.rules import IGNORED_SOURCE_KEYS, expand


class ConversionError(ValueError):
    """A checkpoint does not fit the model; the message lists every difference."""


def detect_format(state_dict: Mapping[str, np.ndarray]) -> str:
    """'openai' (OpenAI and OpenCLIP key names) or 'hf' (Hugging Face CLIPModel)."""
    keys = set(state_dict)
    if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in keys):
        raise ConversionError("this is a ResNet CLIP checkpoint; TCLIP needs a ViT CLIP (patch tokens)")
    if "visual.conv1.weight" in keys:
        return "openai"
    if "vision_model.embeddings.patch_embedding.weight" in keys:
        return "hf"
    sample = ", ".join(sorted(keys)[:5])
    raise ConversionError(f"not a CLIP ViT state dict (neither OpenAI/OpenCLIP nor Hugging Face key names); "
                          f"first keys: {sample}")


def _count_blocks(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise ConversionError(f"block indices are not contiguous: {sorted(found)}")
    return len(found)


def infer_openai_config(state_dict: Mapping[str, np.ndarray], activation: str = "quick_gelu",
                        vision_head_dim: int = 64, text_head_dim: int = 64) -> CLIPConfig:
    """Reads the architecture off an OpenAI-format state dict's shapes, like OpenAI's `build_model`.

    Head counts are not visible in the shapes: OpenAI's ViTs use 64-dim heads; OpenCLIP configs that
    differ (e.g. ViT-H/14, 80-dim heads) pass theirs.
    """
    if detect_format(state_dict) != "openai":
        raise ConversionError("expected OpenAI/OpenCLIP key names")
    try:
        conv = state_dict["visual.conv1.weight"]
        vision_width, patch = conv.shape[0], conv.shape[-1]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        text_width = state_dict["ln_final.weight"].shape[0]
        config = CLIPConfig(
            embed_dim=state_dict["text_projection"].shape[1],
            image_size=patch * grid, patch_size=patch,
            vision_width=vision_width,
            vision_layers=_count_blocks(state_dict, r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
            vision_heads=vision_width // vision_head_dim,
            vision_mlp_dim=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            context_length=state_dict["positional_embedding"].shape[0],
            text_width=text_width,
            text_layers=_count_blocks(state_dict, r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight"),
            text_heads=text_width // text_head_dim,
            text_mlp_dim=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            activation=activation)
    except KeyError as missing:
        raise ConversionError(f"OpenAI-format state dict lacks {missing}") from None
    return config


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: CLIPConfig,
                       fmt: Optional[str] = None) -> dict:
    """Applies the rule table of `fmt`, then checks the result against the model's parameter shapes.

    Raises ConversionError listing missing and unexpected source keys, shape mismatches and
    non-finite values, all at once.
    """
    fmt = fmt or detect_format(state_dict)
    rules = expand(fmt, {"visual": config.vision_layers, "text": config.text_layers})
    flat, missing = {}, []
    for rule in rules:
        if rule.source in state_dict:
            flat[rule.target] = np.asarray(rule.transform(np.asarray(state_dict[rule.source], np.float32)))
        else:
            missing.append(rule.source)
    used = {rule.source for rule in rules}
    unexpected = sorted(k for k in set(state_dict) - used
                        if not any(k.endswith(ignored) for ignored in IGNORED_SOURCE_KEYS))
    problems = [f"missing key: {k}" for k in missing] + [f"unexpected key: {k}" for k in unexpected]
    # Parameters whose source is missing are already reported above.
    missing_targets = {r.target for r in rules if r.source in missing}
    origins = {rule.target: rule.source for rule in rules}
    problems += [p for p in param_problems(flat, config, origins)
                 if not (p.startswith("missing parameter: ") and p.split()[2] in missing_targets)]
    if problems:
        raise ConversionError(f"{fmt} checkpoint does not fit the CLIP config "
                              f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    return unflatten(flat)
