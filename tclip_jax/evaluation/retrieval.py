"""Image <-> text retrieval by CLIP's global embeddings (class token, end-of-text token), as CLIP is trained.

Each image is fed whole (`prepare`'s "whole": bicubic, no crop: TCLIP's default input protocol); its caption is the
correct text among all the captions given, and vice versa. Top-1 accuracy in each direction. Another caption can be
true of an image too (synthetic scenes: "a yellow star" of every scene holding one); given which captions are true of
which images, the top-1 that counts any true one is reported beside.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional

import jax
import numpy as np

from tclip_jax.checkpoints.load import LoadedClip
from tclip_jax.image import prepare
from tclip_jax.model import CLIP

RETRIEVAL_CHUNK = 64  # image-caption pairs per device call


@functools.partial(jax.jit, static_argnames="model")
def global_embeddings(model: CLIP, params, pixels: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unit (image, text) embeddings of normalized pixels [B, H, W, 3] and token rows [B, L]."""
    return model.apply({"params": params}, pixels, token_ids)[1:]


def retrieval_top1(clip: LoadedClip, images: Sequence[np.ndarray], captions: Sequence[str],
                   true_of: Optional[np.ndarray] = None) -> dict:
    """{"pairs", "image_to_text_top1", "text_to_image_top1"} of uint8 images [H, W, 3] and their captions; with
    `true_of` ([images, captions] booleans: caption j is true of image i), also "image_to_true_text_top1" and
    "text_to_true_image_top1", where retrieving any caption true of the image (any image the caption is true of)
    counts."""
    if len(images) != len(captions) or not captions:
        raise ValueError(f"retrieval needs as many captions as images (at least one): got {len(images)} images "
                         f"and {len(captions)} captions")
    image_embeds, text_embeds = [], []
    for start in range(0, len(captions), RETRIEVAL_CHUNK):
        stop = start + RETRIEVAL_CHUNK
        pixels = np.stack([prepare(image, "whole", clip.config)[0] for image in images[start:stop]])
        ids = clip.tokenizer.encode(list(captions[start:stop]), clip.config.context_length)
        image_part, text_part = global_embeddings(clip.model, clip.params, pixels, ids)
        image_embeds.append(np.asarray(image_part, np.float64))
        text_embeds.append(np.asarray(text_part, np.float64))
    image_embeds, text_embeds = np.concatenate(image_embeds), np.concatenate(text_embeds)
    broken = {what: int(np.sum(~np.isfinite(e).all(1))) for e, what in ((image_embeds, "images"),
                                                                        (text_embeds, "captions"))}
    if any(broken.values()):  # argmax over NaN would pick the first pair
        raise ValueError(f"retrieval: the model's embeddings are not finite for "
                         f"{' and '.join(f'{n} {what}' for what, n in broken.items())} of {len(captions)}")
    similarity = image_embeds @ text_embeds.T
    truth = np.arange(len(captions))
    texts, images_found = similarity.argmax(1), similarity.argmax(0)
    result = {"pairs": len(captions), "image_to_text_top1": float(np.mean(texts == truth)),
              "text_to_image_top1": float(np.mean(images_found == truth))}
    if true_of is not None:
        if np.shape(true_of) != (len(captions),) * 2 or not np.all(np.diagonal(true_of)):
            raise ValueError(f"true_of must be a {len(captions)} x {len(captions)} boolean matrix whose diagonal (each "
                             "image's own caption) is true")
        result["image_to_true_text_top1"] = float(np.mean(true_of[truth, texts]))
        result["text_to_true_image_top1"] = float(np.mean(true_of[images_found, truth]))
    return result
