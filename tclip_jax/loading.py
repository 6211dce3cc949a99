"""`load_clip`: one loader for every way of naming a CLIP ViT (see `weights_conversion.load`)."""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Optional

import jax.numpy as jnp

from tclip_jax.model import CLIP, CLIPConfig
from tclip_jax.tokenizer import ClipTokenizer, default_tokenizer

# The small CLIP trained on synthetic scenes that ships with the package; used when no model is named.
DEFAULT_MODEL_DIR = pathlib.Path(__file__).resolve().parent / "data" / "default_model"


@dataclasses.dataclass(frozen=True)
class LoadedClip:
    model: CLIP          # the Flax module; call it as model.apply({"params": params}, ...)
    params: dict         # float32 parameter tree
    tokenizer: ClipTokenizer
    source: str          # 'tclip', 'hf', 'openai' or 'open_clip'
    origin: str          # what was named

    @property
    def config(self) -> CLIPConfig:
        return self.model.config


def load_clip(name_or_path: Optional[str | os.PathLike] = None, *, source: Optional[str] = None,
              activation: Optional[str] = None, dtype: Any = jnp.float32) -> LoadedClip:
    """Loads a CLIP ViT with its tokenizer.

    `name_or_path`: None (the embedded default), a converted folder, a Hugging Face folder or hub name,
    an OpenAI `.pt`, an OpenAI-format `.npz`/`.safetensors` state dict, or an OpenCLIP checkpoint.
    `dtype` is the matmul dtype (parameters stay float32), e.g. `jnp.bfloat16` on TPU.
    """
    from weights_conversion.load import load_any  # conversion code is only needed when loading

    if name_or_path is None:
        if not DEFAULT_MODEL_DIR.is_dir():
            raise FileNotFoundError(f"the embedded default model is missing from this installation "
                                    f"({DEFAULT_MODEL_DIR}); name a model explicitly")
        name_or_path = DEFAULT_MODEL_DIR
    converted = load_any(name_or_path, source=source, activation=activation)
    tokenizer = default_tokenizer() if converted.tokenizer_dir is None else ClipTokenizer(converted.tokenizer_dir)
    return LoadedClip(CLIP(converted.config, dtype), converted.params, tokenizer, converted.source, converted.origin)
