"""Trains the embedded default model: a small CLIP ViT/32 on synthetic scenes, from images and captions only.

Architecture: `tclip_jax.model.CLIP` (OpenAI CLIP's, unchanged) at patch 32 and 224 pixels (a 7x7 grid), the
CLIP BPE tokenizer with its 77-token context and 49408-token vocabulary, QuickGELU, 64-dim heads; only the
widths and depths are small (see `model_config`).

Objective, four terms with CLIP's learned temperature; no ground-truth mask or box is used:
- CLIP's symmetric InfoNCE on the (class token, end-of-text token) embeddings;
- FILIP's token-wise late interaction (Yao et al. 2022, text-to-image side): caption b scores image j by the
  mean, over b's piece tokens (SOT, EOT and padding excluded), of each token's best cosine with j's patch
  tokens, and the same symmetric InfoNCE runs on those scores. It puts final-layer text tokens and the patch
  tokens that show their word into the same place of the joint space, against other images;
- the same per piece (`token_retrieval_loss`): each piece must find its own image among the batch by its best
  cosine alone. In FILIP's mean a weak piece hides behind the others; without this term some shape words
  scored the background above their object (held-out pointing 0.91 -> 0.94);
- SPARC's fine-grained loss (Bica et al. 2024) within each pair (`fine_grained_loss`): every piece token must
  match its own sparse, similarity-weighted group of the image's patches rather than the groups of the
  caption's other pieces. It pushes a word away from the caption's other objects; without it those objects
  stay half as relevant as the word's own and Otsu boxes spill over them (held-out BoxAcc 0.55 -> 0.7).

Scenes are generated on the fly from `train_seeds` (batch i uses seeds [i * B, (i + 1) * B)), so a run is
determined by `TrainConfig`. Retrieval accuracy is monitored on validation scenes drawn from the held-out seed
range at VALIDATION_OFFSET, away from the evaluation scenes (held-out offset 0).

Run from the repository root (5 to 10 minutes on 2 CPU cores, then ~1 minute of held-out metrics):
    nice python training/train_default.py --out tclip_jax/data/default_model
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tclip_jax.checkpoints.folder import save_checkpoint
from tclip_jax.sweep.heldout import record_heldout_metrics
from tclip_jax.checkpoints.load import DEFAULT_MODEL_DIR
from tclip_jax.model import CLIP, CLIPConfig, init_params, l2_normalize
from tclip_jax.image import clip_normalize
from tclip_jax.synthetic import heldout_seeds, make_batch, train_seeds
from tclip_jax.model.tokenizer import PAD_ID, default_tokenizer

VALIDATION_OFFSET = 1_000_000  # validation scenes: heldout_seeds(n, VALIDATION_OFFSET)
LOG_FILE = "training_log.jsonl"
README_FILE = "README.md"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0                   # parameter initialization
    steps: int = 400
    batch_size: int = 64
    peak_learning_rate: float = 1e-3
    warmup_steps: int = 20          # linear warmup, then cosine decay to 0
    weight_decay: float = 0.1       # AdamW, on weight matrices only
    max_logit_scale: float = 4.6052  # log(100), CLIP's clamp
    dense_weight: float = 1.0       # weight of the token-wise late-interaction loss
    token_weight: float = 1.0       # weight of the per-piece image retrieval loss
    fine_grained_weight: float = 1.0  # weight of SPARC's within-caption token-group loss
    # Training text rows are cut to this many positions: captions need at most 20, and with causal attention
    # the padding after the end-of-text token never changes a token before it.
    text_length: int = 24
    validation_scenes: int = 256
    eval_every: int = 50
    # Model widths and depths (everything else is OpenAI CLIP's).
    embed_dim: int = 64
    vision_width: int = 128
    vision_layers: int = 4
    text_width: int = 128
    text_layers: int = 3


def model_config(config: TrainConfig) -> CLIPConfig:
    """OpenAI's ViT/32 design (64-dim heads, MLP ratio 4, QuickGELU, BPE vocabulary, 77 tokens) at a small size."""
    return CLIPConfig(
        embed_dim=config.embed_dim, image_size=224, patch_size=32,
        vision_width=config.vision_width, vision_layers=config.vision_layers,
        vision_heads=config.vision_width // 64, vision_mlp_dim=4 * config.vision_width,
        vocab_size=49408, context_length=77, text_width=config.text_width, text_layers=config.text_layers,
        text_heads=config.text_width // 64, text_mlp_dim=4 * config.text_width, activation="quick_gelu")


def symmetric_infonce(logits: jax.Array) -> jax.Array:
    """CLIP's loss: mean of the text->image and image->text cross-entropies; pair i is the diagonal."""
    labels = jnp.arange(logits.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def best_patch_cosines(text_tokens: jax.Array, patch_tokens: jax.Array) -> jax.Array:
    """[T, L, I]: each token's best cosine over each image's patches (text_tokens [T, L, D], patch_tokens [I, N, D])."""
    return jnp.einsum("tld,ind->tlin", text_tokens, patch_tokens).max(axis=-1)


def late_interaction(best: jax.Array, piece_mask: jax.Array) -> jax.Array:
    """FILIP text-to-image scores [texts, images]: per text, the mean over its pieces of their best cosines."""
    weights = piece_mask / piece_mask.sum(axis=1, keepdims=True)
    return jnp.einsum("tli,tl->ti", best, weights)


def token_retrieval_loss(best: jax.Array, piece_mask: jax.Array, scale: jax.Array) -> jax.Array:
    """Mean over pieces of the cross-entropy of finding the piece's own image by its best cosines alone."""
    labels = jnp.broadcast_to(jnp.arange(best.shape[0])[:, None], best.shape[:2])
    losses = optax.softmax_cross_entropy_with_integer_labels(scale * best, labels)
    return (losses * piece_mask).sum() / piece_mask.sum()


def group_weights(text_tokens: jax.Array, patch_tokens: jax.Array) -> jax.Array:
    """SPARC's sparse alignment weights [B, L, N] of each token over its own pair's patches (rows sum to 1).

    Per token, its cosines with the image's patches are min-max scaled, weights below 1/N are zeroed and
    the rest renormalized.
    """
    similarity = jnp.einsum("bld,bnd->bln", text_tokens, patch_tokens)
    low, high = similarity.min(axis=-1, keepdims=True), similarity.max(axis=-1, keepdims=True)
    scaled = (similarity - low) / (high - low + 1e-6)
    weights = jnp.where(scaled >= 1.0 / patch_tokens.shape[1], scaled, 0.0)
    return weights / weights.sum(axis=-1, keepdims=True)


def fine_grained_loss(text_tokens: jax.Array, piece_mask: jax.Array, patch_tokens: jax.Array,
                      scale: jax.Array) -> jax.Array:
    """SPARC's fine-grained loss (Bica et al. 2024) within each caption.

    Each piece token is grouped with the weighted mean of its patches (`group_weights`); every piece must pick
    out its own group among the groups of the caption's pieces, and every group its piece (one-hot targets,
    as SPARC). Pieces of other objects compete, so a word's similarity to the caption's other objects is
    pushed down. text_tokens [B, L, D], patch_tokens [B, N, D] unit rows.
    """
    weights = group_weights(text_tokens, patch_tokens)
    groups = l2_normalize(jnp.einsum("bln,bnd->bld", weights, patch_tokens))
    valid = (piece_mask[:, :, None] * piece_mask[:, None, :]) > 0
    logits = jnp.where(valid, scale * jnp.einsum("bld,bkd->blk", text_tokens, groups), -1e9)  # token l, group k
    diagonal = jnp.diagonal(logits, axis1=1, axis2=2)
    token_to_group = jax.nn.logsumexp(logits, axis=2) - diagonal
    group_to_token = jax.nn.logsumexp(logits, axis=1) - diagonal
    return 0.5 * ((token_to_group + group_to_token) * piece_mask).sum() / piece_mask.sum()


def piece_mask(token_ids: jax.Array, sot_id: int, eot_id: int) -> jax.Array:
    return ((token_ids != PAD_ID) & (token_ids != sot_id) & (token_ids != eot_id)).astype(jnp.float32)


def losses(params, model: CLIP, images_u8: jax.Array, token_ids: jax.Array, sot_id: int, eot_id: int,
           config: TrainConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    image = model.apply({"params": params}, clip_normalize(images_u8), method="encode_image")
    text = model.apply({"params": params}, token_ids, method="encode_text")
    scale = jnp.exp(params["logit_scale"])
    text_tokens, patch_tokens = l2_normalize(text.tokens), l2_normalize(image.tokens[:, 1:])
    pieces = piece_mask(token_ids, sot_id, eot_id)
    global_logits = scale * l2_normalize(text.embeds) @ l2_normalize(image.embeds).T
    clip_loss = symmetric_infonce(global_logits)
    best = best_patch_cosines(text_tokens, patch_tokens)
    dense_loss = symmetric_infonce(scale * late_interaction(best, pieces))
    token_loss = token_retrieval_loss(best, pieces, scale)
    fine_loss = fine_grained_loss(text_tokens, pieces, patch_tokens, scale)
    total = (clip_loss + config.dense_weight * dense_loss + config.token_weight * token_loss
             + config.fine_grained_weight * fine_loss)
    return total, {"loss": total, "clip_loss": clip_loss, "dense_loss": dense_loss, "token_loss": token_loss,
                   "fine_grained_loss": fine_loss, "logit_scale": scale}


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.peak_learning_rate, config.warmup_steps, config.steps)
    # Decay weight matrices only: not biases, norms, embeddings or the temperature (as CLIP).
    decayed = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf.ndim >= 2 and "embedding" not in path[-1].key, params)
    return optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=config.weight_decay, mask=decayed)


