"""Grad-ECLIP (Zhao et al. 2024) and Grad-CAM on the last block, as in Grad-ECLIP's image notebook.

Cyang-Zhao/Grad-Eclip, `grad_eclip_image.ipynb` (`clip_encode_dense`, `sim_qk`, `grad_eclip`, `grad_cam`).
The notebook re-runs the last block by hand with *single-head* attention over the full width
(`attention_layer(q, k, v, 1)`, also in `generate_emap.py`), whatever the model's head count; that is the
default here (`single_head=True`), and `single_head=False` uses the model's own heads, i.e. explains the
real CLIP embedding.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from tclip_jax.methods import common
from tclip_jax.methods.base import NORMALIZE_THEN_UPSAMPLE, PromptMethod, QueryArrays
from tclip_jax.methods.settings import MethodSettings
from tclip_jax.model import CLIP, l2_normalize
from tclip_jax.settings import setting

Array = jax.Array


@flax.struct.dataclass
class BlockTrace:
    """One re-computed vision block, for a single image (no batch axis)."""

    q: Array           # [n, width] query projection of ln_1(x) (bias included, unscaled)
    k: Array           # [n, width]
    v: Array           # [n, width]
    probs: Array       # [heads, n, n]
    output: Array      # [n, width] residual stream after the block


@flax.struct.dataclass
class LastBlockGradients:
    """The re-computed last block and the gradients of each image-text cosine, per image."""

    stream_in: Array        # [B, n, width] residual stream entering the last block
    trace: BlockTrace       # q, k, v [B, n, width], probs [B, heads, n, n], output [B, n, width]
    tokens: Array           # [B, n, embed_dim] tokens after ln_post and proj
    cosine: Array           # [B, T] cos(class token, text), no logit scale
    grad_stream_in: Array   # [B, T, n, width] d cosine / d stream_in
    grad_cls_output: Array  # [B, T, width] d cosine / d (class token's attention output before out_proj)
    text_features: Array    # [T, embed_dim]
    grid: tuple[int, int] = flax.struct.field(pytree_node=False)


@functools.partial(jax.jit, static_argnames=("model", "single_head"))
def last_block_gradients(model: CLIP, params: dict, images: Array, texts: Array,
                         single_head: bool) -> LastBlockGradients:
    """Blocks before the last from the model; the last re-run (the model's block, with the head count and the
    class-token offset as options); one vjp per image for all texts.

    Both Grad-ECLIP and Grad-CAM read this (jitted once per shape); their own maps are a few cheap ops.
    """
    image = common.encode_image(model, params, images)
    vision = model.bind({"params": params}).visual
    block = vision.blocks[-1]
    num_heads = 1 if single_head else block.attn.num_heads
    texts = common.text_features(model, params, texts)

    def embed(stream_in, cls_offset):
        # The model's own block; the class token's head outputs get `cls_offset` before the output projection.
        output, probs = block(stream_in, num_heads=num_heads,
                              mixed_offset=jnp.zeros_like(stream_in).at[0].set(cls_offset))
        h = block.ln_1(stream_in)  # what the block's attention projected, for the trace
        trace = BlockTrace(block.attn.query(h), block.attn.key(h), block.attn.value(h), probs, output)
        tokens = vision.project(output)
        return l2_normalize(tokens[0]), (trace, tokens)

    def per_image(stream_in):
        embedding, vjp, (trace, tokens) = jax.vjp(embed, stream_in, jnp.zeros(stream_in.shape[-1], jnp.float32),
                                                   has_aux=True)  # float32 also under JAX's x64 mode
        grad_stream_in, grad_cls_output = jax.vmap(vjp)(texts)
        return trace, tokens, texts @ embedding, grad_stream_in, grad_cls_output

    stream_in = image.residual_stream[-2]
    trace, tokens, cosine, grad_stream_in, grad_cls_output = jax.vmap(per_image)(stream_in)
    return LastBlockGradients(stream_in, trace, tokens, cosine, grad_stream_in, grad_cls_output, texts,
                              image.grid)


@flax.struct.dataclass
class GradECLIPOutput:
    maps: Array                  # [n_images, n_texts, gh, gw] ReLU'd explanation, not normalized
    cosine: Array                # [n_images, n_texts] cosine of the (re-computed) image embedding with each text
    image_embedding: Array       # [n_images, embed_dim] normalized class token of the re-computed last block
    patch_cosine: Array          # [n_images, n_texts, gh, gw] cosine of each patch token with each text
    qk_similarity: Array         # [n_images, gh, gw] min-max of cos(q_cls, k_patch), the spatial weight
    cls_attention: Array         # [n_images, gh, gw] head-mean attention of the class token on the patches
    grad_cls_output: Array       # [n_images, n_texts, width] gradient w.r.t. the class token's attention output


def grad_eclip_map(model: CLIP, params: dict, images: Array, texts: Array, *,
                   single_head: bool = True) -> GradECLIPOutput:
    """Grad-ECLIP on the last block: map[p] = relu(sum_d g_d * v[p, d] * sim[p]).

    g = d cos(image, text) / d (class token's attention output, before out_proj); v = value projection of
    ln_1 (bias included); sim = min-max over the patches of cos(q_cls, k_p) (raw projections).
    Protocol of the notebook: each side resized to the nearest patch multiple (`patch_multiple`), the
    positional embedding resized bicubically to the grid; one normalized prompt embedding per text; maps
    min-max normalized on the grid, then upsampled to the original image size.
    """
    run = last_block_gradients(model, params, images, texts, single_head)
    # The model's projections (bfloat16 under bfloat16 matmuls): the cosine, its min-max and the product with the
    # gradient are this method's, in float32 (README's dtype policy).
    q, k, v = (a.astype(jnp.float32) for a in (run.trace.q, run.trace.k, run.trace.v))
    qk = common.minmax(jnp.einsum("bd,bpd->bp", l2_normalize(q[:, 0]), l2_normalize(k[:, 1:])), axis=-1)
    maps = jax.nn.relu(jnp.einsum("btd,bpd->btp", run.grad_cls_output, v[:, 1:]) * qk[:, None])
    grid = run.grid
    patch_cosine = l2_normalize(run.tokens[:, 1:]) @ run.text_features.T
    return GradECLIPOutput(
        maps=maps.reshape(*maps.shape[:2], *grid),
        cosine=run.cosine,
        image_embedding=l2_normalize(run.tokens[:, 0]),
        patch_cosine=jnp.swapaxes(patch_cosine, 1, 2).reshape(*run.cosine.shape, *grid),
        qk_similarity=qk.reshape(-1, *grid),
        cls_attention=common.patch_grid(run.trace.probs.mean(axis=1)[:, 0], grid),
        grad_cls_output=run.grad_cls_output)


@flax.struct.dataclass
class GradCAMOutput:
    maps: Array       # [n_images, n_texts, gh, gw] ReLU'd Grad-CAM, not normalized
    cosine: Array     # [n_images, n_texts]
    weights: Array    # [n_images, n_texts, width] channel weights: the gradient averaged over all tokens


def grad_cam_map(model: CLIP, params: dict, images: Array, texts: Array, *,
                 single_head: bool = True) -> GradCAMOutput:
    """Grad-CAM for ViT on the tokens entering the last block: relu(sum_d w_d x[p, d]), w = mean over all
    tokens (class token included) of d cos / d x. Same model path, protocol and post-processing as
    `grad_eclip_map` (the notebook's second row)."""
    run = last_block_gradients(model, params, images, texts, single_head)
    weights = run.grad_stream_in.mean(axis=2)
    cam = jax.nn.relu(jnp.einsum("btd,bnd->btn", weights, run.stream_in))
    return GradCAMOutput(common.patch_grid(cam, run.grid), run.cosine, weights)


@dataclasses.dataclass(frozen=True)
class GradECLIPSettings(MethodSettings):
    single_head: bool = setting(True, "re-run the last block with one head over the full width, as the official "
                                "notebook does; false: the model's own heads", flag=False)


class GradECLIP(PromptMethod):
    name = "grad_eclip"
    image_encoder_passes = ("1", "T")
    Settings = GradECLIPSettings
    input_protocol = "patch_multiple"
    heatmap = NORMALIZE_THEN_UPSAMPLE

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        return grad_eclip_map(self.clip.model, params, pixels, queries.per_query,
                              single_head=self.settings.single_head).maps


class GradCAM(PromptMethod):
    name = "gradcam"
    image_encoder_passes = ("1", "T")
    Settings = GradECLIPSettings
    input_protocol = "patch_multiple"
    heatmap = NORMALIZE_THEN_UPSAMPLE

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        return grad_cam_map(self.clip.model, params, pixels, queries.per_query,
                            single_head=self.settings.single_head).maps
