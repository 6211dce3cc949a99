"""Relevance-map methods behind one interface (`base.Method`): TCLIP and every baseline, by name.

Each baseline module also keeps its method as a pure function `*_map(model, params, images, texts, **options)`
of the static model (`tclip_jax.model.CLIP`: config and matmul dtype) and its parameters, returning the
patch-grid maps and the method's intermediates; the `Method` classes add the official protocol, prompts and
map post-processing. `get(name)` also takes `"package.module:Class"` for a method defined outside the package.
"""
from __future__ import annotations

import importlib

from tclip_jax.methods.attention import RawAttention, Rollout
from tclip_jax.methods.base import Method
from tclip_jax.methods.clip_surgery import CLIPSurgery
from tclip_jax.methods.decomposition import DecompositionMap
from tclip_jax.methods.grad_eclip import GradCAM, GradECLIP
from tclip_jax.methods.gscorecam import GScoreCAM
from tclip_jax.methods.hilacam import HilaCAM
from tclip_jax.methods.m2ib import M2IB
from tclip_jax.methods.similarity import RCLIP, MaskCLIP, Similarity
from tclip_jax.methods.tclip import TCLIP

METHODS: dict[str, type[Method]] = {
    "tclip": TCLIP,
    "similarity": Similarity,
    "rclip": RCLIP,
    "maskclip": MaskCLIP,
    "clip_surgery": CLIPSurgery,
    "hilacam": HilaCAM,
    "attention": RawAttention,
    "rollout": Rollout,
    "gradcam": GradCAM,
    "grad_eclip": GradECLIP,
    "decomposition": DecompositionMap,
    "gscorecam": GScoreCAM,
    "m2ib": M2IB,
}


def get(spec: str) -> type[Method]:
    """The method class named `spec`: a `METHODS` key or "package.module:Class"."""
    if spec in METHODS:
        return METHODS[spec]
    if ":" not in spec:
        raise ValueError(f"unknown method {spec!r}; available: {', '.join(METHODS)} or 'package.module:Class'")
    module_name, class_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"method module {module_name!r} cannot be imported: {err}") from None
    method = getattr(module, class_name, None)
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise ValueError(f"{spec!r} is not a tclip_jax.methods.Method subclass")
    return method
