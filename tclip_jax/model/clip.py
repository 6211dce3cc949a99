"""CLIP ViT in Flax linen, as a pure function of (params, inputs) that also returns its intermediates.

Parameters are always float32; `dtype` is the dtype of matmul inputs (e.g. bfloat16 on TPU), while
layer norms and softmaxes run in float32. Nothing is cached or mutated: `model.apply` composes with
`jax.jit`, `jax.vmap` (e.g. over translated copies of an image) and `jax.grad`.

Images are NHWC and already normalised (see `tclip_jax.preprocess`). Token ids follow OpenAI's
`clip.tokenize` (SOT ... EOT, zero padding); the text embedding is read at the first maximal id,
which is the end-of-text token for that convention and for Hugging Face's EOT padding alike.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tclip_jax.model.config import CLIPConfig
from tclip_jax.model.posemb import resize_positional_embedding

Array = jax.Array
Dtype = Any


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATION_FNS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def LayerNorm(epsilon: float, name: str) -> nn.LayerNorm:
    """LayerNorm whose statistics and output are float32 whatever the activation dtype."""
    return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


@flax.struct.dataclass
class TransformerOutput:
    tokens: Array                                  # [B, N, width] after the last block
    residual_stream: Optional[tuple[Array, ...]]   # input, then the stream after each block: L + 1 x [B, N, width]
    attention_probs: Optional[tuple[Array, ...]]   # per block [B, heads, N_query, N_key]


@flax.struct.dataclass
class ImageOutput:
    embeds: Array                   # [B, embed_dim] class token after ln_post and proj (CLIP's image embedding)
    tokens: Array                   # [B, 1 + gh*gw, embed_dim] every token after ln_post and proj
    tokens_normed: Array            # [B, 1 + gh*gw, width] every token after ln_post
    residual_stream: Optional[tuple[Array, ...]]
    attention_probs: Optional[tuple[Array, ...]]
    grid: tuple[int, int] = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class TextOutput:
    embeds: Array                   # [B, embed_dim] end-of-text token after ln_final and projection
    tokens: Array                   # [B, context, embed_dim] every token after ln_final and projection
    tokens_normed: Array            # [B, context, width] every token after ln_final
    eot_index: Array                # [B] position of the end-of-text token
    residual_stream: Optional[tuple[Array, ...]]
    attention_probs: Optional[tuple[Array, ...]]


class MultiHeadAttention(nn.Module):
    """Self-attention with separate q/k/v/out projections and an explicit probability tensor."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, causal: bool, probs_offset: Optional[Array]) -> tuple[Array, Array]:
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        dense = lambda name: nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        split = lambda y: y.reshape(batch, length, self.num_heads, head_dim)
        q, k, v = (split(dense(name)(x)) for name in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim**-0.5
        if causal:
            future = jnp.triu(jnp.ones((length, length), bool), k=1)
            logits = jnp.where(future, -jnp.inf, logits)
        probs = jax.nn.softmax(logits, axis=-1)
        if probs_offset is not None:
            # Adding zeros changes nothing; the gradient w.r.t. the offset is the gradient w.r.t.
            # the probabilities, which attention-gradient explanations (HilaCAM, Grad-ECLIP) need.
            probs = probs + probs_offset
        mixed = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        return dense("out")(mixed.reshape(batch, length, width)), probs


class ResidualBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    num_heads: int
    mlp_dim: int
    activation: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, causal: bool, probs_offset: Optional[Array]) -> tuple[Array, Array]:
        attended, probs = MultiHeadAttention(self.num_heads, self.dtype, name="attn")(
            LayerNorm(self.layer_norm_eps, name="ln_1")(x), causal, probs_offset)
        x = x + attended
        h = LayerNorm(self.layer_norm_eps, name="ln_2")(x)
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(h)
        h = ACTIVATION_FNS[self.activation](h)
        h = nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=jnp.float32, name="proj")(h)
        return x + h, probs


class Transformer(nn.Module):
    num_layers: int
    num_heads: int
    mlp_dim: int
    activation: str
    layer_norm_eps: float
    causal: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, intermediates: bool,
                 probs_offsets: Optional[Sequence[Array]]) -> TransformerOutput:
        if probs_offsets is not None and len(probs_offsets) != self.num_layers:
            raise ValueError(f"probs_offsets has {len(probs_offsets)} entries for {self.num_layers} blocks")
        stream, probs_per_block = [x], []
        for i in range(self.num_layers):
            x, probs = ResidualBlock(self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                                     self.dtype, name=f"block_{i}")(
                x, self.causal, None if probs_offsets is None else probs_offsets[i])
            stream.append(x)
            probs_per_block.append(probs)
        if not intermediates:
            return TransformerOutput(x, None, None)
        return TransformerOutput(x, tuple(stream), tuple(probs_per_block))


