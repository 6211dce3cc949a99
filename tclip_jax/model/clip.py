"""CLIP ViT in Flax linen, as a pure function of (params, inputs) that also returns its intermediates.

Parameters are always float32; `dtype` is the dtype of matmul inputs (e.g. bfloat16 on TPU), while
layer norms and softmaxes run in float32. Nothing is cached or mutated: `model.apply` composes with
`jax.jit`, `jax.vmap` (e.g. over translated copies of an image) and `jax.grad`.

Every piece is a submodule defined in `setup`, so explanation methods that re-run part of the network
differently (CLIP Surgery's v-v attention, MaskCLIP's value path, Grad-ECLIP's single-head last block, an
information bottleneck between blocks) call the model's own pieces on a bound model instead of a copy:
`vision = model.bind({"params": params}).visual`, then `vision.blocks[i].attn.value(vision.blocks[i].ln_1(x))`,
`vision.transformer(x, start=i).tokens` (the blocks from block i on), `vision.project(x)`. `attend` is the one
attention kernel they share.

Images are NHWC and already normalized (see `tclip_jax.image`). Token ids follow OpenAI's
`clip.tokenize` (SOT ... EOT, zero padding); the text embedding is read where `eot_positions` says: at the
first maximal id (OpenAI's and OpenCLIP's argmax: the end-of-text token for that convention and for Hugging Face's
EOT padding alike), or, when the config names `eot_token_id` (a Hugging Face config with a current eos_token_id and
tokens added after end-of-text), at that token's first occurrence, as transformers reads it.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tclip_jax.model.config import CLIPConfig
from tclip_jax.model.posemb import resize_positional_embedding

Array = jax.Array
Dtype = Any


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATION_FNS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def LayerNorm(epsilon: float) -> nn.LayerNorm:
    """LayerNorm whose statistics and output are float32 whatever the activation dtype."""
    return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32)


def Dense(features: int, dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32)


def attend(q: Array, k: Array, v: Array, num_heads: int, causal: bool = False,
           probs_offset: Optional[Array] = None, dtype: Dtype = jnp.float32) -> tuple[Array, Array]:
    """Scaled dot-product attention of [..., n, width] projections split into `num_heads` heads.

    Returns the heads' outputs before the output projection, concatenated [..., n, width], and the
    probabilities [..., heads, n_query, n_key] (float32). `probs_offset` is added to the probabilities:
    zeros change nothing, and the gradient w.r.t. it is the gradient w.r.t. the attention, which
    attention-gradient explanations (HilaCAM) need.
    """
    split = lambda y: y.reshape(*y.shape[:-1], num_heads, y.shape[-1] // num_heads)
    q, k, v = split(q), split(k), split(v)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    if causal:
        length = logits.shape[-1]
        logits = jnp.where(jnp.triu(jnp.ones((length, length), bool), k=1), -jnp.inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    if probs_offset is not None:
        probs = probs + probs_offset
    mixed = jnp.einsum("...hqk,...khd->...qhd", probs.astype(dtype), v)
    return mixed.reshape(*mixed.shape[:-2], mixed.shape[-2] * mixed.shape[-1]), probs  # also for an empty batch


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
    # L + 1 x [B, 1 + gh*gw, width] (with `intermediates`): the stream entering the first block (patch, class and
    # position embeddings after ln_pre), then after each block; transformers' vision hidden_states
    residual_stream: Optional[tuple[Array, ...]]
    attention_probs: Optional[tuple[Array, ...]]
    grid: tuple[int, int] = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class TextOutput:
    embeds: Array                   # [B, embed_dim] end-of-text token after ln_final and projection
    tokens: Array                   # [B, length, embed_dim] every token after ln_final and projection
    tokens_normed: Array            # [B, length, width] every token after ln_final (length: the token ids', <= context)
    eot_index: Array                # [B] position of the end-of-text token
    # L + 1 x [B, length, width] (with `intermediates`): the stream entering the first block (token plus position
    # embeddings), then after each block; transformers' text hidden_states
    residual_stream: Optional[tuple[Array, ...]]
    attention_probs: Optional[tuple[Array, ...]]


class Attention(nn.Module):
    """Self-attention with separate q/k/v/out projections and an explicit probability tensor."""

    width: int
    num_heads: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.query, self.key, self.value, self.out = (Dense(self.width, self.dtype) for _ in range(4))

    def __call__(self, x: Array, causal: bool = False, probs_offset: Optional[Array] = None,
                 num_heads: Optional[int] = None, mixed_offset: Optional[Array] = None) -> tuple[Array, Array]:
        """(output [..., n, width], probs). `num_heads` overrides the head count (Grad-ECLIP re-runs the last
        block with one head); `mixed_offset` is added to the heads' outputs before the output projection
        (zeros change nothing; its gradient is the gradient w.r.t. that attention output)."""
        mixed, probs = attend(self.query(x), self.key(x), self.value(x), num_heads or self.num_heads, causal,
                              probs_offset, self.dtype)
        if mixed_offset is not None:
            mixed = mixed + mixed_offset
        return self.out(mixed), probs


class Block(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    width: int
    num_heads: int
    mlp_dim: int
    activation: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    def setup(self):
        self.ln_1 = LayerNorm(self.layer_norm_eps)
        self.attn = Attention(self.width, self.num_heads, self.dtype)
        self.ln_2 = LayerNorm(self.layer_norm_eps)
        self.fc = Dense(self.mlp_dim, self.dtype)
        self.proj = Dense(self.width, self.dtype)

    def mlp(self, x: Array) -> Array:
        """The MLP branch on the residual stream x, ln_2 included, without the residual."""
        return self.proj(ACTIVATION_FNS[self.activation](self.fc(self.ln_2(x))))

    def __call__(self, x: Array, causal: bool = False, probs_offset: Optional[Array] = None,
                 **attention_options) -> tuple[Array, Array]:
        attended, probs = self.attn(self.ln_1(x), causal, probs_offset, **attention_options)
        x = x + attended
        return x + self.mlp(x), probs


class Transformer(nn.Module):
    num_layers: int
    width: int
    num_heads: int
    mlp_dim: int
    activation: str
    layer_norm_eps: float
    causal: bool
    dtype: Dtype = jnp.float32

    def setup(self):
        for i in range(self.num_layers):  # named block_<i>, the parameter paths the conversion tables use
            setattr(self, f"block_{i}", Block(self.width, self.num_heads, self.mlp_dim, self.activation,
                                              self.layer_norm_eps, self.dtype))

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(getattr(self, f"block_{i}") for i in range(self.num_layers))

    def __call__(self, x: Array, intermediates: bool = False, probs_offsets: Optional[Sequence[Array]] = None,
                 start: int = 0) -> TransformerOutput:
        """Blocks `start`, ..., last on the stream x; `probs_offsets` has one entry per block run."""
        blocks = self.blocks[start:]
        if probs_offsets is not None and len(probs_offsets) != len(blocks):
            raise ValueError(f"probs_offsets has {len(probs_offsets)} entries for {len(blocks)} blocks")
        stream, probs_per_block = [x], []
        for i, block in enumerate(blocks):
            x, probs = block(x, self.causal, None if probs_offsets is None else probs_offsets[i])
            stream.append(x)
            probs_per_block.append(probs)
        if not intermediates:
            return TransformerOutput(x, None, None)
        return TransformerOutput(x, tuple(stream), tuple(probs_per_block))


class VisionTransformer(nn.Module):
    config: CLIPConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        # Symmetric padding 1 halves even sides exactly, as PyTorch's Conv2d(3, stride=2, padding=1) would. He
        # initialisation: the stem has no normalization, and with LeCun kernels each activation shrinks the signal
        # until the position embedding dominates the patch tokens (training/image_tower_probe.py position).
        self.stem = [nn.Conv(channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=nn.initializers.he_normal())
                     for channels in cfg.stem_channels]
        patch = (cfg.patch_size // 2 ** len(cfg.stem_channels),) * 2
        self.patch_embed = nn.Conv(cfg.vision_width, patch, strides=patch, padding="VALID", use_bias=False,
                                   dtype=self.dtype, param_dtype=jnp.float32)
        init = nn.initializers.normal(cfg.vision_width**-0.5, jnp.float32)  # float32 under x64 too
        self.class_embedding = self.param("class_embedding", init, (cfg.vision_width,))
        self.positional_embedding = self.param("positional_embedding", init,
                                               (1 + cfg.grid_size**2, cfg.vision_width))
        self.ln_pre = LayerNorm(cfg.layer_norm_eps)
        self.transformer = Transformer(cfg.vision_layers, cfg.vision_width, cfg.vision_heads, cfg.vision_mlp_dim,
                                       cfg.activation, cfg.layer_norm_eps, causal=False, dtype=self.dtype)
        self.ln_post = LayerNorm(cfg.layer_norm_eps)
        self.proj = self.param("proj", init, (cfg.vision_width, cfg.embed_dim))

    @property
    def blocks(self) -> tuple[Block, ...]:
        return self.transformer.blocks

    def embed(self, images: Array) -> tuple[Array, tuple[int, int]]:
        """The stream entering the first block [B, 1 + gh*gw, width] (class token first) and the grid (gh, gw)."""
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [batch, height, width, 3] (NHWC), got shape {images.shape}")
        check_floating_pixels(images)
        height, width = images.shape[1:3]
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {cfg.patch_size}")
        x = images.astype(self.dtype)
        for conv in self.stem:
            x = ACTIVATION_FNS[cfg.activation](conv(x))
        x = self.patch_embed(x)
        batch, grid_h, grid_w, _ = x.shape
        x = x.reshape(batch, grid_h * grid_w, cfg.vision_width).astype(jnp.float32)
        positional = resize_positional_embedding(self.positional_embedding, (cfg.grid_size,) * 2, (grid_h, grid_w))
        x = jnp.concatenate([jnp.broadcast_to(self.class_embedding, (batch, 1, cfg.vision_width)), x], axis=1)
        return self.ln_pre(x + positional), (grid_h, grid_w)

    def normalize_and_project(self, stream: Array) -> tuple[Array, Array]:
        """Residual-stream tokens into the joint space: (ln_post(x), ln_post(x) @ proj), the latter float32."""
        normed = self.ln_post(stream)
        tokens = jnp.einsum("...nw,we->...ne", normed.astype(self.dtype), self.proj.astype(self.dtype))
        return normed, tokens.astype(jnp.float32)

    def project(self, stream: Array) -> Array:
        return self.normalize_and_project(stream)[1]

    def __call__(self, images: Array, intermediates: bool = False,
                 probs_offsets: Optional[Sequence[Array]] = None) -> ImageOutput:
        x, grid = self.embed(images)
        out = self.transformer(x, intermediates, probs_offsets)
        tokens_normed, tokens = self.normalize_and_project(out.tokens)
        return ImageOutput(tokens[:, 0], tokens, tokens_normed, out.residual_stream, out.attention_probs, grid)


class TextTransformer(nn.Module):
    config: CLIPConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.token_embedding = self.param("token_embedding", nn.initializers.normal(0.02, jnp.float32),
                                          (cfg.vocab_size, cfg.text_width))
        self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(0.01, jnp.float32),
                                               (cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_layers, cfg.text_width, cfg.text_heads, cfg.text_mlp_dim,
                                       cfg.activation, cfg.layer_norm_eps, causal=True, dtype=self.dtype)
        self.ln_final = LayerNorm(cfg.layer_norm_eps)
        self.projection = self.param("projection", nn.initializers.normal(cfg.text_width**-0.5, jnp.float32),
                                     (cfg.text_width, cfg.embed_dim))

    @property
    def blocks(self) -> tuple[Block, ...]:
        return self.transformer.blocks

    def embed(self, token_ids: Array) -> Array:
        """The stream entering the first block [B, length, width]."""
        cfg = self.config
        if token_ids.ndim != 2 or token_ids.shape[1] > cfg.context_length:
            raise ValueError(f"token_ids must be [batch, <= {cfg.context_length}], got shape {token_ids.shape}")
        return jnp.take(self.token_embedding, token_ids, axis=0) + self.positional_embedding[:token_ids.shape[1]]

    def normalize_and_project(self, stream: Array) -> tuple[Array, Array]:
        """(ln_final(x), ln_final(x) @ projection), the latter float32."""
        normed = self.ln_final(stream)
        tokens = jnp.einsum("...nw,we->...ne", normed.astype(self.dtype), self.projection.astype(self.dtype))
        return normed, tokens.astype(jnp.float32)

    def output(self, token_ids: Array, out: TransformerOutput) -> TextOutput:
        """The text embedding and tokens of the last block's stream `out` (the embedding at the EOT position)."""
        tokens_normed, tokens = self.normalize_and_project(out.tokens)
        eot_index = eot_positions(token_ids, self.config.eot_token_id)
        embeds = jnp.take_along_axis(tokens, eot_index[:, None, None], axis=1)[:, 0]
        return TextOutput(embeds, tokens, tokens_normed, eot_index, out.residual_stream, out.attention_probs)

    def __call__(self, token_ids: Array, intermediates: bool = False,
                 probs_offsets: Optional[Sequence[Array]] = None) -> TextOutput:
        return self.output(token_ids, self.transformer(self.embed(token_ids), intermediates, probs_offsets))


