"""TCLIP on the device: token–patch relevance and its multi-scale translation aggregate.

Image side: every final-layer patch token after `ln_post` and the visual projection. Text side:
every token after `ln_final` and the text projection. Rows are L2-normalized and `S = T̂ · Îᵀ`.
The image side never sees the text, so one pass over the translated copies serves every query.
A query is a unit token embedding or a mean of several (the pieces of a word, the words of a
class name); S is linear in it, so its map is the mean of their maps before aggregation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tclip_jax.methods.tclip.settings import DEFAULT_TRIM
from tclip_jax.methods.tclip.translations import shift_back_operators, translated_copies, trimmed_mean
from tclip_jax.model import CLIP, l2_normalize


PROMPT_CHUNK = 8  # token rows per text-tower pass


def map_prompts(one, token_ids: jax.Array):
    """`one(row)` for every token row of [P, L], PROMPT_CHUNK rows per pass (a `lax.map`, padded with zero rows).

    Every row runs in a chunk of the same shape and XLA's kernels treat rows alike, so a prompt's result does not
    depend on which prompts come with it or where; 80 prompts take a quarter of the time of one row at a time.
    """
    count = token_ids.shape[0]
    padded = jnp.pad(token_ids, ((0, -count % PROMPT_CHUNK), (0, 0)))
    return jax.tree_util.tree_map(lambda a: a[:count], jax.lax.map(one, padded, batch_size=PROMPT_CHUNK))


@functools.partial(jax.jit, static_argnames="model")
def token_embeddings(model: CLIP, params, token_ids: jax.Array) -> jax.Array:
    """[P, L, D] unit embeddings of every position of token rows [P, L] (SOT/EOT/padding included), by
    `map_prompts` (compiled per P: TCLIP calls it on chunks of PROMPT_CHUNK rows, `common.in_chunks`)."""
    def one(row: jax.Array) -> jax.Array:
        return l2_normalize(model.apply({"params": params}, row[None], method="encode_text").tokens[0])

    return map_prompts(one, token_ids)


@functools.partial(jax.jit, static_argnames=("model", "offsets"))
def translated_patch_embeddings(model: CLIP, params, images: jax.Array,
                                offsets: tuple[tuple[int, int], ...]) -> jax.Array:
    """[B, K, gh*gw, D] unit patch embeddings of the K shifted copies of each image [B, h, w, 3].

    All B*K copies go through the ViT as one batch.
    """
    batch, height, width, channels = images.shape
    copies = jax.vmap(lambda image: translated_copies(image, offsets))(images)
    out = model.apply({"params": params}, copies.reshape(-1, height, width, channels), method="encode_image")
    patches = l2_normalize(out.tokens[:, 1:])  # drop the class token
    return patches.reshape(batch, len(offsets), *patches.shape[1:])


@functools.partial(jax.jit, static_argnames=("offsets", "grid_hw", "size_hw", "trim", "chunk"))
def aggregate_maps(patch_embeds: jax.Array, queries: jax.Array, offsets: tuple[tuple[int, int], ...],
                   grid_hw: tuple[int, int], size_hw: tuple[int, int], trim: float = DEFAULT_TRIM,
                   chunk: int = 8) -> jax.Array:
    """[Q, H, W] aggregated maps of `queries` [Q, D] from one image's copies `patch_embeds` [K, N, D].

    Each copy's relevance grid is upsampled to the model input size (bilinear), shifted back into the
    original frame, and the copies are combined by a pixel-wise trimmed mean over the valid ones.
    Queries run `chunk` at a time to bound memory at K x chunk x H x W; they are padded to whole chunks, so
    that every query runs in a chunk of the same shape and its map does not depend on how many there are.
    """
    rows, cols, valid = shift_back_operators(offsets, grid_hw, size_hw)

    def one_query(query: jax.Array) -> jax.Array:
        grids = (patch_embeds @ query).reshape(len(offsets), *grid_hw)
        maps = jnp.einsum("kyi,kij,kxj->kyx", rows, grids, cols)
        return trimmed_mean(maps, valid, trim)

    count = queries.shape[0]
    padded = jnp.pad(queries, ((0, -count % chunk), (0, 0)))
    return jax.lax.map(one_query, padded, batch_size=chunk)[:count]
