"""M2IB (Wang, Rudner, Wilson, NeurIPS 2023): a multi-modal information bottleneck on CLIP's residual stream.

YingWANGG/M2IB (`scripts/methods.py` `vision_heatmap_iba` / `text_heatmap_iba`, `scripts/iba.py`
`InformationBottleneck`, `IBAInterpreter`), as `demo.ipynb` and `scripts/eval.py` run it on a transformers
`CLIPModel`, one (image, text) pair at a time:

1. The bottleneck replaces the output x [n, D] of vision block `vlayer` (all tokens, class token included):
   lambda = sigmoid(alpha) (alpha in R^{n x D}, initialized to 5), t = x * lambda + (1 - lambda) * eps,
   eps ~ N(0, 1) per element and per copy; capacity = KL(N(x * lambda, (1 - lambda)^2) || N(0, 1)) elementwise.
2. The pair is repeated `batch_size` (10) times; per step the bottlenecked image features and the (unmodified) text
   features give loss = beta * mean(capacity) - mean(cos(text, image)) (cosine eps 1e-6); Adam (lr 1, torch's
   defaults) on alpha only, `steps` (10) steps, everything on the device under jit (`lax.scan` over the steps,
   `vmap` over images and texts).
3. saliency = sum over channels of the capacity, the class token dropped, on the patch grid; upsampled to the
   input size (bilinear, align_corners=False) and min-max normalized: the vision map (224 x 224, the
   centre-crop frame of `CLIPImageProcessor`).
The text map is the same with the bottleneck after text block `tlayer` (tokens SOT ... EOT) and the image
unmodified; its saliency keeps every token and is min-max normalized twice.

Quirks of the official code, reproduced by default, each with the sound alternative as an option:
- The compression estimator is a placeholder: mean 0 and std sqrt(var) are stored but never used, so the
  features are not standardized, the KL is taken against N(0, 1) on the raw residual stream and `var` has no
  effect (`estimator="none"`). `estimator="placeholder"` applies the stored estimator as IBA does
  (z = (x - mean) / std, bottleneck on z, output t * std + mean, so `var` becomes the prior's variance);
  `estimator="tokens"` estimates each channel's mean and std over the tokens of the input (IBA's stabilized
  estimator with the tokens as samples).
- The map comes from the capacity of the last forward, i.e. alpha after steps - 1 updates; the last update is
  applied but unused (`final_alpha=False`). `final_alpha=True` takes the capacity of the final alpha.

Layers: `vlayer` / `tlayer` index blocks Python-style. The official default 9 of ViT-B/32's 12 blocks (two
blocks follow the bottleneck) is -3, which is block 3 of the tiny 6-block vision tower and block 0 of its
3-block text tower, as the reference fixture ran it. Left unset (None), a layer is -3; a tower of fewer than
three blocks (the official code assumes ViT-B/32) gets the bottleneck on its input, the embeddings after
`ln_pre` (text: token plus position embeddings), so that every block follows it. At least one block must follow
the bottleneck: after the last block only the class token (text: the end-of-text token) reaches the features, so
no other token's alpha gets a gradient from the cosine and the map would not depend on the prompt; a layer given
explicitly must exist and must not be the last.

Noise: a JAX random stream cannot reproduce torch's, so the noise is injectable (`vision_noise`,
`text_noise`: [steps, batch_size, n, D], shared by every pair, as the official code re-seeds before each
call); without it, it is drawn from `jax.random.PRNGKey(seed)`, the same draws for every pair, so the maps are
deterministic and a map does not depend on the other pairs of a call.

Cost per map (defaults): steps x batch_size = 100 forward and 100 backward passes through the blocks after the
bottleneck (the copies form one batch of 10 per step), plus 1 forward pass of each tower to the bottleneck.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tclip_jax.methods import common
from tclip_jax.methods.base import (UPSAMPLE_THEN_NORMALIZE, MethodSettings, PromptMethod, QueryArrays,
                                    postprocess_maps)
from tclip_jax.model import CLIP, l2_normalize
from tclip_jax.settings import finite_float32, integer, parse_optional, setting

Array = jax.Array
Estimator = Literal["none", "placeholder", "tokens"]
ESTIMATORS = ("none", "placeholder", "tokens")
DEFAULT_LAYER = -3       # the official vlayer = tlayer = 9 of 12: two blocks after the bottleneck
ALPHA_INIT = 5.0         # `InformationBottleneck.initial_value`
COSINE_EPS = 1e-6        # `torch.nn.CosineSimilarity(eps=1e-6)`
ESTIMATOR_EPS = 1e-5     # `Estimator.eps` (IBA's stabilized std)


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The optimization's static options."""

    beta: float = 0.1
    var: float = 1.0
    lr: float = 1.0
    steps: int = 10
    batch_size: int = 10
    estimator: str = "none"
    final_alpha: bool = False
    trace: bool = False

    def check(self) -> None:
        finite_float32("beta", self.beta)  # all three run in float32
        finite_float32("var", self.var)
        finite_float32("lr", self.lr)
        if self.beta < 0:  # a negative weight rewards capacity: the map stops depending on the prompt
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.var <= 0:
            raise ValueError(f"var must be > 0, got {self.var}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        integer("steps", self.steps, 1)
        integer("batch_size", self.batch_size, 1)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if not isinstance(self.final_alpha, bool):
            raise ValueError(f"final_alpha must be true or false, got {self.final_alpha!r}")


@flax.struct.dataclass
class BottleneckRun:
    """One side's optimization per (image, text) pair: arrays [n_images, n_texts, ...] (layer features: the
    side's own leading axis only, as they do not depend on the other modality)."""

    layer_features: Array       # vision [n_images, n, D] / text [n_texts, context, D]: the bottleneck input
    saliency: Array             # [n_images, n_texts, n] nansum over channels of the map's capacity
    capacity: Array             # [n_images, n_texts, n, D] of the alpha the map uses
    alpha_last: Array           # [n_images, n_texts, n, D] alpha of the last forward (after steps - 1 updates)
    alpha_final: Array          # [n_images, n_texts, n, D] alpha after the last update
    losses: Array               # [n_images, n_texts, steps, 3] per step (compression, fitting, total)
    alpha_used: Optional[Array]  # [n_images, n_texts, steps, n, D] alpha of each step's forward (trace=True)


@flax.struct.dataclass
class M2IBOutput:
    maps: Array                  # [n_images, n_texts, gh, gw] vision saliency on the patch grid (not normalized)
    vision_map: Array            # [n_images, n_texts, h, w] upsampled to the input size, min-max normalized
    vision: BottleneckRun
    text: Optional[BottleneckRun]  # None unless text_side
    text_map: Optional[Array]    # [n_images, n_texts, context] normalized over SOT..EOT, 0 after EOT
    text_lengths: Optional[Array]  # [n_texts] tokens SOT..EOT
    image_features: Array        # [n_images, embed_dim] unnormalized
    text_features: Array         # [n_texts, embed_dim] (normalized when texts were given as features)
    cosine: Array                # [n_images, n_texts] clean cosines


def bottleneck_position(layer: Optional[int], num_layers: int, name: str) -> int:
    """Where the bottleneck goes, as the number of blocks before it (an index into the residual stream, whose
    entry 0 is the tower's input): `layer` + 1 for a Python-style block index (negative counts from the top);
    None: after block `DEFAULT_LAYER`, or the input of a tower too short for it. At least one block must follow."""
    if layer is None:
        return max(num_layers + DEFAULT_LAYER + 1, 0)
    integer(name, layer)
    common.check_block_index(name, layer, num_layers, "text" if name == "tlayer" else "image")
    if layer % num_layers == num_layers - 1:
        raise ValueError(f"{name}={layer} is the last block of this {num_layers}-block tower: with no block after "
                         "the bottleneck its map would not depend on the prompt; name a lower block or leave it "
                         "unset")
    return layer % num_layers + 1


def capacity(mu: Array, var: Array) -> Array:
    """`_calc_capacity`: KL(N(mu, var) || N(0, 1)) elementwise."""
    return -0.5 * (1 + jnp.log(var) - mu**2 - var)


def cosine_similarity(x: Array, y: Array) -> Array:
    """`torch.nn.CosineSimilarity(eps=1e-6)` over the last axis."""
    norm = lambda v: jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), COSINE_EPS)  # noqa: E731
    return jnp.sum(x / norm(x) * (y / norm(y)), axis=-1)


