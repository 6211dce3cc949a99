"""tclip_jax: TCLIP (token-level CLIP relevance) in JAX/Flax."""
from tclip_jax.checkpoints.load import LoadedClip, load_clip
from tclip_jax.method.explainer import TCLIP, Settings

__all__ = ["TCLIP", "LoadedClip", "Settings", "load_clip"]
