"""Per-word localisation on held-out synthetic scenes: TCLIP (K=25, K=1), the raw similarity map, and RCLIP.

Every colour and shape word of each held-out caption is one unit, scored against its object's ground truth:
- ``pointing``: the map's argmax pixel lies in the object's mask (`pointing_game`, tolerance 1).
- ``energy``: share of the min-max scaled map's energy inside the mask (`energy_in_mask`).
- ``box_acc``: the Otsu box (largest 8-connected component) has IoU >= 0.5 with the object's box.
- ``mask_iou``: IoU of the GMM foreground with the mask. The foreground is `map >= tau` for the GMM split tau
  of the map: exactly the pixels the soft map keeps before its Gaussian blur (the blur only smooths).

Methods (all maps at the image's size):
- ``tclip_k25`` / ``tclip_k1``: TCLIP's aggregated map of the word's token(s), the prompt being the whole
  caption, with 25 translated copies or none.
- ``similarity``: cosine of the end-of-text embedding of the word alone (e.g. "red") with every patch token,
  min-max scaled and bilinearly upsampled (`tclip_jax.methods.similarity.similarity_map` and its protocol).
- ``rclip``: |1 - min-max of that map| (`tclip_jax.methods.similarity.rclip_map`).

Captions and vocabulary words are encoded once per chunk of scenes; TCLIP maps are computed only for the scored
words (`TCLIP.explain` would also fit soft maps to every other word of the caption), and equal `explain`'s.
Scores are means over units, per kind ("colour", "shape") and over both ("overall").
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np

from tclip_jax.checkpoints.load import LoadedClip, load_clip
from tclip_jax.files import write_text_atomic
from tclip_jax.image import to_original
from tclip_jax.methods import get as get_method
from tclip_jax.methods.base import Query
from tclip_jax.methods.tclip import TCLIP, Settings
from tclip_jax.evaluation.metrics import aggregate_by_class, box_hit, energy_in_mask, pointing_game
from tclip_jax.postprocess import gmm_threshold, heatmap_box
from tclip_jax.synthetic import COLOURS, SHAPES, EvalUnit, Scene, evaluation_units, heldout_seeds, make_scene

METHODS = ("tclip_k25", "tclip_k1", "similarity", "rclip")
METRICS = ("pointing", "energy", "box_acc", "mask_iou")
KINDS = ("colour", "shape")
TCLIP_TRANSLATIONS = {"tclip_k25": 25, "tclip_k1": 1}
VOCABULARY = tuple(COLOURS) + SHAPES  # every word a unit can name

# What the shipped checkpoint's heldout_metrics.json records (and tests/test_default_model.py reproduces).
HELDOUT_METRICS_FILE = "heldout_metrics.json"
HELDOUT_METRICS_SCENES = 100
HELDOUT_METRICS_METHODS = ("tclip_k25",)


def mask_iou(foreground: np.ndarray, mask: np.ndarray) -> float:
    """|foreground & mask| / |foreground | mask| of two boolean maps (0 when both are empty)."""
    union = np.logical_or(foreground, mask).sum()
    return float(np.logical_and(foreground, mask).sum() / union) if union else 0.0


def score_heatmap(heatmap: np.ndarray, unit: EvalUnit, settings: Settings = Settings()) -> dict[str, float]:
    """The four scores of one word's map; its box and GMM threshold are computed as TCLIP computes them."""
    box = heatmap_box(heatmap, rule=settings.box_rule)
    tau = gmm_threshold(heatmap, settings.gmm_seed).tau
    return {
        "pointing": float(pointing_game(heatmap, unit.gt_mask)),
        "energy": energy_in_mask(heatmap, unit.gt_mask),
        "box_acc": float(box_hit(box, [unit.gt_box])),
        "mask_iou": mask_iou(heatmap >= tau, unit.gt_mask),
    }


def tclip_scores(explainer: TCLIP, scenes: Sequence[Scene]) -> Iterator[list[dict[str, float]]]:
    """Per scene, the scores of its units under TCLIP; captions are encoded together, once."""
    encoded = explainer.encode_prompts([scene.caption for scene in scenes])
    first_query = np.cumsum([0] + [len(words) for words in encoded.words])
    for p, scene in enumerate(scenes):
        units = evaluation_units(scene)
        for unit in units:  # captions have no punctuation, so explained words follow caption.split()
            if encoded.words[p][unit.word_index].text != unit.word:
                raise ValueError(f"word {unit.word_index} of {scene.caption!r} is not {unit.word!r}")
        rows = [first_query[p] + unit.word_index for unit in units]
        pixels, geometry = explainer.prepare(scene.image)
        maps = explainer.jitted_maps(explainer.params, pixels[None], encoded.queries.take(encoded.rows[rows]),
                                     np.arange(len(rows), dtype=np.int32)[None]).maps
        maps = to_original(np.asarray(maps[0]), geometry)
        yield [score_heatmap(m, unit, explainer.settings) for m, unit in zip(maps, units)]


