"""ECLIP's image-text similarity map (ITSM) and the file of its trained projections.

CLIP stays frozen; ECLIP replaces its two projections into the joint space by a trained pair (`Projections`):
φ̂ᵢ [vision_width, embed_dim] on the image features Fᵢ (the final-layer patch tokens after ln_post) and φ̂ₜ
[text_width, embed_dim] on the text feature Fₜ (the end-of-text token after ln_final). Training
(`tclip_jax.methods.eclip.train`) starts from CLIP's own projections (`clip_projections`), so untrained ECLIP
is CLIP's dense similarity map.

The map of a prompt is the cosine of φ̂ₜ(Fₜ) with φ̂ᵢ(Fᵢ) of every patch on the patch grid, upsampled to the
model input and min-max normalized. The attention mask of training plays no part at test time.

The projections file (`PROJECTIONS_FILE`, safetensors, never pickle) holds the arrays "image" and "text"; a JSON
file beside it of the same name (eclip_projections.json) names the CLIP model it was trained on, with that model's
`LoadedClip.fingerprint` (its config and every weight), the shapes and the training run. Loading refuses projections
whose JSON records another CLIP: widths alone do not tell models apart (ViT-B/32 and ViT-B/16 share theirs), nor do
the tensors around the transformer blocks (a fine-tune of the blocks alone keeps them). A JSON written before the
fingerprint covered the whole model is checked by the definition it was written with, which tells those tensors.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import warnings
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from tclip_jax.checkpoints.load import LoadedClip, frozen_weight
from tclip_jax.files import loads_json, write_files_together
from tclip_jax.methods.base import UPSAMPLE_THEN_NORMALIZE, PromptMethod, QueryArrays
from tclip_jax.methods.eclip.settings import Settings
from tclip_jax.model import CLIP, CLIPConfig, l2_normalize

Array = jax.Array
Projections = dict  # {"image": [vision_width, embed_dim], "text": [text_width, embed_dim]}
PROJECTIONS_FILE = "eclip_projections.safetensors"
PROJECTIONS_FORMAT = "tclip_jax/eclip_projections"


def clip_projections(params: dict) -> Projections:
    """CLIP's own projections (visual proj, text projection), the parameters' arrays themselves: where training
    starts, and untrained ECLIP's (read at each use, a copy would be another leaf each time to the text features'
    cache, `TreeLeaves`)."""
    return {"image": params["visual"]["proj"], "text": params["text"]["projection"]}


def projection_shapes(config: CLIPConfig) -> dict[str, tuple[int, int]]:
    return {"image": (config.vision_width, config.embed_dim), "text": (config.text_width, config.embed_dim)}


def image_features(model: CLIP, params: dict, images: Array) -> tuple[Array, tuple[int, int]]:
    """Fᵢ: the final-layer patch tokens after ln_post [B, gh*gw, vision_width], and the patch grid."""
    out = model.apply({"params": params}, images, method="encode_image")
    return out.tokens_normed[:, 1:], out.grid


def text_features(model: CLIP, params: dict, token_ids: Array) -> Array:
    """Fₜ: the end-of-text token after ln_final [B, text_width]."""
    out = model.apply({"params": params}, token_ids, method="encode_text")
    return jnp.take_along_axis(out.tokens_normed, out.eot_index[:, None, None], axis=1)[:, 0]


def text_queries(projections: Projections, texts: Array) -> Array:
    """φ̂ₜ(Fₜ), L2-normalized [T, embed_dim]."""
    return l2_normalize(texts @ projections["text"])


def itsm(projections: Projections, patches: Array, queries: Array, grid: tuple[int, int]) -> Array:
    """The cosine of every patch's φ̂ᵢ(Fᵢ) ([B, gh*gw, vision_width] features) with each normalized query
    [T, embed_dim] (`text_queries`) -> [B, T, gh, gw]."""
    similarity = l2_normalize(patches @ projections["image"]) @ queries.T
    return jnp.swapaxes(similarity, 1, 2).reshape(*similarity.shape[:1], queries.shape[0], *grid)


@flax.struct.dataclass
class ECLIPOutput:
    maps: Array     # [n_images, n_texts, gh, gw] the ITSM on the patch grid
    queries: Array  # [n_texts, embed_dim] normalized φ̂ₜ(Fₜ)


@functools.partial(jax.jit, static_argnames="model")
def eclip_map(model: CLIP, params: dict, images: Array, texts: Array, projections: Projections) -> ECLIPOutput:
    """ECLIP's ITSM of `texts` on `images` through `projections`: token ids [n_texts, context], or the queries
    [n_texts, embed_dim] this function (or `text_queries`) already returned, which pass through."""
    if jnp.issubdtype(texts.dtype, jnp.floating):
        queries = texts
    else:
        queries = text_queries(projections, text_features(model, params, texts))
    patches, grid = image_features(model, params, images)
    return ECLIPOutput(itsm(projections, patches, queries, grid), queries)


# ------------------------------------------------------------------------------------------ the projections file
def save_projections(path: str | os.PathLike, projections: Projections, clip: LoadedClip,
                     training: Optional[dict] = None) -> pathlib.Path:
    """Writes the projections and, beside them, their JSON (the same name, .json), together
    (`write_files_together`): a failed or interrupted save leaves the pair there was, or the JSON alone, which
    loading finds without its projections; never projections beside another's JSON, or without one, which would be
    checked by their widths alone. Returns the projections' path."""
    path = pathlib.Path(path)
    arrays = {k: np.ascontiguousarray(projections[k], np.float32) for k in ("image", "text")}
    info = {"format": PROJECTIONS_FORMAT, "version": 1,
            "model": {"origin": clip.origin, "source": clip.source, "fingerprint": clip.fingerprint},
            "shapes": {k: list(v.shape) for k, v in arrays.items()}, "training": training}
    write_files_together({path.with_suffix(".json"): (json.dumps(info, indent=2) + "\n").encode("utf-8"),
                          path: safetensors.numpy.save(arrays)})
    return path


