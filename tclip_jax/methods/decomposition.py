"""Direct contributions to CLIP's image embedding (Gandelsman et al. 2024), mean ablation and TextSpan.

Follows yossigandelsman/clip_text_span (`prs_hook.py`, `compute_ablations.py`,
`compute_complete_text_set.py`; `compute_segmentations.py` for the heatmap). The class token's final
residual stream is a sum of terms: the ln_pre output, and per block every (source token, head) attention term plus the MLP output. ln_post is
linearized at the actual statistics, so every term maps into the joint space and the terms sum exactly to
the image embedding divided by its norm.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from tclip_jax.methods import common
from tclip_jax.methods.base import MapPostprocess, PromptMethod, Query, QueryArrays, label_set_mean
from tclip_jax.model import CLIP
from tclip_jax.settings import integer

Array = jax.Array


@flax.struct.dataclass
class ResidualTerms:
    """The class token's residual stream split into terms, before ln_post (the PRS logger's records)."""

    attentions: Array   # [B, L, n, heads, width] probs[h, cls, t] * v[t, h] @ W_out[h] + out bias / (n * heads)
    mlps: Array         # [B, L + 1, width] index 0: ln_pre output; index l + 1: block l's MLP output
    ln_mean: Array      # [B] mean of the final class-token stream (ln_post's statistics)
    ln_std: Array       # [B] sqrt(var + eps)
    norm: Array         # [B] norm of the image embedding (class token after ln_post and proj)


@flax.struct.dataclass
class Decomposition:
    """Direct contributions in the joint space; all terms sum to embedding / ||embedding||."""

    attentions: Array   # [B, L, n, heads, embed_dim] per (block, source token, head); token 0 is the class token
    mlps: Array         # [B, L + 1, embed_dim] ln_pre term, then each block's MLP
    grid: tuple[int, int] = flax.struct.field(pytree_node=False)

    @property
    def heads(self) -> Array:
        """[B, L, heads, embed_dim] each head's contribution, summed over source tokens."""
        return self.attentions.sum(axis=2)

    @property
    def embedding(self) -> Array:
        """[B, embed_dim] the sum of all terms: the L2-normalized image embedding."""
        return self.heads.sum(axis=(1, 2)) + self.mlps.sum(axis=1)


def residual_terms(model: CLIP, params: dict, images: Array) -> ResidualTerms:
    """Splits the final class-token stream of each image into its ln_pre, attention and MLP terms.

    The out_proj bias is shared equally among the (source token, head) terms of its block, as the PRS
    logger does.
    """
    image = common.encode_image(model, params, images)
    vision = model.bind({"params": params}).visual
    stream = image.residual_stream
    attentions, mlps = [], [stream[0][:, 0]]
    for index, block in enumerate(vision.blocks):
        heads = block.attn.num_heads
        v = block.attn.value(block.ln_1(stream[index]))
        v = v.reshape(*v.shape[:-1], heads, -1)                                    # [B, n, heads, head_dim]
        out = block.attn.out.variables["params"]
        w_out = out["kernel"].reshape(heads, -1, out["kernel"].shape[-1])          # [heads, head_dim, width]
        cls_probs = image.attention_probs[index][:, :, 0]                          # [B, heads, n]
        terms = jnp.einsum("bhn,bnhd,hdw->bnhw", cls_probs, v, w_out)
        terms = terms + out["bias"] / (terms.shape[1] * heads)
        attentions.append(terms)
        attended = stream[index][:, 0] + terms.sum(axis=(1, 2))
        mlps.append(block.mlp(attended))
    final = stream[-1][:, 0]
    return ResidualTerms(
        attentions=jnp.stack(attentions, axis=1), mlps=jnp.stack(mlps, axis=1),
        ln_mean=final.mean(axis=-1),
        ln_std=jnp.sqrt(final.var(axis=-1) + model.config.layer_norm_eps),
        norm=jnp.linalg.norm(image.embeds, axis=-1))


def project_terms(params: dict, terms: ResidualTerms, grid: tuple[int, int]) -> Decomposition:
    """ln_post linearized at the actual statistics, then proj, divided by the embedding norm.

    A term c among K = 2L + 1 groups (ln_pre, L attention blocks, L MLPs; an attention group's
    n * heads terms share its part) maps to ((c - mean / K') * gamma / std + beta / K') @ proj / norm, with
    K' = K for ln_pre and MLP terms and K * n * heads for attention terms.
    """
    ln, proj = params["visual"]["ln_post"], params["visual"]["proj"]
    groups = terms.attentions.shape[1] + terms.mlps.shape[1]

    def project(c, shares, term_axes):
        expand = (slice(None),) + (None,) * term_axes   # batch statistics over the term axes
        centred = (c - terms.ln_mean[expand] / shares) * ln["scale"] / terms.ln_std[expand]
        return (centred + ln["bias"] / shares) @ proj / terms.norm[expand]

    n, heads = terms.attentions.shape[2:4]
    return Decomposition(project(terms.attentions, groups * n * heads, 4), project(terms.mlps, groups, 2), grid)


