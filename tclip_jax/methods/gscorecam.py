"""gScoreCAM (Chen et al., ACCV 2022): Score-CAM on the gradient-ranked top-k channels of CLIP's last block.

anguyen8/gScoreCAM (`pytorch_grad_cam/gscore_cam.py` `GScoreCAM.get_cam_weights`, `base_cam.py`, `tools/cam.py`
`CAMWrapper`, `model_loader/clip_loader.py` with `resize='adapt'`), as its `predict.py` calls it for CLIP ViT:

1. The last vision block's output X ([n, D], before ln_post) and the gradient G of the image-text logit
   (logit_scale * cosine) with respect to it; activations A = the patch tokens of X, channel-first [D, gh, gw].
2. Channel importance: the mean over the patch tokens of G (`ranking="patch"`, what the official code runs) or
   the class token's row of G (`ranking="cls"`); the top k channels (`topk`, official 300).
3. Each selected channel's map upsampled to the input size with align_corners=True (`UpsamplingBilinear2d`),
   min-max normalized with eps 1e-6, multiplied into the normalized input; the masked images are scored by
   the logit with the text (chunks of `chunk_size` images, the official batch 128), NaN scores become 0.
4. Scores placed at the selected channels of a zero vector of all D channels, softmax over the D channels;
   cam = ReLU(sum_c w_c A_c), `normalize2D` ((x - min) / (max(x - min) + 1e-8)); the official code then
   resizes it to the original image with `cv2.resize` and takes ReLU and `normalize2D` again (the map it
   returns: `gscorecam_heatmap`, `GScoreCAM.original_maps`).

Quirks of the official code, reproduced by default, each with the sound alternative as an option:
- `ranking="patch"`: CLIP's ViT reads only the class token after the last block, so the patch-token gradient
  is exactly zero and the "top k by gradient" is a tie order (torch's, on CPU: 88, 81, 82, ...; here, as
  `lax.top_k`, the lowest channel indices first). The official evaluation scripts meant `is_transformer=True`
  for ViTs but never pass it on; `ranking="cls"` ranks by the class token's gradient. `indices` may be
  injected (e.g. a reference run's tie order). With k >= D every channel is used and the ranking cannot matter.
- `zero_unselected=False`: channels outside the top k keep score 0, hence weight exp(0) / Z, in the softmax
  over all D channels (they dominate when the selected logits are negative); `True` gives them weight 0
  (softmax over the selected scores only). No effect when k >= D.
- `topk` larger than the channel count (the official 300 on a model narrower than 300; torch's `topk` raises):
  every channel is used, i.e. k = D.
- The score is the raw logit, softmaxed over channels (no baseline subtraction as in Score-CAM).
- Preprocessing (`adapt`): the whole image squashed to the model size with PIL bilinear (antialiased) resizing,
  then normalized; the map is produced at the original image size (see `GScoreCAM`).

Cost per (image, text) map on ViT-B/32 (D = 768, k = 300): 1 forward and 1 backward pass for the gradient,
k = 300 forward passes of masked images. With k >= D the masked images do not depend on the text, so each image's
D masked forwards serve all its texts.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Literal, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tclip_jax.image import Geometry, clip_normalize, resize_rgb, upsample_bilinear
from tclip_jax.image.resample import resample
from tclip_jax.methods import common
from tclip_jax.methods.base import MethodSettings, PromptMethod, QueryArrays
from tclip_jax.model import CLIP, l2_normalize
from tclip_jax.settings import integer, setting

Array = jax.Array
Ranking = Literal["patch", "cls"]
RANKINGS = ("patch", "cls")
DEFAULT_TOPK = 300           # `topk_channels` / `predict.py --topk`, the paper's ViT-B/32 run (300 of 768)
DEFAULT_CHUNK_SIZE = 128     # `CAMWrapper(batch_size=128)`: masked images per forward batch
MASK_EPS = 1e-6              # `(upsampled - mins) / (maxs - mins + 1e-6)`
NORMALIZE_EPS = 1e-8         # `normalize2D`


@flax.struct.dataclass
class GScoreCAMOutput:
    maps: Array          # [n_images, n_texts, gh, gw] cam_norm: normalize2D(ReLU(cam_raw)), in [0, 1]
    cam_raw: Array       # [n_images, n_texts, gh, gw] sum_c w_c A_c (before the ReLU)
    weights: Array       # [n_images, n_texts, D] channel weights (softmax over all D channels, by default)
    scores: Array        # [n_images, n_texts, k] masked-image logits, aligned with `indices`
    indices: Array       # [n_images, n_texts, k] the selected channels, best first
    importance: Array    # [n_images, n_texts, D] the ranking (mean patch-token gradient, or the CLS gradient)
    activations: Array   # [n_images, D, gh, gw] last block output, patch tokens, channel-first
    grad_tokens: Array   # [n_images, n_texts, n, D] d logit / d last block output (token 0: the class token)
    logits: Array        # [n_images, n_texts] logit_scale * cosine of the unmasked image


def upsample_align_corners(maps: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of the last two axes with align_corners=True (torch `UpsamplingBilinear2d`)."""
    taps = [_align_corners_taps(int(out), int(inp)) for out, inp in zip(size, maps.shape[-2:])]
    return resample(maps, *taps)