def make_train_step(model: CLIP, tx: optax.GradientTransformation, config: TrainConfig, sot_id: int, eot_id: int):
    @jax.jit
    def step(params, opt_state, images_u8, token_ids):
        grads, metrics = jax.grad(losses, has_aux=True)(params, model, images_u8, token_ids, sot_id, eot_id, config)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, config.max_logit_scale)
        return params, opt_state, metrics

    return step


@functools.partial(jax.jit, static_argnames="model")
def global_embeddings(model: CLIP, params, images_u8: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unit (image, text) embeddings of uint8 images and token rows."""
    return model.apply({"params": params}, clip_normalize(images_u8), token_ids)[1:]


def retrieval_accuracy(model: CLIP, params, images_u8: np.ndarray, token_ids: np.ndarray,
                       chunk: int = 64) -> dict[str, float]:
    """Top-1 image->text and text->image retrieval among the given pairs, by the global embeddings."""
    pairs = [global_embeddings(model, params, images_u8[i:i + chunk], token_ids[i:i + chunk])
             for i in range(0, len(token_ids), chunk)]
    image_embeds = np.concatenate([np.asarray(p[0]) for p in pairs])
    text_embeds = np.concatenate([np.asarray(p[1]) for p in pairs])
    similarity = image_embeds @ text_embeds.T
    truth = np.arange(len(similarity))
    return {"image_to_text_top1": float(np.mean(similarity.argmax(1) == truth)),
            "text_to_image_top1": float(np.mean(similarity.argmax(0) == truth))}


def encode_captions(captions: list[str], length: int) -> np.ndarray:
    ids = default_tokenizer().encode(captions)
    if (ids[:, length:] != PAD_ID).any():
        raise ValueError(f"a caption needs more than text_length={length} positions")
    return ids[:, :length]


def train(config: TrainConfig, log_path: pathlib.Path) -> tuple[dict, np.ndarray, dict]:
    """Returns (float32 params, sorted token ids the captions used, run summary); logs to `log_path`."""
    clip_config = model_config(config)
    model = CLIP(clip_config)
    tokenizer = default_tokenizer()
    params = init_params(clip_config, config.seed)
    tx = optimizer(config)
    opt_state = tx.init(params)
    step_fn = make_train_step(model, tx, config, tokenizer.sot_id, tokenizer.eot_id)
    val_images, val_captions = make_batch(heldout_seeds(config.validation_scenes, VALIDATION_OFFSET))
    val_ids = encode_captions(val_captions, config.text_length)

    def batch(step: int) -> tuple[np.ndarray, list[str]]:
        return make_batch(train_seeds(config.batch_size, step * config.batch_size))

    used_ids: set[int] = set()
    start, cpu_start = time.perf_counter(), time.process_time()
    with log_path.open("w") as log, concurrent.futures.ThreadPoolExecutor(1) as prefetch:
        next_batch = prefetch.submit(batch, 0)
        for step in range(config.steps):
            images, captions = next_batch.result()
            if step + 1 < config.steps:  # the next scenes are drawn while this step runs
                next_batch = prefetch.submit(batch, step + 1)
            token_ids = encode_captions(captions, config.text_length)
            used_ids.update(np.unique(token_ids).tolist())
            step_start = time.perf_counter()
            params, opt_state, metrics = step_fn(params, opt_state, images, token_ids)
            record = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
            record["samples_per_s"] = config.batch_size / (time.perf_counter() - step_start)
            record["elapsed_s"] = time.perf_counter() - start
            record["cpu_s"] = time.process_time() - cpu_start  # all threads: the compute a shared machine gave us
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                record["validation"] = retrieval_accuracy(model, params, val_images, val_ids)
            log.write(json.dumps(record) + "\n")
            log.flush()
    used_ids.discard(PAD_ID)  # padding follows the end-of-text token, so it never reaches a real token
    summary = {"train_seconds": record["elapsed_s"], "train_cpu_seconds": record["cpu_s"], "final": record}
    return jax.device_get(params), np.array(sorted(used_ids), np.int32), summary


def zero_unused_rows(params: dict, used_ids: np.ndarray) -> dict:
    """Zeroes the token-embedding rows no caption used, so the compressed checkpoint stays small."""
    embedding = np.asarray(params["text"]["token_embedding"])
    kept = np.zeros_like(embedding)
    kept[used_ids] = embedding[used_ids]
    return {**params, "text": {**params["text"], "token_embedding": kept}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = parser.parse_args()
    config = dataclasses.replace(TrainConfig(), steps=args.steps)
    log_path = args.out.parent / f".{args.out.name}.{LOG_FILE}"  # moved into the folder once it is written
    log_path.parent.mkdir(parents=True, exist_ok=True)
    readme = args.out / README_FILE
    readme_text = readme.read_text() if readme.is_file() else None  # saving replaces the folder
    params, used_ids, summary = train(config, log_path)
    metadata = {"training": {"config": dataclasses.asdict(config), **summary,
                             "used_token_ids": used_ids.tolist(), "cpu_count": os.cpu_count()}}
    save_checkpoint(args.out, zero_unused_rows(params, used_ids), model_config(config), metadata=metadata,
                    storage_dtype=np.float16, compressed=True, overwrite=True)
    log_path.rename(args.out / LOG_FILE)
    if readme_text is not None:
        readme.write_text(readme_text)
    print(json.dumps(record_heldout_metrics(args.out), indent=2))


if __name__ == "__main__":
    main()