def load_projections(path: str | os.PathLike, clip: LoadedClip) -> tuple[Projections, str]:
    """(the projections in `path`, checked against the model's widths and against the model their JSON records,
    if they have one; the SHA-256 of the bytes they were read from)."""
    projections, digest, _ = _projections_and_record(path, clip)
    return projections, digest


def _projections_and_record(path: str | os.PathLike, clip: LoadedClip) -> tuple[Projections, str, dict]:
    """`load_projections`, and the model record of their JSON (`_trained_on`), read once with them."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"ECLIP projections {path} is a folder; name its {PROJECTIONS_FILE}")
    if not path.is_file():
        raise FileNotFoundError(f"ECLIP projections file {path} not found")
    data = path.read_bytes()
    try:
        arrays = safetensors.numpy.load(data)
    except Exception as err:  # safetensors raises its own types for truncated or foreign files
        raise ValueError(f"ECLIP projections file {path} is unreadable: {err}") from None
    expected = projection_shapes(clip.config)
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if shapes != expected:
        raise ValueError(f"ECLIP projections {path} do not fit the model: they are {shapes}, the model needs "
                         f"{expected} (trained on another CLIP?)")
    if not all(np.isfinite(v).all() for v in arrays.values()):
        raise ValueError(f"ECLIP projections {path} hold non-finite values")
    info_path = path.with_suffix(".json")
    trained_on = _trained_on(info_path)
    _refuse_other_clip(info_path, trained_on, clip)
    # read-only as a model's weights are: the method keeps what it computed from them
    return ({k: frozen_weight(v.astype(np.float32)) for k, v in arrays.items()}, hashlib.sha256(data).hexdigest(),
            trained_on)


def _trained_on(info_path: pathlib.Path) -> dict:
    """The model record of the projections' JSON ({} where there is no JSON)."""
    if not info_path.is_file():
        return {}
    try:
        model = loads_json(info_path.read_text(encoding="utf-8")).get("model") or {}
        if not isinstance(model, dict):
            raise ValueError(f"its model is {type(model).__name__}, not a record")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{info_path} (what the projections beside it were trained on) is damaged: {err}") from None
    return model


