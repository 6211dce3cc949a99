"""What does an image tower encode about one object (its shape, its colour), and do its patch tokens stay local?

    PYTHONPATH=. python training/image_tower_probe.py probe tclip_jax/data/default_model [FOLDER ...] [--random]
    PYTHONPATH=. python training/image_tower_probe.py position FOLDER [FOLDER ...]
    PYTHONPATH=. python training/image_tower_probe.py words tclip_jax/data/default_model [FOLDER ...] [--random]
    PYTHONPATH=. python training/image_tower_probe.py captions tclip_jax/data/default_model [FOLDER ...] [--scenes 40]
    PYTHONPATH=. python training/image_tower_probe.py boxes tclip_jax/data/default_model [FOLDER ...] [--scenes 20]
    PYTHONPATH=. python training/image_tower_probe.py supervised --label shape [colour] --steps 400
        [--set FIELD=VALUE ...] [--object-sizes MIN MAX] [--backgrounds NAME ...] [--easy-steps N] [--random-heads]

`probe`: a checkpoint's image tower, frozen, on `one_object_scenes` (PLAIN_STYLE, exactly one object): a
multinomial logistic regression (scikit-learn) per label and per feature, fitted on 1500 scenes, accuracy on 500
others. Features: the class-token embedding (CLIP's image embedding), the mean of the patch tokens after
`ln_post`, the projected patch token under the object's centre (the token TCLIP reads for the object), and the
projected patch token farthest from it that the object does not touch (if it reads the object as well, the tokens
carry the scene rather than their place, and a word's map need not peak on its object).
`--random` adds the architecture at initialisation (seed 0), the floor of what training added.

`position`: the share of the unit patch tokens' variance that is their grid position's mean token, over 64
held-out training-style scenes (`position_shares`): of the tokens TCLIP reads, and of the residual stream from the
tower's input through each block.

`words`: the probe's question asked of TCLIP's S: on the probe's 500 test scenes, how often the object's centre
patch token is closest (cosine) to the object's own shape word, colour word, or shape word inside
"a <colour> <shape>", among all shape or colour words (`word_accuracy`). A tower can carry shape (the probe) while
its S cannot find it (this). Then where the object's own bare word lies in S (`word_locality`): its cosine at the
object and on the background, and how often its highest patch touches the object.

`captions`: words inside captions against the same words alone (`caption_words`). On the captions
protocol's first held-out scenes, each colour and shape word's TCLIP map inside its caption against the same word
alone (as a prompt of its own) on the same image: the gate's pointing game for both, by the scene's object count;
how alike the maps of two words of one caption are (the Pearson correlation of their heatmaps), for words naming
the same object and words naming different ones; and how far the word's query inside the caption is from the bare
word's (cosine, and whether the bare word is its nearest of the words of its kind).

`boxes`: why boxes miss, by object size. On the captions and bare_words protocols' first held-out scenes (the
gates' scenes), the BoxAcc@0.5 of the checkpoint's TCLIP maps (default settings, the sweep's boxes and scorer) per
object size (`SIZE_BINS`: the side of a square of the area of the referent's box), beside two stand-in patch
scorers that know the object's mask, put through TCLIP's own translated copies, shift-back, trimmed mean and Otsu
box (`stand_in_map`): `coverage`, a patch's score is the share of its pixels that the object covers, and `presence`,
1 where the object touches the patch and 0 elsewhere. The first is what a patch scorer can give on this grid; the
second one that says only whether the object is in the patch, whatever share of it. And the model's own patch
scores by the share of the patch its object covers (`share_profile`: S of the untranslated image, 0 at the
untouched patches' median, 1 at the highest patch). And where each missed box lies (`miss_kind`): around its object,
or on another object, with the map's peak on the named object or not.

`supervised`: the training script's image tower (`train_default.model_config`, with `--set` overrides) trained
from scratch with a linear head and cross-entropy on the label of one-object scenes (AdamW, warmup then cosine,
batch 64), held-out accuracy on 300 scenes every 100 steps; with two labels, one head each and the sum of the
losses (does learning one label stop the other?); `--random-heads` starts the heads random instead of at zero.
It separates the objective from the architecture: if direct supervision does not teach the tower a label, no
contrastive caption loss of the same length will.
`--set stem_channels=16,32,64` gives the tower a convolutional stem. `--object-sizes` / `--backgrounds` narrow the
scenes (training and held-out alike); `--easy-steps N` draws the first N training batches from `EASY_OBJECTS`
(100-160 px objects on flat backgrounds), a curriculum.

Chance: 1/7 for shape (7 shapes), 1/6 for colour. Prints one JSON line per model or evaluation.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_default  # noqa: E402

from tclip_jax.checkpoints.load import load_clip  # noqa: E402
from tclip_jax.cli import CommandParser, OneLineErrors  # noqa: E402
from tclip_jax.evaluation.metrics import box_hit, pointing_game  # noqa: E402
from tclip_jax.image import clip_normalize, resize_rgb  # noqa: E402
from tclip_jax.methods.base import Query  # noqa: E402
from tclip_jax.methods.tclip import TCLIP  # noqa: E402
from tclip_jax.methods.tclip.relevance import aggregate_maps  # noqa: E402
from tclip_jax.methods.tclip.translations import translated_copies  # noqa: E402
from tclip_jax.model import CLIP, init_params, l2_normalize  # noqa: E402
from tclip_jax.synthetic import (BACKGROUNDS, COLOURS, HELDOUT_SEED_START, PLAIN_STYLE, SHAPES,  # noqa: E402
                                 TRAINING_STYLE, Style, heldout_seeds, make_scene, protocol_sample)

LABELS = {"shape": tuple(SHAPES), "colour": tuple(COLOURS)}
ONE_OBJECT = dataclasses.replace(PLAIN_STYLE, counts=(1,), count_weights=(1.0,))
EASY_OBJECTS = dataclasses.replace(ONE_OBJECT, size_range=(100.0, 160.0), backgrounds=("flat",))
PROBE_SEEDS = HELDOUT_SEED_START + 3_000_000   # probe scenes: their own held-out stream
PROBE_FIT_SCENES = 1500  # the probe fits on the first scenes of that stream and tests on those after them
SUPERVISED_TEST_SEEDS = HELDOUT_SEED_START + 5_000_000
SIZE_BINS = (0, 32, 48, 64, 96)  # `boxes`: bin edges of the object's side, pixels (the protocols' scenes are 224 px)
STAND_INS = ("coverage", "presence")
SHARE_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)  # `share_profile`: intervals of covered share, beside untouched patches
BOX_PROTOCOLS = ("captions", "bare_words")
MISS_KINDS = ("around", "elsewhere, peak on its object", "elsewhere, peak elsewhere")  # `boxes`: `miss_kind`


def one_object_scenes(count: int, start: int, size: int = 224, style: Style = ONE_OBJECT
                      ) -> tuple[np.ndarray, dict[str, np.ndarray], list]:
    """Images [count, size, size, 3], label indices per label name, and the scenes (for their masks)."""
    if style.counts != (1,):
        raise ValueError(f"one-object scenes need counts=(1,), got {style.counts}")
    scenes = [make_scene(start + i, size, style) for i in range(count)]
    labels = {name: np.array([values.index(getattr(s.objects[0], name)) for s in scenes]) for name, values in
              LABELS.items()}
    return np.stack([s.image for s in scenes]), labels, scenes


@functools.partial(jax.jit, static_argnames=("model", "intermediates"))
def encode_images(model: CLIP, params, images: jax.Array, intermediates: bool = False):
    """The image tower's output for uint8 images [B, H, W, 3] (compiled once per model and shape)."""
    return model.apply({"params": params}, clip_normalize(images), intermediates, method="encode_image")


