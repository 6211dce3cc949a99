"""The ways a decoded image becomes the model input (`InputProtocol`), each with its `Geometry`.

- ``"whole"``: the whole image resized (bicubic) to the model's square input size, nothing cropped; CLIP Surgery's
  demo and TCLIP's default. Reproduces torchvision ``Resize((h, w), BICUBIC)`` with the PIL backend.
- ``"center_crop"``: OpenAI CLIP's ``_transform``: bicubic resize of the short side to the input size, then the
  centre crop; HilaCAM, the decomposition code and the TCLIP author's similarity code. Reproduces torchvision
  ``Resize(size, BICUBIC)`` (PIL backend; long side ``int(size * long / short)``) and ``CenterCrop(size)``
  (offset ``int(round((resized - size) / 2.0))``).
- ``"patch_multiple"``: each side resized to the nearest multiple of the patch size, ``int(side / patch + 0.5)``
  patches (Grad-ECLIP's ``imgprocess``); the model resizes its positional embedding to that grid.

Every protocol takes the decoded uint8 image (`tclip_jax.image.load_image`), so an image is decoded once
whatever runs on it, and returns float32 [h, w, 3] normalized with the model's mean and std (`CLIPConfig.image_mean`,
`image_std`: OpenAI's, `CLIP_MEAN` and `CLIP_STD`, unless its checkpoint says others). The reproductions are
of RGB images: OpenAI's ``_transform`` resizes before it converts to RGB, and PIL resizes an RGBA image with its
colours weighted by alpha (a transparent pixel counts as black) and a palette or 1-bit image by nearest
neighbour, where we resize the RGB image `load_image` gives (alpha dropped); such images differ a little.

Images longer than `MAX_ASPECT_RATIO` times their width (or the reverse) are refused by the square protocols:
``whole`` would squash a 4000 x 50 strip 80-fold into the square input and ``center_crop`` would keep an eightieth
of it, and either way the maps would not say much. Crop or tile such images first; ``patch_multiple`` keeps the
aspect ratio and takes them.
"""
from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from PIL import Image

from tclip_jax.image.geometry import Geometry
from tclip_jax.model.config import OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD, CLIPConfig

InputProtocol = Literal["whole", "center_crop", "patch_multiple"]
INPUT_PROTOCOLS: tuple[str, ...] = get_args(InputProtocol)

MAX_ASPECT_RATIO = 10
CLIP_MEAN = np.array(OPENAI_IMAGE_MEAN, dtype=np.float32)
CLIP_STD = np.array(OPENAI_IMAGE_STD, dtype=np.float32)


def prepare(rgb: np.ndarray, protocol: InputProtocol, config: CLIPConfig) -> tuple[np.ndarray, Geometry]:
    """The model input of a decoded image under `protocol`, for a model of `config` (its input and patch size, its
    pixel normalization)."""
    check_rgb(rgb)
    patch_size = config.patch_size
    check_input_size(rgb.shape[:2], protocol, patch_size)
    normalization = {"mean": config.image_mean, "std": config.image_std}
    if protocol == "patch_multiple":
        return whole_image(rgb, tuple(int(side / patch_size + 0.5) * patch_size for side in rgb.shape[:2]),
                           **normalization)
    return (whole_image if protocol == "whole" else center_crop)(rgb, config.image_size, **normalization)


def check_input_size(size_hw: tuple[int, int], protocol: InputProtocol, patch_size: int) -> None:
    """Refuses an image of `size_hw` that `protocol` cannot feed in (as `prepare` would, before any decoding)."""
    height, width = size_hw
    if protocol in ("whole", "center_crop"):
        if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
            # patch_multiple is pointed to only where it would take the image
            alternative = "" if _patch_multiple_problem(size_hw, patch_size) else (
                " (TCLIP can also take it as it is: --input-protocol patch_multiple; baselines keep their official "
                "protocol)")
            raise ValueError(f"the image is {width}x{height} (W x H), more than {MAX_ASPECT_RATIO}:1; the {protocol} "
                             f"protocol would squash or crop most of it away: crop or tile it first{alternative}")
    elif protocol == "patch_multiple":
        problem = _patch_multiple_problem(size_hw, patch_size)
        if problem:
            raise ValueError(problem)
    else:
        raise ValueError(f"unknown input protocol {protocol!r}; expected one of {', '.join(INPUT_PROTOCOLS)}")


