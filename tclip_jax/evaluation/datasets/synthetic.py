"""Held-out synthetic scenes as evaluation datasets, one per protocol of ``tclip_jax.synthetic.PROTOCOLS``.

Every `EvalUnit` of `protocol_sample(protocol, seed)` is one target: its word inside its prompt is the query
(`Query(prompt, span)`; a prompt-level method, which has no per-word maps, maps the whole prompt), its referents'
silhouettes the mask and their boxes the boxes (end exclusive), its kind (``colour``, ``shape``, ``relation``)
the group that reports summarize separately (``many_objects``: kind and the 1-based place of the word's phrase,
e.g. ``shape 4``; the report also pools each kind over places, ``shape``: `tclip_jax.sweep.report.unit_groups`).
Wrong-attribute units also carry the named-but-wrong object's silhouette (`Target.wrong_mask`),
scored as ``wrong_pointing``. Classes are the colour words, the shape words and the relation head words. The
key is the seed. Samples are made one at a time as they are iterated, so a dataset's memory does not grow with its
count. A synthetic sweep takes `tclip_jax.synthetic.SYNTHETIC_SCENES` scenes unless told otherwise. See
``tclip_jax.synthetic`` for what each protocol draws.
"""
from __future__ import annotations

import functools

import numpy as np

from tclip_jax.evaluation.datasets.base import Dataset, LoadedSample, Sample, Target
from tclip_jax.methods.base import Query
from tclip_jax.synthetic import (COLOURS, DATASET_PREFIX, DEFAULT_PROTOCOL, PROTOCOLS, RELATION_WORDS, SHAPES,
                                 heldout_seeds, protocol_sample)

SYNTHETIC_CLASSES: tuple[str, ...] = tuple(COLOURS) + tuple(SHAPES) + tuple(RELATION_WORDS.values())


def synthetic_dataset(count: int, protocol: str = DEFAULT_PROTOCOL, offset: int = 0) -> Dataset:
    """``count`` held-out scenes from held-out seed ``offset`` on, under ``protocol`` (at most as many as there
    are seeds left in ``offset``'s stream of held-out seeds, `tclip_jax.synthetic.heldout_seeds`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown synthetic protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
    if count < 1:
        raise ValueError(f"the synthetic dataset needs count >= 1 scenes, got {count}")
    seeds = heldout_seeds(count, offset)

    def samples(limit=None):
        return (Sample(str(seed), index, functools.partial(_load, protocol, seed))
                for index, seed in enumerate(seeds[:limit]))
    return Dataset(f"{DATASET_PREFIX}{protocol}", SYNTHETIC_CLASSES, count, samples)


def _load(protocol: str, seed: int) -> LoadedSample:
    sample = protocol_sample(protocol, seed)
    targets = tuple(
        Target(SYNTHETIC_CLASSES.index(unit.word), boxes=np.array(unit.gt_boxes, np.float64), mask=unit.gt_mask,
               query=Query(unit.prompt, unit.span),
               group=f"{unit.kind} {unit.position}" if unit.position else unit.kind, wrong_mask=unit.wrong_mask)
        for unit in sample.units)
    return LoadedSample(sample.scene.image, targets)