def tower_features(model: CLIP, params, images: np.ndarray, scenes: list, chunk: int = 100) -> dict[str, np.ndarray]:
    """Per image: class-token embedding, mean patch token after ln_post, projected patch token at the object's
    centre (the grid cell holding the centroid of its mask) and at the cell farthest from it that the object does
    not touch (`far_cell`: does a token far from the object know what the object is?)."""
    features: dict[str, list] = {"class_embedding": [], "mean_patch": [], "centre_patch": [], "far_patch": []}
    for start in range(0, len(images), chunk):
        out = encode_images(model, params, images[start:start + chunk])
        tokens = np.asarray(out.tokens)
        features["class_embedding"].append(np.asarray(out.embeds))
        features["mean_patch"].append(np.asarray(out.tokens_normed[:, 1:]).mean(axis=1))
        for row, scene in enumerate(scenes[start:start + chunk]):
            mask = scene.objects[0].mask
            features["centre_patch"].append(tokens[row, 1 + centre_cell(mask, out.grid)][None])
            features["far_patch"].append(tokens[row, 1 + far_cell(mask, out.grid)][None])
    return {name: np.concatenate(parts) for name, parts in features.items()}


def centre_cell(mask: np.ndarray, grid: tuple[int, int]) -> int:
    """The row-major index of the grid cell that holds the centroid of `mask`."""
    ys, xs = np.nonzero(mask)
    cell_y, cell_x = int(ys.mean() * grid[0] / mask.shape[0]), int(xs.mean() * grid[1] / mask.shape[1])
    return cell_y * grid[1] + cell_x