def _patch_multiple_problem(size_hw: tuple[int, int], patch_size: int) -> str | None:
    """Why the patch_multiple protocol cannot take an image of `size_hw` (a side that rounds to no patch), or None."""
    if 2 * min(size_hw) < patch_size:
        return (f"the image's {min(size_hw)}-pixel side is less than half a {patch_size}-pixel patch: too small for "
                "the patch_multiple protocol")
    return None


def center_crop(rgb: np.ndarray, size: int = 224, *, mean=CLIP_MEAN, std=CLIP_STD) -> tuple[np.ndarray, Geometry]:
    """OpenAI CLIP's resize of the short side to ``size``, centre crop, normalize (`clip_normalize`): float32 [size,
    size, 3]."""
    check_rgb(rgb)
    if not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"center_crop size must be a positive int, got {size!r}")
    height, width = rgb.shape[:2]
    if width <= height:
        resized_hw = (int(size * height / width), size)
    else:
        resized_hw = (size, int(size * width / height))
    offset_yx = tuple(int(round((r - size) / 2.0)) for r in resized_hw)
    resized = resize_rgb(rgb, resized_hw)
    crop = resized[offset_yx[0] : offset_yx[0] + size, offset_yx[1] : offset_yx[1] + size]
    geometry = Geometry((height, width), (size, size), resized_hw, offset_yx)
    return clip_normalize(crop, mean, std), geometry


def whole_image(rgb: np.ndarray, size: int | tuple[int, int] = 224, *, mean=CLIP_MEAN,
                std=CLIP_STD) -> tuple[np.ndarray, Geometry]:
    """Bicubic resize of the whole image to ``size`` (int or (h, w)), no crop, normalize (`clip_normalize`): float32
    [h, w, 3]."""
    check_rgb(rgb)
    input_hw = (size, size) if isinstance(size, (int, np.integer)) else size
    if not (
        isinstance(input_hw, (tuple, list))
        and len(input_hw) == 2
        and all(isinstance(s, (int, np.integer)) and s > 0 for s in input_hw)
    ):
        raise ValueError(f"whole_image size must be a positive int or (h, w) of positive ints, got {size!r}")
    input_hw = (int(input_hw[0]), int(input_hw[1]))
    geometry = Geometry(rgb.shape[:2], input_hw, input_hw, (0, 0))
    return clip_normalize(resize_rgb(rgb, input_hw), mean, std), geometry


def clip_normalize(rgb, mean=CLIP_MEAN, std=CLIP_STD):
    """The pixel normalization of uint8 RGB [..., 3], numpy or jax (training normalizes batches on device), with a
    model's per-channel `mean` and `std` (`CLIPConfig.image_mean`, `image_std`; OpenAI's by default).

    Same float32 operations, in the same order, as torchvision ToTensor (/255) then Normalize (sub, div).
    """
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return (rgb.astype(np.float32) / np.float32(255.0) - mean) / std


def check_rgb(rgb: np.ndarray) -> None:
    """Refuses, in one line, anything but a decoded uint8 RGB array [H, W, 3] with H, W >= 1 (what `load_image`
    gives)."""
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            and rgb.size):
        raise ValueError("expected a decoded uint8 RGB array [H, W, 3] (tclip_jax.image.load_image), "
                         f"got {type(rgb).__name__} {getattr(rgb, 'dtype', '')} {getattr(rgb, 'shape', '')}")


def resize_rgb(rgb: np.ndarray, size_hw: tuple[int, int], resample: str = "bicubic") -> np.ndarray:
    """A uint8 RGB image resized to `size_hw` with PIL's antialiased "bicubic" or "bilinear" filter: torchvision's
    `Resize` with the PIL backend. Anything else (`check_rgb`), or another filter, is refused in one line."""
    check_rgb(rgb)
    if resample not in _PIL_FILTERS:
        raise ValueError(f"resample must be one of {', '.join(_PIL_FILTERS)}, got {resample!r}")
    return np.asarray(Image.fromarray(rgb).resize((size_hw[1], size_hw[0]), _PIL_FILTERS[resample]))


_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
