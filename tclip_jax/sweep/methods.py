"""Methods a sweep can run: an image batch and the classes to explain in, one relevance map per class out.

A ``Method`` splits into what runs where:
- ``preprocess`` (host, per image): uint8 image -> model input [h, w, 3] and its ``Geometry``;
- ``maps`` (device, jitted and sharded over the batch by the sweep): ``(params, pixels [B, h, w, 3],
  class_ids [B, K] int32) -> [B, K, h', w']``, the map of class ``class_ids[b, k]`` on image b over the model
  input frame (any resolution); ``params`` holds everything the method needs on the device (weights, the
  class prompts encoded once) and is replicated to every device;
- ``relevance`` (host, per map at original size): the map the pointing and segmentation metrics score.
Boxes always come from the map itself (Otsu and the largest region).

Methods are built by name from ``METHODS`` (TCLIP and every baseline of ``tclip_jax.baselines``) or from
``"package.module:factory"``; a factory is called as ``factory(model, class_names, template)`` and returns a
``Method``.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tclip_jax.image import Geometry, prepare
from tclip_jax.methods.postprocess import postprocess_maps
from tclip_jax.methods.registry import BASELINES, get_baseline, text_features
from tclip_jax.checkpoints.load import load_clip
from tclip_jax.method.explainer import TCLIP
from tclip_jax.postprocess import soft_map

MapsFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
Factory = Callable[[Optional[str], Sequence[str], Optional[str]], "Method"]
DEFAULT_TEMPLATE = "{}"


def _identity(heatmap: np.ndarray) -> np.ndarray:
    return heatmap


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
    name: str
    params: Any
    maps: MapsFn
    preprocess: Callable[[np.ndarray], tuple[np.ndarray, Geometry]]
    relevance: Callable[[np.ndarray], np.ndarray] = _identity


def prompts_for(class_names: Sequence[str], template: Optional[str]) -> list[str]:
    """Each class name put into ``template`` (one ``{}``; None: the bare name)."""
    template = DEFAULT_TEMPLATE if template is None else template
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}' for the class name, got {template!r}")
    return [template.replace("{}", name) for name in class_names]


def tclip_class_queries(explainer: TCLIP, class_names: Sequence[str], template: Optional[str]) -> np.ndarray:
    """[C, D] queries: the mean of the word queries of each class name inside its prompt.

    With the bare name this is TCLIP's phrase query (the mean of the prompt's words); with a template the
    template's own words are left out, so "a photo of a {}." explains the class name in that context.
    """
    prompts = prompts_for(class_names, template)
    name_start = (template or DEFAULT_TEMPLATE).index("{}")
    encoded = explainer.encode_prompts(prompts)
    rows, first = [], 0
    for name, words in zip(class_names, encoded.words):
        inside = [first + i for i, w in enumerate(words) if w.start >= name_start and w.end <= name_start + len(name)]
        if not inside:
            raise ValueError(f"class name {name!r} has no words to explain")
        rows.append(encoded.queries[inside].mean(axis=0))
        first += len(words)
    return np.stack(rows)


def tclip_method(model: Optional[str], class_names: Sequence[str], template: Optional[str] = None,
                 **settings) -> Method:
    """TCLIP: multi-scale translated token relevance per class; segmentation metrics score its soft maps."""
    explainer = TCLIP.from_pretrained(model, **settings)
    clip, config = explainer.clip, explainer.settings

    def maps(params, pixels, class_ids):
        # The explainer's own device path, with the replicated parameters in place of its constants.
        inner = TCLIP(dataclasses.replace(clip, params=params["clip"]), config)

        def one_image(image, ids):
            return inner.device_maps(image[None], jnp.asarray(params["queries"])[ids])[1][0]

        return jax.vmap(one_image)(pixels, class_ids)

    def relevance(heatmap: np.ndarray) -> np.ndarray:
        return soft_map(heatmap, sigma=config.sigma, seed=config.gmm_seed)[0]

    return Method("tclip", {"clip": clip.params, "queries": tclip_class_queries(explainer, class_names, template)},
                  maps, lambda image: explainer.preprocess(image)[1:], relevance)


def baseline_method(name: str) -> Factory:
    """A factory for baseline `name`, run with its official input protocol, prompts and map post-processing.

    The baseline explains every class on every image and the classes present are gathered afterwards:
    CLIP Surgery's feature surgery depends on the whole label set, so a per-image subset would change it.
    A single class gets CLIP Surgery's empty-string redundant features, as its demo does for one prompt.
    """
    baseline = get_baseline(name)

    def factory(model: Optional[str], class_names: Sequence[str], template: Optional[str] = None) -> Method:
        if len(class_names) < baseline.min_texts:
            raise ValueError(f"{name} needs at least {baseline.min_texts} prompts or classes, got {len(class_names)}")
        clip = load_clip(model)
        prompts = prompts_for(class_names, template)
        encode = clip.tokenizer.encode
        options = {}
        if baseline.prompt_templates is None:
            texts = encode(prompts)
        else:
            texts = np.stack([encode([t.format(p) for t in baseline.prompt_templates]) for p in prompts])
            if name == "clip_surgery" and len(prompts) == 1:
                options["redundant_texts"] = encode([t.format("") for t in baseline.prompt_templates])[None]
        if baseline.takes_text_features:  # the text tower runs once here, not once per image batch
            features = jax.jit(text_features, static_argnums=0)
            texts = np.asarray(features(clip.model, clip.params, texts))
            options = {key: np.asarray(features(clip.model, clip.params, value)) for key, value in options.items()}

        def maps(params, pixels, class_ids):
            grids = baseline.explain(clip.model, params["clip"], pixels, params["texts"], **options).maps
            present = jnp.take_along_axis(grids, class_ids[:, :, None, None], axis=1)
            return postprocess_maps(present, pixels.shape[1:3], baseline.postprocess)

        return Method(name, {"clip": clip.params, "texts": texts}, maps,
                      lambda image: prepare(image, baseline.input_protocol, clip.config.image_size, clip.config.patch_size))

    return factory


METHODS: dict[str, Factory] = {"tclip": tclip_method, **{name: baseline_method(name) for name in BASELINES}}


def build_method(spec: str, model: Optional[str], class_names: Sequence[str], template: Optional[str] = None) -> Method:
    """The method named ``spec`` (a ``METHODS`` key or ``"package.module:factory"``) for these classes."""
    if spec in METHODS:
        return METHODS[spec](model, class_names, template)
    if ":" not in spec:
        raise ValueError(f"unknown method {spec!r}; available: {', '.join(sorted(METHODS))} "
                         f"or 'package.module:factory'")
    module_name, factory_name = spec.split(":", 1)
    factory = getattr(importlib.import_module(module_name), factory_name, None)
    if factory is None:
        raise ValueError(f"method factory {factory_name!r} not found in module {module_name!r}")
    method = factory(model, class_names, template)
    if not isinstance(method, Method):
        raise ValueError(f"method factory {spec!r} returned {type(method).__name__}, not a Method")
    return method
