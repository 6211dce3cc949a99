"""The registry of baseline methods (`--method NAME`) and their official protocols."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from tclip_jax.methods.common import text_features
from tclip_jax.methods.attention import AttentionOutput, raw_attention_map, rollout_map
from tclip_jax.methods.clip_surgery import SurgeryOutput, clip_surgery_map
from tclip_jax.methods.grad_eclip import GradCAMOutput, GradECLIPOutput, grad_cam_map, grad_eclip_map
from tclip_jax.methods.hilacam import HilaCAMOutput, hilacam_map
from tclip_jax.image import InputProtocol
from tclip_jax.methods.postprocess import MapPostprocess, postprocess_maps
from tclip_jax.methods.decomposition import DecompositionHeatmapOutput, decomposition_map
from tclip_jax.methods.similarity import SimilarityOutput, maskclip_map, rclip_map, similarity_map
from tclip_jax.methods.templates import CLIP_SURGERY_TEMPLATES


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A method and its official protocol.

    prompt_templates: the templates the official code ensembles over; pass their tokens as texts
      [n_texts, n_templates, context] (None: one prompt per text).
    takes_text_features: whether `explain` accepts `text_features(...)` in place of token ids.
    min_texts: the fewest texts a call can explain (the decomposition heatmap subtracts their mean).
    """

    explain: Callable[..., Any]
    postprocess: MapPostprocess
    input_protocol: InputProtocol
    prompt_templates: Optional[tuple[str, ...]] = None
    takes_text_features: bool = True
    min_texts: int = 1


_NORMALIZE_THEN_UPSAMPLE = MapPostprocess(normalize_first=True)
_UPSAMPLE_THEN_NORMALIZE = MapPostprocess(normalize_first=False)

BASELINES: dict[str, Baseline] = {
    "similarity": Baseline(similarity_map, _NORMALIZE_THEN_UPSAMPLE, "whole"),
    "rclip": Baseline(rclip_map, _NORMALIZE_THEN_UPSAMPLE, "whole"),
    "maskclip": Baseline(maskclip_map, _NORMALIZE_THEN_UPSAMPLE, "whole"),
    "clip_surgery": Baseline(clip_surgery_map, _NORMALIZE_THEN_UPSAMPLE, "whole", CLIP_SURGERY_TEMPLATES),
    "hilacam": Baseline(hilacam_map, _UPSAMPLE_THEN_NORMALIZE, "center_crop", takes_text_features=False),
    "attention": Baseline(raw_attention_map, _UPSAMPLE_THEN_NORMALIZE, "center_crop"),
    "rollout": Baseline(rollout_map, _UPSAMPLE_THEN_NORMALIZE, "center_crop"),
    "gradcam": Baseline(grad_cam_map, _NORMALIZE_THEN_UPSAMPLE, "patch_multiple"),
    "grad_eclip": Baseline(grad_eclip_map, _NORMALIZE_THEN_UPSAMPLE, "patch_multiple"),
    "decomposition": Baseline(decomposition_map, MapPostprocess(normalize_first=False, clip_negative=True),
                              "center_crop", min_texts=2),
}


def get_baseline(name: str) -> Baseline:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; available: {', '.join(sorted(BASELINES))}")
    return BASELINES[name]


__all__ = [
    "AttentionOutput", "BASELINES", "Baseline", "DecompositionHeatmapOutput", "GradCAMOutput", "GradECLIPOutput",
    "HilaCAMOutput", "InputProtocol", "MapPostprocess", "SimilarityOutput", "SurgeryOutput",
    "clip_surgery_map", "decomposition_map", "get_baseline", "grad_cam_map", "grad_eclip_map", "hilacam_map",
    "maskclip_map", "postprocess_maps", "raw_attention_map", "rclip_map", "rollout_map",
    "similarity_map", "text_features",
]
