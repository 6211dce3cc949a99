"""The CLIP ViT model: architecture config and the Flax module."""
from tclip_jax.model.clip import CLIP, ImageOutput, TextOutput, attend, init_params, l2_normalize, param_shapes
from tclip_jax.model.config import PRESETS, CLIPConfig, from_hf_config, to_hf_config

__all__ = ["CLIP", "CLIPConfig", "ImageOutput", "PRESETS", "TextOutput", "attend", "from_hf_config", "init_params",
           "l2_normalize", "param_shapes", "to_hf_config"]
