"""Training ECLIP's projections (`tclip train-eclip`): masked max pooling and CLIP's contrastive loss.

For each image-text pair, the image feature is the channel-wise max over patches of Fᵢ ⊙ A (`masked_max_pool`),
A [patches] a class-agnostic attention map: the last block's class-to-patch attention (mean over heads) of an
offline self-supervised ViT (`ViTAttention`, a Hugging Face `ViTModel` such as DINO, resized to CLIP's patch
grid) or, without one, of CLIP's own image tower (`clip_attention`); min-max normalized per image, so the least
attended patch counts for nothing. The loss (`contrastive_loss`) is CLIP's symmetric InfoNCE between the
normalized φ̂ᵢ(pooled) and φ̂ₜ(Fₜ) at CLIP's learned temperature; AdamW (optax) trains φ̂ᵢ and φ̂ₜ only.

CLIP is frozen and A depends on the image alone, so every pair's pooled feature and Fₜ are fixed: they are
computed once (`pair_features`, one jitted CLIP forward per batch of pairs) and the jitted train step
(`make_train_step`) sees only them, the projections and the optimizer state. CLIP's parameters are not an
argument of the step, so no gradient of them is ever formed.

`train` checkpoints the projections, the optimizer state and the step into OUT/checkpoint after every epoch
(a staged folder: never half-written), continues from it with `resume`, and writes the final projections as
OUT/eclip_projections.safetensors (`method.save_projections`). An epoch's order of pairs depends on the seed and
the epoch alone, so a resumed run gives the projections of an uninterrupted one. A resume must be of the same run:
the model, the attention model and the data are compared by fingerprint (config and every weight, float32 bytes
whole: `weights_fingerprint`; the list and each image's name and size, before anything runs, and the SHA-256 of every
image file's bytes, as `pair_features` reads them: a resume whose images differ in content alone is refused after the
features pass, before any training step), not by how their paths were spelt; a checkpoint that cannot tell them is
not resumed: one written before fingerprints (paths alone), one of image files written before their contents were
compared (names and sizes alone: a picture replaced by another of the same size, as uncompressed formats have, would
resume; refused rather than resumed unchecked, as the fingerprints of first definitions are, since what it was
trained on cannot be known), or whose model or attention fingerprint is of the first definition
(`is_v1_fingerprint`: it did not tell apart models that differ in their transformer blocks alone, or ViTs of other
configs). A checkpoint's arrays must have the shapes of the
model's projections and be finite. A run whose projections stop being finite ends with an error.
One run trains in OUT at a time (a lock in it). An epoch's last batch of a single pair is left out (its loss is 0,
yet an Adam step on it would move the projections); a checkpoint written before that rule is not resumed where the
data has such a batch.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib
import io
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

from tclip_jax.checkpoints.load import LoadedClip, is_v1_fingerprint, weights_fingerprint
from tclip_jax.files import (check_output_folder, fingerprint, held_lock, loads_json, mend_killed_swaps,
                             nonempty_path, staged_folder, write_safetensors)
from tclip_jax.image import image_size, load_image, prepare
from tclip_jax.methods import common
from tclip_jax.methods.eclip.method import (PROJECTIONS_FILE, Projections, clip_projections, image_features,
                                            save_projections, text_features)
from tclip_jax.methods.eclip.settings import TrainSettings
from tclip_jax.model import CLIP, CLIPConfig, hf_normalization, l2_normalize
from tclip_jax.model.config import refuse_other_hf_values

Array = jax.Array
CAPTIONS_FILE = "captions.tsv"
CHECKPOINT_DIR = "checkpoint"
FEATURE_BATCH = 32  # pairs per CLIP forward when the features are computed
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # the normalization DINO was trained with
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
VIT_PROCESSOR_MEAN = VIT_PROCESSOR_STD = (0.5, 0.5, 0.5)  # transformers' ViTImageProcessor's, where its config has none


# ------------------------------------------------------------------------------------------------ the pairs
@dataclasses.dataclass(frozen=True)
class Pairs:
    """Image-text pairs: `count` of them, read in order by `read()` as (uint8 RGB, caption, the encoded bytes the
    image was decoded from, or None). `fingerprint` tells data apart for a resume (`description` says where they come
    from, however its path was spelt); with `sources`, `read` yields every image's bytes, whose digest a resume
    compares too (`pair_features`): image files, which the fingerprint tells by name and size alone."""

    description: str
    fingerprint: str
    count: int
    read: Callable[[], Iterator[tuple[np.ndarray, str, Optional[bytes]]]]
    sources: bool = False


def synthetic_pairs(count: int) -> Pairs:
    """The first `count` synthetic training scenes (`make_scene(seed, None)`) with their captions."""
    from tclip_jax.synthetic import HELDOUT_SEED_START, TRAIN_SEED_START, make_scene, train_seeds

    most = HELDOUT_SEED_START - TRAIN_SEED_START  # the training scenes there are: the held-out ones follow
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= most:
        raise ValueError(f"--synthetic must be an integer from 1 to {most} (the synthetic training scenes there are), "
                         f"got {count!r}")

    def read():
        for seed in train_seeds(count):
            scene = make_scene(seed, None)
            yield scene.image, scene.caption, None

    return Pairs(f"{count} synthetic training scene{'s' * (count != 1)}", f"synthetic:{count}", count, read)


def file_pairs(path: str | os.PathLike) -> Pairs:
    """The pairs of a folder with `CAPTIONS_FILE` (FILE<TAB>CAPTION per line), a .csv with columns path and caption,
    or a .jsonl of {"path": ..., "caption": ...} (or such a .tsv list itself); image paths are relative to the folder
    of the list. Every image is checked to exist and to be an image (its header) before anything runs. Their
    fingerprint is a digest of the list and of each image's name and size; `read` yields each image's bytes too
    (`Pairs.sources`), read once, and an image that cannot be decoded is named by its line of the list."""
    path = nonempty_path(path, "the training data's path",
                         f"a folder with {CAPTIONS_FILE}, or a .tsv, .csv or .jsonl file")
    if not path.exists():
        raise FileNotFoundError(f"training data {path} not found")
    if path.is_dir():
        listing = path / CAPTIONS_FILE
        if not listing.is_file():
            raise FileNotFoundError(f"{path} has no {CAPTIONS_FILE} (one FILE<TAB>CAPTION line per image)")
        rows = _tsv_rows(listing)
    elif path.suffix.lower() in (".tsv", ".csv", ".jsonl"):
        listing = path
        rows = {".tsv": _tsv_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows}[path.suffix.lower()](path)
    else:
        raise ValueError(f"training data {path} is neither a folder with {CAPTIONS_FILE} nor a .tsv, .csv or .jsonl "
                         "file")
    pairs, named = [], [listing.read_bytes()]
    for line, image, caption in rows:
        if not image.strip():  # it would name the list's own folder
            raise ValueError(f"{listing}:{line}: the image path is empty")
        if not caption.strip():
            raise ValueError(f"{listing}:{line}: the caption is empty")
        image_path = listing.parent / image
        if not image_path.is_file():
            raise FileNotFoundError(f"{listing}:{line}: image {image_path} not found")
        try:
            image_size(image_path)  # an unreadable or too large image, found before any forward pass
        except ValueError as err:
            raise ValueError(f"{listing}:{line}: {err}") from None
        named.append(f"{image}\0{image_path.stat().st_size}".encode())
        pairs.append((line, image_path, caption))
    if not pairs:
        raise ValueError(f"{listing} has no image-text pairs")

    def read():
        for line, image_path, caption in pairs:
            try:
                data = image_path.read_bytes()
                yield load_image(data, file=image_path), caption, data
            except (OSError, ValueError) as err:  # damaged past the header (found only by decoding), or gone since
                raise ValueError(f"{listing}:{line}: {err}") from None

    return Pairs(str(listing), fingerprint(named), len(pairs), read, sources=True)


def _text(listing: pathlib.Path) -> str:
    """A list's text (a byte-order mark, as spreadsheet programs write, dropped); one line naming it if it is not
    UTF-8."""
    try:
        return listing.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{listing} is not UTF-8 text: {err}") from None


def _tsv_rows(listing: pathlib.Path) -> Iterator[tuple[int, str, str]]:
    for line, text in enumerate(_text(listing).splitlines(), 1):
        if not text.strip():
            continue
        image, tab, caption = text.partition("\t")
        if not tab:
            raise ValueError(f"{listing}:{line}: expected FILE<TAB>CAPTION, got {text[:60]!r}")
        yield line, image.strip(), caption.strip()


def _csv_rows(listing: pathlib.Path) -> Iterator[tuple[int, str, str]]:
    with io.StringIO(_text(listing), newline="") as f:
        reader = csv.DictReader(f)
        if not {"path", "caption"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{listing} needs the columns path and caption, has {reader.fieldnames}")
        for row in reader:
            if None in row:  # DictReader's key of the fields past the header's
                raise ValueError(f"{listing}:{reader.line_num}: more fields than the header's (a comma in a caption "
                                 "needs quotes)")
            yield reader.line_num, row["path"] or "", row["caption"] or ""


def _jsonl_rows(listing: pathlib.Path) -> Iterator[tuple[int, str, str]]:
    for line, text in enumerate(_text(listing).splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = loads_json(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{listing}:{line}: not JSON: {err}") from None
        if not (isinstance(row, dict) and isinstance(row.get("path"), str) and isinstance(row.get("caption"), str)):
            raise ValueError(f'{listing}:{line}: expected {{"path": ..., "caption": ...}}')
        yield line, row["path"], row["caption"]


# ------------------------------------------------------------------------------------------ the attention map
def clip_attention(model: CLIP, params: dict, images: Array) -> Array:
    """The CLIP image tower's last-block attention of the class token to the patches, mean over heads [B, gh*gw]."""
    probs = common.encode_image(model, params, images).attention_probs[-1]  # [B, heads, 1 + P, 1 + P]
    return probs[:, :, 0, 1:].mean(axis=1)


