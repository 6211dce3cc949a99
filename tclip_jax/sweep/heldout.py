"""Held-out synthetic benchmarks through the sweep: the figures of a model card and of benchmarks/synthetic_grounding.py.

A benchmark is `tclip sweep synthetic --protocol P --limit N` run in-process into a temporary folder, so its
figures and a sweep's cannot disagree. `heldout_metrics` is what a checkpoint's `heldout_metrics.json`
records: TCLIP with its default settings on the first `HELDOUT_SCENES` held-out scenes, under every protocol.
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile

from tclip_jax.checkpoints.load import LoadedClip, load_clip
from tclip_jax.evaluation.datasets.synthetic import PROTOCOLS, synthetic_dataset
from tclip_jax.files import write_text_atomic
from tclip_jax.methods.base import Method
from tclip_jax.methods.tclip import TCLIP
from tclip_jax.sweep.runner import RunOptions, run_sweep

HELDOUT_METRICS_FILE = "heldout_metrics.json"
HELDOUT_SCENES = 100


def synthetic_report(method: Method, protocol: str, scenes: int, batch_size: int = 8) -> dict:
    """The report of a synthetic sweep of `method` over the first `scenes` held-out scenes under `protocol`."""
    dataset = synthetic_dataset(scenes, protocol)
    with tempfile.TemporaryDirectory() as out:
        result = run_sweep(dataset, method, out, f"held-out synthetic scenes, protocol {protocol}",
                           options=RunOptions(batch_size=batch_size, progress=False))
    return result.report


def heldout_metrics(clip: LoadedClip) -> dict:
    """TCLIP (default settings) on the first HELDOUT_SCENES held-out scenes, per protocol (JSON-ready)."""
    method = TCLIP(clip)
    metrics = {"scenes": HELDOUT_SCENES, "settings": method.settings.to_dict(), "protocols": {}}
    for protocol in PROTOCOLS:
        report = synthetic_report(method, protocol, HELDOUT_SCENES)
        metrics["protocols"][protocol] = {k: v for k, v in report.items() if k != "config"}
    return json.loads(json.dumps(metrics))


def record_heldout_metrics(folder: str | os.PathLike) -> dict:
    """Computes `heldout_metrics` of the checkpoint in `folder` and writes them to its heldout_metrics.json."""
    metrics = heldout_metrics(load_clip(folder))
    write_text_atomic(pathlib.Path(folder) / HELDOUT_METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    return metrics
