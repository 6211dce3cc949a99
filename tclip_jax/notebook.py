"""The logic behind `colab/tclip_demo.ipynb`, kept here so that it is tested like everything else."""
from __future__ import annotations

import importlib.metadata
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np

from tclip_jax import synthetic
from tclip_jax.image import load_image
from tclip_jax.checkpoints.load import load_clip
from tclip_jax.cli.explain import NO_COMPARE
from tclip_jax.methods.base import ImageResult, prompt_list
from tclip_jax.methods.tclip import TCLIP, Settings
from tclip_jax.sweep.heldout import synthetic_report

PRETRAINED = "openai/clip-vit-base-patch32"


def backend_report() -> str:
    """One line naming the JAX backend (tpu, gpu or cpu) and its devices."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} device(s) ({', '.join(kinds)})"


def hub_offline() -> bool:
    """Whether the Hugging Face hub is turned off, as huggingface_hub reads HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE
    ("1", "true", "yes" or "on", in any case): when it was imported (it reads them then, and refuses the hub by
    that), or as they are now (set in a notebook cell since)."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.HF_HUB_OFFLINE or (now or "").upper() in constants.ENV_VARS_TRUE_VALUES


def online(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """Whether the hub can be used: not turned off (`hub_offline`), and `host` answers."""
    if hub_offline():
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_explainer(model: Optional[str] = None, **settings) -> tuple[TCLIP, str]:
    """(explainer, what was loaded): `model`, else ViT-B/32 when the hub is reachable, else the embedded model."""
    if model is None and online():
        model = PRETRAINED
    clip = load_clip(model)
    return TCLIP(clip, Settings.from_dict(settings)), clip.origin


def _user_agent() -> str:
    """Names tclip_jax to the servers it fetches from: Wikimedia's (and others') refuse urllib's default."""
    try:
        version = importlib.metadata.version("tclip_jax")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        version = "dev"
    return f"tclip_jax/{version} (notebook.fetch_image; Python urllib)"


def fetch_image(source: Any = None) -> np.ndarray:
    """uint8 RGB from an http(s) URL, or what `load_image` takes (a path as str or `pathlib.Path`, encoded bytes, a PIL
    image, an array), or Colab's `files.upload()` result, a dict of one uploaded file's name and bytes; with no
    source, a held-out synthetic scene. An error names the URL, and what the server sent where that was no image."""
    if source is None:
        return synthetic.make_scene(synthetic.HELDOUT_SEED_START).image
    if isinstance(source, dict):  # google.colab.files.upload(): {file name: bytes}
        if len(source) != 1:
            raise ValueError(f"fetch_image takes one uploaded file, and the dict holds {len(source)}"
                             + (f" ({', '.join(map(repr, source))}): pass one, fetch_image(uploaded[name])"
                                if source else ""))
        source = next(iter(source.values()))
    if isinstance(source, str) and source.strip().lower().startswith(("http://", "https://")):  # case-blind schemes
        source = source.strip()  # a URL pasted with a space before it was taken for a file name
        request = urllib.request.Request(source, headers={"User-Agent": _user_agent()})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                encoded = response.read()
                sent = response.headers.get_content_type() if response.headers.get("Content-Type") else None
        except OSError as err:  # urllib's words do not say which URL ("<urlopen error [Errno 111] Connection refused>")
            unwrapped = type(err) is urllib.error.URLError  # an HTTPError's own words are "HTTP Error 404: ..."
            raise OSError(f"cannot fetch {source}: {err.reason if unwrapped else err}") from None
        try:
            return load_image(encoded, file=source)  # encoded bytes: the pixel-limit check a file gets; errors name it
        except ValueError as err:  # a web page (a login, a gallery's page about the image) where the image was meant
            if sent is None or sent.startswith("image/"):
                raise
            raise ValueError(f"{err} (the server sent {sent}, not an image)") from None
    return load_image(source)


def show(result: ImageResult, prompt_index: int = 0):
    """The static grid of one prompt (`ImageResult.figure`): the image, each word and the whole prompt, τ in
    each title."""
    return result.figure(prompt_index)


def compare(explainer, image, prompts, methods: Optional[Sequence[str] | str] = None):
    """The explorer's compare view of one image: `explainer`'s result beside each of `methods` (as `tclip
    explain --compare`: "METHOD[:key=value,...]"), all on the explainer's loaded model; as there, TCLIP K=1 joins a
    TCLIP explainer's comparison unless the explainer or one of `methods` is TCLIP at K=1 already, so the default
    (None) compares a TCLIP explainer with K=1, and `[]` or "none" compares nothing. A notebook shows the returned
    object as the explorer; `.result` is the explainer's own `ImageResult`."""
    from tclip_jax.cli.explain import Plan
    from tclip_jax.visualize import Explorer

    if methods is None:
        methods = []
    else:
        methods = [methods] if isinstance(methods, str) else list(methods)
        methods = methods or [NO_COMPARE]
    plan = Plan.build(explainer, prompt_list(prompts), methods)
    return Explorer(plan.views(image))


def mini_sweep(explainer: TCLIP, scenes: int = 8) -> dict[str, float]:
    """Pointing game and BoxAcc over every colour, shape and relation word of held-out synthetic captions: a small
    `tclip sweep synthetic --protocol captions` run in-process."""
    report = synthetic_report(explainer, "captions", scenes, batch_size=4)
    return {"units": report["units"], "pointing_game": report["segmentation"]["pointing_game"],
            "box_accuracy": report["detection"]["box_accuracy"]}
