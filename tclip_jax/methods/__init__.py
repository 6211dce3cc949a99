"""Relevance-map methods behind one interface (`base.Method`): TCLIP and every baseline, by name.

Each baseline module also keeps its method as a pure function `*_map(model, params, images, texts, **options)`
of the static model (`tclip_jax.model.CLIP`: config and matmul dtype) and its parameters, returning the
patch-grid maps and the method's intermediates; the `Method` classes add the official protocol, prompts and
map post-processing. `get(name)` also takes `"package.module:Class"` for a method defined outside the package.
The registry names where each class lives, so listing the methods imports none of them.
"""
from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {
    "tclip": "tclip_jax.methods.tclip.method:TCLIP",
    "similarity": "tclip_jax.methods.similarity:Similarity",
    "rclip": "tclip_jax.methods.similarity:RCLIP",
    "maskclip": "tclip_jax.methods.similarity:MaskCLIP",
    "clip_surgery": "tclip_jax.methods.clip_surgery:CLIPSurgery",
    "hilacam": "tclip_jax.methods.hilacam:HilaCAM",
    "attention": "tclip_jax.methods.attention:RawAttention",
    "rollout": "tclip_jax.methods.attention:Rollout",
    "gradcam": "tclip_jax.methods.grad_eclip:GradCAM",
    "grad_eclip": "tclip_jax.methods.grad_eclip:GradECLIP",
    "decomposition": "tclip_jax.methods.decomposition:DecompositionMap",
    "gscorecam": "tclip_jax.methods.gscorecam:GScoreCAM",
    "m2ib": "tclip_jax.methods.m2ib:M2IB",
    "eclip": "tclip_jax.methods.eclip.method:ECLIP",
}


def get(spec: str) -> type:
    """The method class named `spec`: a `REGISTRY` name or "package.module:Class"."""
    from tclip_jax.methods.base import Method

    path = REGISTRY.get(spec, spec)
    if ":" not in path:
        raise ValueError(f"unknown method {spec!r}; available: {', '.join(REGISTRY)} or 'package.module:Class'")
    module_name, class_name = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"method module {module_name!r} cannot be imported: {err}") from None
    method = getattr(module, class_name, None)
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise ValueError(f"{spec!r} is not a tclip_jax.methods.Method subclass")
    return method


def __getattr__(name: str):
    if name == "METHODS":  # every registered class, imported on first use
        methods = {key: get(key) for key in REGISTRY}
        globals()["METHODS"] = methods
        return methods
    raise AttributeError(f"module 'tclip_jax.methods' has no attribute {name!r}")
