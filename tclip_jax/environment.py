"""What a result ran under beyond the weights and settings that `Method.run_info` records: Python, the versions of
the libraries that compute it, and JAX's backend and devices. result.json records it (`ImageResult.to_record`), and
sweep.json lists it per run of a sweep that set out to score samples (`sweep.runner`), a run under the environment
of the run before it not listed again.

Maps, τ and boxes depend on it: XLA fuses and orders float operations otherwise from one jax release, and one
backend, to another (JAX's default precision runs float32 matmuls as single bfloat16 passes on TPUs), SciPy and
OpenCV compute the host step, scikit-learn the AP metric, ftfy cleans prompts, pycocotools decodes COCO's masks,
OpenCV draws the synthetic scenes. It is recorded, not compared (but for the OpenCV that draws a synthetic sweep's
scenes, which its source names: `synthetic.heldout_source`): a resumed sweep runs on under a newer jax, or on
another runtime (a notebook's TPU quota gone), and its report says so. A library's version is the running module's
where it is imported (`__version__`: a `pip install -U` without a restart leaves the old one running), else the
installed one.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import json
import pathlib
import platform
import sys
import urllib.parse

# The name a record gives a library -> (its module, its distribution). OpenCV ships as several distributions.
_LIBRARIES = {"jax": ("jax", "jax"), "jaxlib": ("jaxlib", "jaxlib"), "flax": ("flax", "flax"),
              "numpy": ("numpy", "numpy"), "scipy": ("scipy", "scipy"), "scikit-learn": ("sklearn", "scikit-learn"),
              "opencv": ("cv2", None), "pillow": ("PIL", "pillow"), "tokenizers": ("tokenizers", "tokenizers"),
              "ftfy": ("ftfy", "ftfy"), "safetensors": ("safetensors", "safetensors"), "optax": ("optax", "optax"),
              "pycocotools": (None, "pycocotools"), "libtpu": (None, "libtpu"),
              "jax-cuda12-plugin": (None, "jax-cuda12-plugin"), "jax-cuda13-plugin": (None, "jax-cuda13-plugin")}


def run_environment() -> dict[str, str]:
    """{name: value}: python, tclip_jax (`_this_package`: its version and commit, or the folder of the source that
    runs, with the version where it is an editable install), each library of `_LIBRARIES` that is installed,
    `backend` (jax.default_backend()) and `devices` ("8 x TPU v4": this process's); a new dict each call."""
    import jax

    devices = jax.local_devices()
    kinds = sorted({device.device_kind for device in devices})
    return {**_versions(), "backend": jax.default_backend(), "devices": f"{len(devices)} x {', '.join(kinds)}"}


@functools.cache
def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "tclip_jax": _this_package()}
    importlib.import_module("cv2")  # of no one distribution: its module says its version
    for name, (module_name, distribution_name) in _LIBRARIES.items():
        module = sys.modules.get(module_name) if module_name else None
        version = getattr(module, "__version__", None)
        if not isinstance(version, str) and distribution_name is not None:
            try:
                version = importlib.metadata.version(distribution_name)
            except importlib.metadata.PackageNotFoundError:
                continue
        if isinstance(version, str):
            versions[name] = version
    return versions


def _this_package() -> str:
    """This package's installed version (with the git commit pip installed it from, where it recorded one) where the
    installed distribution is the code that runs; "VERSION (editable, source at FOLDER)" where it is an editable
    install of the running folder (whose code is what the folder holds now: pip records no commit for it, and one
    recorded would be the install's, not the code's); else "source at FOLDER": a checkout run from its folder, or
    before another copy on the path, is not the version installed elsewhere."""
    import tclip_jax

    running = pathlib.Path(tclip_jax.__file__).resolve().parent
    try:
        distribution = importlib.metadata.distribution("tclip_jax")
        url = json.loads(distribution.read_text("direct_url.json") or "{}")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return f"source at {running}"
    url = url if isinstance(url, dict) else {}
    located = pathlib.Path(str(distribution.locate_file("tclip_jax"))).resolve()
    editable = url.get("dir_info", {}).get("editable") and str(url.get("url", "")).startswith("file://")
    if editable and running.parent == pathlib.Path(urllib.parse.unquote(
            urllib.parse.urlparse(url["url"]).path)).resolve():
        return f"{distribution.version} (editable, source at {running})"
    if located != running:
        return f"source at {running}"
    commit = url.get("vcs_info", {}).get("commit_id")
    return distribution.version + (f" (git {commit[:12]})" if isinstance(commit, str) else "")


def environment_line(environment: dict[str, str]) -> str:
    """"backend cpu, devices 1 x cpu, flax 0.12.8, jax 0.10.2, ..." for a report, by name (as sweep.json, which
    sorts its keys, holds them)."""
    return ", ".join(f"{name} {environment[name]}" for name in sorted(environment))
