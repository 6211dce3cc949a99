"""The versions of the software that produced a result, recorded beside it: in result.json
(`ImageResult.to_record`) and in sweep.json (`sweep.runner`: the versions of each run of a resumed sweep that ran
under others than the run before it).

Maps, τ and boxes depend on them beyond the weights and settings that `Method.run_info` records: XLA fuses and
orders float operations otherwise from one jax release to another (last-bit differences that can move a threshold
or a box edge), scikit-learn, SciPy and OpenCV compute the host step, OpenCV draws the synthetic scenes. They are
recorded, not compared: a resumed sweep runs on under a newer jax (as a notebook's runtime is upgraded), and its
report says so.
"""
from __future__ import annotations

import functools
import importlib.metadata
import platform

# Distribution name -> the name a record gives it. OpenCV is read from cv2 (it ships as several distributions).
_DISTRIBUTIONS = {"tclip_jax": "tclip_jax", "jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "numpy": "numpy",
                  "scipy": "scipy", "scikit-learn": "scikit-learn", "pillow": "pillow", "tokenizers": "tokenizers"}


@functools.cache
def software_versions() -> dict[str, str]:
    """{name: version} of Python, this package (as installed: a source checkout run without installing it has
    none) and the libraries that compute maps, τ and boxes; a library that is not installed is left out."""
    versions = {"python": platform.python_version()}
    for distribution, name in _DISTRIBUTIONS.items():
        try:
            versions[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            pass
    import cv2

    versions["opencv"] = cv2.__version__
    return versions


def versions_line(versions: dict[str, str]) -> str:
    """"flax 0.12.8, jax 0.10.2, ..." for a report, by name (as sweep.json, which sorts its keys, holds them)."""
    return ", ".join(f"{name} {versions[name]}" for name in sorted(versions))