class ViTAttention:
    """The last layer's CLS-to-patch attention (mean over heads) of a Hugging Face `ViTModel` (e.g. DINO), from a
    folder or hub name, resized (bilinear) to CLIP's patch grid. Runs in PyTorch, on the CLIP input un-normalized,
    resized to the ViT's input size with its preprocessor_config.json's filter (bilinear or bicubic, antialiased as
    PIL's resize, which transformers' ViTImageProcessor uses) and normalized with its mean and std, as
    ViTImageProcessor reads them (`hf_normalization`; some ViTs use 0.5 and 0.5); where it has no such file,
    bilinear and ImageNet's mean and std, which DINO was trained with. Settings no input here computes (pixels not
    rescaled by 1/255, no resizing) are refused."""

    def __init__(self, name_or_path: str | os.PathLike):
        try:  # both optional (the dino extra); transformers without torch gives a ViTModel that fails when used
            importlib.import_module("torch")
            from transformers import ViTModel
        except ImportError:
            raise ImportError("--dino needs transformers and PyTorch: pip install 'tclip_jax[dino]'") from None

        from tclip_jax.checkpoints.sources import download_from_hub

        name, folder = str(name_or_path), pathlib.Path(name_or_path).expanduser()
        if folder.is_dir():
            name = str(folder)
        elif folder.is_file():
            raise ValueError(f"--dino {name} is a file; name a Hugging Face ViTModel folder (config.json and weights) "
                             "or hub name")
        else:
            if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:  # not a hub "org/name"
                raise FileNotFoundError(f"attention model folder {name} not found")
            folder = download_from_hub(name, flag="--dino")  # offline: one line that says what to do
        from transformers.utils import logging as transformers_logging

        config_path = pathlib.Path(folder) / "config.json"
        try:
            model_type = loads_json(config_path.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"--dino {name}: cannot read its config.json ({err})") from None
        if model_type != "vit":  # transformers would build a ViT from any config, its weights left random
            raise ValueError(f"--dino {name} is a {model_type!r} model, not a ViT (a Hugging Face ViTModel such as "
                             "facebook/dino-vitb16)")
        # A pickled pytorch_model.bin could run code when read: safetensors only, never transformers' pickle path.
        if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            held = [f.name for f in sorted(folder.glob("*.bin"))]
            raise ValueError(f"--dino {name} has no model.safetensors" + (
                f" ({', '.join(held)} is a pickle, which could run code when read: save its weights as safetensors)"
                if held else ""))
        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # its "Loading weights" bar is not train-eclip's to show
        try:
            self.model, loading = ViTModel.from_pretrained(
                str(folder), add_pooling_layer=False, attn_implementation="eager", trust_remote_code=False,
                use_safetensors=True, output_loading_info=True)
        except Exception as err:  # damaged weights, a config value it cannot build from: transformers and
            # huggingface_hub raise many types (StrictDataclassError, only in recent hubs, among them)
            raise ValueError(f"--dino {name}: cannot load it ({type(err).__name__}: "
                             f"{' '.join(str(err).split())})") from None
        finally:
            if shown:
                transformers_logging.enable_progress_bar()
        absent = [*loading.get("missing_keys", ()), *(k for k, *_ in loading.get("mismatched_keys", ()))]
        if absent:
            raise ValueError(f"--dino {name}: its weights lack {len(absent)} of the ViT's tensors (e.g. {absent[0]}), "
                             "which would be random")
        self.model.eval()
        self.image_mean, self.image_std, self.resample = vit_preprocessing(pathlib.Path(folder), name)
        self.image_size = self.model.config.image_size
        self.patch_size = self.model.config.patch_size
        self.origin = name
        # What a resume compares, however the folder was spelt: the parsed config but where it was read from and
        # by which transformers, and every weight.
        config = {k: v for k, v in self.model.config.to_dict().items()
                  if not k.startswith("_") and k != "transformers_version"}
        if not (np.array_equal(self.image_mean, IMAGENET_MEAN) and np.array_equal(self.image_std, IMAGENET_STD)):
            # the pixels it sees (ImageNet's, all runs before this was read, leave the fingerprint as it was)
            config["pixel_normalization"] = [self.image_mean.tolist(), self.image_std.tolist()]
        if self.resample != "bilinear":  # likewise: runs resized bilinearly keep their fingerprint
            config["pixel_resize"] = self.resample
        self.fingerprint = weights_fingerprint(
            json.dumps(config, sort_keys=True, default=str),
            {key: tensor.detach().float().numpy() for key, tensor in self.model.state_dict().items()})

    def __call__(self, pixels: np.ndarray, grid: tuple[int, int], config: CLIPConfig) -> np.ndarray:
        """Inputs [B, h, w, 3] of the CLIP of `config` (normalized with its mean and std) -> [B, gh*gw] attention on
        its patch grid."""
        import torch
        import torch.nn.functional as F

        mean, std = np.asarray(config.image_mean, np.float32), np.asarray(config.image_std, np.float32)
        rgb = torch.from_numpy((np.asarray(pixels) * std + mean).astype(np.float32)).permute(0, 3, 1, 2)
        if rgb.shape[-2:] != (self.image_size, self.image_size):
            rgb = F.interpolate(rgb, size=(self.image_size, self.image_size), mode=self.resample, align_corners=False,
                                antialias=True)
        rgb = (rgb - torch.from_numpy(self.image_mean)[:, None, None]) / torch.from_numpy(self.image_std)[:, None, None]
        with torch.no_grad():
            probs = self.model(pixel_values=rgb, output_attentions=True).attentions[-1]  # [B, heads, 1 + P, 1 + P]
        side = self.image_size // self.patch_size
        attention = probs[:, :, 0, 1:].mean(dim=1).reshape(-1, 1, side, side)
        attention = F.interpolate(attention, size=tuple(grid), mode="bilinear", align_corners=False)
        return attention.reshape(len(rgb), -1).numpy()