def _align_corners_taps(out_size: int, in_size: int) -> tuple[np.ndarray, ...]:
    # torch: scale = (in - 1) / (out - 1) in float32, source = scale * index, no clamping needed.
    scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
    source = (scale * np.arange(out_size, dtype=np.float32)).astype(np.float32)
    index0 = np.minimum(source.astype(np.int32), in_size - 1)
    index1 = np.where(index0 < in_size - 1, index0 + 1, index0)
    weight1 = (source - index0.astype(np.float32)).astype(np.float32)
    return index0, index1, np.float32(1.0) - weight1, weight1


def channel_masks(activations: Array, size: tuple[int, int]) -> Array:
    """Masks [..., H, W] of channel maps [..., gh, gw]: align_corners upsampling, min-max with eps 1e-6."""
    upsampled = upsample_align_corners(activations, size)
    low = upsampled.min(axis=(-2, -1), keepdims=True)
    high = upsampled.max(axis=(-2, -1), keepdims=True)
    return (upsampled - low) / (high - low + MASK_EPS)


def normalize2d(cam: Array) -> Array:
    """The official `normalize2D` over the last two axes: x - min, then / (max + 1e-8)."""
    shifted = cam - cam.min(axis=(-2, -1), keepdims=True)
    return shifted / (shifted.max(axis=(-2, -1), keepdims=True) + NORMALIZE_EPS)


def aggregate_resized(resized: Array) -> Array:
    """`aggregate_multi_layers` on the resized cam_norm: ReLU, mean over the one layer, `normalize2D`."""
    return normalize2d(jnp.maximum(resized, 0) if isinstance(resized, jax.Array) else np.maximum(resized, 0))


def gscorecam_heatmap(cam_norm: Array, size: tuple[int, int]) -> Array:
    """The map the official code returns at the original image size (H, W): `cv2.resize` of `cam_norm`
    (bilinear, half-pixel centres), then `aggregate_resized`."""
    return aggregate_resized(upsample_bilinear(cam_norm, tuple(size)))


