"""The held-out synthetic scenes as an evaluation dataset with a closed vocabulary.

Classes are the colour words then the shape words of ``tclip_jax.synthetic``; each object of a scene gives two
units, its colour and its shape, both with the object's mask and its tight box (end exclusive). Colours and
shapes are distinct within a scene, so every class present names exactly one object. The key is the seed.
"""
from __future__ import annotations

import functools

import numpy as np

from tclip_jax.evaluation.datasets.base import Dataset, LoadedSample, Sample, Target
from tclip_jax.synthetic import COLOURS, DEFAULT_SIZE, SHAPES, heldout_seeds, make_scene

SYNTHETIC_CLASSES: tuple[str, ...] = tuple(COLOURS) + SHAPES


def synthetic_dataset(count: int, size: int = DEFAULT_SIZE, offset: int = 0) -> Dataset:
    """``count`` held-out scenes from held-out seed ``offset`` on, ``size`` pixels square."""
    if count < 1:
        raise ValueError(f"the synthetic dataset needs count >= 1 scenes, got {count}")
    samples = [Sample(str(seed), functools.partial(_load, seed, size)) for seed in heldout_seeds(count, offset)]
    return Dataset("synthetic", SYNTHETIC_CLASSES, count, lambda: iter(samples))


def _load(seed: int, size: int) -> LoadedSample:
    scene = make_scene(seed, size)
    targets = []
    for obj in scene.objects:
        boxes = np.array([obj.box], dtype=np.float64)
        for word in (obj.colour, obj.shape):
            targets.append(Target(SYNTHETIC_CLASSES.index(word), boxes=boxes, mask=obj.mask))
    return LoadedSample(scene.image, tuple(sorted(targets, key=lambda t: t.class_id)))