# ViTImageProcessor's resample ids (PIL's) that torch's antialiased interpolation computes as PIL does.
_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}


def vit_preprocessing(folder: pathlib.Path, name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(mean [3], std [3], resize mode) the ViT in `folder` preprocesses its pixels with: its preprocessor_config.json's
    (`ViTAttention`), or ImageNet's and bilinear where it has none. Errors name the field."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    try:
        hf = loads_json(path.read_text(encoding="utf-8"))
        normalization = hf_normalization(hf, VIT_PROCESSOR_MEAN, VIT_PROCESSOR_STD)
        refuse_other_hf_values(hf, {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255},
                               "the ViT is fed pixels as")
        resample = hf.get("resample", 2)  # ViTImageProcessor's default: bilinear
        if isinstance(resample, bool) or resample not in _RESAMPLE_MODES:
            raise ValueError(f"resample = {resample!r} is not supported (2: bilinear, 3: bicubic)")
    except (OSError, ValueError) as err:
        raise ValueError(f"--dino {name}: cannot read its preprocessor_config.json ({err})") from None
    return (np.asarray(normalization["image_mean"], np.float32), np.asarray(normalization["image_std"], np.float32),
            _RESAMPLE_MODES[resample])


# ----------------------------------------------------------------------------------------- pooling and the loss
def masked_max_pool(features: Array, attention: Array) -> Array:
    """max over patches of Fᵢ ⊙ A, channel by channel: features [B, P, C], attention [B, P] -> [B, C]."""
    return jnp.max(features * attention[:, :, None], axis=1)


def contrastive_loss(projections: Projections, pooled: Array, texts: Array, logit_scale: Array) -> Array:
    """CLIP's symmetric InfoNCE of the batch's pairs: normalized φ̂ᵢ(pooled) [B, vision_width -> embed_dim] against
    normalized φ̂ₜ(Fₜ) [B, text_width -> embed_dim], logits scaled by exp(logit_scale)."""
    image = l2_normalize(pooled @ projections["image"])
    text = l2_normalize(texts @ projections["text"])
    logits = jnp.exp(logit_scale) * image @ text.T
    image_to_text = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1)).mean()
    text_to_image = -jnp.diagonal(jax.nn.log_softmax(logits, axis=0)).mean()
    return (image_to_text + text_to_image) / 2