def similarity_scores(clip: LoadedClip, method: str, scenes: Sequence[Scene],
                      settings: Settings = Settings()) -> Iterator[list[dict[str, float]]]:
    """Per scene, the scores of its units under the raw similarity map or RCLIP (each word its own prompt)."""
    baseline = get_method(method)(clip)
    queries = baseline.encode([Query(word) for word in VOCABULARY], label_set=VOCABULARY)
    inputs = [baseline.prepare(scene.image) for scene in scenes]
    rows = np.broadcast_to(np.arange(len(VOCABULARY), dtype=np.int32), (len(scenes), len(VOCABULARY)))
    heatmaps = baseline.jitted_maps(baseline.params, np.stack([pixels for pixels, _ in inputs]), queries, rows).maps
    for scene, (_, geometry), scene_maps in zip(scenes, inputs, np.asarray(heatmaps)):
        units = evaluation_units(scene)
        maps = to_original(scene_maps[[VOCABULARY.index(unit.word) for unit in units]], geometry)
        yield [score_heatmap(m, unit, settings) for m, unit in zip(maps, units)]


def summarize(unit_scores: Sequence[dict[str, float]], kinds: Sequence[str]) -> dict[str, dict[str, float]]:
    """{"colour" | "shape" | "overall": {metric: mean}} of per-unit scores."""
    summary: dict[str, dict[str, float]] = {kind: {} for kind in (*KINDS, "overall")}
    for metric in METRICS:
        aggregate = aggregate_by_class([s[metric] for s in unit_scores], list(kinds))
        for kind in KINDS:
            summary[kind][metric] = aggregate.per_class[kind][0]
        summary["overall"][metric] = aggregate.micro
    return summary


def evaluate(clip: LoadedClip, seeds: Sequence[int], methods: Sequence[str] = METHODS,
             chunk: int = 32) -> dict:
    """Scores of each method over the scenes of `seeds` (held-out seeds, see `heldout_seeds`).

    Returns {"units": {kind: count}, "methods": {method: summarize(...)}}; scenes are made `chunk` at a time.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; available: {METHODS}")
    explainers = {m: TCLIP(clip, Settings(translations=TCLIP_TRANSLATIONS[m])) for m in methods
                  if m in TCLIP_TRANSLATIONS}
    scores: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    kinds: list[str] = []
    for start in range(0, len(seeds), chunk):
        scenes = [make_scene(seed) for seed in seeds[start:start + chunk]]
        kinds += [unit.kind for scene in scenes for unit in evaluation_units(scene)]
        for method in methods:
            per_scene = (tclip_scores(explainers[method], scenes) if method in explainers
                         else similarity_scores(clip, method, scenes))
            scores[method] += [s for scene_scores in per_scene for s in scene_scores]
    return {"units": {kind: kinds.count(kind) for kind in KINDS},
            "methods": {m: summarize(scores[m], kinds) for m in methods}}


def heldout_metrics(clip: LoadedClip) -> dict:
    """The metrics a checkpoint's heldout_metrics.json records: HELDOUT_METRICS_METHODS on the first
    HELDOUT_METRICS_SCENES held-out scenes, with the default TCLIP settings."""
    seeds = heldout_seeds(HELDOUT_METRICS_SCENES)
    result = evaluate(clip, seeds, HELDOUT_METRICS_METHODS)
    return {"seeds": {"start": seeds.start, "stop": seeds.stop},
            "settings": {m: dataclasses.asdict(Settings(translations=TCLIP_TRANSLATIONS[m]))
                         for m in HELDOUT_METRICS_METHODS},
            **result}


def record_heldout_metrics(folder: str | os.PathLike) -> dict:
    """Computes `heldout_metrics` of the checkpoint in `folder` and writes them to its heldout_metrics.json."""
    metrics = heldout_metrics(load_clip(folder))
    write_text_atomic(pathlib.Path(folder) / HELDOUT_METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    return metrics
