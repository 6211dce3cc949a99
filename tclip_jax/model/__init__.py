"""The CLIP ViT model: architecture config, the Flax module and the tokenizer (`tokenizer`; `make_tokenizer_files`
derives its packaged vocabulary from OpenAI's BPE merges)."""
from tclip_jax._exports import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["CLIP", "ImageOutput", "TextOutput", "attend", "eot_positions", "init_params", "l2_normalize", "param_shapes"],
                    "tclip_jax.model.clip"),
    **dict.fromkeys(["PRESETS", "PRESET_HUB_NAMES", "CLIPConfig", "from_hf_config", "from_hf_preprocessor",
                     "hf_normalization", "to_hf_config"],
                    "tclip_jax.model.config"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
