"""TCLIP: per-word maps from CLIP's final-layer text tokens against its patch tokens, over translated copies."""
from tclip_jax._exports import lazy_exports

_EXPORTS = {"TCLIP": "tclip_jax.methods.tclip.method", "Settings": "tclip_jax.methods.tclip.settings"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
