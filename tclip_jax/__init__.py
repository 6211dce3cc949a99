"""tclip_jax: TCLIP (token-level CLIP relevance) in JAX/Flax.

The names below are imported on first use, so that `import tclip_jax` (and `tclip --help`) stays fast.
"""
from tclip_jax._exports import lazy_exports

_EXPORTS = {
    "TCLIP": "tclip_jax.methods.tclip",
    "Settings": "tclip_jax.methods.tclip",
    "LoadedClip": "tclip_jax.checkpoints.load",
    "load_clip": "tclip_jax.checkpoints.load",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
