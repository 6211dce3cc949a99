"""What every method's settings have, in a module light enough for the command line to import."""
from __future__ import annotations

import dataclasses

from tclip_jax.postprocess.boxes import BOX_RULES, BoxRule
from tclip_jax.settings import Options, setting


@dataclasses.dataclass(frozen=True)
class MethodSettings(Options):
    """What every method's settings have: the host step's box rule and what to do with over-long prompts."""

    box_rule: BoxRule = setting("component", "zero-shot box: the largest connected component of the Otsu "
                                "foreground (TCLIP) or the largest contour box (gScoreCAM's evaluation)",
                                choices=BOX_RULES)
    truncate: bool = setting(False, "truncate prompts longer than the model's context (with a warning) "
                             "instead of refusing them")