def gscorecam_map(model: CLIP, params: dict, images: Array, texts: Array, *, topk: int = DEFAULT_TOPK,
                  ranking: Ranking = "patch", zero_unselected: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  indices: Optional[Array] = None) -> GScoreCAMOutput:
    """gScoreCAM maps of each text on each image (see the module docstring).

    images: [B, h, w, 3] normalized (the official `adapt` preprocessing: `GScoreCAM.prepare`).
    texts: token ids [T, context] (or [T, n_templates, context]), text features [T, embed_dim] (one prompt each),
      or per-image text features [B, T, embed_dim].
    topk: channels scored (k >= 1; more than the D channels means all of them).
    ranking: "patch" (official: the mean patch-token gradient, all zeros for CLIP) or "cls" (the class token's).
    zero_unselected: weight 0 for channels outside the top k instead of the official exp(0) / Z.
    chunk_size: masked images per batch of the chunked `lax.map` (bounds memory; the result does not depend on it).
    indices: the selected channels [k] or [T, k] (distinct, best first) in place of the ranking's top k, e.g. a
      reference run's tie order.
    """
    config = model.config
    channels = config.vision_width
    integer("topk", topk, 1)
    integer("chunk_size", chunk_size, 1)
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    if indices is not None:
        host = np.asarray(indices)
        if not np.issubdtype(host.dtype, np.integer) or host.ndim not in (1, 2) or host.shape[-1] == 0:
            raise ValueError(f"indices must be integer channel ids [k] or [n_texts, k], got {host.dtype} "
                             f"{host.shape}")
        if host.min() < 0 or host.max() >= channels:
            raise ValueError(f"indices must lie in [0, {channels}), got {host.min()}..{host.max()}")
        if any(len(np.unique(row)) != len(row) for row in host.reshape(-1, host.shape[-1])):
            raise ValueError("indices must be distinct within each text's selection")
        indices = jnp.asarray(host, jnp.int32)
    texts = jnp.asarray(texts)
    if not jnp.issubdtype(texts.dtype, jnp.floating) or texts.ndim == 2:
        texts = common.text_features(model, params, texts)
    return _gscorecam(model, params, images, texts, indices, min(topk, channels), ranking, zero_unselected,
                      chunk_size)