@functools.partial(jax.jit, static_argnums=0)
def _pair_features(model: CLIP, params: dict, pixels: Array, token_ids: Array,
                   attention: Optional[Array]) -> tuple[Array, Array]:
    patches, _ = image_features(model, params, pixels)
    if attention is None:
        attention = clip_attention(model, params, pixels)
    return masked_max_pool(patches, common.minmax(attention, axis=-1)), text_features(model, params, token_ids)


def pair_features(clip: LoadedClip, pairs: Pairs, attention: Optional[ViTAttention] = None,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray, Optional[str]]:
    """Every pair's masked-max-pooled image feature [N, vision_width] and Fₜ [N, text_width], in order (captions
    longer than the model's context are truncated), and the digest of the images' bytes as read (`fingerprint` of
    each one's SHA-256; None where `pairs` yields none, `Pairs.sources`)."""
    from tqdm.auto import tqdm

    config = clip.config
    grid = (config.image_size // config.patch_size,) * 2
    pooled, texts, batch, digests = [], [], [], []

    def flush():
        pixels = np.stack([prepare(rgb, "whole", config)[0] for rgb, _ in batch])
        ids = clip.tokenizer.encode([c for _, c in batch], config.context_length, truncate=True)
        mask = None if attention is None else attention(pixels, grid, config)
        image, text = _pair_features(clip.model, clip.params, pixels, ids, mask)
        pooled.append(np.asarray(image))
        texts.append(np.asarray(text))
        batch.clear()

    for rgb, caption, source in tqdm(pairs.read(), total=pairs.count, desc="features", unit="pair",
                                     disable=not progress):
        if source is not None:
            digests.append(hashlib.sha256(source).digest())
        batch.append((rgb, caption))
        if len(batch) == FEATURE_BATCH:
            flush()
    if batch:
        flush()
    return np.concatenate(pooled), np.concatenate(texts), fingerprint(digests) if pairs.sources else None


# ------------------------------------------------------------------------------------------------- training
def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    return optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay)


