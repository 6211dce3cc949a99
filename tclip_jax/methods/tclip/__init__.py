"""TCLIP: per-word maps from CLIP's final-layer text tokens against its patch tokens, over translated copies."""
from tclip_jax.methods.tclip.method import TCLIP, Settings

__all__ = ["TCLIP", "Settings"]
