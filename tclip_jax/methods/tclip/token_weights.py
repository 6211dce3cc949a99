"""Attention-weighted token relevance (the TCLIP paper's future work): how much the end-of-text token attends to
each position of the text tower, as weights for the tokens of a multi-word query.

TCLIP's query for a class name or a whole prompt is the plain mean of its words (the paper's default, "none").
With a weighting, it is the mean of the span's BPE pieces weighted by the end-of-text (pooled) token's attention
to them, heads averaged: in the last block ("last"), averaged over blocks ("mean"), or by attention rollout over
the text tower ("rollout", Abnar & Zuidema 2020: each block's head-averaged attention with the residual added as
0.5 A + 0.5 I, rows renormalized, multiplied from the first block to the last). S is linear in the query, so this
weights each token's relevance row. Single-word queries keep the paper's mean of their pieces.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tclip_jax.methods.tclip.relevance import map_prompts
from tclip_jax.methods.tclip.settings import TOKEN_WEIGHTINGS
from tclip_jax.model import CLIP, l2_normalize


@functools.partial(jax.jit, static_argnames="model")
def token_embeddings_and_attention(model: CLIP, params, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(`relevance.token_embeddings` of token rows [P, L], their head-averaged text-tower attention probabilities
    [P, blocks, L, L]) from one pass, by `relevance.map_prompts` (as `token_embeddings`)."""
    def one(row: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = model.apply({"params": params}, row[None], intermediates=True, method="encode_text")
        return l2_normalize(out.tokens[0]), jnp.stack([probs[0].mean(axis=0) for probs in out.attention_probs])

    return map_prompts(one, token_ids)


def eot_weights(attention: np.ndarray, eot_position: int, weighting: str) -> np.ndarray:
    """[L] weights of every position from one prompt's head-averaged attention [blocks, L, L]."""
    attention = np.asarray(attention, np.float64)
    if weighting == "last":
        return attention[-1, eot_position]
    if weighting == "mean":
        return attention[:, eot_position].mean(axis=0)
    if weighting == "rollout":
        identity = np.eye(attention.shape[-1])
        rollout = identity
        for block in attention:
            mixed = 0.5 * block + 0.5 * identity
            rollout = (mixed / mixed.sum(axis=-1, keepdims=True)) @ rollout
        return rollout[eot_position]
    raise ValueError(f"token weighting must be one of {TOKEN_WEIGHTINGS[1:]} here, got {weighting!r}")