def make_train_step(optimizer: optax.GradientTransformation) -> Callable:
    """The jitted step `(projections, opt_state, pooled, texts, logit_scale) -> (projections, opt_state, loss)`,
    differentiating the loss with respect to the projections alone."""
    @jax.jit
    def step(projections, opt_state, pooled, texts, logit_scale):
        loss, grads = jax.value_and_grad(contrastive_loss)(projections, pooled, texts, logit_scale)
        updates, opt_state = optimizer.update(grads, opt_state, projections)
        return optax.apply_updates(projections, updates), opt_state, loss

    return step


def epoch_order(settings: TrainSettings, count: int, epoch: int) -> np.ndarray:
    """The order of all `count` pairs in epoch `epoch`: a permutation drawn from the seed and the epoch alone (a
    resume draws it again), another each epoch. The epoch's batches are its consecutive slices; a last single
    pair left out is its last entry, so which pair that is changes from epoch to epoch."""
    return np.random.default_rng([settings.seed, epoch]).permutation(count)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    projections: Projections
    path: pathlib.Path  # the projections file
    steps: int
    loss: Optional[float]  # of the last step run here (None: a resumed run that had nothing left to do)


LOCK_FILE = ".train-eclip.lock"  # held in --out while a run trains there


def train(clip: LoadedClip, pairs: Pairs, out: str | os.PathLike, settings: TrainSettings = TrainSettings(),
          attention: Optional[ViTAttention] = None, resume: bool = False, progress: bool = True) -> TrainResult:
    """Trains the projections on `pairs` (see the module docstring) into the folder `out`."""
    out = check_output_folder(out)
    if pairs.count < 2:  # InfoNCE over one pair is 0 with no gradient: nothing would be trained
        raise ValueError(f"{pairs.description} holds {pairs.count} image-text pair{'s' * (pairs.count != 1)}; "
                         "contrastive training needs at least 2")
    # Two runs into one folder wrote its files each other's way, and both reported success: a lock in the folder,
    # which is made for it; the folders made are removed again if the run leaves nothing in them.
    with held_lock(out / LOCK_FILE, "train-eclip run", out, make_folder=True):
        return _train(clip, pairs, out, settings, attention, resume, progress)