class VisionTransformer(nn.Module):
    config: CLIPConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: Array, intermediates: bool = False,
                 probs_offsets: Optional[Sequence[Array]] = None) -> ImageOutput:
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [batch, height, width, 3] (NHWC), got shape {images.shape}")
        height, width = images.shape[1:3]
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {cfg.patch_size}")
        x = nn.Conv(cfg.vision_width, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2, padding="VALID",
                    use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="patch_embed")(
            images.astype(self.dtype))
        batch, grid_h, grid_w, _ = x.shape
        x = x.reshape(batch, grid_h * grid_w, cfg.vision_width).astype(jnp.float32)
        init = nn.initializers.normal(cfg.vision_width**-0.5)
        class_embedding = self.param("class_embedding", init, (cfg.vision_width,))
        positional = self.param("positional_embedding", init, (1 + cfg.grid_size**2, cfg.vision_width))
        positional = resize_positional_embedding(positional, (cfg.grid_size,) * 2, (grid_h, grid_w))
        x = jnp.concatenate([jnp.broadcast_to(class_embedding, (batch, 1, cfg.vision_width)), x], axis=1)
        x = LayerNorm(cfg.layer_norm_eps, name="ln_pre")(x + positional)
        out = Transformer(cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp_dim, cfg.activation,
                          cfg.layer_norm_eps, causal=False, dtype=self.dtype, name="transformer")(
            x, intermediates, probs_offsets)
        tokens_normed = LayerNorm(cfg.layer_norm_eps, name="ln_post")(out.tokens)
        proj = self.param("proj", init, (cfg.vision_width, cfg.embed_dim))
        tokens = jnp.einsum("bnw,we->bne", tokens_normed.astype(self.dtype), proj.astype(self.dtype))
        tokens = tokens.astype(jnp.float32)
        return ImageOutput(tokens[:, 0], tokens, tokens_normed, out.residual_stream, out.attention_probs,
                           (grid_h, grid_w))


class TextTransformer(nn.Module):
    config: CLIPConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, token_ids: Array, intermediates: bool = False,
                 probs_offsets: Optional[Sequence[Array]] = None) -> TextOutput:
        cfg = self.config
        if token_ids.ndim != 2 or token_ids.shape[1] > cfg.context_length:
            raise ValueError(f"token_ids must be [batch, <= {cfg.context_length}], got shape {token_ids.shape}")
        length = token_ids.shape[1]
        embedding = self.param("token_embedding", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.text_width))
        positional = self.param("positional_embedding", nn.initializers.normal(0.01),
                                (cfg.context_length, cfg.text_width))
        x = jnp.take(embedding, token_ids, axis=0) + positional[:length]
        out = Transformer(cfg.text_layers, cfg.text_heads, cfg.text_mlp_dim, cfg.activation,
                          cfg.layer_norm_eps, causal=True, dtype=self.dtype, name="transformer")(
            x, intermediates, probs_offsets)
        tokens_normed = LayerNorm(cfg.layer_norm_eps, name="ln_final")(out.tokens)
        proj = self.param("projection", nn.initializers.normal(cfg.text_width**-0.5),
                          (cfg.text_width, cfg.embed_dim))
        tokens = jnp.einsum("bnw,we->bne", tokens_normed.astype(self.dtype), proj.astype(self.dtype))
        tokens = tokens.astype(jnp.float32)
        eot_index = jnp.argmax(token_ids, axis=-1)
        embeds = jnp.take_along_axis(tokens, eot_index[:, None, None], axis=1)[:, 0]
        return TextOutput(embeds, tokens, tokens_normed, eot_index, out.residual_stream, out.attention_probs)


class CLIP(nn.Module):
    """Both towers and the learned temperature. Use through `apply`, e.g.
    `model.apply({"params": params}, images, method="encode_image")`."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.visual = VisionTransformer(self.config, self.dtype)
        self.text = TextTransformer(self.config, self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), ())

    def encode_image(self, images: Array, intermediates: bool = False,
                     probs_offsets: Optional[Sequence[Array]] = None) -> ImageOutput:
        return self.visual(images, intermediates, probs_offsets)

    def encode_text(self, token_ids: Array, intermediates: bool = False,
                    probs_offsets: Optional[Sequence[Array]] = None) -> TextOutput:
        return self.text(token_ids, intermediates, probs_offsets)

    def __call__(self, images: Array, token_ids: Array) -> tuple[Array, Array, Array]:
        """Returns (logits_per_image [n_images, n_texts], image embeds, text embeds), embeds normalised."""
        image_embeds = l2_normalize(self.encode_image(images).embeds)
        text_embeds = l2_normalize(self.encode_text(token_ids).embeds)
        return jnp.exp(self.logit_scale) * image_embeds @ text_embeds.T, image_embeds, text_embeds


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps), as torch's F.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def init_params(config: CLIPConfig, seed: int = 0) -> dict:
    """Randomly initialised float32 parameters (the shapes every checkpoint is checked against)."""
    model = CLIP(config)
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, config.context_length), jnp.int32)
    return model.init(jax.random.PRNGKey(seed), images, tokens)["params"]


def param_shapes(config: CLIPConfig) -> dict:
    """`jax.eval_shape` of `init_params`: the shape tree without allocating anything."""
    return jax.eval_shape(lambda: init_params(config))
