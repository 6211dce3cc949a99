"""Package namespaces whose names are imported on first use.

Importing one module of a package then runs only that module, not its siblings: `tclip --help` and argument
errors stay fast (no jax, scikit-learn or OpenCV), and light modules (settings) do not pull in heavy ones.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for the `__init__` of `package`, whose public name n lives in module exports[n]."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name])
        for exported, home in exports.items():  # all of the module's names at once, over a submodule of that name
            if home == exports[name]:
                setattr(sys.modules[package], exported, getattr(module, exported))
        return getattr(module, name)

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