@functools.partial(jax.jit, static_argnames=("model", "k", "ranking", "zero_unselected", "chunk_size"))
def _gscorecam(model: CLIP, params: dict, images: Array, texts: Array, indices: Optional[Array], k: int,
               ranking: str, zero_unselected: bool, chunk_size: int) -> GScoreCAMOutput:
    vision = model.bind({"params": params}).visual
    scale = jnp.exp(params["logit_scale"])
    channels = model.config.vision_width
    size = images.shape[1:3]
    texts = l2_normalize(texts)
    per_image_texts = texts.ndim == 3
    shared = indices is None and k == channels  # every channel for every text: masked images shared by texts
    image = common.encode_image(model, params, images)
    grid = image.grid

    def embed(masked: Array) -> Array:
        return l2_normalize(model.apply({"params": params}, masked, method="encode_image").embeds)

    def one_image(pixels: Array, stream: Array, texts: Array):
        # Gradient of each text's logit w.r.t. the last block output (class token first); one vjp for all texts.
        unit, vjp = jax.vjp(lambda x: l2_normalize(vision.project(x[:1])[0]), stream)
        grad_tokens = jax.vmap(lambda text: vjp(scale * text)[0])(texts)              # [T, n, D]
        importance = grad_tokens[:, 1:].mean(axis=1) if ranking == "patch" else grad_tokens[:, 0]
        selected = jax.lax.top_k(importance, k)[1] if indices is None else jnp.broadcast_to(
            indices, (texts.shape[0], indices.shape[-1]))
        activations = jnp.moveaxis(stream[1:].reshape(*grid, channels), -1, 0)        # [D, gh, gw]

        def embed_channels(ids: Array) -> Array:
            """Normalized embeddings of the input masked by each channel of `ids` [m], chunk by chunk."""
            padded = -(-ids.shape[0] // chunk_size) * chunk_size
            chunks = jnp.pad(ids, (0, padded - ids.shape[0])).reshape(-1, chunk_size)
            masks = lambda chunk: channel_masks(activations[chunk], size)             # noqa: E731
            out = jax.lax.map(lambda chunk: embed(pixels[None] * masks(chunk)[..., None]), chunks)
            return out.reshape(padded, -1)[:ids.shape[0]]

        if shared:
            scores = jnp.take_along_axis(scale * texts @ embed_channels(jnp.arange(channels)).T, selected, axis=1)
        else:
            masked = embed_channels(selected.reshape(-1)).reshape(*selected.shape, -1)
            scores = scale * jnp.einsum("tke,te->tk", masked, texts)
        scores = jnp.nan_to_num(scores, nan=0.0)
        rows = jnp.arange(texts.shape[0])[:, None]
        if zero_unselected:
            weights = jnp.zeros_like(importance).at[rows, selected].set(jax.nn.softmax(scores, axis=-1))
        else:
            weights = jax.nn.softmax(jnp.zeros_like(importance).at[rows, selected].set(scores), axis=-1)
        cam_raw = jnp.einsum("td,dhw->thw", weights, activations)
        return (normalize2d(jax.nn.relu(cam_raw)), cam_raw, weights, scores, selected, importance, activations,
                grad_tokens, scale * texts @ unit)

    outputs = jax.vmap(one_image, in_axes=(0, 0, 0 if per_image_texts else None))(
        images, image.residual_stream[-1], texts)
    return GScoreCAMOutput(*outputs)


def _adapt_squash(rgb: np.ndarray, size: int) -> np.ndarray:
    """`load_clip(..., resize='adapt')`: torchvision `Resize((size, size))` (PIL bilinear, antialiased)."""
    return resize_rgb(rgb, (size, size), "bilinear")


@dataclasses.dataclass(frozen=True)
class GScoreCAMSettings(MethodSettings):
    topk: int = setting(DEFAULT_TOPK, "channels scored, best first (the official 300; more than the model's "
                        "channels means every channel)", flag=False)
    ranking: str = setting("patch", "channel ranking: patch (official: the mean patch-token gradient, all zeros "
                           "for CLIP, so the top k is a tie order: the lowest channel indices) or cls (the class "
                           "token's gradient)", choices=RANKINGS, flag=False)
    zero_unselected: bool = setting(False, "weight 0 for channels outside the top k (false: the official "
                                    "softmax over all channels, where they keep exp(0))", flag=False)
    chunk_size: int = setting(DEFAULT_CHUNK_SIZE, "masked images per device batch, per image (bounds memory; "
                              "the maps do not depend on it)", flag=False)
    resample: str = setting("bilinear", "the squash of the whole image to the model size: bilinear (the official "
                            "adapt resize, PIL antialiased) or bicubic (the project's whole protocol)",
                            choices=("bilinear", "bicubic"), flag=False)

    def __post_init__(self):
        super().__post_init__()
        integer("topk", self.topk, 1)
        integer("chunk_size", self.chunk_size, 1)


class GScoreCAM(PromptMethod):
    """gScoreCAM as `predict.py` runs it: the whole image squashed to the model size (`adapt`), one prompt per
    text, cam_norm on the patch grid resized once to the original image (bilinear, half-pixel centres: the
    official `cv2.resize`), then ReLU and `normalize2D` at the original size (`original_maps`): the map the
    official code returns."""

    name = "gscorecam"
    # per map one gradient pass and k = 300 masked-image forwards
    image_encoder_passes = ("T (1 + 300)", "T")
    Settings = GScoreCAMSettings
    input_protocol = "whole"
    heatmap = None  # cam_norm stays on the grid: `original_maps` resizes it once, as the official code
    query_chunk = 1  # each map costs k masked forwards

    def __init__(self, clip, settings=None):
        super().__init__(clip, settings)
        channels = clip.config.vision_width
        if self.settings.topk > channels:
            warnings.warn(f"gScoreCAM: topk {self.settings.topk} exceeds the model's {channels} channels; every "
                          f"channel is scored (k = {channels}), so the ranking and zero_unselected have no effect",
                          stacklevel=2)

    def prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, Geometry]:
        if self.settings.resample == "bicubic":
            return super().prepare(rgb)
        config = self.clip.config
        size = config.image_size
        pixels = clip_normalize(_adapt_squash(rgb, size), config.image_mean, config.image_std)
        return pixels, Geometry(rgb.shape[:2], (size, size), (size, size), (0, 0))

    def original_maps(self, maps: Array, geometry: Geometry) -> Array:
        return aggregate_resized(super().original_maps(maps, geometry))

    def _run(self, params, pixels: Array, texts: Array) -> GScoreCAMOutput:
        s = self.settings
        return gscorecam_map(self.clip.model, params, pixels, texts, topk=s.topk, ranking=s.ranking,
                             zero_unselected=s.zero_unselected, chunk_size=s.chunk_size)

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        return self._run(params, pixels, queries.per_query).maps

