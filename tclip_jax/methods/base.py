"""The one interface of every relevance-map method (TCLIP and each baseline), and what `explain` returns.

A method splits into what runs where:
- `prepare` (host, per image): the decoded uint8 image -> model input [h, w, 3] and its `Geometry`, under the
  method's input protocol (`tclip_jax.image.protocols`);
- `encode` (once for any number of images): `Query`s (a prompt, and the part of it whose map is wanted) ->
  `QueryArrays`: arrays with a leading query axis (TCLIP's query embeddings, text features, token ids) and arrays
  every query shares (e.g. a label set);
- `maps` (device): a pure function `(params, pixels [B, h, w, 3], queries, rows [B, K]) -> MapOutput` whose
  `maps[b, k]` is the map of query `rows[b, k]` on image b, covering the model-input frame at any resolution.
  It is jit-compiled once per shape, and a batch is split over the local devices (`explain_batch` and `tclip
  sweep` alike: `tclip_jax.methods.devices`); `explain` pads a call's
  queries to a multiple of `Method.query_chunk` slots (`pad_slots`: a padded slot maps a real query again, its map
  dropped), so prompts of a few more or fewer words reuse the compiled program;
- `original_maps` (host, numpy: no image size compiles a program): one image's maps -> the original image size
  (bilinear; a method whose official code rescales its maps there does it here);
- `postprocess` (host): maps at the original image size -> a `HostMaps` (soft map, GMM fit, box) each, fitted
  within `covered`, the part of the image the model saw (`Geometry.covered`; an override takes it too).
`explain` / `explain_batch` run them for images and prompts; `tclip sweep` runs them over datasets.

A map of a query never depends on the other queries of a call or on the batch it runs in: methods whose map
depends on a set of texts (CLIP Surgery's feature surgery, the decomposition heatmap) take that set once, as the
label set of `encode` (the prompts of an `explain` call; a dataset's class prompts in a sweep).

Adding a method: a module with a `Method` subclass (`name`, `Settings`, `encode`, `maps`; prompt-level methods
derive from `PromptMethod` and write `grid_maps` only) and one line in `tclip_jax.methods.REGISTRY` (or none: a
class outside the package is named "package.module:Class"). The contract the test suite checks of every registered
method: `maps` jit-compiles, gives finite float32 maps, one per query, and a query's map does not depend on the other
queries of the call; the maps change with the prompt unless the class says `prompt_free = True`; every matmul of
the model's parameters takes the model's matmul dtype; JAX's x64 mode leaves the maps as they are; only TCLIP has
soft maps. Integer pixels are refused in `maps_per_image`, the one entry every method's maps are called through,
before `maps` sees them; and so, as they are traced, are maps not of shape [B, K, h, w] with [B, K] the shape of
`rows` (and in `PromptMethod.maps` grid maps not of shape [B, Q, gh, gw], Q the queries given, on the patch grid),
in one line naming the class and both shapes. A NaN or infinite value in a map is refused by the host step (a
prompt-level method's min-max, `common.minmax`, makes such a grid map all NaN). Results record a method by its
`name`, which a class sets in its own body or is "package.module:Class" (`Method.__init_subclass__`).

Gradients: `maps` is the differentiable entry (TCLIP's in the pixels and the image tower's parameters: its queries are
encoded on the host, so the text tower's parameters get a zero gradient through it). `maps_per_image` and
`jitted_maps` loop over the images with a trip count hidden from the compiler (`_each`), which JAX's reverse mode
refuses under `jax.jit`."""
from __future__ import annotations

import abc
import collections
import copy
import dataclasses
import functools
import json
import os
import threading
import warnings
from collections.abc import Iterator, Sequence, Sized
from typing import Any, ClassVar, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tclip_jax.checkpoints.load import DeviceCopies, LoadedClip, TreeLeaves, load_clip, matmul_dtype, read_only
from tclip_jax.environment import run_environment
from tclip_jax.image import (Geometry, ImageLike, InputProtocol, check_input_size, load_image, prepare, to_original,
                             upsample_bilinear)
from tclip_jax.methods.common import causal_length_groups, in_chunks, minmax, text_features
from tclip_jax.methods.devices import DeviceMaps, DispatchedMaps, batch_devices, default_batch_size
from tclip_jax.model.clip import check_floating_pixels, eot_positions
from tclip_jax.model.config import PRESETS
from tclip_jax.model.tokenizer import PromptCutWarning, TokenizedPrompt, Word, clean_text, has_word
from tclip_jax.methods.settings import MethodSettings
from tclip_jax.postprocess import Box, GmmFit, heatmap_boxes

Array = jax.Array
RESULT_SCHEMA = "tclip_jax/result"
RESULT_VERSION = 2
REPR_PROMPTS = 8  # an ImageResult's repr names this many of its prompts


@dataclasses.dataclass(frozen=True)
class Query:
    """One map to compute: of `prompt`, or of the words that overlap `span` (characters [start, end) of the prompt,
    0 <= start <= end <= len(prompt); a word partly inside it is taken whole).

    Per-token methods (TCLIP) map the words that overlap the span; prompt-level methods map the whole prompt.
    """

    prompt: str
    span: Optional[tuple[int, int]] = None

    def __post_init__(self):
        if self.span is None:
            return
        try:
            start, end = (int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None
                          for v in self.span)
        except (TypeError, ValueError):  # not a pair
            start = end = None
        if start is None or end is None or not 0 <= start <= end <= len(self.prompt):
            raise ValueError(f"span {self.span!r} of prompt {self.prompt!r} is not characters [start, end) of it: two "
                             f"integers, 0 <= start <= end <= {len(self.prompt)}")
        object.__setattr__(self, "span", (start, end))  # Python ints, as results record them


@flax.struct.dataclass
class QueryArrays:
    """Encoded queries: `per_query` arrays have a leading query axis; `shared` arrays serve every query."""

    per_query: Any
    shared: Any = None

    def __len__(self) -> int:
        return len(jax.tree_util.tree_leaves(self.per_query)[0])

    def take(self, index: np.ndarray) -> "QueryArrays":
        """These queries, reordered or repeated by `index` (host arrays)."""
        return self.replace(per_query=jax.tree_util.tree_map(lambda a: np.asarray(a)[index], self.per_query))

    def extend(self, other: "QueryArrays") -> "QueryArrays":
        """These queries, then `other`'s (encoded with the same label set, so the shared arrays are these)."""
        per_query = jax.tree_util.tree_map(lambda a, b: np.concatenate([a, b]), self.per_query, other.per_query)
        return self.replace(per_query=per_query)


@flax.struct.dataclass
class MapOutput:
    maps: Array        # [B, K, h', w'] over the model-input frame
    extras: Any = None  # method-specific per-image arrays (TCLIP: the untranslated copy's patch embeddings)


