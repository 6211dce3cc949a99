"""Relevance-map methods: TCLIP and the baselines, behind one interface.

Every baseline is a pure function `explain(model, params, images, texts, **options) -> output` (jit-compiled,
or a thin wrapper over a jit-compiled core) of the static model (`tclip_jax.model.CLIP`: config and matmul
dtype) and its parameters: images [n_images, h, w, 3] (NHWC, CLIP-normalised, one size per call), texts as
token ids [n_texts, context] (or [n_texts, n_templates, context] for a prompt ensemble) or, for every method
but HilaCAM (which differentiates the text tower), as their features from `common.text_features`
[n_texts, embed_dim], computed once for many image batches; `output.maps` [n_images, n_texts, gh, gw] is the
patch-grid relevance; each output dataclass also carries the method's intermediates. Its `Baseline` entry
records how the official code feeds images in (`tclip_jax.image.InputProtocol`) and turns maps into heatmaps
(`postprocess_maps`). The registry is `tclip_jax.methods.registry.BASELINES`.
"""
