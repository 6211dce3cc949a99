"""ECLIP's settings (the method's, and training's), in a module light enough for the command line to import."""
from __future__ import annotations

import dataclasses
from typing import Optional

from tclip_jax.methods.settings import MethodSettings
from tclip_jax.settings import Options, finite_float32, integer, setting


@dataclasses.dataclass(frozen=True)
class Settings(MethodSettings):
    """How ECLIP is run: which projections map CLIP's final-layer features into the joint space."""

    projections: Optional[str] = setting(
        None, "the trained projections, eclip_projections.safetensors of `tclip train-eclip` (None: CLIP's own "
        "projections, untrained ECLIP)", parse=str, flag=False)

    def __post_init__(self):
        super().__post_init__()
        if self.projections == "":
            raise ValueError(f"projections must be a file path, got {self.projections!r}")


@dataclasses.dataclass(frozen=True)
class TrainSettings(Options):
    """How the projections are trained (`tclip train-eclip`); the defaults are the paper's."""

    epochs: int = setting(10, "passes over the training pairs")
    batch_size: int = setting(1024, "image-text pairs per step (the contrastive batch; at least 2: one pair has no "
                              "negatives, its loss is 0 with no gradient, so an epoch's last batch of one pair is "
                              "left out)")
    learning_rate: float = setting(1e-4, "AdamW learning rate")
    weight_decay: float = setting(0.05, "AdamW weight decay")
    seed: int = setting(0, "seed of the order of the pairs in each epoch")

    def __post_init__(self):
        super().__post_init__()
        integer("epochs", self.epochs, 1)
        integer("batch_size", self.batch_size, 2)
        integer("seed", self.seed, 0)
        finite_float32("learning_rate", self.learning_rate)  # optax runs both in float32
        finite_float32("weight_decay", self.weight_decay)
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