@dataclasses.dataclass(frozen=True)
class HostMaps:
    """The host step's output for one map."""

    soft: Optional[np.ndarray]   # TCLIP's soft map [H, W]; None for methods whose metrics score the map itself
    gmm: Optional[GmmFit]        # the soft map's mixture fit (gmm.tau is τ)
    box: Box                     # xyxy pixels, exclusive end


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class MapResult:
    """One word (or a whole prompt) on one image, at the original image's size."""

    text: str
    heatmap: np.ndarray              # [H, W] the method's map (TCLIP: the trimmed mean over translated copies)
    soft: Optional[np.ndarray]       # [H, W] TCLIP's GMM-thresholded, Gaussian-filtered map; None for baselines
    gmm: Optional[GmmFit]
    box: Box                         # from Otsu + the settings' box rule, on `heatmap`

    @property
    def tau(self) -> Optional[float]:
        return None if self.gmm is None else self.gmm.tau

    @property
    def relevance(self) -> np.ndarray:
        """The map that pointing and segmentation metrics score: the soft map where there is one."""
        return self.heatmap if self.soft is None else self.soft

    def __repr__(self) -> str:  # short, as ImageResult's: the dataclass's printed every array
        height, width = self.heatmap.shape
        parts = [f"map {height}x{width} in [{self.heatmap.min():.4g}, {self.heatmap.max():.4g}]"]
        if self.gmm is not None:
            fallback = f" (GMM fallback: {self.gmm.fallback})" if self.gmm.fallback else ""
            parts.append(f"τ {self.tau:.4g}{fallback}")
        parts.append(f"box {tuple(int(v) for v in self.box)}")
        if self.soft is not None:
            parts.append("soft map")
        return f"<MapResult {self.text!r}: {', '.join(parts)}>"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class PromptResult:
    prompt: str
    tokens: TokenizedPrompt
    words: tuple[Word, ...]           # the explained words (punctuation dropped); () for prompt-level methods
    word_maps: tuple[MapResult, ...]  # one per word
    phrase: MapResult                 # the whole prompt (TCLIP: its words' mean query, or its pieces' weighted)
    # TCLIP: raw S [n_pieces, gh*gw] of the untranslated image, row i piece tokens.pieces[i] (a word's rows: its
    # piece_positions - 1); else None
    similarity: Optional[np.ndarray]
    # where a prompt cut to fit the model's context (the `truncate` setting) stops being mapped: `Method.mapped_ends`
    mapped_ends: Optional[tuple[int, int]] = None

    def __repr__(self) -> str:
        return f"<PromptResult {_prompt_summary(self)}>"


def _prompt_summary(prompt: PromptResult) -> str:
    """'a red circle' (words a, red, circle): a prompt and its mapped words, for the short reprs."""
    words = f"words {', '.join(w.text for w in prompt.words)}" if prompt.words else "no per-word maps"
    return f"{prompt.prompt!r} ({words})"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ImageResult:
    image: np.ndarray                 # uint8 [H, W, 3] as loaded
    geometry: Geometry
    grid: tuple[int, int]             # the patch grid of the model input
    prompts: tuple[PromptResult, ...]
    run: dict                         # method, model, settings, protocol (`Method.run_info`)
    # its maps were computed against its prompts as their label set (the method's `uses_label_set`), which the
    # explorer says; not in the record (`run` names a method, whose class is not imported to ask)
    against_label_set: bool = False

    def to_record(self) -> dict:
        """The result as JSON-ready values (`RESULT_SCHEMA`; `tclip explain` adds the files it wrote)."""
        def map_record(m: MapResult) -> dict:
            return {"tau": m.tau, "gmm_fallback": None if m.gmm is None else m.gmm.fallback,
                    "box_xyxy": [int(v) for v in m.box]}

        prompts = []
        for prompt in self.prompts:
            pieces = prompt.tokens.pieces
            # a word's pieces as indices into the prompt's `pieces` and rows of its S (a token row's position - 1)
            indices = [[p - 1 for p in w.piece_positions] for w in prompt.words]
            words = [{"word": w.text, "span": [w.start, w.end], "pieces": [pieces[i] for i in ii], "piece_indices": ii,
                      **map_record(m)} for w, ii, m in zip(prompt.words, indices, prompt.word_maps)]
            prompts.append({"prompt": prompt.prompt, "pieces": list(pieces), "words": words,
                            "phrase": map_record(prompt.phrase),
                            "mapped_ends": None if prompt.mapped_ends is None else list(prompt.mapped_ends)})
        return {"schema": RESULT_SCHEMA, "version": RESULT_VERSION, "run": self.run, "environment": run_environment(),
                "image": {"size_hw": list(self.image.shape[:2])}, "grid": list(self.grid), "prompts": prompts}

    def figure(self, prompt: int = 0, kind: str = "heatmap", columns: int = 5):
        """A matplotlib grid of one prompt (the image, each word, the whole prompt; at most `columns` ≤ 5 per row),
        titled with the method and model, τ in each panel's title; kind "heatmap" or "soft" (TCLIP's soft maps).
        A notebook shows it when it is a cell's last value; `.savefig(path)` writes it."""
        from tclip_jax.visualize import result_figure

        return result_figure(self, prompt, kind, columns)

    def __repr__(self) -> str:
        """Method, model, image size and prompts with their words: a notebook keeps this beside the explorer
        (`_repr_html_`) as the cell's text, which was a dump of every array (20 kB for one prompt)."""
        from tclip_jax.visualize import method_label, model_label

        prompts = "; ".join(_prompt_summary(p) for p in self.prompts[:REPR_PROMPTS])
        if len(self.prompts) > REPR_PROMPTS:
            prompts += f"; ... ({len(self.prompts) - REPR_PROMPTS} more)"
        return (f"<ImageResult {method_label(self.run)} on {model_label(self.run)}: image size_hw "
                f"{tuple(self.image.shape[:2])}, {len(self.prompts)} prompt{'s' * (len(self.prompts) != 1)}: "
                f"{prompts}>")

    def _repr_html_(self) -> str:
        """The interactive explorer of this result, inline in a notebook (`tclip_jax.visualize.explorer`)."""
        from tclip_jax.visualize import result_html

        return result_html(self)


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedPrompts:
    """Prompts encoded once for any number of images: per prompt its words, then one map per word and phrase."""

    tokens: tuple[TokenizedPrompt, ...]
    words: tuple[tuple[Word, ...], ...]   # per prompt, the words that get their own map
    queries: QueryArrays                  # distinct queries
    rows: np.ndarray                      # [sum(words) + P] row of each word query, then of each phrase query
    extras: Any = None                    # method-specific (TCLIP: unit token embeddings, for S)
    encoder: tuple = ()                   # `Method.encoder` of the method that encoded them: no other may use them
    mapped_ends: tuple = ()               # per prompt, `Method.mapped_ends` (empty: every prompt mapped whole)