def _refuse_other_clip(info_path: pathlib.Path, model: dict, clip: LoadedClip) -> None:
    """Refuses projections whose JSON (`info_path`, its model record `model`) records another CLIP than `clip` (no
    JSON, or one written before the fingerprint was recorded: nothing to check against; one of the fingerprint's
    first definition is compared by it, `LoadedClip.is_recorded_as`)."""
    recorded = model.get("fingerprint")
    if recorded is not None and not clip.is_recorded_as(recorded):
        # The fingerprint covers the activation: name it, as the same file under another --activation differs.
        raise ValueError(f"ECLIP projections beside {info_path} were trained on another CLIP than this one: "
                         f"{model.get('origin')} (fingerprint {str(recorded)[:12]}) there, {clip.origin} with the "
                         f"{clip.config.activation} activation (fingerprint {clip.fingerprint[:12]}) here; their "
                         "features differ, so the projections do not apply")


# ------------------------------------------------------------------------------------------------- the method
class ECLIP(PromptMethod):
    """ECLIP's ITSM of whole prompts (`itsm`), with the projections the settings name (else CLIP's own)."""

    name = "eclip"
    # CLIP's one forward
    image_encoder_passes = ("1", "0")
    Settings = Settings
    heatmap = UPSAMPLE_THEN_NORMALIZE

    def __init__(self, clip: LoadedClip, settings: Optional[Settings] = None):
        super().__init__(clip, settings)
        if self.settings.projections is None:
            warnings.warn("eclip: no trained projections given (--option projections=FILE): using CLIP's own, "
                          "i.e. untrained ECLIP", stacklevel=2)
            self._trained, self.projections_digest = None, None
        else:
            # with the model their JSON records, and the one they were checked against
            self._trained, self.projections_digest, self._trained_on = _projections_and_record(
                self.settings.projections, clip)
            self._checked_on = clip.fingerprint

    @property
    def projections(self) -> Projections:
        """The trained projections, or CLIP's own as its parameters hold them now: a leaf replaced there is another
        model (`LoadedClip.fingerprint`), whose projections these are, and against which trained ones are checked
        again (refused as on a fresh build if their JSON records another model)."""
        if self._trained is None:
            return clip_projections(self.clip.params)
        if self.clip.fingerprint != self._checked_on:  # against the record read with them, not the file as it is now
            _refuse_other_clip(pathlib.Path(self.settings.projections).with_suffix(".json"), self._trained_on,
                               self.clip)
            self._checked_on = self.clip.fingerprint
        return self._trained

    @property
    def params(self):
        return {"clip": self.clip.params, "projections": self.projections}

    def params_on(self, device: jax.Device) -> dict:
        """`params` on ``device``: the model's as the model keeps them there (`LoadedClip.params_on`, shared with its
        other methods: not a second copy of CLIP's weights) and the projections, kept by the method."""
        return {"clip": self.clip.params_on(device), "projections": self.own_params_on(self.projections, device)}

    def run_info(self) -> dict:
        """With the projections file and a digest of what it held when loaded: `tclip train-eclip --resume`
        rewrites the file in place, and a sweep resumed after that must not mix the old and the new maps."""
        if self.settings.projections is None:
            return {**super().run_info(), "projections": "CLIP's own projections (untrained ECLIP)"}
        return {**super().run_info(), "projections": {"file": str(pathlib.Path(self.settings.projections).resolve()),
                                                      "sha256": self.projections_digest}}

    @property
    def encoder(self) -> tuple:
        """`Method.encoder` and the projections' digest: the queries go through them, and a file trained further
        in place (`train-eclip --resume`) keeps its path."""
        return (*super().encoder, self.projections_digest)

    def encode_texts(self, token_ids: np.ndarray) -> Array:
        """[n, embed_dim] normalized φ̂ₜ(Fₜ) of a chunk of token rows [n, length]."""
        return _jitted_text_queries(self.clip.model, self.default_device_params(), token_ids)

    def grid_maps(self, params: Any, pixels: Array, queries: QueryArrays) -> Array:
        return eclip_map(self.clip.model, params["clip"], pixels, queries.per_query, params["projections"]).maps


@functools.partial(jax.jit, static_argnums=0)
def _jitted_text_queries(model: CLIP, params: dict, token_ids: Array) -> Array:
    """`text_queries` of a chunk of token rows, together: XLA's kernels treat rows alike, so a text's query does not
    depend on the texts with it (as `base._jitted_text_features`)."""
    return text_queries(params["projections"], text_features(model, params["clip"], token_ids))