def _train(clip: LoadedClip, pairs: Pairs, out: pathlib.Path, settings: TrainSettings,
           attention: Optional[ViTAttention], resume: bool, progress: bool) -> TrainResult:
    from tqdm.auto import tqdm

    checkpoint = out / CHECKPOINT_DIR
    # A run killed between a checkpoint save's two renames left the checkpoint hidden beside its place: put back
    # first, it is resumed, or refused to a fresh run, rather than taken for missing (and replaced by the next save).
    mend_killed_swaps(out)
    if checkpoint.exists() and not resume:
        raise FileExistsError(f"{out} holds a training checkpoint: pass --resume to continue it, or choose another "
                              "--out")
    if resume and not checkpoint.is_dir():
        raise FileNotFoundError(f"--resume: {out} holds no training checkpoint ({CHECKPOINT_DIR}/)")
    if not resume and (out / PROJECTIONS_FILE).exists():
        raise FileExistsError(f"{out} holds {PROJECTIONS_FILE} (of an earlier run): choose another --out, or move it")
    # What a resume compares: fingerprints, counts and settings, not how a path was spelt (origin, description).
    run = {"model": {"origin": clip.origin, "source": clip.source, "fingerprint": clip.fingerprint},
           "pairs": {"description": pairs.description, "fingerprint": pairs.fingerprint, "count": pairs.count},
           "attention": {"origin": "clip", "fingerprint": "clip"} if attention is None else
           {"origin": attention.origin, "fingerprint": attention.fingerprint},
           "settings": settings.to_dict()}
    if pairs.sources:  # the images' contents: known once the features pass has read them (`pair_features`)
        run["pairs"]["contents"] = None
    if pairs.count % settings.batch_size == 1:  # a checkpoint from before such a batch was left out stepped on it
        run["one_pair_batch"] = "left out"
    if attention is not None and clip.config.image_size > attention.image_size:
        # CLIP's input shrunk to the ViT's, antialiased since 2026-12-07: a run begun before (a record without this)
        # is not resumed with other attention maps
        run["attention"]["resize"] = f"{attention.resample}, antialiased"
    optimizer = make_optimizer(settings)
    projections = clip_projections(clip.params)
    opt_state = optimizer.init(projections)
    epoch = step_count = 0
    if resume:
        projections, opt_state, epoch, step_count, contents = load_checkpoint(checkpoint, run, projections, opt_state)
        if epoch > settings.epochs:
            raise ValueError(f"--resume: the checkpoint in {out} has {epoch} epochs done, more than --epochs "
                             f"{settings.epochs}")

    pooled, texts, read = pair_features(clip, pairs, attention, progress)
    if pairs.sources:
        if resume and read != contents:
            raise ValueError(f"--resume: the checkpoint in {checkpoint} is of another run: its images' contents differ "
                             "from these (their names and sizes are the same; found as the features were computed, "
                             "before any training step)")
        run["pairs"]["contents"] = read
    step = make_train_step(optimizer)
    logit_scale = clip.params["logit_scale"]
    # A last batch of one pair is left out of its epoch: InfoNCE over one pair is 0, and an Adam step on its zero
    # gradient would still move the projections (momentum, weight decay).
    used = pairs.count - (pairs.count % settings.batch_size == 1)
    batches = math.ceil(used / settings.batch_size)
    loss = None
    with tqdm(total=settings.epochs * batches, initial=step_count, desc="train", unit="step",
              disable=not progress) as bar:
        for epoch in range(epoch, settings.epochs):
            order = epoch_order(settings, pairs.count, epoch)
            for start in range(0, used, settings.batch_size):
                index = order[start:start + settings.batch_size]
                projections, opt_state, loss = step(projections, opt_state, pooled[index], texts[index], logit_scale)
                step_count += 1
                bar.update()
                bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
            if not (np.isfinite(float(loss)) and all(np.isfinite(v).all() for v in projections.values())):
                # A resume is of the same settings, so it diverges again: a lower rate is a run in another --out.
                kept = (f"the checkpoint of epoch {epoch} is kept. A lower --learning-rate may help, in another --out "
                        f"(or once {checkpoint} is removed)") if epoch else \
                    "nothing was saved. A lower --learning-rate may help"
                raise ValueError(f"training diverged in epoch {epoch + 1} (loss {float(loss)}): the projections are "
                                 f"not finite; {kept}")
            save_checkpoint(checkpoint, projections, opt_state, {**run, "epoch": epoch + 1, "step": step_count})
    projections = jax.tree_util.tree_map(np.asarray, projections)
    path = save_projections(out / PROJECTIONS_FILE, projections, clip, {**run, "steps": step_count})
    return TrainResult(projections, path, step_count, None if loss is None else float(loss))


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(folder: pathlib.Path, projections: Projections, opt_state: Any, state: dict) -> None:
    """Projections, optimizer state (its leaves in order) and `state` (run, epoch, step) into a staged folder."""
    arrays = {f"projections/{k}": np.asarray(v) for k, v in projections.items()}
    arrays.update({f"optimizer/{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(opt_state))})
    with staged_folder(folder) as staging:
        write_safetensors(staging / "state.safetensors", arrays)
        (staging / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def load_checkpoint(folder: pathlib.Path, run: dict, projections: Projections,
                    opt_state: Any) -> tuple[Projections, Any, int, int, Optional[str]]:
    """(projections, optimizer state, epochs done, steps done, the digest of the images' contents it records) of a
    checkpoint of the same run; `projections` and `opt_state`, fresh ones, give the shapes and dtypes its arrays
    must have. Any difference of model, data or settings but the number of epochs is an error (`_compared`; the
    images' contents, known only once they are read, are the caller's to compare), and so is a checkpoint whose
    record cannot tell them (`_older`; one without the contents' digest only where nothing else differs)."""
    def damaged(why: str) -> ValueError:
        return ValueError(f"--resume: the checkpoint in {folder} is damaged ({why}); train afresh in another --out")

    # The arrays as save_checkpoint names them, with what they must be: a fresh run's shapes and dtypes.
    expected = {**{f"projections/{k}": v for k, v in projections.items()},
                **{f"optimizer/{i}": leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(opt_state))}}
    try:
        state = loads_json((folder / "state.json").read_text(encoding="utf-8"))
        arrays = safetensors.numpy.load_file(folder / "state.safetensors")
        loaded = {key: arrays[key] for key in expected}
        epoch, step = state["epoch"], state["step"]
    except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError) as err:
        raise damaged(f"{type(err).__name__}: {err}") from None
    for key, count in (("epoch", epoch), ("step", step)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise damaged(f"its {key} is {count!r}, not a count")
    for key, array in loaded.items():
        want = np.asarray(expected[key])
        if (array.shape, array.dtype) != (want.shape, want.dtype):
            raise damaged(f"{key} is {array.dtype} {array.shape}, not {want.dtype} {want.shape}")
        if not np.isfinite(array).all():
            raise damaged(f"{key} is not finite")
    if isinstance(state.get("pairs"), str):  # the layout before fingerprints: paths as spelt
        raise _older(folder, "record named the model, the data and the attention model by path alone")
    for key, what in (("model", "model fingerprint covered fewer weights"),
                      ("attention", "fingerprint of the attention model covered neither its config nor its weights "
                                    "whole")):
        if isinstance(state.get(key), dict) and is_v1_fingerprint(state[key].get("fingerprint")):
            raise _older(folder, what)
    ours, theirs = _compared(run), _compared({k: state.get(k) for k in run})
    changed = [f"{k} {theirs[k]!r} there, {ours[k]!r} here" + (
        " (it was written before an epoch's last batch of a single pair was left out, and stepped on it)"
        if k == "one_pair_batch" and theirs[k] is None else "") for k in ours if ours[k] != theirs[k]]
    if changed:
        raise ValueError(f"--resume: the checkpoint in {folder} is of another run: {'; '.join(changed)}")
    # A record without the images' contents is older only where all else is the same: one of another run (a run on
    # synthetic or in-memory pairs records none either) was refused above, for what differs.
    recorded = state["pairs"]
    if "contents" in run["pairs"] and not isinstance(recorded.get("contents"), str):
        raise _older(folder, "record compared the images by name and size alone")
    leaves = [loaded[f"optimizer/{i}"] for i in range(len(expected) - len(projections))]
    return ({k: loaded[f"projections/{k}"] for k in projections},
            jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(opt_state), leaves), epoch, step,
            recorded.get("contents"))


def _older(folder: pathlib.Path, why: str) -> ValueError:
    """A checkpoint whose record cannot tell what it was trained on: not resumed, whatever it was trained on."""
    return ValueError(f"--resume: the checkpoint in {folder} was written by an older tclip_jax, whose {why}, so it "
                      "cannot tell what it was trained on; train afresh in another --out")


def _compared(run: dict) -> dict:
    """What two runs must share for one to resume the other: every fingerprint, count and setting but the number
    of epochs, not origins and descriptions (a path spelt another way); the images' contents are compared once read
    (`_train`)."""
    described = ("origin", "source", "description", "contents")
    return {key: ({k: v for k, v in part.items() if k not in described and (key != "settings" or k != "epochs")}
                  if isinstance(part, dict) else part) for key, part in run.items()}