class Method(abc.ABC):
    """Base of every method; see the module docstring. Construct with a loaded model and settings."""

    name: ClassVar[str]
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    input_protocol: ClassVar[InputProtocol] = "whole"  # how `prepare` feeds images in (TCLIP: a setting)
    explains_words: ClassVar[bool] = False  # maps each word of a prompt, not only the prompt
    # A prompt's map depends on the label set it is encoded with (an instance whose settings make its maps
    # independent of it, CLIP Surgery without feature surgery, says False).
    uses_label_set: bool = False
    # (forward, backward) passes through the image encoder per image for all T prompts of a call, as
    # benchmarks/baselines.py shows them (e.g. ("1", "T"): one forward, one backward per prompt); None: not stated.
    image_encoder_passes: ClassVar[Optional[tuple[str, str]]] = None
    # Raised when a change makes the method's maps, soft maps or boxes differ from those it made before (records
    # say which they hold, and a sweep begun on other maps is not resumed): 2 for the similarity methods and CLIP
    # Surgery since their grid maps are upsampled once, straight to the image (2026-12-05); a property where only
    # some settings' maps changed (MaskCLIP's residual_and_mlp=False: 3). Not raised for the centre crop: `run_info`
    # records at least 2 under it for every method, one outside the package too (`recorded_maps_version`).
    maps_version: ClassVar[int] = 1
    # `explain` maps a call's queries in a multiple of this many slots, so that prompts of another word count reuse
    # the compiled maps (at most query_chunk - 1 padded maps); prompt-level methods map one image's queries in
    # chunks of it. 1 for a method whose every map is a computation of its own (an optimization, masked forwards),
    # where a padded slot would cost a whole map.
    query_chunk: ClassVar[int] = 8
    # Its maps do not depend on the prompt: one map for every prompt of an image (the class token's attention). The
    # test suite asks every other method for different maps of two prompts naming different objects.
    prompt_free: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        """A method is recorded by its `name` (`run_info`: sweeps, which resume only the method they began with, and
        explain's result.json; labels): the class's own, or for a class that sets none, "module:Class", as `get`
        names a class outside the package. The name a class inherits is its base's (a subclass of Similarity that
        maps otherwise would be recorded, resumed and reported as "similarity"), and a registered method's name is
        that method's: another class that takes it is refused."""
        super().__init_subclass__(**kwargs)
        from tclip_jax.methods import REGISTRY

        own = f"{cls.__module__}:{cls.__qualname__}"
        if "name" not in vars(cls):
            cls.name = own
        elif REGISTRY.get(cls.name, own) != own:
            raise TypeError(f"method class {own} is named {cls.name!r}, the name of the registered method "
                            f"{REGISTRY[cls.name]}, whose records its own would mix with: name it otherwise, or "
                            f"set no name (it is then recorded as {own!r})")

    def __init__(self, clip: LoadedClip, settings: Optional[MethodSettings] = None):
        self.clip = clip
        self._settings = self.Settings() if settings is None else settings
        if not isinstance(self._settings, self.Settings):
            raise TypeError(f"{self.name} takes {self.Settings.__name__}, got {type(self._settings).__name__}")

    @property
    def settings(self) -> MethodSettings:
        return self._settings

    @settings.setter
    def settings(self, _):
        # The compiled maps and what was computed from the settings (TCLIP's translations) keep the first ones: a
        # new value would be recorded in results but not used.
        raise AttributeError(f"a method's settings are fixed when it is built: build another, e.g. "
                             f"type(m)(m.clip, m.settings.replace(...)), or {type(self).__name__}.from_pretrained("
                             "..., **settings)")

    @property
    def encoder(self) -> tuple:
        """What encoded prompts depend on: the method, its model (`LoadedClip.fingerprint`: its config and every
        weight, so a model whose transformer blocks alone differ is another), the dtype of its matmuls and JAX's
        matmul precision in this thread (`matmul_precision`, so taken at each use; the queries differ with either,
        and results record this method's) and its settings."""
        return (self.name, self.clip.fingerprint, np.dtype(self.clip.model.dtype).name, matmul_precision(),
                json.dumps(self.settings.to_dict(), sort_keys=True))

    def check_encoded(self, encoded: "EncodedPrompts") -> None:
        """Refuses prompts another method, model, matmul dtype, matmul precision or settings encoded: their queries
        would be mapped as if this method's, and the results recorded as this method's."""
        own = self.encoder
        if encoded.encoder == own:
            return
        method, model, dtype, precision = (encoded.encoder or ("an unknown method", None, None, None))[:4]
        this = f"this {self.name}"
        differs = (f"another method than {this}" if method != self.name
                   else f"another model than {this}" if model != self.clip.fingerprint
                   else f"another matmul dtype ({dtype}) than {this} ({own[2]})" if dtype != own[2]
                   else f"another matmul precision ({precision or 'default'}) than {this} ({own[3] or 'default'})"
                   if precision != own[3]
                   else f"other settings than {this}")  # or what a method adds to its encoder (ECLIP: its projections)
        raise ValueError(f"these prompts were encoded by {method} with {differs}: encode them with this method's "
                         "encode_prompts")

    @classmethod
    def from_pretrained(cls, name_or_path: Optional[str | os.PathLike] = None, *, dtype: Any = jnp.float32,
                        activation: Optional[str] = None, **settings) -> "Method":
        """The method on any model `load_clip` accepts (None: the embedded default), with these settings.
        `activation` names the MLP activation of a state dict that does not say it (see `load_clip`)."""
        settings = cls.Settings.from_dict(settings)  # checked before the model loads
        return cls(load_clip(name_or_path, dtype=dtype, activation=activation), settings)

    @property
    def params(self):
        """What `maps` reads besides the inputs: the model's parameters."""
        return self.clip.params

    def params_on(self, device: jax.Device):
        """`params` on ``device``, for the maps of `explain_batch` and sweeps (`tclip_jax.methods.devices`), text
        encoding and `input_maps`: put there once and kept while they are the same (`DeviceCopies`), the model's by
        the model (`LoadedClip.params_on`: every method of one model shares them), a tree of the method's own by the
        method (ECLIP's holds the model's: it overrides this to share the model's copy)."""
        params = self.params
        if self.clip is not None and params is self.clip.params:
            return self.clip.params_on(device)
        return self.own_params_on(params, device)

    def own_params_on(self, tree, device: jax.Device):
        """``tree``, parameters of the method's own, on ``device``, kept by the method (`DeviceCopies`)."""
        own = self.__dict__.get("_own_params_on")
        if own is None:  # made at first use: a subclass's __init__ need not make it
            own = self._own_params_on = DeviceCopies()
        return own.of(tree, device)

    def default_device_params(self):
        """`params_on` the device a plain JAX call runs on (`batch_devices()[0]`), for the calls outside the split
        batches (text encoding, `input_maps`): given the numpy parameters, each jitted call copied them there."""
        return self.params_on(batch_devices()[0])

    def run_info(self) -> dict:
        """What produced a result: method, model (its architecture if it is a preset's, its MLP activation, its
        `LoadedClip.fingerprint` of its config and every weight, which tells models apart where the origin, a path
        as typed, does not, the dtype its matmuls take: float32 parameters, bfloat16 matmuls move boxes, and JAX's
        matmul precision where it is not the default, `matmul_precision`), settings and input protocol (JSON-ready).

        Taken as a run starts (each batch of `explain_batch` as it is dispatched, a sweep as it begins), in the
        thread that starts it: the precision is that thread's, and a dtype that would not run as recorded is refused
        there (float64 matmuls of a model loaded under JAX's x64 mode, run without it, run as float32)."""
        architecture = next((name for name, preset in PRESETS.items() if preset == self.clip.config), None)
        precision = matmul_precision()
        model = {"origin": self.clip.origin, "source": self.clip.source, "architecture": architecture,
                 "activation": self.clip.config.activation, "fingerprint": self.clip.fingerprint,
                 "matmul_dtype": matmul_dtype(self.clip.model.dtype).name,
                 **({} if precision is None else {"matmul_precision": precision})}
        return {"method": self.name, "maps_version": recorded_maps_version(self.maps_version, self.input_protocol),
                "model": model, "settings": self.settings.to_dict(), "input_protocol": self.input_protocol}

    # ----------------------------------------------------------------------------------- the four parts
    def prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, Geometry]:
        return prepare(rgb, self.input_protocol, self.clip.config)

    def check_image_size(self, size_hw: tuple[int, int]) -> None:
        """Refuses an image of this size that `prepare` would refuse (its input protocol cannot take it)."""
        check_input_size(size_hw, self.input_protocol, self.clip.config.patch_size)

    @abc.abstractmethod
    def encode(self, queries: Sequence[Query], label_set: Optional[Sequence[str]] = None) -> QueryArrays:
        """The queries' arrays, in order; `label_set`: the prompts that set-dependent methods compare against."""

    @abc.abstractmethod
    def maps(self, params, pixels: Array, queries: QueryArrays, rows: Array) -> MapOutput:
        """Pure device function (see the module docstring)."""

    def maps_per_image(self, params, pixels: Array, queries: QueryArrays, rows: Array) -> MapOutput:
        """`maps`, one image at a time (a `lax.map` over the batch), each with its own queries gathered first.

        XLA's kernels may sum in another order for another shape, so a batched call could give an image maps
        that differ in the last bits with the batch it lands in and the queries that come with it. Here every
        image runs the same program on arrays of the same shape: its maps are the same bits whatever the batch
        size, device count or resume point. Integer pixels are refused here, for every method, in the image tower's
        words (`check_floating_pixels`), before a method's own code (a gradient w.r.t. them) sees them; and maps
        not of shape [1, K, h, w] for an image's K query rows, as they are traced (`_check_map_shape`).

        Not differentiable in reverse mode under `jax.jit` (the loop's trip count is hidden from the compiler, so
        that a single image is not compiled otherwise): take gradients of `maps`.
        """
        check_floating_pixels(pixels)
        own = jax.tree_util.tree_map(lambda a: jnp.take(a, rows, axis=0), queries.per_query)  # [B, slots, ...]
        own_rows = jnp.arange(rows.shape[1])[None]

        def one(image, per_query):
            out = self.maps(params, image[None], queries.replace(per_query=per_query), own_rows)
            _check_map_shape(self, "maps", out.maps, (1, rows.shape[1], None, None),
                             f"1 image and rows of shape {own_rows.shape}",
                             "[images, query rows, height, width] ([B, K] the shape of rows)")
            return jax.tree_util.tree_map(lambda a: a[0], out)

        return _each(one, pixels, own)

    def original_maps(self, maps: Array, geometry: Geometry) -> Array:
        """Maps [..., h, w] covering the model input (at its size or the patch grid's) -> the original image: a numpy
        array, resized on the host (`image.to_original`; jax maps are fetched first), where no image size compiles
        a program, in `explain` and sweeps alike; a method whose official code rescales its maps at the original
        size does it here."""
        return to_original(maps, geometry)

    def postprocess(self, heatmaps: Sequence[np.ndarray], soft_maps: bool = True,
                    covered: Optional[tuple[slice, slice]] = None) -> list[HostMaps]:
        """The host step for maps at the original size: Otsu boxes under the settings' rule (and, for a method
        with soft maps, those too unless `soft_maps` is False). `covered`: the image's `Geometry.covered`, the part
        the model saw, where thresholds are fitted and boxes found (None: all of it)."""
        return [HostMaps(None, None, box) for box in heatmap_boxes(heatmaps, self.settings.box_rule, covered=covered)]

    # ----------------------------------------------------------------------------------------- explain
    @functools.cached_property
    def jitted_maps(self):
        """`maps_per_image`, jit-compiled (once per shape: of the batch, and of the queries, which `explain` pads to
        a multiple of `query_chunk`)."""
        return jax.jit(self.maps_per_image)

    def tokenize(self, prompts: Sequence[str]) -> tuple[TokenizedPrompt, ...]:
        context = self.clip.config.context_length
        return tuple(self.clip.tokenizer.tokenize_words(p, context, self.settings.truncate) for p in prompts)

    def mapped_ends(self, tokens: TokenizedPrompt) -> Optional[tuple[int, int]]:
        """Where a prompt cut to fit the model's context (the `truncate` setting) stops being mapped, in characters
        of the prompt: (the end of what the text that kept least of it kept, the end of what the text that kept most
        kept), each the end of its last word kept; None for a prompt mapped whole (no text of it was cut inside it).
        The prompt is one text here, its own tokens (a method with templates: each template text is cut by itself)."""
        if not self.settings.truncate or self.clip.tokenizer.fits(tokens.text, self.clip.config.context_length):
            return None  # (a prompt too long was refused)
        end = _kept_end(tokens.words, 0, len(tokens.text))
        return end, end

    def encode_prompts(self, prompts: str | Sequence[str]) -> EncodedPrompts:
        """Tokenises and encodes prompts once; the result serves any number of images."""
        tokens = self.tokenize(prompt_list(prompts))  # says which prompts are cut
        words, queries = self.explained_queries(tokens)
        with warnings.catch_warnings():  # ... once: encoding them tokenizes them again
            warnings.simplefilter("ignore", PromptCutWarning)
            queries = self.encode(queries, label_set=[t.text for t in tokens])
            mapped = tuple(self.mapped_ends(t) for t in tokens)
        return dataclasses.replace(distinct_queries(tokens, words, queries, self.encoder), mapped_ends=mapped)

    def explained_queries(self, tokens: Sequence[TokenizedPrompt]) -> tuple[tuple[tuple[Word, ...], ...], list[Query]]:
        """Per prompt the words that get their own map, and the queries: each word, then each prompt."""
        if self.explains_words:
            words = tuple(_explained_words(t) for t in tokens)
        else:  # the whole prompt is mapped (emoji and punctuation too), but nothing would be SOT and EOT alone
            empty = next((t.text for t in tokens if not t.pieces), None)
            if empty is not None:
                raise ValueError(f"prompt {empty!r} is empty")
            words = tuple(() for _ in tokens)
        queries = [Query(t.text, (w.start, w.end)) for t, ws in zip(tokens, words) for w in ws]
        return words, queries + [Query(t.text) for t in tokens]

    def preprocess(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """(uint8 image, model input [h, w, 3], geometry): the image decoded once, then `prepare`d."""
        rgb = load_image(image)
        return (rgb, *self.prepare(rgb))

    def input_maps(self, image: ImageLike, queries: QueryArrays) -> tuple[np.ndarray, Any, Geometry]:
        """One image's maps of every query in order over the model input [Q, h, w], the image's `extras` (e.g.
        TCLIP's unit patch embeddings) and its geometry: the device step of `explain`."""
        out, geometry = self._one_image_maps(image, queries)
        return np.asarray(out.maps), jax.device_get(out.extras), geometry

    def image_maps(self, image: ImageLike, queries: QueryArrays) -> tuple[np.ndarray, Any]:
        """`input_maps` at the image's size [Q, H, W], with the image's `extras`: the device and resize steps of
        `explain`, without the host step (which, under a centre crop, takes the geometry's `covered`: `postprocess(
        maps, covered=self.preprocess(image)[2].covered)`)."""
        out, geometry = self._one_image_maps(image, queries)
        return np.asarray(self.original_maps(out.maps, geometry)), out.extras

    def _one_image_maps(self, image: ImageLike, queries: QueryArrays) -> tuple[MapOutput, Geometry]:
        """One image's `MapOutput`, fetched to the host (indexed there: on the device each shape would compile a
        program), the batch axis dropped, and its geometry."""
        _, pixels, geometry = self.preprocess(image)
        slots, rows = self.query_slots(queries)
        out = jax.tree_util.tree_map(lambda a: np.asarray(a)[0],
                                     self.jitted_maps(self.default_device_params(), pixels[None], slots, rows[None]))
        return out.replace(maps=out.maps[:len(queries)]), geometry

    def query_slots(self, queries: QueryArrays) -> tuple[QueryArrays, np.ndarray]:
        """(`queries` padded to the next multiple of `query_chunk` by `pad_slots`, the rows [slots] of every slot):
        the maps of any number of queries in one bucket come from one compiled program; the first len(queries)
        are these queries' maps, the others are dropped."""
        count = len(queries)
        index = pad_slots(range(count), -(-count // self.query_chunk) * self.query_chunk)
        return queries.take(index), np.arange(len(index), dtype=np.int32)

    def explain(self, image: ImageLike, prompts: str | Sequence[str] | EncodedPrompts) -> ImageResult:
        return next(self.explain_batch([image], prompts))

    def explain_batch(self, images: Sequence[ImageLike], prompts: str | Sequence[str] | EncodedPrompts,
                      batch_size: Optional[int] = None, overlap: bool = True) -> Iterator[ImageResult]:
        """Yields one ImageResult per image; the prompts are encoded once for all images (prompts given as text
        when the first result is read, on the default device and under the JAX settings of the thread that reads it:
        `encode_prompts` first to choose), and refused before a batch if the model changed since (a leaf replaced).

        ``batch_size`` images (by default the smallest multiple of the device count that is at least 4,
        `default_batch_size`: 6 on three devices, 8 on a TPU v2-8) go to the devices at a time, split over every
        local device (`jax.local_devices()`; where ``explain_batch`` is called within a ``jax.default_device``
        context, that device alone, wherever the results are then read) as a sweep's batches are
        (`tclip_jax.methods.devices`: each device takes ceil(batch_size / devices) of them and runs the
        single-device program, so any device count gives the same bits; `explain`'s one image runs on the first
        device alone). With ``overlap`` (default) the device work of each batch is dispatched
        (asynchronously) before the host step of the batch before it, so decoding and the host step run while the
        devices compute; without, each batch's host step comes first (benchmarks/explain_overlap.py compares the
        two). The host step fetches its batch's maps whole, as the devices made them (nothing is dispatched to a
        device for them: a device runs one thread's work in the order it was dispatched, so it waits for its own
        batch only), and resizes each image's maps to the image on the host (`original_maps`, as a sweep does: no
        image size compiles a program), one image's image-size maps at a time."""
        # The devices of the call's context: the generator's body runs when its results are first read.
        return self._explained_batches(images, prompts, batch_size, overlap, batch_devices())

    def _explained_batches(self, images: Sequence[ImageLike], prompts: str | Sequence[str] | EncodedPrompts,
                           batch_size: Optional[int], overlap: bool,
                           devices: list[jax.Device]) -> Iterator[ImageResult]:
        _check_several_images(images)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        encoded = prompts if isinstance(prompts, EncodedPrompts) else self.encode_prompts(prompts)
        slots, rows = self.query_slots(encoded.queries)
        pending = None
        batches = self._input_batches(images, default_batch_size(len(devices)) if batch_size is None else batch_size)
        with DeviceMaps(self, devices) as device_maps:  # its threads end with the generator
            while True:
                try:
                    self.check_encoded(encoded)  # another method's or model's (a leaf replaced since the last batch)
                    loaded = next(batches, None)
                except Exception:  # that, or an image that cannot be read: the images before it are explained first
                    if pending is not None:
                        yield from self._batch_results(encoded, *pending)
                    raise
                if loaded is None:
                    break
                pixels = np.stack([p for _, p, _ in loaded])
                if pending is not None and not overlap:
                    yield from self._batch_results(encoded, *pending)
                    pending = None
                run = self.run_info()  # what runs this batch: checked before it runs, at the precision in effect
                out = device_maps(pixels, slots, np.broadcast_to(rows, (len(loaded), len(rows))))
                if pending is not None:
                    yield from self._batch_results(encoded, *pending)
                pending = loaded, out, run
            if pending is not None:
                yield from self._batch_results(encoded, *pending)

    def _input_batches(self, images: Sequence[ImageLike], batch_size: int) -> Iterator[list]:
        """`preprocess` of each image, in order, `batch_size` at a time, each batch of one input shape (an input
        protocol that keeps the aspect ratio, such as patch_multiple, gives images of other shapes other batches).
        An error, whether `images` raises it or preprocessing does, comes after a batch of the images before it."""
        batch: list = []
        several = not isinstance(images, Sized) or len(images) > 1
        try:
            for index, image in enumerate(images):  # an iterable's own error (a loader's) is raised here
                try:
                    item = self.preprocess(image)
                except (ValueError, TypeError) as err:
                    if several and type(err) in (ValueError, TypeError):  # an array or PIL image is named by place
                        raise type(err)(f"image {index}: {err}") from err
                    raise
                if batch and item[1].shape != batch[0][1].shape:
                    yield batch
                    batch = []
                batch.append(item)
                if len(batch) == batch_size:  # a full batch goes at once, before the next image is read
                    yield batch
                    batch = []
        except Exception:  # any error, reading or preprocessing: the images read before it are explained first
            if batch:
                yield batch
            raise
        if batch:
            yield batch

    def _batch_results(self, encoded: EncodedPrompts, loaded: list, out: DispatchedMaps,
                       run: dict) -> Iterator[ImageResult]:
        maps, extras = out.host_maps(), out.host_extras()  # [B, slots, h, w]: the padded slots are dropped here
        for b, (rgb, _, geometry) in enumerate(loaded):
            resized = np.asarray(self.original_maps(maps[b, :len(encoded.queries)], geometry))
            yield self._image_result(rgb, geometry, encoded, resized,
                                     jax.tree_util.tree_map(lambda a: a[b], extras), run)

    def prompt_similarity(self, encoded: EncodedPrompts, prompt: int, extras: Any) -> Optional[np.ndarray]:
        """A method's raw token-patch similarity of one prompt, if it has one (TCLIP's S)."""
        return None

    def _image_result(self, rgb: np.ndarray, geometry: Geometry, encoded: EncodedPrompts, distinct_maps: np.ndarray,
                      extras: Any, run: dict) -> ImageResult:
        """`distinct_maps` [Q, H, W] at the image's size; equal queries share one array; `run`: the `run_info` of
        its batch (each result has a copy of its own).

        Every array of the result is read-only, and each map and soft map is an array of its own [H, W], not a view
        into the image's [Q, H, W] maps (or a soft map's padded buffer): a map kept holds its own memory alone, and
        one result's edit cannot reach the others that share its array."""
        distinct_maps = [read_only(np.array(m)) for m in distinct_maps]  # compact copies
        host = self.postprocess(distinct_maps, covered=geometry.covered)
        soft = [None if h.soft is None else read_only(np.array(h.soft, copy=True)) for h in host]

        def map_result(text: str, item: int) -> MapResult:
            row = encoded.rows[item]
            return MapResult(text, distinct_maps[row], soft[row], host[row].gmm, host[row].box)

        n_words = sum(len(ws) for ws in encoded.words)
        prompts, item = [], 0
        for p, (tokens, words) in enumerate(zip(encoded.tokens, encoded.words)):
            word_maps = tuple(map_result(w.text, item + i) for i, w in enumerate(words))
            item += len(words)
            similarity = self.prompt_similarity(encoded, p, extras)
            prompts.append(PromptResult(tokens.text, tokens, words, word_maps, map_result(tokens.text, n_words + p),
                                        None if similarity is None else read_only(np.asarray(similarity).view()),
                                        encoded.mapped_ends[p] if encoded.mapped_ends else None))
        grid = tuple(s // self.clip.config.patch_size for s in geometry.input_hw)
        return ImageResult(read_only(rgb.view()), geometry, grid, tuple(prompts), copy.deepcopy(run),
                           self.uses_label_set)


# ---------------------------------------------------------------------------------- prompt-level methods
@dataclasses.dataclass(frozen=True)
class MapPostprocess:
    """Upsampling (bilinear, align_corners=False) and min-max normalization, in the official order.

    normalize_first: min-max over each grid map, then upsample (CLIP Surgery's `get_similarity_map`,
      Grad-ECLIP's notebook); otherwise upsample, then min-max over the image (HilaCAM, clip_text_span).
    clip_negative: clip the upsampled map to [0, max] before the min-max (clip_text_span's segmentation).
    to_original: upsample the normalized grid map once, straight to the original image (`original_maps`), as
      `get_similarity_map(sim, (H, W))` does; otherwise to the model input, which `original_maps` then resamples.
    """

    normalize_first: bool
    clip_negative: bool = False
    to_original: bool = False

    def __post_init__(self):
        if self.to_original and not (self.normalize_first and not self.clip_negative):
            raise ValueError("to_original needs normalize_first (a grid map normalized before any upsampling)")


def postprocess_maps(maps: Array, size: tuple[int, int], spec: MapPostprocess) -> Array:
    """Patch-grid maps [..., gh, gw] -> heatmaps [..., H, W] in [0, 1]."""
    if spec.normalize_first:
        return upsample_bilinear(minmax(maps), tuple(size))
    upsampled = upsample_bilinear(maps, tuple(size))
    if spec.clip_negative:
        upsampled = jnp.maximum(upsampled, 0)
    return minmax(upsampled)


def _check_map_shape(method: Method, function: str, maps: Array, expected: tuple[Optional[int], ...], given: str,
                     layout: str) -> None:
    """Refuses maps that `method.<function>` returned for `given` inputs unless their shape is `expected` (None: any
    length on that axis), naming the method's class, the shape expected and the shape got: a map per query short, or
    an axis more or fewer, was indexed past the end (explain), cut off by a zip (a sweep's units) or refused by the
    host step as a map of the wrong rank, far from the method."""
    shape = tuple(jnp.shape(maps))
    if len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected)):
        return
    want = "(" + ", ".join("any" if e is None else str(e) for e in expected) + ")"
    raise ValueError(f"{type(method).__module__}:{type(method).__qualname__}.{function} returned maps of shape "
                     f"{shape} for {given}: expected {want}, {layout}")


NORMALIZE_THEN_UPSAMPLE = MapPostprocess(normalize_first=True)
UPSAMPLE_THEN_NORMALIZE = MapPostprocess(normalize_first=False)
NORMALIZE_THEN_UPSAMPLE_TO_ORIGINAL = MapPostprocess(normalize_first=True, to_original=True)


class PromptMethod(Method):
    """A method that explains whole prompts, one map per prompt, from its text features (one prompt, or the
    official template ensemble, per text; HilaCAM takes token ids), with its official input protocol and
    map post-processing (`heatmap`)."""

    heatmap: ClassVar[Optional[MapPostprocess]]  # None: the maps stay on the patch grid
    templates: ClassVar[Optional[tuple[str, ...]]] = None  # the official prompt ensemble, if any
    text_chunk: ClassVar[int] = 8  # one-prompt texts encoded per call (template ensembles: one per call)
    text_cache_size: ClassVar[int] = 4096  # texts whose features `text_features` keeps

    def __init__(self, clip: LoadedClip, settings: Optional[MethodSettings] = None):
        super().__init__(clip, settings)
        self._text_lock = threading.Lock()
        self._text_leaves: Optional[TreeLeaves] = None  # the parameters the kept features came from
        self._text_precision: Optional[str] = None  # and the matmul precision they were computed at
        self._text_cache: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()

    def encode(self, queries: Sequence[Query], label_set: Optional[Sequence[str]] = None) -> QueryArrays:
        return QueryArrays(self.text_features([q.prompt for q in queries]))

    def text_keys(self, prompts: Sequence[str]) -> list[bytes]:
        """Each prompt's token rows, as bytes: what the model tells texts apart by ("A red  circle" is "a red
        circle")."""
        with warnings.catch_warnings():  # a cut prompt is said where its features are computed, once
            warnings.simplefilter("ignore")
            return [row.tobytes() for row in self.text_token_ids(prompts)]

    def distinct_texts(self, prompts: Sequence[str]) -> dict[bytes, str]:
        """{`text_keys`: the first prompt with them}, for a label set whose members must differ (a set-dependent
        method subtracts their mean: two alike made every map of the set zero)."""
        distinct: dict[bytes, str] = {}
        for prompt, key in zip(prompts, self.text_keys(prompts)):
            distinct.setdefault(key, prompt)
        return distinct

    def label_set_arrays(self, labels: Sequence[str]) -> dict[str, np.ndarray]:
        """{"label_set": the labels' `text_features` padded to a multiple of `query_chunk` rows by `pad_slots`,
        "label_valid": [rows] bool, True for the labels}: a set-dependent method's means over the label set are
        masked (`label_set_mean`), so that label sets of a few members more or fewer (explain's prompts) run one
        compiled program."""
        slots = -(-len(labels) // self.query_chunk) * self.query_chunk
        features = self.text_features(labels)
        return {"label_set": features[pad_slots(range(len(labels)), slots)],
                "label_valid": np.arange(slots) < len(labels)}

    def template_texts(self, prompt: str) -> list[str]:
        """The texts a prompt is put into, one per official template (each cut by itself to fit the context)."""
        return [t.format(prompt) for t in self.templates]

    def mapped_ends(self, tokens: TokenizedPrompt) -> Optional[tuple[int, int]]:
        """As `Method.mapped_ends`, over the prompt's template texts: each keeps what fits beside its template's
        words, so the ends are those of the template that kept least and of the one that kept most."""
        if self.templates is None or not self.settings.truncate:
            return super().mapped_ends(tokens)
        context, prompt, tokenizer = self.clip.config.context_length, tokens.text, self.clip.tokenizer
        texts = self.template_texts(prompt)
        if all(tokenizer.fits(text, context) for text in texts):  # kept by the tokenizer: known at once
            return None
        # A text cut after the prompt's last word (in the template's own closing words) mapped all of it. The
        # prompt's words uncut (a piece takes a byte of the cleaned text at least, and cleaning may lengthen a
        # character: NFC splits U+1D160 into 3): those of `tokens` may be cut.
        uncut = tokenizer.tokenize_words(prompt, len(clean_text(prompt).encode("utf-8")) + 2)
        last_word_end = max((w.end for w in uncut.words), default=0)
        ends = []
        with warnings.catch_warnings():  # said once, by text_token_ids
            warnings.simplefilter("ignore", PromptCutWarning)
            for template, text in zip(self.templates, texts):
                if tokenizer.fits(text, context):
                    ends.append(len(prompt))
                    continue
                end = _kept_end(tokenizer.tokenize_words(text, context, True).words, template.index("{}"), len(prompt))
                ends.append(len(prompt) if end >= last_word_end else end)
        return None if min(ends) == len(prompt) else (min(ends), max(ends))

    def text_token_ids(self, prompts: Sequence[str]) -> np.ndarray:
        """[n, context] token ids, or [n, n_templates, context] with the official templates."""
        encode = functools.partial(self.clip.tokenizer.encode, context_length=self.clip.config.context_length,
                                   truncate=self.settings.truncate)
        if self.templates is None:
            return encode(list(prompts))
        stacks = []
        for prompt in prompts:  # errors and truncation are the prompt's, said once, not once per template
            with warnings.catch_warnings(record=True) as cut:
                warnings.simplefilter("always")
                try:
                    stacks.append(encode(self.template_texts(prompt)))
                except ValueError as err:
                    raise ValueError(f"{self.name} puts each prompt into its {len(self.templates)} templates: "
                                     f"{err}") from None
            if cut:
                warnings.warn(f"{len(cut)} of the {len(self.templates)} template texts of a prompt were cut: "
                              f"{cut[0].message}", stacklevel=2)
        return np.stack(stacks) if stacks else np.zeros((0, len(self.templates), self.clip.config.context_length),
                                                        np.int32)

    def text_features(self, prompts: Sequence[str]) -> np.ndarray:
        """[n, embed_dim] features of the prompts (`encode_texts`), each text cut after its end-of-text token
        (`causal_length_groups`, the longest of its templates) and computed once, in chunks of `text_chunk` texts (a
        template ensemble alone: it is a batch already), so that every text of one cut length goes through the same
        program whatever texts come with it.

        A text's features do not depend on the texts computed with it, so those of the last `text_cache_size` texts
        are kept, for the parameters they came from and the matmul precision in this thread (`matmul_precision`,
        which the queries' encoder and the results record): a label set that every call names (CLIP Surgery's, in
        every batch of a sweep) is encoded once, and so is a prompt explained image after image."""
        token_ids = self.text_token_ids(prompts)
        if not len(token_ids):
            one_text = np.zeros((1, *token_ids.shape[1:-1], 1), np.int32)
            return np.zeros((0, jax.eval_shape(self.encode_texts, one_text).shape[-1]), np.float32)
        keys = [row.tobytes() for row in token_ids]
        leaves, precision = TreeLeaves.of(self.params), matmul_precision()
        with self._text_lock:
            cache = self._text_cache
            if precision != self._text_precision or not leaves.same_as(self._text_leaves):
                self._text_leaves, self._text_precision = leaves, precision
                cache.clear()
            first_row: dict[bytes, int] = {}
            for i, key in enumerate(keys):
                first_row.setdefault(key, i)
            missing = [i for key, i in first_row.items() if key not in cache]
            eots = eot_positions(token_ids[missing], self.clip.config.eot_token_id)
            if eots.ndim == 2:  # a template stack is cut after its last end-of-text token
                eots = eots.max(axis=1)
            groups = causal_length_groups(eots.tolist(), token_ids.shape[-1])
            chunk = 1 if token_ids.ndim == 3 else self.text_chunk  # a template ensemble is a batch of its own
            for length, members in groups.items():
                group = [missing[j] for j in members]
                cache.update(zip((keys[i] for i in group),
                                 in_chunks(self.encode_texts, token_ids[group][..., :length], chunk)))
            features = np.stack([cache[key] for key in keys])
            for key in keys:
                cache.move_to_end(key)
            while len(cache) > self.text_cache_size:
                cache.popitem(last=False)
        return features

    def encode_texts(self, token_ids: np.ndarray) -> Array:
        """[n, embed_dim] L2-normalized features of a chunk of token rows [n, length] or template stacks
        [n, templates, length] (`_jitted_text_features`)."""
        return _jitted_text_features(self.clip.model, self.default_device_params(), token_ids)

    @abc.abstractmethod
    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        """[B, Q, gh, gw] patch-grid maps of every query on every image (another shape is refused in `maps`)."""

    def maps(self, params, pixels: Array, queries: QueryArrays, rows: Array) -> MapOutput:
        """The maps of the queries in `rows`.

        For one image (as `maps_per_image` calls it) only its queries are computed, in chunks of `query_chunk`
        (padded), so that every query's map comes from a computation of the same shape, however many there are.
        """
        batch, slots = rows.shape

        def grid_maps(queries: QueryArrays) -> Array:  # shapes are static: checked as the maps are traced
            grids = self.grid_maps(params, pixels, queries)
            height, width = pixels.shape[1:3]
            grid = tuple(s // self.clip.config.patch_size for s in (height, width))
            _check_map_shape(self, "grid_maps", grids, (pixels.shape[0], len(queries), *grid),
                             f"{pixels.shape[0]} image{'s' * (pixels.shape[0] != 1)} of {height}x{width} pixels and "
                             f"{len(queries)} queries",
                             "[images, queries, grid height, grid width] (the patch grid)")
            return grids

        if batch == 1:
            chunk = self.query_chunk
            index = jnp.concatenate([rows[0], jnp.broadcast_to(rows[0, :1], (-slots % chunk,))])
            chunks = jax.tree_util.tree_map(lambda a: jnp.take(a, index, axis=0).reshape(-1, chunk, *a.shape[1:]),
                                            queries.per_query)
            grids = jax.lax.map(lambda chunk: grid_maps(queries.replace(per_query=chunk))[0], chunks)
            grids = grids.reshape(1, -1, *grids.shape[2:])[:, :slots]
        else:
            grids = jnp.take_along_axis(grid_maps(queries), rows[:, :, None, None], axis=1)
        if self.heatmap is None:  # the grid maps, resized once to the original image by `original_maps`
            return MapOutput(grids)
        if self.heatmap.to_original:
            return MapOutput(minmax(grids))
        return MapOutput(postprocess_maps(grids, pixels.shape[1:3], self.heatmap))


@functools.partial(jax.jit, static_argnums=0)
def _jitted_text_features(model, params, token_ids: Array) -> Array:
    """`text_features` of a chunk of texts in one pass: XLA's kernels treat rows alike (as in TCLIP's
    `map_prompts`), so a text's features do not depend on the texts with it (4x faster than a `lax.map` one text at
    a time for a chunk of eight one-prompt texts)."""
    return text_features(model, params, token_ids)


# ----------------------------------------------------------------------------------------------- helpers
def matmul_precision() -> Optional[str]:
    """JAX's matmul precision for float32 inputs in this thread (`jax.default_matmul_precision(...)`, a context of
    the thread that enters it, else the environment's JAX_DEFAULT_MATMUL_PRECISION), as results record it: None for
    JAX's default (unset, "default" or "bfloat16"; the platform's choice: one bfloat16 pass on TPU, float32 on CPUs,
    README's dtype policy), else the `lax.Precision` it names ("highest" for "float32" too, "high" for
    "tensorfloat32") or the `lax.DotAlgorithmPreset`; either is a value `jax.default_matmul_precision` takes."""
    value = jax.config.jax_default_matmul_precision
    if value is None:
        return None
    try:
        precision = jax.lax.Precision(value)
    except ValueError:  # not a precision level: a dot algorithm preset, recorded by its name
        return value
    return None if precision == jax.lax.Precision.DEFAULT else precision.name.lower()


def _each(fn, images: Array, per_image: Any):
    """[fn(images[i], per_image[i]) for every i], stacked, by a loop whose body compiles the same for any batch.

    XLA simplifies a one-iteration loop, and reads from and writes into one-row buffers, and then fuses the body
    with other kernels: one image alone would get other bits than the same image in a batch. So the trip count is
    opaque to the compiler, and the inputs and results of a single image are held in two-row buffers (the second
    row is never computed).
    """
    count = images.shape[0]
    if count == 0:  # an empty batch: empty results, of the shapes one image's would have
        one = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), (images, per_image))
        return jax.tree_util.tree_map(lambda s: jnp.zeros((0, *s.shape), s.dtype), jax.eval_shape(fn, *one))
    if count == 1:
        images, per_image = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), (images, per_image))
    pixel = images[0, 0, 0, 0]
    opaque_zero = (pixel != pixel).astype(jnp.int32)  # 0 for any non-NaN pixel
    shapes = jax.eval_shape(fn, images[0], jax.tree_util.tree_map(lambda a: a[0], per_image))
    outputs = jax.tree_util.tree_map(lambda s: jnp.zeros((max(count, 2), *s.shape), s.dtype), shapes)

    def body(i, outputs):
        result = fn(images[i], jax.tree_util.tree_map(lambda a: a[i], per_image))
        return jax.tree_util.tree_map(lambda out, r: out.at[i].set(r), outputs, result)

    outputs = jax.lax.fori_loop(0, count + opaque_zero, body, outputs)
    return jax.tree_util.tree_map(lambda a: a[:count], outputs)


