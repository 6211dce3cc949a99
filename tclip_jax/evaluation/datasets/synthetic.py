"""Held-out synthetic scenes as evaluation datasets, one per protocol, with a closed vocabulary.

Classes are the colour words then the shape words of ``tclip_jax.synthetic``; every unit is one word that
names one object, scored against that object's mask and tight box (end exclusive), and grouped by the word's
kind (``colour`` or ``shape``) in reports. The key is the seed. Protocols:

- ``captions``: the scene's own caption is the prompt; each colour and shape word of it is a unit whose map is
  that word's inside the caption (a prompt-level method, which has no per-word maps, maps the whole caption).
- ``bare_words``: each word alone is the prompt (the class prompt), e.g. "red" and "circle" for a red circle.
"""
from __future__ import annotations

import functools

import numpy as np

from tclip_jax.evaluation.datasets.base import Dataset, LoadedSample, Sample, Target, indexed
from tclip_jax.methods.base import Query
from tclip_jax.synthetic import COLOURS, DEFAULT_SIZE, SHAPES, heldout_seeds, make_scene

SYNTHETIC_CLASSES: tuple[str, ...] = tuple(COLOURS) + SHAPES
PROTOCOLS = ("captions", "bare_words")


def synthetic_dataset(count: int, protocol: str = "captions", size: int = DEFAULT_SIZE, offset: int = 0) -> Dataset:
    """``count`` held-out scenes from held-out seed ``offset`` on, ``size`` pixels square, under ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown synthetic protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
    if count < 1:
        raise ValueError(f"the synthetic dataset needs count >= 1 scenes, got {count}")
    samples = [Sample(str(seed), index, functools.partial(_load, seed, size, protocol))
               for index, seed in enumerate(heldout_seeds(count, offset))]
    return Dataset(f"synthetic-{protocol}", SYNTHETIC_CLASSES, count, indexed(samples))


def _load(seed: int, size: int, protocol: str) -> LoadedSample:
    scene = make_scene(seed, size)
    starts = np.cumsum([0] + [len(word) + 1 for word in scene.caption.split()])
    targets = []
    for index, word in sorted(scene.word_targets.items()):
        query = None
        if protocol == "captions":
            query = Query(scene.caption, (int(starts[index]), int(starts[index]) + len(word.word)))
        targets.append(Target(SYNTHETIC_CLASSES.index(word.word), boxes=np.array([word.box], np.float64),
                              mask=word.mask, query=query, group=word.kind))
    return LoadedSample(scene.image, tuple(targets))
