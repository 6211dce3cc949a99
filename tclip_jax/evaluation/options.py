"""How units are scored (`EvalOptions`), in a module light enough for the command line to import."""
from __future__ import annotations

import dataclasses
from typing import Union

from tclip_jax.evaluation.metrics.pointing import DEFAULT_TOLERANCE
from tclip_jax.settings import Options, integer, setting

THRESHOLDS = ("mean", "otsu", "gmm")
METRIC_SETS = ("default", "seed")
Threshold = Union[str, float]


def parse_threshold(text: str) -> Threshold:
    if text in THRESHOLDS:
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"threshold must be mean, otsu, gmm or a number in [0, 1), got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class EvalOptions(Options):
    pg_tolerance: int = setting(DEFAULT_TOLERANCE, "pointing-game tolerance in pixels, at least 1: a hit is a map "
                                "peak closer than this to the mask, so 1 is the peak pixel on the mask (TorchRay: 15)",
                                parse=int)
    threshold: Threshold = setting("mean", "segmentation foreground threshold: mean, otsu, gmm or a number in "
                                   "[0, 1)", parse=parse_threshold)
    metrics: str = setting("default", "seed: also the seed papers' (ECLIP, CLIP Surgery) score contrast (mSC) and "
                           "mIoU at grid-searched and fixed thresholds, in the report's own table", choices=METRIC_SETS)

    def __post_init__(self):
        super().__post_init__()
        # TorchRay's hit is a distance strictly below the tolerance: at 0 no unit could hit (a PG of 0 saying nothing)
        integer("pg_tolerance", self.pg_tolerance, 1)
        if isinstance(self.threshold, str):
            if self.threshold not in THRESHOLDS:
                raise ValueError(f"threshold must be one of {THRESHOLDS} or a number, got {self.threshold!r}")
        elif isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"a numeric threshold lies in [0, 1), got {self.threshold!r}")