@functools.partial(jax.jit, static_argnames="model")
def decompose(model: CLIP, params: dict, images: Array) -> Decomposition:
    """Per-block, per-head, per-position direct contributions to each image's normalized embedding."""
    terms = residual_terms(model, params, images)
    patch = model.config.patch_size
    grid = (images.shape[1] // patch, images.shape[2] // patch)
    return project_terms(params, terms, grid)


def spatial_heatmaps(decomposition: Decomposition, text_features: Array) -> tuple[Array, Array]:
    """clip_text_span's heatmaps: each patch's contribution through all heads and blocks, dotted with each
    text, minus the mean over the text set. Returns (heatmaps, raw) as [B, T, gh, gw]."""
    patches = decomposition.attentions[:, :, 1:].sum(axis=(1, 3))           # [B, N, embed_dim]
    raw = jnp.swapaxes(patches @ text_features.T, 1, 2)                       # [B, T, N]
    raw = raw.reshape(*raw.shape[:2], *decomposition.grid)
    return raw - raw.mean(axis=1, keepdims=True), raw


def mean_ablate(decomposition: Decomposition, reference: Decomposition, heads: Array,
                mlps: Array | None = None) -> Array:
    """The embedding [B, embed_dim] with chosen direct contributions replaced by their mean over `reference`.

    heads: bool [L, heads], True where a head's contribution (summed over positions) is ablated; a whole
    block's attention is a row of True. mlps: optional bool [L + 1] for the ln_pre and MLP terms. Ablating
    nothing returns `decomposition.embedding`.
    """
    per_head = decomposition.heads
    heads = jnp.asarray(heads, bool)
    if heads.shape != per_head.shape[1:3]:
        raise ValueError(f"heads mask must have shape {per_head.shape[1:3]} (layers, heads), got {heads.shape}")
    per_head = jnp.where(heads[..., None], reference.heads.mean(axis=0), per_head)
    per_mlp = decomposition.mlps
    if mlps is not None:
        mlps = jnp.asarray(mlps, bool)
        if mlps.shape != per_mlp.shape[1:2]:
            raise ValueError(f"mlps mask must have shape {per_mlp.shape[1:2]}, got {mlps.shape}")
        per_mlp = jnp.where(mlps[:, None], reference.mlps.mean(axis=0), per_mlp)
    return per_head.sum(axis=(1, 2)) + per_mlp.sum(axis=1)


@flax.struct.dataclass
class TextSpan:
    indices: Array          # [num_texts] pool indices, in the order chosen; -1 once the pool's span is exhausted
    reconstruction: Array   # [n_images, dim] mean output + its projections on the chosen texts


@functools.partial(jax.jit, static_argnames=("num_texts", "rank"))
def text_span(outputs: Array, text_pool: Array, num_texts: int, rank: int) -> TextSpan:
    """TextSpan (`replace_with_iterative_removal`): a greedy text basis for one head's outputs.

    outputs [n_images, dim] (e.g. `Decomposition.heads[:, layer, head]`); text_pool [n_pool, dim] text
    embeddings. The pool is first projected onto the span of the top `rank` right singular vectors of the
    (uncentred) outputs. Then, on the centred outputs, repeat: pick the text whose projection has the
    largest standard deviation over the images, add the outputs' projection on it to the reconstruction,
    and project it out of the outputs and of every text. A pick whose text has (almost) nothing left outside the
    span of those chosen before (a pool of fewer independent texts than `num_texts`) is index -1 and adds nothing.
    The official code divides by that text's squared norm whatever it is: mostly a rounding residue (about 1e-13),
    not zero, so its reconstruction stays finite but gains a spurious component as large as the real ones, and the
    index is one picked before or one already in the span of those picked; NaN only where the residue is exactly
    zero (e.g. a duplicated or an all-zero text, in some runs). Outputs with a NaN leave every pick -1 and a NaN
    reconstruction (values are not checked under jit).
    """
    if outputs.ndim != 2 or text_pool.ndim != 2 or text_pool.shape[1] != outputs.shape[1]:
        raise ValueError(f"text_span takes outputs [n_images, dim] and text_pool [n_pool, dim] of the same dim, got "
                         f"{tuple(outputs.shape)} and {tuple(text_pool.shape)}")
    integer("rank", rank)
    integer("num_texts", num_texts)
    n_images, dim = outputs.shape
    if not 1 <= rank <= min(n_images, dim):
        raise ValueError(f"rank must be in [1, {min(n_images, dim)}] for outputs of shape {outputs.shape}, got {rank}")
    if not 1 <= num_texts <= min(rank, text_pool.shape[0]):
        raise ValueError(f"num_texts must be in [1, min(rank, pool size) = {min(rank, text_pool.shape[0])}], "
                         f"got {num_texts}")
    basis = jnp.linalg.svd(outputs, full_matrices=False)[2][:rank]
    texts = text_pool @ basis.T @ basis
    mean = outputs.mean(axis=0, keepdims=True)

    norms = jnp.sum(texts * texts, axis=1)

    def pick(carry, _):
        data, texts, reconstruction = carry
        chosen = jnp.argmax(jnp.std(data @ texts.T, axis=0, ddof=1))
        direction = texts[chosen]
        norm = direction @ direction
        left = norm > 1e-8 * norms[chosen]  # more than float32 rounding of a text in the chosen span
        along = lambda x: jnp.where(left, x @ direction / jnp.where(left, norm, 1), 0)[:, None] * direction
        explained = along(data)
        return (data - explained, texts - along(texts), reconstruction + explained), jnp.where(left, chosen, -1)

    start = (outputs - mean, texts, jnp.broadcast_to(mean, outputs.shape))
    (_, _, reconstruction), indices = jax.lax.scan(pick, start, None, length=num_texts)
    return TextSpan(indices, reconstruction)


@functools.partial(jax.jit, static_argnames=("num_texts", "rank"))
def text_span_heads(heads: Array, text_pool: Array, num_texts: int, rank: int) -> TextSpan:
    """`text_span` for every head at once: heads [n_images, L, heads, dim] (`Decomposition.heads`).

    Returns indices [L, heads, num_texts] and reconstructions [L, heads, n_images, dim].
    """
    if heads.ndim != 4:
        raise ValueError(f"text_span_heads takes heads [n_images, L, heads, dim] (Decomposition.heads), got "
                         f"{tuple(heads.shape)}")
    per_head = jax.vmap(text_span, in_axes=(1, None, None, None))
    return jax.vmap(per_head, in_axes=(1, None, None, None))(heads, text_pool, num_texts, rank)


@flax.struct.dataclass
class DecompositionHeatmapOutput:
    maps: Array                    # [n_images, n_texts, gh, gw] patch contributions . text, minus the mean over texts
    raw: Array                     # [n_images, n_texts, gh, gw] before subtracting the mean over texts
    decomposition: Decomposition


@functools.partial(jax.jit, static_argnames="model")
def decomposition_map(model: CLIP, params: dict, images: Array, texts: Array) -> DecompositionHeatmapOutput:
    """Each patch's direct contribution to the normalized image embedding, through every head of every
    block, dotted with each normalized text embedding, minus the mean over the given text set.

    Protocol of the official code (`compute_segmentations.py`): center-crop preprocessing; each image explains its
    predicted ImageNet class minus the mean over all 1000 classes, scored with the classifier
    `compute_text_projection.py` builds (`zero_shot_classifier` with OPENAI_IMAGENET_TEMPLATES: each class's 80
    template texts normalized, averaged, renormalized); maps upsampled by the patch size (bilinear), clipped to
    [0, max], then min-max normalized. Here (and in the reference fixture, fixtures/decomposition/README.md) the
    texts are the given ones, one prompt per text with no templates, minus the mean over the given set (the
    `DecompositionMap` method: the label set); the upsampling and normalization are the official ones. Needs >= 2
    texts: one text minus the mean over itself is zero everywhere.
    """
    if texts.shape[0] < 2:
        raise ValueError("the decomposition heatmap subtracts the mean over the text set, so it needs at least "
                         f"2 texts (one text gives an all-zero map); got {texts.shape[0]}")
    decomposition = decompose(model, params, images)
    maps, raw = spatial_heatmaps(decomposition, common.text_features(model, params, texts))
    return DecompositionHeatmapOutput(maps, raw, decomposition)


class DecompositionMap(PromptMethod):
    """The decomposition heatmap as `compute_segmentations.py` runs it: each prompt's raw map minus the mean raw
    map over the label set (the prompts of an explain call, a sweep's class prompts), which needs >= 2 texts."""

    name = "decomposition"
    image_encoder_passes = ("1", "0")
    input_protocol = "center_crop"
    heatmap = MapPostprocess(normalize_first=False, clip_negative=True)
    uses_label_set = True

    def encode(self, queries: list[Query], label_set=None) -> QueryArrays:
        labels = list(self.distinct_texts(label_set or ()).values())
        if len(labels) < 2:
            raise ValueError("the decomposition heatmap subtracts the mean over a set of texts (the prompts, or a "
                             f"dataset's classes), so it needs at least 2 that differ; got {len(labels)}")
        return QueryArrays(self.text_features([q.prompt for q in queries]), self.label_set_arrays(labels))

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        decomposition = decompose(self.clip.model, params, pixels)
        raw = spatial_heatmaps(decomposition, queries.per_query)[1]
        reference = spatial_heatmaps(decomposition, queries.shared["label_set"])[1]
        return raw - label_set_mean(reference, queries.shared["label_valid"], axis=1)