def _check_several_images(images: Any) -> None:
    """Refuses one image passed where a sequence or iterable of images is expected: iterated, a path would be its
    characters, an array its rows, bytes their values."""
    from PIL import Image

    if isinstance(images, str):
        one = "a str (one path)"
    elif isinstance(images, os.PathLike):
        one = f"a {type(images).__name__} (one path)"
    elif isinstance(images, (bytes, bytearray, memoryview)):
        one = f"{type(images).__name__} (one encoded image)"
    elif isinstance(images, Image.Image):
        one = "a PIL image"
    elif isinstance(images, (np.ndarray, jax.Array)) and images.ndim not in (1, 4):
        kind = "numpy" if isinstance(images, np.ndarray) else "jax"
        one = (f"a {kind} array of shape {images.shape}, one image (images stacked in an array: a list of them, or "
               "[N, H, W, C])")
    else:
        return
    raise TypeError(f"explain_batch takes a sequence or iterable of images, got {one}; explain takes one image")


def pad_slots(rows: Sequence[int], slots: int) -> np.ndarray:
    """Query `rows` padded to `slots` entries [slots] int32 by repeating the first: a padded slot maps a real query
    again and its map is dropped, so that calls with a few queries more or fewer run one compiled program (explain's
    queries, a sweep's class slots per image; a map never depends on the other queries of its call)."""
    rows = list(rows)
    return np.array(rows + rows[:1] * (slots - len(rows)), np.int32)


