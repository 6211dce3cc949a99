"""Held-out synthetic benchmarks through the sweep: the figures of a model card and of benchmarks/synthetic_grounding.py.

A benchmark is `tclip sweep synthetic --protocol P --limit N` run in-process into a temporary folder, so its
figures and a sweep's cannot disagree. `heldout_metrics` is what a checkpoint's `heldout_metrics.json` records,
and what a test re-measures: TCLIP with its default settings on the first `FAST_SCENES` held-out scenes of the
`FAST_PROTOCOLS` (the gates that colour-copying cannot pass), plus image <-> text retrieval on
`RETRIEVAL_PAIRS` held-out scenes (top-1 of each scene's own caption, and of any caption true of it: a caption is true
of every scene whose objects include its own, `description_is_true`).
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np

from tclip_jax.checkpoints.load import LoadedClip, load_clip
from tclip_jax.evaluation.datasets.synthetic import synthetic_dataset
from tclip_jax.evaluation.retrieval import retrieval_top1
from tclip_jax.files import write_text_atomic
from tclip_jax.methods.base import Method
from tclip_jax.methods.tclip import TCLIP
from tclip_jax.sweep.runner import RunOptions, run_sweep
from tclip_jax.synthetic import description_is_true, heldout_source, retrieval_scenes

HELDOUT_METRICS_FILE = "heldout_metrics.json"
FAST_PROTOCOLS = ("captions", "bare_words", "colour_twins", "wrong_attribute", "small_objects")
FAST_SCENES = 20
RETRIEVAL_PAIRS = 256


def synthetic_report(method: Method, protocol: str, scenes: int, batch_size: int = 8, offset: int = 0) -> dict:
    """The report of a synthetic sweep of `method` over `scenes` held-out scenes under `protocol`, from held-out
    seed `offset` on (training's validation uses an offset far from the gates' scenes)."""
    dataset = synthetic_dataset(scenes, protocol, offset)
    with tempfile.TemporaryDirectory() as out:
        result = run_sweep(dataset, method, out, heldout_source(protocol),
                           options=RunOptions(batch_size=batch_size, progress=False))
    errors = result.report["errors"]
    if errors:  # the figures cover every scene or none: a score over the scenes that worked would pass for one
        raise ValueError(f"{len(errors)} of {scenes} held-out scenes failed under protocol {protocol}; the first, "
                         f"{errors[0]['key']}: {errors[0]['error']}")
    return result.report


def grounding_scores(report: dict) -> dict:
    """A synthetic report's headline figures, over all units ("all") and per word group: units, pointing game,
    box accuracy and, where the protocol has them, wrong-attribute pointing."""
    def scores(part: dict) -> dict:
        out = {"units": part["units"], "pointing_game": part["segmentation"]["pointing_game"],
               "box_accuracy": part["detection"]["box_accuracy"]}
        if "wrong_attribute" in part:
            out["wrong_pointing"] = part["wrong_attribute"]["wrong_pointing"]
        return out

    return {"all": scores(report), **{group: scores(part) for group, part in report.get("groups", {}).items()}}


def heldout_metrics(clip: LoadedClip, protocols: Sequence[str] = FAST_PROTOCOLS, scenes: int = FAST_SCENES,
                    batch_size: int = 8) -> dict:
    """TCLIP (default settings) per protocol, and retrieval (JSON-ready). `batch_size` changes no figure (a sweep's
    maps are the same bytes at any batch size); the larger it is, the fewer programs are compiled, the more memory
    a batch takes."""
    method = TCLIP(clip)
    metrics = {"scenes": scenes, "settings": method.settings.to_dict(), "protocols": {}}
    for protocol in protocols:
        metrics["protocols"][protocol] = grounding_scores(synthetic_report(method, protocol, scenes, batch_size))
    pairs = retrieval_scenes(RETRIEVAL_PAIRS)
    true_of = np.array([[description_is_true(caption.description, image.objects) for caption in pairs]
                        for image in pairs])
    metrics["retrieval"] = retrieval_top1(clip, [s.image for s in pairs], [s.caption for s in pairs], true_of)
    return json.loads(json.dumps(metrics))


def record_heldout_metrics(folder: str | os.PathLike) -> dict:
    """Computes `heldout_metrics` of the checkpoint in `folder` and writes them to its heldout_metrics.json."""
    metrics = heldout_metrics(load_clip(folder))
    write_text_atomic(pathlib.Path(folder) / HELDOUT_METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    return metrics
