"""State dict -> tclip_jax params, checked against `jax.eval_shape` of the model's init."""
from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np

from tclip_jax.checkpoints.folder import not_floating, param_problems, unflatten
from tclip_jax.model import CLIPConfig
from tclip_jax.checkpoints.rules import IGNORED_SOURCE_KEYS, expand


class ConversionError(ValueError):
    """A checkpoint does not fit the model; the message lists every difference."""


# A key each format's state dict has (its image tower's patch embedding).
_FORMAT_KEYS = {"openai": "visual.conv1.weight", "hf": "vision_model.embeddings.patch_embedding.weight"}


def detect_format(state_dict: Mapping[str, np.ndarray], path: Optional[str] = None) -> str:
    """'openai' (OpenAI and OpenCLIP key names) or 'hf' (Hugging Face CLIPModel); errors name `path`, the file, if
    given."""
    keys = set(state_dict)
    where = f"{path}: " if path else ""
    if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in keys):
        raise ConversionError(f"{where}this is a ResNet CLIP checkpoint; TCLIP needs a ViT CLIP (patch tokens)")
    found = next((fmt for fmt, key in _FORMAT_KEYS.items() if key in keys), None)
    if found is not None:
        return found
    # A wrapper's attribute name before every key (a training script's `model.`): said, not guessed away.
    prefix = next(iter(keys), "").split(".", 1)[0] + "."
    if all(k.startswith(prefix) for k in keys) and any(prefix + key in keys for key in _FORMAT_KEYS.values()):
        raise ConversionError(f"{where}every key starts with {prefix!r}, as a model wrapped in another module saves "
                              f"it; save the CLIP's own state dict (its keys without {prefix!r})")
    sample = ", ".join(sorted(keys)[:5])
    raise ConversionError(f"{where}not a CLIP ViT state dict (neither OpenAI/OpenCLIP nor Hugging Face key names); "
                          f"first keys: {sample}")


def _count_blocks(keys, pattern: str, where: str = "") -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise ConversionError(f"{where}block indices are not contiguous: {sorted(found)}")
    return len(found)


def infer_openai_config(state_dict: Mapping[str, np.ndarray], activation: str = "quick_gelu",
                        vision_head_dim: int = 64, text_head_dim: int = 64, layer_norm_eps: float = 1e-5,
                        path: Optional[str] = None, **normalization) -> CLIPConfig:
    """Reads the architecture off an OpenAI-format state dict's shapes, like OpenAI's `build_model`.

    Head counts and the layer-norm epsilon are not visible in the shapes: OpenAI's ViTs use 64-dim heads and
    torch's default 1e-5; OpenCLIP configs that differ (e.g. ViT-H/14, 80-dim heads) pass theirs, and their pixel
    normalization (`normalization`: `CLIPConfig.image_mean`, `image_std`; OpenAI's where not given). Errors name
    `path`, the checkpoint file, if given.
    """
    where = f"{path}: " if path else ""
    if detect_format(state_dict, path) != "openai":
        raise ConversionError(f"{where}expected OpenAI/OpenCLIP key names")

    def shape(key: str, rank: int, layout: str) -> tuple[int, ...]:
        if key not in state_dict:  # the architecture is read off it, so it is missed before the other keys are
            raise ConversionError(f"{where}OpenAI-format state dict lacks {key!r}, from which its architecture is read")
        found = tuple(np.shape(state_dict[key]))
        if len(found) != rank:
            raise ConversionError(f"{where}{key} must be {rank}-D {layout}, got shape {found}")
        return found

    vision_width, _, patch, _ = shape("visual.conv1.weight", 4, "[width, 3, patch, patch]")
    positions = shape("visual.positional_embedding", 2, "[1 + grid**2, width]")[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ConversionError(f"{where}visual.positional_embedding has {positions} rows, not 1 + a square grid")
    text_width = shape("ln_final.weight", 1, "[text width]")[0]
    for width, head_dim, tower, field in ((vision_width, vision_head_dim, "vision", "vision_cfg.head_width"),
                                          (text_width, text_head_dim, "text", "text_cfg.width and heads")):
        if width % head_dim:
            raise ConversionError(f"{where}{tower} width {width} is not a multiple of {head_dim}, the width of its "
                                  "heads (a state dict does not store it: OpenAI's 64, unless the open_clip_config.json "
                                  f"of an OpenCLIP folder holding the weights gives model_cfg.{field})")
    values = dict(
        embed_dim=shape("text_projection", 2, "[text width, embed dim]")[1],
        image_size=patch * grid, patch_size=patch,
        vision_width=vision_width,
        vision_layers=_count_blocks(state_dict, r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight",
                                    where),
        vision_heads=vision_width // vision_head_dim,
        vision_mlp_dim=shape("visual.transformer.resblocks.0.mlp.c_fc.weight", 2, "[mlp dim, width]")[0],
        vocab_size=shape("token_embedding.weight", 2, "[vocabulary, text width]")[0],
        context_length=shape("positional_embedding", 2, "[context, text width]")[0],
        text_width=text_width,
        text_layers=_count_blocks(state_dict, r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", where),
        text_heads=text_width // text_head_dim,
        text_mlp_dim=shape("transformer.resblocks.0.mlp.c_fc.weight", 2, "[mlp dim, text width]")[0],
        activation=activation, layer_norm_eps=layer_norm_eps, **normalization)
    try:
        return CLIPConfig(**values)
    except ValueError as err:  # CLIPConfig's own checks (e.g. no blocks at all)
        raise ConversionError(f"{where}the state dict's shapes give no valid CLIP: {err}") from None


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: CLIPConfig,
                       fmt: Optional[str] = None, path: Optional[str] = None) -> dict:
    """Applies the rule table of `fmt`, then checks the result against the model's parameter shapes.

    Raises ConversionError listing missing and unexpected source keys, keys a rule cannot split or transpose or
    that hold integers or booleans (a buffer the rules ignore may), shape mismatches and non-finite values, all at
    once (naming `path`, the checkpoint file, if given).
    """
    fmt = fmt or detect_format(state_dict)
    rules = expand(fmt, {"visual": config.vision_layers, "text": config.text_layers})
    flat, missing, malformed = {}, [], {}
    for rule in rules:
        if rule.source not in state_dict:
            missing.append(rule.source)
            continue
        if (problem := not_floating(rule.source, state_dict[rule.source])) is not None:
            malformed[rule.source] = problem
            continue
        try:
            flat[rule.target] = np.asarray(rule.transform(np.asarray(state_dict[rule.source], np.float32)))
        except ValueError as err:  # e.g. a fused in_proj whose rows do not split in three
            malformed[rule.source] = f"{rule.source}: {err}"
    used = {rule.source for rule in rules}
    unexpected = sorted(k for k in set(state_dict) - used
                        if not any(k == ignored or k.endswith("." + ignored) for ignored in IGNORED_SOURCE_KEYS))
    problems = [f"missing key: {k}" for k in missing] + [f"unexpected key: {k}" for k in unexpected]
    problems += malformed.values()
    # Parameters whose source is missing or malformed are already reported above.
    unmade_targets = {r.target for r in rules if r.source in missing or r.source in malformed}
    origins = {rule.target: rule.source for rule in rules}
    problems += [p for p in param_problems(flat, config, origins)
                 if not (p.startswith("missing parameter: ") and p.split()[2] in unmade_targets)]
    if problems:
        raise ConversionError(f"{fmt} checkpoint{f' {path}' if path else ''} does not fit the CLIP config "
                              f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    return unflatten(flat)