def label_set_mean(values: Array, valid: Array, axis: int) -> Array:
    """The mean of `values` over the label set's entries along `axis` (kept, length 1), the padded ones
    (`label_valid` False, see `Method.label_set_arrays`) left out."""
    shape = [1] * values.ndim
    shape[axis] = -1
    valid = jnp.reshape(valid, shape)
    return jnp.sum(jnp.where(valid, values, 0), axis=axis, keepdims=True) / jnp.sum(valid)


def recorded_maps_version(maps_version: int, input_protocol: InputProtocol) -> int:
    """The maps version a run records (`Method.run_info`): the method's own (`Method.maps_version`), and at least 2
    under a centre crop, since the thresholds and boxes of every centre-crop method come from the part of the image
    the crop kept (2026-12-05)."""
    return max(maps_version, 2) if input_protocol == "center_crop" else maps_version


def prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """The prompts as a list of str (one str is one prompt); anything else refused in one line that says what to
    give (bytes were iterated as their byte values, None as 'not iterable')."""
    if prompts is None:
        raise TypeError("prompts are required: give a str or a list of str (got None)")
    if isinstance(prompts, (str, bytes, bytearray)):  # one prompt (bytes: refused below, not iterated as values)
        prompts = [prompts]
    try:
        prompts = list(prompts)
    except TypeError:
        raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}") from None
    if not prompts:
        raise ValueError("no prompts given")
    for prompt in prompts:
        if isinstance(prompt, (bytes, bytearray)):
            raise TypeError(f"prompts must be str, got {type(prompt).__name__} {bytes(prompt)[:40]!r}: decode them "
                            "first, e.g. prompt.decode('utf-8')")
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be str, got {type(prompt).__name__}: {prompt!r}")
    return prompts