class CLIP(nn.Module):
    """Both towers and the learned temperature. Use through `apply`, e.g.
    `model.apply({"params": params}, images, method="encode_image")`, or `model.bind({"params": params})`
    to reach the towers' pieces (`.visual`, `.text`)."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.visual = VisionTransformer(self.config, self.dtype)
        self.text = TextTransformer(self.config, self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07), jnp.float32), ())

    def encode_image(self, images: Array, intermediates: bool = False,
                     probs_offsets: Optional[Sequence[Array]] = None) -> ImageOutput:
        """images [B, h, w, 3] (NHWC, normalized); `intermediates`: also the residual stream and attention."""
        return self.visual(images, intermediates, probs_offsets)

    def encode_text(self, token_ids: Array, intermediates: bool = False,
                    probs_offsets: Optional[Sequence[Array]] = None) -> TextOutput:
        return self.text(token_ids, intermediates, probs_offsets)

    def __call__(self, images: Array, token_ids: Array) -> tuple[Array, Array, Array]:
        """Returns (logits_per_image [n_images, n_texts], image embeds, text embeds), embeds normalized."""
        image_embeds = l2_normalize(self.encode_image(images).embeds)
        text_embeds = l2_normalize(self.encode_text(token_ids).embeds)
        return jnp.exp(self.logit_scale) * image_embeds @ text_embeds.T, image_embeds, text_embeds


def check_floating_pixels(images: Array) -> None:
    """Raises ValueError unless `images` are floating-point (CLIP-normalized) pixels: raw 0..255 integers would run
    without a word. The image tower checks its input, and so does every method's device entry
    (`Method.maps_per_image`), before a gradient w.r.t. the pixels (which JAX refuses for integers) is taken."""
    if not jnp.issubdtype(images.dtype, jnp.floating):
        dtype = jnp.dtype(images.dtype).name
        raise ValueError(f"images must be CLIP-normalized floating-point pixels, got {dtype}: make them from "
                         "uint8 RGB with a method's prepare or tclip_jax.image.prepare (tclip_jax.image."
                         "clip_normalize for pixels already at the model's input size)")


def eot_positions(token_ids: Array, eot_token_id: Optional[int]) -> Array:
    """[B] where each row's text embedding is read (`CLIPConfig.eot_token_id`): its highest token id (None), or
    the first occurrence of `eot_token_id`. In numpy for numpy ids (the host's length grouping: a jnp call there
    compiled two programs per new row count)."""
    xp = np if isinstance(token_ids, np.ndarray) else jnp
    return xp.argmax(token_ids if eot_token_id is None else token_ids == eot_token_id, axis=-1)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps), as torch's F.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def init_params(config: CLIPConfig, seed: int = 0) -> dict:
    """Randomly initialized float32 parameters (the shapes every checkpoint is checked against). `lazy_init` skips
    the forward pass that `init` would run on dummy inputs; the initializers still run one op at a time, so the values
    are bit for bit `init`'s (a jitted `init` fuses them and differs in the last bits)."""
    model = CLIP(config)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
    return model.lazy_init(jax.random.PRNGKey(seed), images, tokens)["params"]


def param_shapes(config: CLIPConfig) -> dict:
    """`jax.eval_shape` of `init_params`: the shape tree without allocating anything."""
    return jax.eval_shape(lambda: init_params(config))
