"""tclip_jax: TCLIP (token-level CLIP relevance) in JAX/Flax.

The names below are imported on first use, so that `import tclip_jax` (and `tclip --help`) stays fast.
"""
import importlib

_EXPORTS = {
    "TCLIP": "tclip_jax.methods.tclip",
    "Settings": "tclip_jax.methods.tclip",
    "LoadedClip": "tclip_jax.checkpoints.load",
    "load_clip": "tclip_jax.checkpoints.load",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tclip_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
