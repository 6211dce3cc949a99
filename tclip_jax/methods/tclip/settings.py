"""TCLIP's settings, in a module light enough for the command line to import."""
from __future__ import annotations

import dataclasses
from typing import Optional

from tclip_jax.image.protocols import INPUT_PROTOCOLS, InputProtocol
from tclip_jax.methods.settings import MethodSettings
from tclip_jax.postprocess.sigma import DEFAULT_SIGMA_FRACTION
from tclip_jax.settings import finite, parse_float_tuple, parse_optional, setting

# Shift lengths as fractions of the patch size: sub-patch shifts move every patch boundary.
DEFAULT_SCALE_FRACTIONS = (0.25, 0.5, 0.75)
DEFAULT_TRIM = 0.2
# The largest soft-map sigma a user may set, in pixels: the default (DEFAULT_SIGMA_FRACTION, 2 %) of a 50,000-pixel
# side, longer than the whole and center_crop protocols admit under the default pixel limit (29,913 pixels at their
# 10:1 aspect limit; the default sigma of a longer patch_multiple image is not capped). The blur's time does not grow
# with sigma (an axis shorter than 8 sigmas is blurred exactly by the DCT, postprocess/blur.py).
MAX_SIGMA = 1000.0
TOKEN_WEIGHTINGS = ("none", "last", "mean", "rollout")  # see methods/tclip/token_weights.py


@dataclasses.dataclass(frozen=True)
class Settings(MethodSettings):
    """How TCLIP is run. `translations=1` turns the multi-scale translation off."""

    translations: Optional[int] = setting(
        None, "translated copies: 1 turns translation off; the full set is the identity + 8 directions per scale "
        "fraction", parse=parse_optional(int), shown_default="the full set, 25 with the default scale fractions")
    scale_fractions: tuple[float, ...] = setting(
        DEFAULT_SCALE_FRACTIONS, "shift lengths as fractions of the patch size, comma-separated",
        parse=parse_float_tuple)
    trim: float = setting(DEFAULT_TRIM, "trimmed-mean proportion cut from each end, per pixel", parse=float)
    input_protocol: InputProtocol = setting(
        "whole", "how an image becomes the model input: the whole image resized, CLIP's center crop, or each side "
        "resized to a patch multiple", choices=INPUT_PROTOCOLS)
    sigma: Optional[float] = setting(
        None, f"soft-map Gaussian sigma in pixels, 0 to {MAX_SIGMA:g}", parse=parse_optional(float),
        shown_default=f"{100 * DEFAULT_SIGMA_FRACTION:g}%% of the image's longer side")
    token_weighting: str = setting(
        "none", "how the tokens of a multi-word query (a class name, a whole prompt) are weighted: the plain mean "
        "of its words (none, the paper's), or by the end-of-text token's attention in the text tower's last block, "
        "its mean over blocks, or its attention rollout", choices=TOKEN_WEIGHTINGS)

    def replace(self, **changes) -> "Settings":
        """As `MethodSettings.replace`; new scale fractions bring their own full set of copies unless translations
        is given too (translation off stays off)."""
        if "scale_fractions" in changes and "translations" not in changes and self.translations != 1:
            changes["translations"] = None
        return super().replace(**changes)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.scale_fractions, tuple) or not self.scale_fractions:
            raise ValueError(f"scale_fractions must be a non-empty tuple, got {self.scale_fractions!r}")
        for fraction in self.scale_fractions:  # messages begin with the setting's name, which names its flag
            finite("scale_fractions", fraction)
            if not 0 < fraction <= 1:
                raise ValueError(f"scale_fractions must lie in (0, 1] (of the patch size), got {fraction}")
        if len(set(self.scale_fractions)) < len(self.scale_fractions):  # the same copies would count twice
            raise ValueError(f"scale_fractions must differ, got {','.join(map(str, self.scale_fractions))}")
        full = 1 + 8 * len(self.scale_fractions)
        if self.translations is None:
            object.__setattr__(self, "translations", full)
        if self.translations not in (1, full):
            scales = len(self.scale_fractions)
            raise ValueError(f"translations must be 1 (off) or {full} (identity + 8 directions x {scales} "
                             f"scale{'s' if scales != 1 else ''}), got {self.translations}")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must lie in [0, 0.5), got {self.trim}")
        if self.sigma is not None and not 0 <= self.sigma <= MAX_SIGMA:
            raise ValueError(f"sigma must lie in [0, {MAX_SIGMA:g}] (pixels), got {self.sigma:g}")
