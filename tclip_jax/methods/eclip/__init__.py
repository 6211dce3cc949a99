"""ECLIP: image-text similarity maps from CLIP's final-layer features through re-trained projections.

`method` holds the map (and the projections' file); `train` trains the projections (`tclip train-eclip`);
`settings` holds both settings classes, light enough for the command line to import.
"""
from tclip_jax._exports import lazy_exports

_EXPORTS = {"ECLIP": "tclip_jax.methods.eclip.method", "Settings": "tclip_jax.methods.eclip.settings",
            "TrainSettings": "tclip_jax.methods.eclip.settings"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
