"""The decomposition heatmap of Gandelsman et al. 2024 (clip_text_span's `compute_segmentations.py`)."""
from __future__ import annotations

import functools

import flax.struct
import jax

from tclip_jax.baselines import _blocks
from tclip_jax.decomposition import Decomposition, decompose, spatial_heatmaps
from tclip_jax.model import CLIPConfig

Array = jax.Array


@flax.struct.dataclass
class DecompositionHeatmapOutput:
    maps: Array                    # [n_images, n_texts, gh, gw] patch contributions . text, minus the mean over texts
    raw: Array                     # [n_images, n_texts, gh, gw] before subtracting the mean over texts
    decomposition: Decomposition


@functools.partial(jax.jit, static_argnames="config")
def decomposition_map(params: dict, config: CLIPConfig, images: Array, texts: Array) -> DecompositionHeatmapOutput:
    """Each patch's direct contribution to the normalised image embedding, through every head of every
    block, dotted with each normalised text embedding, minus the mean over the given text set.

    Protocol of the official code: center-crop preprocessing; one prompt per text, no templates; maps
    upsampled by the patch size (bilinear), clipped to [0, max], then min-max normalised. Needs >= 2 texts:
    one text minus the mean over itself is zero everywhere.
    """
    if texts.shape[0] < 2:
        raise ValueError("the decomposition heatmap subtracts the mean over the text set, so it needs at least "
                         f"2 texts (one text gives an all-zero map); got {texts.shape[0]}")
    decomposition = decompose(params, config, images)
    maps, raw = spatial_heatmaps(decomposition, _blocks.text_features(params, config, texts))
    return DecompositionHeatmapOutput(maps, raw, decomposition)