def _statistics(features: Array, valid: Array, hyper: Hyper) -> tuple[Array, Array]:
    """(mean, std) that the bottleneck standardizes with ((0, 1): no standardization, the official code)."""
    if hyper.estimator == "none":
        return jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)  # float32 also under JAX's x64 mode
    if hyper.estimator == "placeholder":
        return jnp.zeros(()), jnp.sqrt(jnp.asarray(hyper.var, jnp.float32))
    weight = valid[:, None].astype(features.dtype)
    count = weight.sum()
    mean = (features * weight).sum(axis=0) / count
    squares = (((features - mean) * weight) ** 2).sum(axis=0)
    return mean, jnp.sqrt(jnp.maximum(squares, ESTIMATOR_EPS) / count)


class TorchAdamState(NamedTuple):
    count: Array   # updates done
    mu: Array
    nu: Array


def torch_adam(learning_rate: float, steps: int, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam as `torch.optim.Adam` computes it (single-tensor path, torch's defaults), as an optax transformation.

    `optax.adam` is the same algorithm, but it computes the bias corrections 1 - b^t in float32, where
    1 - float32(0.999) is 1.3e-5 off 1e-3; torch computes them in float64 on the host. With lr 1 that moves
    every element of alpha by ~7e-6 per step, so here the corrections of steps 1..`steps` are float64 tables.
    """
    t = np.arange(1, steps + 1, dtype=np.float64)
    step_size = jnp.asarray(learning_rate / (1 - b1**t), jnp.float32)
    correction2_sqrt = jnp.asarray(np.sqrt(1 - b2**t), jnp.float32)

    def init(params: Array) -> TorchAdamState:
        return TorchAdamState(jnp.zeros((), jnp.int32), jnp.zeros_like(params), jnp.zeros_like(params))

    def update(grad: Array, state: TorchAdamState, params=None) -> tuple[Array, TorchAdamState]:
        del params
        index = jnp.minimum(state.count, steps - 1)
        mu = state.mu + np.float32(1 - b1) * (grad - state.mu)        # exp_avg.lerp_(grad, 1 - beta1)
        nu = state.nu * np.float32(b2) + np.float32(1 - b2) * grad * grad
        denom = jnp.sqrt(nu) / correction2_sqrt[index] + np.float32(eps)
        return -step_size[index] * (mu / denom), TorchAdamState(state.count + 1, mu, nu)

    return optax.GradientTransformation(init, update)


def optimize_bottleneck(features: Array, valid: Array, forward, target: Array, noise: Array,
                        hyper: Hyper) -> dict:
    """The official optimization for one pair.

    features [n, D]: the bottleneck input; valid [n]: the tokens that exist (text: SOT..EOT; the compression
    term averages over those); forward: bottleneck output [batch, n, D] -> features [batch, E] of the
    bottlenecked modality; target [E]: the other modality's features; noise [steps, batch, n, D].
    """
    mean, std = _statistics(features, valid, hyper)
    z = (features - mean) / std
    denominator = valid.sum() * features.shape[-1]

    def bottleneck(alpha: Array) -> tuple[Array, Array, Array]:
        lam = jax.nn.sigmoid(alpha)
        mu, var = z * lam, (1 - lam) ** 2
        return mu, var, capacity(mu, var)

    def loss(alpha: Array, eps: Array):
        mu, var, cap = bottleneck(alpha)
        t = (mu + jnp.sqrt(var) * eps) * std + mean
        compression = jnp.sum(jnp.where(valid[:, None], cap, 0)) / denominator
        fitting = cosine_similarity(target, forward(t)).mean()
        total = hyper.beta * compression - fitting
        return total, (jnp.stack([compression, fitting, total]), cap)

    optimizer = torch_adam(hyper.lr, hyper.steps)

    def step(carry, eps):
        alpha, state, _ = carry
        (_, (losses, cap)), grad = jax.value_and_grad(loss, has_aux=True)(alpha, eps)
        updates, state = optimizer.update(grad, state, alpha)
        return (optax.apply_updates(alpha, updates), state, (alpha, cap)), (losses, alpha if hyper.trace else None)

    alpha = jnp.full(features.shape, ALPHA_INIT, jnp.float32)
    cap_type = jax.eval_shape(lambda a: bottleneck(a)[2], alpha)  # float64 from float64 features (x64 mode)
    init = (alpha, optimizer.init(alpha), (alpha, jnp.zeros(cap_type.shape, cap_type.dtype)))
    (alpha_final, _, (alpha_last, cap_last)), (losses, alpha_used) = jax.lax.scan(step, init, noise)
    cap = bottleneck(alpha_final)[2] if hyper.final_alpha else cap_last
    cap = jnp.where(valid[:, None], cap, 0)
    return {"saliency": jnp.nansum(cap, axis=-1), "capacity": cap, "alpha_last": alpha_last,
            "alpha_final": alpha_final, "losses": losses, "alpha_used": alpha_used}


def m2ib_map(model: CLIP, params: dict, images: Array, texts: Array, *, vlayer: Optional[int] = None,
             tlayer: Optional[int] = None, beta: float = 0.1, var: float = 1.0, lr: float = 1.0, steps: int = 10,
             batch_size: int = 10, estimator: Estimator = "none", final_alpha: bool = False,
             text_side: bool = True, seed: int = 0, vision_noise: Optional[Array] = None,
             text_noise: Optional[Array] = None, trace: bool = False) -> M2IBOutput:
    """M2IB vision maps (and text maps with `text_side`) of each text on each image (see the module docstring).

    images: [B, h, w, 3] normalized (centre crop, as `CLIPImageProcessor`).
    texts: token ids [T, context] (OpenAI's `clip.tokenize`: SOT ... EOT, zero padding); without `text_side`
      also text features [T, embed_dim] or per-image features [B, T, embed_dim].
    vlayer / tlayer: the block whose output gets the bottleneck (negative counts from the top; -3 = the official 9
      of 12; None: -3, or the input of a tower of fewer than three blocks; never the last block). beta, var, lr,
      steps, batch_size: as the official `vision_heatmap_iba` (0.1, 1, 1, 10, 10).
    estimator: "none" (official: no standardization, var unused), "placeholder" (mean 0, std sqrt(var)) or
      "tokens" (per-channel mean/std over the input's tokens). final_alpha: the map from the final alpha.
    seed / vision_noise / text_noise: the noise eps, drawn from `PRNGKey(seed)` (vision and text streams split
      from it) or given: [steps, batch_size, n, D] (text: n <= context tokens; zero-padded to the context),
      the same for every pair.
    trace: also return every step's alpha (`alpha_used`).
    """
    hyper = Hyper(beta, var, lr, steps, batch_size, estimator, final_alpha, trace)
    hyper.check()
    config = model.config
    vision_position = bottleneck_position(vlayer, config.vision_layers, "vlayer")
    text_position = bottleneck_position(tlayer, config.text_layers, "tlayer")
    texts = jnp.asarray(texts)
    if text_side and (jnp.issubdtype(texts.dtype, jnp.floating) or texts.ndim != 2):
        raise ValueError(f"the text-side map needs token ids [n_texts, context], got {texts.dtype} {texts.shape}")
    if not jnp.issubdtype(texts.dtype, jnp.floating) and texts.ndim != 2:
        raise ValueError(f"M2IB explains single prompts: token ids must be [n_texts, context], got {texts.shape}")
    grid = (images.shape[1] // config.patch_size, images.shape[2] // config.patch_size)
    shapes = {"vision": (steps, batch_size, 1 + grid[0] * grid[1], config.vision_width)}
    if text_side:
        shapes["text"] = (steps, batch_size, texts.shape[1], config.text_width)
    keys = dict(zip(("vision", "text"), jax.random.split(jax.random.PRNGKey(seed))))
    noise = {}
    for side, given in (("vision", vision_noise), ("text", text_noise)):
        if side not in shapes:
            continue
        if given is None:
            noise[side] = jax.random.normal(keys[side], shapes[side], jnp.float32)
            continue
        given = jnp.asarray(given, jnp.float32)
        want = shapes[side]
        if given.ndim != 4 or given.shape[:2] != want[:2] or given.shape[3] != want[3] or given.shape[2] > want[2] \
                or (side == "vision" and given.shape[2] != want[2]):
            raise ValueError(f"{side}_noise must be [steps, batch_size, n, D] = {list(want)} (text: n <= context), "
                             f"got {list(given.shape)}")
        noise[side] = jnp.pad(given, ((0, 0), (0, 0), (0, want[2] - given.shape[2]), (0, 0)))
    return _m2ib(model, params, images, texts, noise, vision_position, text_position, hyper)


@functools.partial(jax.jit, static_argnames=("model", "vision_position", "text_position", "hyper"))
def _m2ib(model: CLIP, params: dict, images: Array, texts: Array, noise: dict, vision_position: int,
          text_position: int, hyper: Hyper) -> M2IBOutput:
    bound = model.bind({"params": params})
    vision, text = bound.visual, bound.text
    image = common.encode_image(model, params, images)
    image_features = image.embeds
    vision_features = image.residual_stream[vision_position]                          # [B, n, D]
    token_ids = None
    if jnp.issubdtype(texts.dtype, jnp.floating):
        text_features = common.text_features(model, params, texts) if texts.ndim == 2 else l2_normalize(texts)
    else:
        token_ids = texts
        encoded = common.encode_text(model, params, token_ids)
        text_features = encoded.embeds
    per_image_texts = text_features.ndim == 3

    def vision_forward(t: Array) -> Array:
        return vision.project(vision.transformer(t, start=vision_position).tokens[:, 0])

    def vision_pair(features: Array, target: Array) -> dict:
        valid = jnp.ones(features.shape[0], bool)
        return optimize_bottleneck(features, valid, vision_forward, target, noise["vision"], hyper)

    per_text = jax.vmap(vision_pair, in_axes=(None, 0))
    vision_runs = jax.vmap(per_text, in_axes=(0, 0 if per_image_texts else None))(vision_features, text_features)
    vision_run = BottleneckRun(vision_features, **vision_runs)
    maps = common.patch_grid(vision_run.saliency, image.grid)
    vision_map = postprocess_maps(maps, images.shape[1:3], UPSAMPLE_THEN_NORMALIZE)

    text_run = text_map = lengths = None
    if "text" in noise:
        text_stream = encoded.residual_stream[text_position]                          # [T, context, D]
        eot = encoded.eot_index
        lengths = eot + 1
        positions = jnp.arange(token_ids.shape[1])

        def text_pair(features: Array, ids: Array, end: Array, target: Array) -> dict:
            copies = jnp.broadcast_to(ids, (hyper.batch_size, ids.shape[0]))

            def forward(t: Array) -> Array:
                return text.output(copies, text.transformer(t, start=text_position)).embeds

            return optimize_bottleneck(features, positions <= end, forward, target, noise["text"], hyper)

        per_image = jax.vmap(text_pair, in_axes=(None, None, None, 0))
        runs = jax.vmap(per_image, in_axes=(0, 0, 0, None))(text_stream, token_ids, eot, image_features)
        runs = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), runs)          # [B, T, ...]
        text_run = BottleneckRun(text_stream, **runs)
        valid = positions <= eot[:, None]                                               # [T, context]
        text_map = _masked_minmax(_masked_minmax(text_run.saliency, valid), valid)
    cosine = cosine_similarity(image_features[:, None], text_features if per_image_texts else text_features[None])
    return M2IBOutput(maps, vision_map, vision_run, text_run, text_map, lengths, image_features, text_features,
                      cosine)


def _masked_minmax(x: Array, valid: Array) -> Array:
    """The official `normalize` ((x - min) / (max - min)) over the valid entries of the last axis; 0 elsewhere."""
    low = jnp.min(jnp.where(valid, x, jnp.inf), axis=-1, keepdims=True)
    high = jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(valid, (x - low) / (high - low), 0)


@dataclasses.dataclass(frozen=True)
class M2IBSettings(MethodSettings):
    vlayer: Optional[int] = setting(None, "vision block whose output gets the bottleneck; negative counts from the "
                                    "top; not the last block (default: -3, the official 9 of ViT-B/32's 12 blocks, "
                                    "or the input of a tower of fewer than three)", parse=parse_optional(int),
                                    flag=False)
    beta: float = setting(0.1, "weight of the compression term (>= 0)", flag=False)
    var: float = setting(1.0, "variance of the placeholder estimator (no effect unless estimator=placeholder, as "
                         "in the official code)", flag=False)
    lr: float = setting(1.0, "Adam learning rate", flag=False)
    steps: int = setting(10, "optimization steps (>= 2 unless final_alpha: the map is read one update before the "
                         "last)", flag=False)
    batch_size: int = setting(10, "noisy copies per step", flag=False)
    estimator: str = setting("none", "feature standardization: none (official: raw features against N(0, 1)), "
                             "placeholder (mean 0, std sqrt(var)) or tokens (per-channel mean and std over the "
                             "image's tokens)", choices=ESTIMATORS, flag=False)
    final_alpha: bool = setting(False, "map from the alpha after the last update (false: the official map from the "
                                "last forward, one update earlier)", flag=False)
    seed: int = setting(0, "PRNG seed of the noise (the same draws for every image and prompt)", flag=False)

    def __post_init__(self):
        super().__post_init__()
        Hyper(self.beta, self.var, self.lr, self.steps, self.batch_size, self.estimator, self.final_alpha).check()
        # `m2ib_map` takes one step (its features and cosines do not need more); a method's map would not
        if self.steps == 1 and not self.final_alpha:
            raise ValueError("steps=1 reads the map from the initial alpha, before any update, so it would not depend "
                             "on the prompt: use steps >= 2, or final_alpha=true")


class M2IB(PromptMethod):
    """M2IB's vision map as `demo.ipynb` computes it: centre crop (`CLIPImageProcessor`), one prompt per text,
    the saliency upsampled to the input and min-max normalized; the map covers the crop, mapped back onto the
    original image by the geometry (the official map stays in the 224 x 224 crop frame)."""

    name = "m2ib"
    # per map 10 steps x 10 noisy copies through the blocks after the bottleneck, forward and backward
    image_encoder_passes = ("1 + 100 T (after layer 9)", "100 T (after layer 9)")
    Settings = M2IBSettings
    input_protocol = "center_crop"
    heatmap = UPSAMPLE_THEN_NORMALIZE
    query_chunk = 1  # each map is its own optimization

    def __init__(self, clip, settings=None):
        super().__init__(clip, settings)
        bottleneck_position(self.settings.vlayer, clip.config.vision_layers, "vlayer")

    def _grids(self, params, pixels: Array, texts: Array) -> Array:
        s = self.settings
        return m2ib_map(self.clip.model, params, pixels, texts, vlayer=s.vlayer, beta=s.beta, var=s.var, lr=s.lr,
                        steps=s.steps, batch_size=s.batch_size, estimator=s.estimator, final_alpha=s.final_alpha,
                        text_side=False, seed=s.seed).maps

    def grid_maps(self, params, pixels: Array, queries: QueryArrays) -> Array:
        return self._grids(params, pixels, queries.per_query)

