"""Relevance-map methods behind one interface (`base.Method`): TCLIP and every baseline, by name.

Each baseline module also keeps its method as a pure function `*_map(model, params, images, texts, **options)`
of the static model (`tclip_jax.model.CLIP`: config and matmul dtype) and its parameters, returning the
patch-grid maps and the method's intermediates; the `Method` classes add the official protocol, prompts and
map post-processing. `get(name)` also takes `"package.module:Class"` for a method defined outside the package.
The registry names where each class lives, so listing the methods imports none of them.
"""
from __future__ import annotations

import importlib
import inspect
import os
import traceback

from tclip_jax.settings import did_you_mean

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
        raise ValueError(f"unknown method {spec!r}{did_you_mean(spec, REGISTRY)}; available: {', '.join(REGISTRY)} "
                         "or 'package.module:Class'")
    module_name, class_name = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"method module {module_name!r} cannot be imported: {err}") from None
    except Exception as err:
        if spec in REGISTRY:  # the package's own module: a bug, not the user's
            raise
        # The user's module fails as it runs (NameError, SyntaxError, ...): their error, said where it is; the
        # traceback stays chained (the CLI's TCLIP_TRACEBACK=1 shows it).
        raise ValueError(f"method module {module_name!r} of {spec!r} cannot be imported: {_where(err)}") from err
    method = getattr(module, class_name, None)
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise ValueError(f"{spec!r} is not a tclip_jax.methods.Method subclass")
    if inspect.isabstract(method):  # a family's shared base (attention's ClassTokenAttention): no method to run
        raise ValueError(f"{spec!r} is an abstract Method class: it leaves "
                         f"{', '.join(sorted(method.__abstractmethods__))} undefined")
    return method


def _where(err: Exception) -> str:
    """'NameError: name 'x' is not defined at path.py:3': the error and the line that raised it, on one line."""
    if isinstance(err, SyntaxError) and err.filename:  # raised by the compiler: no frame of the file
        text, filename, line = err.msg, err.filename, err.lineno
    else:
        frames = [f for f in traceback.extract_tb(err.__traceback__)
                  if not f.filename.startswith("<") and f.filename not in (__file__, importlib.__file__)]
        text, filename, line = str(err), *((frames[-1].filename, frames[-1].lineno) if frames else (None, None))
    text = " ".join(part.strip() for part in text.splitlines() if part.strip()) or "(no message)"
    if filename is None:
        return f"{type(err).__name__}: {text}"
    relative = os.path.relpath(filename)
    return f"{type(err).__name__}: {text} at {filename if relative.startswith('..') else relative}:{line}"


def __getattr__(name: str):
    if name == "METHODS":  # every registered class, imported on first use
        methods = {key: get(key) for key in REGISTRY}
        globals()["METHODS"] = methods
        return methods
    raise AttributeError(f"module 'tclip_jax.methods' has no attribute {name!r}")