def far_cell(mask: np.ndarray, grid: tuple[int, int]) -> int:
    """The row-major index of the cell that `mask` does not touch farthest from its centre cell (the first such
    in row-major order on a tie)."""
    centre_y, centre_x = divmod(centre_cell(mask, grid), grid[1])
    cells_y, cells_x = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    distance = np.where(touched_cells(mask, grid), -1, (cells_y - centre_y) ** 2 + (cells_x - centre_x) ** 2)
    return int(np.argmax(distance))


def touched_cells(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[cells] bool, row-major: the grid cells (the image split evenly, as the patches split it) that `mask`
    touches."""
    rows = np.array_split(np.arange(mask.shape[0]), grid[0])
    columns = np.array_split(np.arange(mask.shape[1]), grid[1])
    return np.array([mask[r[0]:r[-1] + 1, c[0]:c[-1] + 1].any() for r in rows for c in columns])


def probe(model: CLIP, params, train_count: int = PROBE_FIT_SCENES, test_count: int = 500) -> dict[str, float]:
    """Held-out accuracy of a linear probe per (label, feature)."""
    from sklearn.linear_model import LogisticRegression

    size = model.config.image_size  # the tower at its own input size, as TCLIP's `whole` protocol feeds it
    train_images, train_labels, train_scenes = one_object_scenes(train_count, PROBE_SEEDS, size)
    test_images, test_labels, test_scenes = one_object_scenes(test_count, PROBE_SEEDS + train_count, size)
    train_features = tower_features(model, params, train_images, train_scenes)
    test_features = tower_features(model, params, test_images, test_scenes)
    accuracy = {}
    for label in LABELS:
        for feature in train_features:
            classifier = LogisticRegression(max_iter=3000, C=10.0)
            classifier.fit(train_features[feature], train_labels[label])
            accuracy[f"{label}/{feature}"] = float(classifier.score(test_features[feature], test_labels[label]))
    return accuracy


def word_accuracy(clip, count: int = 500) -> dict[str, float]:
    """Zero-shot, with the text tower as the classifier: the share of `count` one-object scenes (the probe's test
    scenes) whose object's centre patch token (`tower_features`) has the highest cosine with the object's own word,
    among the bare shape words ("shape"), the bare colour words ("colour"), and the shape words of
    "a <colour> <shape>" for the object's colour ("shape_in_caption"). The words' vectors are TCLIP's queries for
    those prompts, so this is the linear probe's question asked of S itself."""
    method = TCLIP(clip)
    images, labels, scenes = one_object_scenes(count, PROBE_SEEDS + PROBE_FIT_SCENES, clip.config.image_size)
    patches = tower_features(clip.model, clip.params, images, scenes)["centre_patch"]

    def share_closest(words: Sequence[str], label: str) -> float:
        return float(np.mean((patches @ method.encode([Query(w) for w in words]).per_query.T).argmax(1)
                             == labels[label]))

    shapes, colours = LABELS["shape"], LABELS["colour"]
    captions = [f"a {colour} {shape}" for colour in colours for shape in shapes]
    in_caption = method.encode([Query(c, (len(c) - len(c.split()[-1]), len(c))) for c in captions]).per_query
    in_caption = in_caption.reshape(len(colours), len(shapes), -1)[labels["colour"]]  # [count, shapes, D]
    return {"shape": share_closest(shapes, "shape"), "colour": share_closest(colours, "colour"),
            "shape_in_caption": float(np.mean(np.einsum("nsd,nd->ns", in_caption, patches).argmax(1)
                                              == labels["shape"]))}


def word_locality(clip, count: int = 500) -> dict[str, float]:
    """Where S puts the object's own bare shape and colour word on the probe's test scenes (`<label>_...`): its
    mean cosine with the unit patch token at the object's centre (`at_object`, the patch `word_accuracy` reads) and
    with the patches the object does not touch (`background`), and the share of scenes whose highest patch touches
    the object (`peak_on_object`, the pointing game on the patch grid). A word can be the closest of its kind at
    the object and still peak on the background, where TCLIP's map then points."""
    method = TCLIP(clip)
    images, labels, scenes = one_object_scenes(count, PROBE_SEEDS + PROBE_FIT_SCENES, clip.config.image_size)
    outs = [encode_images(clip.model, clip.params, images[start:start + 100]) for start in range(0, count, 100)]
    patches = np.concatenate([np.asarray(l2_normalize(out.tokens[:, 1:])) for out in outs])
    touched = np.stack([touched_cells(scene.objects[0].mask, outs[0].grid) for scene in scenes])
    centres = [centre_cell(scene.objects[0].mask, outs[0].grid) for scene in scenes]
    result = {}
    for label, words in LABELS.items():
        queries = np.asarray(method.encode([Query(w) for w in words]).per_query)
        similarity = np.einsum("npd,nd->np", patches, queries[labels[label]])  # each scene's own word
        result[f"{label}_at_object"] = float(np.mean(similarity[np.arange(count), centres]))
        result[f"{label}_background"] = float(similarity[~touched].mean())
        result[f"{label}_peak_on_object"] = float(touched[np.arange(count), similarity.argmax(1)].mean())
    return result


def caption_words(clip, count: int = 40) -> dict:
    """A colour or shape word inside its caption against the same word alone, on the first `count` held-out scenes
    of the captions protocol (the gate's scenes), TCLIP with its default settings. Per word kind: the pointing
    game of the word's relevance map (the soft map, as the scorer reads it) inside the caption ("in_caption") and
    alone ("alone"), overall and by the scene's object count (`by_objects`: {count: [in_caption, alone, units]});
    the cosine of the word's query inside the caption with the bare word's (`cosine_to_alone`), and the share of
    words whose nearest bare word of their kind is their own (`own_alone_nearest`). `map_correlation`: the mean
    Pearson correlation of the heatmaps of two words of one caption that name the same object and that name
    different objects."""
    method = TCLIP(clip)
    vocabulary = {"colour": tuple(COLOURS), "shape": tuple(SHAPES)}
    alone_queries = {kind: np.asarray(method.encode([Query(w) for w in words]).per_query)
                     for kind, words in vocabulary.items()}
    hits = {kind: [] for kind in vocabulary}   # (objects, in caption, alone, cosine to alone, own alone nearest)
    correlations = {"same_object": [], "other_objects": []}
    for seed in heldout_seeds(count):
        sample = protocol_sample("captions", seed)
        units = [u for u in sample.units if u.kind in vocabulary]
        # The sweep's path: each word inside its caption, then each word alone, as queries mapped in one call.
        queries = method.encode([Query(u.prompt, u.span) for u in units] + [Query(u.word) for u in units])
        heatmaps, _ = method.image_maps(sample.image, queries)
        relevance = [host.soft for host in method.postprocess(heatmaps)]
        vectors = np.asarray(queries.per_query)
        for i, unit in enumerate(units):
            alone = alone_queries[unit.kind]
            cosines = alone @ vectors[i] / (np.linalg.norm(alone, axis=1) * np.linalg.norm(vectors[i]))
            own = vocabulary[unit.kind].index(unit.word)
            hits[unit.kind].append((len(sample.scene.objects), pointing_game(relevance[i], unit.gt_mask),
                                    pointing_game(relevance[len(units) + i], unit.gt_mask),
                                    cosines[own], int(cosines.argmax()) == own))
        for (i, first), (j, second) in itertools.combinations(enumerate(units), 2):
            if first.prompt == second.prompt:
                same = set(first.referents) == set(second.referents)
                correlations["same_object" if same else "other_objects"].append(
                    float(np.corrcoef(heatmaps[i].ravel(), heatmaps[j].ravel())[0, 1]))
    result = {"scenes": count}
    for kind, kind_hits in hits.items():
        table = np.array(kind_hits, np.float64)
        objects = table[:, 0].astype(int)
        result[kind] = {"units": len(table), "in_caption": table[:, 1].mean(), "alone": table[:, 2].mean(),
                        "by_objects": {int(n): [table[objects == n, 1].mean(), table[objects == n, 2].mean(),
                                                int((objects == n).sum())] for n in np.unique(objects)},
                        "cosine_to_alone": table[:, 3].mean(), "own_alone_nearest": table[:, 4].mean()}
    result["map_correlation"] = {name: float(np.mean(values)) for name, values in correlations.items()}
    return result


def patch_shares(masks, patch_size: int):
    """[..., gh, gw]: the share of each patch's pixels that `masks` [..., H, W] (whole patches; numpy or JAX)
    cover."""
    *lead, height, width = masks.shape
    return masks.reshape(*lead, height // patch_size, patch_size, width // patch_size, patch_size).mean(axis=(-3, -1))


def stand_in_map(mask: np.ndarray, scorer: str, patch_size: int, offsets: tuple[tuple[int, int], ...],
                 trim: float) -> np.ndarray:
    """TCLIP's aggregated map [H, W] of the object `mask` [H, W] (whole patches) under a stand-in patch scorer
    (`STAND_INS`): each translated copy's patch scores the share of its pixels the object covers (``coverage``) or
    1 where the object touches it (``presence``). The copies, shift-back and trimmed mean are TCLIP's own
    (`translated_copies`, `aggregate_maps` with one-dimensional patch embeddings and the query 1)."""
    if scorer not in STAND_INS:
        raise ValueError(f"scorer must be one of {STAND_INS}, got {scorer!r}")
    cover = patch_shares(translated_copies(jnp.asarray(mask, jnp.float32)[..., None], offsets)[..., 0], patch_size)
    scores = cover if scorer == "coverage" else (cover > 0).astype(jnp.float32)
    return np.asarray(aggregate_maps(scores.reshape(len(offsets), -1, 1), jnp.ones((1, 1)), offsets, cover.shape[1:],
                                     mask.shape, trim)[0])


def share_profile(scores: np.ndarray, mask: np.ndarray, others: np.ndarray, patch_size: int) -> dict[str, float]:
    """A word's patch scores `scores` [gh * gw] (row-major) by the share of each patch that its object `mask`
    [H, W] covers, rescaled so that 0 is the median over untouched patches and 1 the highest score: the mean
    per bin, "0" for untouched patches and "a-b" for shares in (a, b] (`SHARE_BINS`). Patches that another object
    (`others` [H, W]) touches are left out of every bin; empty bins are left out of the result."""
    share = patch_shares(mask, patch_size).ravel()
    free = patch_shares(others, patch_size).ravel() == 0
    floor = np.median(scores[(share == 0) & free])
    rescaled = (scores - floor) / (scores.max() - floor)
    bins = {"0": (share == 0) & free, **{f"{low:g}-{high:g}": (share > low) & (share <= high) & free
                                         for low, high in zip(SHARE_BINS, SHARE_BINS[1:])}}
    return {name: float(rescaled[chosen].mean()) for name, chosen in bins.items() if chosen.any()}


def miss_kind(box, gt_boxes: Sequence, peak_on_referent: bool) -> str:
    """Where a missed box (IoU < 0.5 with every referent box) lies (`MISS_KINDS`): ``around`` its object when it
    holds the centre of a referent's box (too large, or shifted), else ``elsewhere``, split by whether the map's
    peak is on a referent: then the named object scored highest, but another region of the Otsu foreground (another
    object) was the largest component."""
    x1, y1, x2, y2 = box
    if any(x1 <= (g[0] + g[2]) / 2 < x2 and y1 <= (g[1] + g[3]) / 2 < y2 for g in gt_boxes):
        return "around"
    return "elsewhere, peak on its object" if peak_on_referent else "elsewhere, peak elsewhere"


def box_sizes(clip, count: int = 20, protocols: Sequence[str] = BOX_PROTOCOLS) -> dict:
    """Per protocol, BoxAcc@0.5 of the checkpoint's TCLIP boxes ("model") and of the `STAND_INS` scorers' boxes
    over all units and per object-size bin (`SIZE_BINS`; "units" counts them), on the first `count` held-out
    scenes. A unit's size is the side of a square of its largest referent box's area. "share_profile": the units'
    mean `share_profile` per bin, with the patches of the objects the word does not name left out. "misses": the
    model's missed boxes by `miss_kind` (the peak: the heatmap's highest pixel, on a referent's silhouette)."""
    method = TCLIP(clip)
    patch, size = clip.config.patch_size, clip.config.image_size
    result: dict = {"scenes": count}
    for protocol in protocols:
        rows = []  # (side, model hit, one hit per stand-in)
        profiles: dict[str, list[float]] = {}
        misses = dict.fromkeys(MISS_KINDS, 0)
        for seed in heldout_seeds(count):
            sample = protocol_sample(protocol, seed)
            if sample.image.shape[:2] != (size, size):
                raise ValueError(f"boxes compares maps at the model input size ({size} px); {protocol} scenes "
                                 f"are {sample.image.shape[1]} x {sample.image.shape[0]}")
            units = sample.units
            queries = method.encode([Query(u.prompt, u.span) for u in units])
            heatmaps, patch_embeds = method.image_maps(sample.image, queries)
            boxes = {"model": [host.box for host in method.postprocess(heatmaps, soft_maps=False)]}
            scores = patch_embeds @ np.asarray(queries.per_query).T  # S [patches, units] of the untranslated copy
            for scorer in STAND_INS:
                maps = [stand_in_map(u.gt_mask, scorer, patch, method.offsets, method.settings.trim) for u in units]
                boxes[scorer] = [host.box for host in method.postprocess(maps, soft_maps=False)]
            for i, unit in enumerate(units):
                side = max((b[2] - b[0]) * (b[3] - b[1]) for b in unit.gt_boxes) ** 0.5
                rows.append((side, *(box_hit(boxes[name][i], unit.gt_boxes) for name in ("model", *STAND_INS))))
                if not rows[-1][1]:
                    peak = np.unravel_index(np.argmax(heatmaps[i]), heatmaps[i].shape)
                    misses[miss_kind(boxes["model"][i], unit.gt_boxes, bool(unit.gt_mask[peak]))] += 1
                others = np.zeros_like(unit.gt_mask)
                for index, item in enumerate(sample.scene.objects):
                    if index not in unit.referents:
                        others |= item.region
                for name, value in share_profile(scores[:, i], unit.gt_mask, others, patch).items():
                    profiles.setdefault(name, []).append(value)
        table = np.array(rows, np.float64)
        bins = np.searchsorted(SIZE_BINS, table[:, 0], side="right") - 1
        names = [f"{low}-{high}" for low, high in zip(SIZE_BINS, SIZE_BINS[1:])] + [f"{SIZE_BINS[-1]}+"]

        def accuracy(part: np.ndarray) -> dict:
            return {"units": len(part), **{name: part[:, 1 + j].mean() for j, name in enumerate(("model",
                                                                                                  *STAND_INS))}}

        result[protocol] = {"all": accuracy(table), "by_side": {names[b]: accuracy(table[bins == b])
                                                                  for b in np.unique(bins)},
                            "share_profile": {name: float(np.mean(values)) for name, values in profiles.items()},
                            "misses": misses}
    return result


def position_shares(model: CLIP, params, count: int = 64) -> dict[str, float]:
    """Per stage of the tower, the share of the unit patch tokens' variance that is their grid position's mean
    token, over `count` held-out TRAINING_STYLE scenes resized whole to the model's input: near 0 when each token
    describes its own patch, near 1 when it mostly says where the patch is (then a word's S is one pattern in every
    image). Stages: the residual stream entering the first block ("input"), after each block ("block_1", ...),
    and the projected tokens TCLIP reads ("output")."""
    size = model.config.image_size
    images = np.stack([resize_rgb(make_scene(seed, None, TRAINING_STYLE).image, (size, size))
                       for seed in range(HELDOUT_SEED_START, HELDOUT_SEED_START + count)])
    out = encode_images(model, params, images, intermediates=True)
    stages = {"input": out.residual_stream[0],
              **{f"block_{i}": stream for i, stream in enumerate(out.residual_stream[1:], 1)},
              "output": out.tokens}
    return {name: _position_share(np.asarray(tokens[:, 1:], np.float64)) for name, tokens in stages.items()}


def _position_share(tokens: np.ndarray) -> float:
    tokens = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    overall = tokens.mean(axis=(0, 1))
    total = ((tokens - overall) ** 2).sum(axis=-1).mean()
    return float(((tokens.mean(axis=0) - overall) ** 2).sum(axis=-1).mean() / total)


def supervised(config: train_default.TrainConfig, labels: Sequence[str], steps: int, batch_size: int = 64,
               peak_learning_rate: float = 1e-3, test_count: int = 300, every: int = 100,
               style: Style = ONE_OBJECT, easy_steps: int = 0, random_heads: bool = False):
    """Yields {step, loss, heldout_accuracy: {label: accuracy}} every `every` steps of supervised training of the
    image tower on `style` scenes (the first `easy_steps` batches from `EASY_OBJECTS`), one linear head per label
    and the sum of their cross-entropies; held out: `style` scenes.

    Heads start at zero (a zero head passes the tower no gradient until it has grown), or with `random_heads`
    from N(0, 1/embed_dim) (seeded by `config.seed`)."""
    clip_config = train_default.model_config(config)
    model = CLIP(clip_config)

    def head(key, label):
        shape = (clip_config.embed_dim, len(LABELS[label]))
        return jax.random.normal(key, shape) * shape[0] ** -0.5 if random_heads else jnp.zeros(shape)

    keys = jax.random.split(jax.random.PRNGKey(config.seed + 1), len(labels))
    params = {"clip": init_params(clip_config, config.seed),
              "heads": {label: head(key, label) for key, label in zip(keys, labels)}}
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak_learning_rate, min(50, steps // 4), steps)
    tx = optax.adamw(schedule, weight_decay=0.1)
    state = tx.init(params)

    def logits(p, images):
        embeds = encode_images(model, p["clip"], images).embeds
        return {label: embeds @ head for label, head in p["heads"].items()}

    def loss(p, images, targets):
        return sum(optax.softmax_cross_entropy_with_integer_labels(out, targets[label]).mean()
                   for label, out in logits(p, images).items())

    @jax.jit
    def step(p, s, images, targets):
        value, grads = jax.value_and_grad(loss)(p, images, targets)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    predict = jax.jit(lambda p, images: {label: jnp.argmax(out, axis=-1) for label, out in logits(p, images).items()})
    test_images, test_labels, _ = one_object_scenes(test_count, SUPERVISED_TEST_SEEDS, config.image_size, style)
    start = time.perf_counter()
    for index in range(steps):
        batch_style = EASY_OBJECTS if index < easy_steps else style
        images, batch_labels, _ = one_object_scenes(batch_size, index * batch_size, config.image_size, batch_style)
        params, state, value = step(params, state, images, {label: batch_labels[label] for label in labels})
        if (index + 1) % every == 0 or index + 1 == steps:
            predictions = predict(params, test_images)
            accuracy = {label: float((np.asarray(predictions[label]) == test_labels[label]).mean())
                        for label in labels}
            yield {"step": index + 1, "loss": float(value), "heldout_accuracy": accuracy,
                   "elapsed_s": time.perf_counter() - start}


def initialised():
    """The shipped models' architecture at initialisation (seed 0), with the CLIP tokenizer: the floor of what
    training added."""
    config = train_default.model_config(train_default.TrainConfig())
    return dataclasses.replace(load_clip(), model=CLIP(config), params=init_params(config, 0), origin="random")


def main() -> None:
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    probe_parser = commands.add_parser("probe", help="linear probes of checkpoints' frozen image towers")
    probe_parser.add_argument("folders", nargs="*", type=pathlib.Path)
    probe_parser.add_argument("--random", action="store_true", help="also the tower at initialisation")
    position_parser = commands.add_parser("position", help="how much of the patch tokens is their grid position")
    position_parser.add_argument("folders", nargs="+", type=pathlib.Path)
    words_parser = commands.add_parser("words", help="which word's text embedding the object's patch is closest to")
    words_parser.add_argument("folders", nargs="*", type=pathlib.Path)
    words_parser.add_argument("--random", action="store_true", help="also the model at initialisation")
    captions_parser = commands.add_parser("captions", help="words inside captions against the same words alone")
    captions_parser.add_argument("folders", nargs="+", type=pathlib.Path)
    captions_parser.add_argument("--scenes", type=int, default=40, help="held-out captions scenes (from the first)")
    boxes_parser = commands.add_parser("boxes", help="box accuracy by object size, beside stand-in patch scorers")
    boxes_parser.add_argument("folders", nargs="+", type=pathlib.Path)
    boxes_parser.add_argument("--scenes", type=int, default=20, help="held-out scenes per protocol (from the first)")
    sup = commands.add_parser("supervised", help="train the image tower on a label directly")
    sup.add_argument("--label", nargs="+", choices=tuple(LABELS), default=["shape"],
                     help="one label, or several trained together (one head each, their losses summed)")
    sup.add_argument("--steps", type=int, default=400)
    sup.add_argument("--learning-rate", type=float, default=1e-3)
    sup.add_argument("--set", nargs="*", action="extend", default=[], metavar="FIELD=VALUE",
                     help="TrainConfig overrides (may be repeated)")
    sup.add_argument("--object-sizes", nargs=2, type=float, metavar=("MIN", "MAX"),
                     default=ONE_OBJECT.size_range, help="object extent range, pixels at 224 px")
    sup.add_argument("--backgrounds", nargs="+", choices=BACKGROUNDS, default=ONE_OBJECT.backgrounds)
    sup.add_argument("--easy-steps", type=int, default=0, help="first N batches from EASY_OBJECTS")
    sup.add_argument("--random-heads", action="store_true", help="heads start random, not at zero")
    args = parser.parse_args()
    for folder in getattr(args, "folders", None) or []:  # all of them, before the first is probed
        if not folder.exists():
            parser.refuse(f"checkpoint folder {folder} not found")
    if args.command == "supervised":
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        if not 0 < args.learning_rate < math.inf:  # NaN too
            parser.error(f"--learning-rate must be finite and > 0, got {args.learning_rate:g}")
    try:
        run(parser, args)
    except (FileNotFoundError, ValueError) as err:  # a folder that is not a checkpoint, say: one line
        parser.refuse(str(err))


def run(parser: OneLineErrors, args: argparse.Namespace) -> None:
    if args.command == "probe":
        if not args.folders and not args.random:
            parser.error("probe needs a checkpoint folder or --random")
        for folder in args.folders:
            loaded = load_clip(folder)
            print(json.dumps({"model": str(folder), **probe(loaded.model, loaded.params)}), flush=True)
        if args.random:
            tower = initialised()
            print(json.dumps({"model": "random", **probe(tower.model, tower.params)}), flush=True)
    elif args.command == "position":
        for folder in args.folders:
            loaded = load_clip(folder)
            shares = position_shares(loaded.model, loaded.params)
            print(json.dumps({"model": str(folder), "position_share": shares["output"], "by_stage": shares}),
                  flush=True)
    elif args.command == "words":
        if not args.folders and not args.random:
            parser.error("words needs a checkpoint folder or --random")
        for folder in args.folders:
            clip = load_clip(folder)
            print(json.dumps({"model": str(folder), **word_accuracy(clip), **word_locality(clip)}), flush=True)
        if args.random:
            clip = initialised()
            print(json.dumps({"model": "random", **word_accuracy(clip), **word_locality(clip)}), flush=True)
    elif args.command == "captions":
        if args.scenes < 1:
            parser.error(f"--scenes must be >= 1, got {args.scenes}")
        for folder in args.folders:
            print(json.dumps({"model": str(folder), **caption_words(load_clip(folder), args.scenes)}), flush=True)
    elif args.command == "boxes":
        if args.scenes < 1:
            parser.error(f"--scenes must be >= 1, got {args.scenes}")
        for folder in args.folders:
            print(json.dumps({"model": str(folder), **box_sizes(load_clip(folder), args.scenes)}), flush=True)
    else:
        try:
            config = dataclasses.replace(train_default.TrainConfig(), **train_default.parse_overrides(args.set))
        except ValueError as error:
            parser.error(str(error))
        low, high = args.object_sizes
        if not 0 < low <= high < math.inf:  # NaN too
            parser.error(f"--object-sizes needs finite 0 < MIN <= MAX, got {low:g} {high:g}")
        if args.easy_steps < 0:
            parser.error(f"--easy-steps must be >= 0, got {args.easy_steps}")
        style = dataclasses.replace(ONE_OBJECT, size_range=(low, high), backgrounds=tuple(args.backgrounds))
        labels = tuple(dict.fromkeys(args.label))
        for record in supervised(config, labels, args.steps, peak_learning_rate=args.learning_rate, style=style,
                                 easy_steps=args.easy_steps, random_heads=args.random_heads):
            print(json.dumps({"labels": labels, **record}), flush=True)


if __name__ == "__main__":
    main()