def _kept_end(words: Sequence[Word], start: int, length: int) -> int:
    """The end of the last word a text kept, in characters of the prompt that starts at `start` of it and is
    `length` long (0 if the text kept nothing of it; `length` if it kept all of it)."""
    return min(max(max((w.end for w in words), default=0) - start, 0), length)


def _explained_words(tokens: TokenizedPrompt) -> tuple[Word, ...]:
    words = tuple(w for w in tokens.words if not w.is_punctuation)
    if not words:  # its words may all lie past the model's context, cut off under `truncate`
        cut = " within the model's context (truncate cut off every word)" if has_word(tokens.text) else ""
        raise ValueError(f"prompt {tokens.text!r} has no words to explain{cut}")
    return words


def distinct_queries(tokens, words, queries: QueryArrays, encoder: tuple) -> EncodedPrompts:
    """Equal queries (a one-word prompt's word and phrase, a word in several prompts) are mapped once."""
    flat = np.concatenate([np.ascontiguousarray(leaf).reshape(len(queries), -1).view(np.uint8)
                           for leaf in jax.tree_util.tree_leaves(queries.per_query)], axis=1)
    _, first, rows = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)                       # distinct rows in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return EncodedPrompts(tokens, words, queries.take(first[order]), rank[rows.ravel()].astype(np.int64),
                          encoder=encoder)
