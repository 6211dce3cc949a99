"""Trains an embedded CLIP on synthetic scenes: a miniature of OpenAI CLIP, from images and captions only.

Architecture: `tclip_jax.model.CLIP` (OpenAI CLIP's, unchanged): pre-norm transformers, QuickGELU, 64-dim heads,
MLP ratio 4, the CLIP BPE tokenizer with its 77-token context and 49408-token vocabulary. Only the widths, depths,
patch size and input size are small (`TrainConfig`, `model_config`). `stem_channels` puts a convolutional stem
ahead of the patch embedding, which no released CLIP has (the default recipe has one, `RECIPES`).

Objectives (`--objective`):
- ``clip``: CLIP's symmetric InfoNCE on the global embeddings (class token, end-of-text token) with CLIP's learned
  temperature, and nothing else.
- ``clip_tokens``: the same plus token-level terms on the final-layer tokens: FILIP's late interaction, a
  per-piece image retrieval term (`token_losses`) and SPARC's within-caption fine-grained term
  (`fine_grained_loss`), as the first embedded model had.
No ground-truth mask or box is used by either. `word_weight` (3 in the default recipe, 0 in `clip_only`) adds
SuperClass's caption-word term to either (`word_loss`): the image embedding predicts its caption's word pieces
through a head that exists only in training; `patch_word_weight` the same term read from the patch tokens
(`patch_word_loss`: each piece scored by its best patch), through that head or, with `patch_word_head=text`, through
each piece's own text embedding (the term then acts on TCLIP's S), where `patch_word_compete` makes the pieces
compete for each patch first and `patch_word_pool=logsumexp` takes a soft maximum over the patches instead of the
best patch; `caption_word_weight` the same term with each caption piece's embedding inside its caption, against the
batch's other captions' pieces (`caption_word_targets`: it acts on the S of caption words);
`bare_anchor_weight` asks each caption piece, inside its caption, to pick its own bare embedding among the
vocabulary's (`bare_anchor_loss`), a text-side term; `pair_locality_weight` asks a scene and its variant to differ,
in the S of the word the variant changed, at few patches (`pair_locality_loss`), so that a word is scored where its
object is, with no mask; `mosaic_weight` asks four scenes shrunk to half size and tiled 2 x 2 to give each word a map
shaped like the scenes' own maps averaged over 2 x 2 patch blocks (`mosaic`, `map_correlation_loss`), so that a patch
showing part of an object scores in proportion to it (from step `mosaic_start` on); with `mosaic_student=full` the
term is read the other way: one scene in four, at full size, gives each word the map of its four quadrants enlarged
2 x 2 (`quadrant_zooms`), averaged over 2 x 2 patch blocks, so the tower is never asked to score shapes at half size;
`exclusive_weight` asks two distinct colour words, or two distinct shape words, of one caption (different objects)
for maps over its image that do not correlate (`exclusive_loss`), a separation meant for same-colour twins;
`bare_map_weight` asks each colour or shape word inside its caption for the map its bare word gives over the
caption's image (`bare_map_loss`), the bare word's map held fixed, so caption words land where bare words do (from
step `bare_map_start` on: 1800 in the default recipe), and with `bare_map_separation` not where the bare maps of the
caption's other words of that kind land; `peak_contrast_weight` asks each bare colour or shape word of a caption to
score its own map's peak over the caption's image above the peaks of the caption's other words of its kind
(`peak_contrast_loss`, from step `peak_contrast_start` on), so that its map does not light every object (the default
recipe: colour words, weight 10, from step 1800).

Batches (`batch`): B/2 training scenes (`make_scene(seed, size=None)`, TRAINING_STYLE: every background, outlined
objects, blur, JPEG, non-square sizes; the first `curriculum_steps` steps draw EASY_STYLE, 1-3 objects in plain
style, so colour and shape are learnt before clutter) and, next to each, `scene_variant`: the same scene with one
object's colour or shape changed, so every image has an image-side hard negative. Each scene also brings
`negatives` captions that differ from its caption in one attribute or binding (`negative_captions`, kept only when
also false of the variant): extra text columns for the image->text direction. `step_colours` (recipe search; 0 in
the shipped models) draws a step's objects from a few colours chosen for the step (`step_palette`). Images are
resized to the model input as TCLIP's `whole` protocol does (bicubic, the whole image, no crop). Batch i uses
training seeds [i * B/2, (i + 1) * B/2), so a run is determined by `TrainConfig`.

Validation retrieval (logged every `eval_every` steps by `evaluation.retrieval.retrieval_top1`, the benchmark's)
uses `retrieval_scenes(256, VALIDATION_OFFSET)`: held-out seeds far from those the gates use (offset 0). With
`select_step=validation` each evaluation also measures TCLIP's pointing game on validation captions and bare words
(the sweep's scorer, scenes from VALIDATION_OFFSET), and the checkpoint is the evaluated step with the best
`validation_record` score instead of the last step. With `ema_decay` both read a moving average of the parameters.

Run from the repository root (it also records the checkpoint's fast held-out gates, `heldout_metrics.json`):
    nice python training/train_default.py --recipe default --out tclip_jax/data/default_model
    nice python training/train_default.py --recipe clip_only --out tclip_jax/data/clip_only_model
(`--out DIR --heldout-only` records the gates alone, for a checkpoint whose run was stopped after training.)
`--out` must be new, empty (file-browser files aside) or a model folder this script wrote holding nothing but its
`MODEL_FILES` and a README.md model card, which saving keeps with its permissions; any other folder, the current
folder or one above it, and a `--save-state` PATH that cannot be written or lies in `--out` are refused before
training. A run holds a lock beside `--out` (`.NAME.lock`) until it ends: a second run into the same folder (this
script, a recipe search's run, `tclip convert`) is refused in one line. Ctrl-C exits 130, SIGTERM 143 and a write
that fails (a full disk) 2 with one line, leaving nothing half-written.
Without `--recipe`, TrainConfig's defaults are the first embedded models' (no stem, 4 blocks, 900 steps; with
`--objective clip_tokens` the first default model, with `clip` the first `clip_only`), to which the recipe search's
`--set` overrides are relative (`training/RECIPE_SEARCH.md`).

Recipe search on late terms: `--save-state STEP PATH` also writes the run's state after STEP steps (`RunState`:
parameters, optimiser state, moving average, the step selected so far, the log), and `--resume PATH` goes on from
it as if the run had not stopped (bit for bit on one machine), for any configuration that trains those first steps
alike: one that differs only in late terms, stem freezing (`stem_frozen_start`) or a schedule stretch
(`schedule_steps`, `schedule_stretch_start`: a longer late phase) starting at STEP or later (`prefix_config`), or
that keeps its last step where the saved run selected one by validation (its log keeps the saved steps' validation
scores). A resumed run's log and CPU time include the saved steps'.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tclip_jax.checkpoints.folder import CONFIG_FILE, FORMAT_NAME, PARAMS_FILES, is_checkpoint, save_checkpoint
from tclip_jax.checkpoints.load import LoadedClip, load_clip
from tclip_jax.cli import OneLineErrors, Terminated, redelivered_interrupts, sigterm_as_interrupt
from tclip_jax.evaluation.retrieval import retrieval_top1
from tclip_jax.files import (atomic_file, check_output_file, check_output_folder, check_replaceable, held_lock_beside,
                             read_npz, staged_folder, unwritten_entries)
from tclip_jax.model import CLIP, CLIPConfig, init_params, l2_normalize
from tclip_jax.image import clip_normalize, resize_rgb
from tclip_jax.synthetic import (
    ATTRIBUTES,
    COLOURS,
    HELDOUT_SEED_START,
    NEGATIVE_KINDS,
    PHRASE_FORMS,
    PLAIN_STYLE,
    SHAPES,
    TRAINING_STYLE,
    TRAIN_SEED_START,
    check_choices,
    make_scene,
    negative_captions,
    retrieval_scenes,
    scene_variant,
    train_seeds,
)
from tclip_jax.model.tokenizer import PAD_ID, default_tokenizer
from tclip_jax.methods.tclip import TCLIP
from tclip_jax.settings import Options, finite, integer, parse_float_tuple, parse_tuple, setting
from tclip_jax.sweep.heldout import (HELDOUT_METRICS_FILE, grounding_scores, record_heldout_metrics,
                                    synthetic_report)

VALIDATION_OFFSET = 1_000_000  # validation scenes: retrieval_scenes(n, VALIDATION_OFFSET)
LOG_FILE = "training_log.jsonl"
README_FILE = "README.md"
# What this script writes into a model folder (`train_and_save`, then `record_heldout_metrics`): saving a model
# again replaces these and keeps anything else there (a model card, README_FILE).
MODEL_FILES = (PARAMS_FILES[1], CONFIG_FILE, LOG_FILE, HELDOUT_METRICS_FILE)
OBJECTIVES = ("clip", "clip_tokens")
PATCH_WORD_HEADS = ("random", "text")
PATCH_WORD_POOLS = ("max", "logsumexp")
SELECT_STEPS = ("last", "validation")
MOSAIC_STUDENTS = ("half", "full")
VALIDATION_PROTOCOLS = ("captions", "bare_words")  # the grounding that select_step="validation" reads
WORD_IDF_STEPS = 16  # word_idf counts the captions of the run's first steps
CAPTION_POSITIONS = 46  # SOT, the pieces and EOT of the longest caption (or negative) the training styles write
# Curriculum: 1-3 objects on plain backgrounds, no outlines or degradations, square images, before the full style.
EASY_STYLE = dataclasses.replace(PLAIN_STYLE, counts=(1, 2, 3), count_weights=(0.4, 0.35, 0.25))


WORD_KINDS = ("colour", "shape")  # `word_kinds`' 1 and 2

# The weights of the terms beside CLIP's global loss: `clip_tokens`' three, and the word terms (0 = off).
TOKEN_TERMS = ("dense_weight", "token_weight", "fine_grained_weight")
WORD_TERMS = ("word_weight", "patch_word_weight", "caption_word_weight", "bare_anchor_weight", "pair_locality_weight",
              "mosaic_weight", "exclusive_weight", "bare_map_weight", "peak_contrast_weight")
# Word terms that may act only from a step on: {weight field: start field}; before it the step is as if the term
# were off (its weight 0).
LATE_TERMS = {"mosaic_weight": "mosaic_start", "bare_map_weight": "bare_map_start",
              "peak_contrast_weight": "peak_contrast_start"}
# Before its start a late term is off, and so are its parts: the values a config without the term accepts.
LATE_TERM_PARTS = {"mosaic_weight": {"mosaic_student": "half"}, "bare_map_weight": {"bare_map_separation": 0.0},
                   "peak_contrast_weight": {"peak_contrast_kinds": WORD_KINDS}}


@dataclasses.dataclass(frozen=True)
class TrainConfig(Options):
    """A training run (the module docstring). The scripts set its fields by `--set FIELD=VALUE` (`parse_assignments`)
    beside their own flags (`--objective`, `--steps`), so none is a flag here (`flag=False`); a model folder's header
    and a saved state record it as JSON (`to_dict`, read back by `from_dict`)."""

    objective: str = setting("clip", "the training objective", choices=OBJECTIVES, flag=False)
    seed: int = 0                   # parameter initialisation
    steps: int = 900
    curriculum_steps: int = 0       # the first steps draw EASY_STYLE scenes, then TRAINING_STYLE (see the card)
    curriculum_objects: int = 3     # curriculum scenes hold 1..curriculum_objects objects (EASY_STYLE's weights)
    curriculum_form_weights: tuple[float, ...] = setting((), "the curriculum's phrase forms; (): form_weights",
                                                         parse=parse_float_tuple, flag=False)
    curriculum_restart: int = setting(0, "1: the steps after the curriculum get a second warm-up and cosine decay",
                                      choices=(0, 1), flag=False)
    curriculum_objective: str = setting("", 'the curriculum\'s objective; "": objective', choices=("", *OBJECTIVES),
                                        flag=False)
    text_frozen_steps: int = 0      # the first steps keep the text tower at its initialisation
    text_init: str = ""             # a checkpoint folder of this script whose text tower starts the run
    batch_size: int = 64            # images: B/2 scenes and their variants
    negatives: int = 2              # hard-negative captions per scene
    variant_attributes: tuple[str, ...] = setting(ATTRIBUTES, "what a scene's variant may change",
                                                  parse=parse_tuple(str), flag=False)
    negative_kinds: tuple[str, ...] = setting(NEGATIVE_KINDS, "the changes a negative caption may make",
                                              parse=parse_tuple(str), flag=False)
    step_colours: int = 0           # k > 0: a step's scenes draw their colours from k of the COLOURS (`step_palette`)
    step_colours_rate: float = 1.0  # the share of steps so restricted
    # Caption phrase forms (colour+shape, shape+colour, shape only, colour only): TRAINING_STYLE's by default.
    form_weights: tuple[float, ...] = setting(TRAINING_STYLE.form_weights, "caption phrase form weights",
                                              parse=parse_float_tuple, flag=False)
    relation_rate: float = TRAINING_STYLE.relation_rate  # per join, a true relation phrase instead of "and"
    peak_learning_rate: float = 1e-3
    warmup_steps: int = 50          # linear warmup, then cosine decay to 0
    # k > 0, with schedule_stretch_start: the learning rate is that of a k-step run up to schedule_stretch_start, and
    # from there the rest of that run's schedule stretched over this run's remaining steps: a longer late phase at
    # the late phase's rates, whose first steps are the k-step run's (so it resumes from that run's saved state).
    schedule_steps: int = 0
    schedule_stretch_start: int = 0
    # > 0: from this step on, the convolutional stem and the patch embedding take no steps (no gradient, no weight
    # decay). On a CPU their gradients are about a third of a step (XLA's strided-convolution gradients), so a late
    # phase with the pixels' first layers kept runs about 1.5x the steps in the same time (neither run that spent
    # that time on more steps grounded better: RECIPE_SEARCH.md).
    stem_frozen_start: int = 0
    weight_decay: float = 0.1       # AdamW, on weight matrices only
    max_logit_scale: float = 4.6052  # log(100), CLIP's clamp
    dense_weight: float = 1.0       # clip_tokens: FILIP late interaction
    token_weight: float = 1.0       # clip_tokens: per-piece image retrieval
    fine_grained_weight: float = 1.0  # clip_tokens: SPARC's within-caption token-group loss
    word_weight: float = 0.0        # > 0: SuperClass's caption-word term beside the objective (`word_loss`)
    patch_word_weight: float = 0.0  # > 0: the same term read from the patch tokens (`patch_word_loss`)
    # Its head: "random" (word_weight's, shared) or "text" (each piece's own text embedding: the term acts on S).
    patch_word_head: str = setting("random", "the patch term's head", choices=PATCH_WORD_HEADS, flag=False)
    # 1: in the patch term each patch's piece scores are log-softmax-normalized over the pieces before the best patch
    # is taken, so words compete for patches: a patch that scores every piece alike (one that carries the whole
    # scene) scores none of them.
    patch_word_compete: int = setting(0, "1: pieces compete for patches", choices=(0, 1), flag=False)
    # How the patch term pools a piece's patch scores: "max" (its best patch) or "logsumexp" (a soft maximum, whose
    # gradient reaches every patch in proportion to its softmax weight, so the piece is trained on more of its
    # object than one patch).
    patch_word_pool: str = setting("max", "how the patch term pools patches", choices=PATCH_WORD_POOLS, flag=False)
    # > 0: the patch term with each caption piece's own in-caption embedding as its kernel (`caption_word_targets`).
    caption_word_weight: float = 0.0
    # > 0: each caption piece inside its caption must pick its own bare embedding among the vocabulary's
    # (`bare_anchor_loss`): ties the S of words in captions to that of bare words.
    bare_anchor_weight: float = 0.0
    # > 0: a scene and its variant must differ, in the S of the word the variant changed, at few patches
    # (`pair_locality_loss`): locality without a mask.
    pair_locality_weight: float = 0.0
    # > 0: the true scenes, four at a time, shrunk to half size and tiled 2 x 2 (`mosaic`), must give every counted
    # piece a map correlated with the four scenes' own maps averaged over 2 x 2 patch blocks (the patch the
    # shrunk copy shows; `block_mean_mosaic`), the full-size maps held fixed (`map_correlation_loss`): where an
    # object covers part of a patch, its word should score that patch in proportion, not as if the object filled it.
    mosaic_weight: float = 0.0
    mosaic_start: int = 0           # the mosaic term acts from this step on (e.g. curriculum_steps: full scenes only)
    # Which side of the mosaic term learns: "half" (the mosaic of half-size scenes, against the full-size maps) or
    # "full" (every fourth true scene at full size, against the tiled maps of its quadrants enlarged to full size).
    mosaic_student: str = setting("half", "which side of the mosaic term learns", choices=MOSAIC_STUDENTS,
                                  flag=False)
    # > 0: two distinct colour words of a caption name two different objects, as do two distinct shape words (an
    # object has one colour and one shape), so inside the caption their S over their own image's patches should not
    # coincide (`exclusive_loss`). Tried for same-colour twins, which no other term separates; it emptied the caption
    # words' maps instead (RECIPE_SEARCH.md).
    exclusive_weight: float = 0.0
    # > 0: each colour or shape word inside its caption must give, over the caption's image, the map its bare word
    # gives there (`bare_map_loss`), the bare word's map held fixed. Added because the patch term grounds bare words
    # and no term read the caption words TCLIP reads. From the start it met the wrong-object gate by making those words
    # ignore their caption, and the bare shape words moved; from step 1800, once the bare words ground, it met the
    # gate and they held: the default recipe since 2026-12-04 (RECIPE_SEARCH.md).
    bare_map_weight: float = 0.0
    bare_map_start: int = 0         # the bare-map term acts from this step on (the default recipe: 1800)
    # > 0: the bare-map term also asks each such word's map inside its caption not to correlate with the bare map of
    # another word of its kind in the caption (a shape word not with the other shape's bare map): the separation of
    # same-colour twins, read from the bare words' maps, which the patch term holds to their objects.
    bare_map_separation: float = 0.0
    # > 0: each bare colour or shape word of a caption must score, over the caption's image, its own map's peak above
    # the peaks of the caption's other words of its kind (`peak_contrast_loss`). Added because most missed boxes of
    # bare words lie on another object while the map peaks on the named one (`image_tower_probe.py boxes`): a map
    # that lights every object leaves Otsu's largest component to the largest object. The default recipe since
    # 2026-12-05: weight 10 from step 1800, colour words only (asking shape words too cost the twins gate: a shape's
    # peak can sit on its same-colour twin, and the term then holds it there; RECIPE_SEARCH.md).
    peak_contrast_weight: float = 0.0
    peak_contrast_start: int = 0    # the peak-contrast term acts from this step on
    peak_contrast_kinds: tuple[str, ...] = setting(WORD_KINDS, "the kinds of word the peak-contrast term asks",
                                                   parse=parse_tuple(str), flag=False)
    text_length: int = 48           # longest training row: captions need at most CAPTION_POSITIONS
    # 0: every step's rows are cut at text_length (the shipped models). k > 0: at the step's longest row rounded up
    # to a multiple of k, which makes clip_tokens steps ~30 % faster (recipe search) but changes the last bits.
    text_length_step: int = 0
    # > 0: validation and the checkpoint read an exponential moving average of the parameters instead of the
    # step's own (each step: average = ema_decay * average + (1 - ema_decay) * parameters; it starts at the
    # initialisation), which damps the step-to-step noise that moves the gates between evaluations and seeds.
    ema_decay: float = 0.0
    validation_scenes: int = 256
    eval_every: int = 100
    # "last": the checkpoint is the last step's parameters. "validation": the evaluated step (every eval_every steps
    # and the last) with the best `validation_record` score, read on validation scenes only; at patch 32 longer runs
    # traded grounding for retrieval (RECIPE_SEARCH.md), so the step is chosen by both.
    select_step: str = setting("last", "which step the checkpoint keeps", choices=SELECT_STEPS, flag=False)
    validation_grounding_scenes: int = 20  # select_step="validation": scenes per VALIDATION_PROTOCOLS protocol
    # Model geometry, widths and depths (everything else is OpenAI CLIP's).
    image_size: int = 224
    patch_size: int = 32
    stem_channels: tuple[int, ...] = setting((), "CLIPConfig.stem_channels: () is CLIP's linear patch embedding",
                                             parse=parse_tuple(int), flag=False)
    embed_dim: int = 64
    vision_width: int = 128
    vision_layers: int = 4
    text_width: int = 128
    text_layers: int = 3

    def __post_init__(self):  # checked once, where the config is made, rather than in training
        super().__post_init__()  # choices, types, and every float finite (NaN passes every comparison below)
        for name in ("form_weights", "curriculum_form_weights"):
            for weight in getattr(self, name):
                finite(name, weight)
        for name, least in (("seed", 0), ("steps", 1), ("curriculum_steps", 0), ("text_length_step", 0),
                            ("batch_size", 2), ("negatives", 0), ("validation_scenes", 1),
                            ("eval_every", 1), ("image_size", 1), ("patch_size", 1), ("embed_dim", 1),
                            ("vision_width", 64), ("vision_layers", 1), ("text_width", 64), ("text_layers", 1),
                            ("text_frozen_steps", 0), ("validation_grounding_scenes", 1)):
            integer(name, getattr(self, name), least)
        for name in (*TOKEN_TERMS, *WORD_TERMS, "bare_map_separation", "weight_decay", "max_logit_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("step_colours_rate", "relation_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.peak_learning_rate <= 0:
            raise ValueError(f"peak_learning_rate must be > 0, got {self.peak_learning_rate}")
        if self.text_length < CAPTION_POSITIONS:
            raise ValueError(f"text_length must be >= {CAPTION_POSITIONS} (the longest training caption's positions), "
                             f"got {self.text_length}")
        if not 1 <= self.curriculum_objects <= len(EASY_STYLE.counts):
            raise ValueError(f"curriculum_objects must be 1..{len(EASY_STYLE.counts)}, got {self.curriculum_objects}")
        if not 0 <= self.step_colours <= len(COLOURS):
            raise ValueError(f"step_colours must be 0..{len(COLOURS)}, got {self.step_colours}")
        check_choices("variant_attributes", self.variant_attributes, ATTRIBUTES)
        check_choices("negative_kinds", self.negative_kinds, NEGATIVE_KINDS)
        check_choices("peak_contrast_kinds", self.peak_contrast_kinds, WORD_KINDS)
        if self.batch_size % 2:
            raise ValueError(f"batch_size must be even (each scene beside its variant), got {self.batch_size}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size must be a multiple of patch_size, got {self.image_size} and "
                             f"{self.patch_size}")
        if len(self.form_weights) != len(PHRASE_FORMS) or min(self.form_weights) < 0 or not sum(self.form_weights):
            raise ValueError(f"form_weights must be {len(PHRASE_FORMS)} weights >= 0 (of {', '.join(PHRASE_FORMS)}), "
                             f"not all 0, got {self.form_weights}")
        if self.patch_word_compete and not self.patch_word_weight:
            raise ValueError("patch_word_compete needs patch_word_weight > 0")
        if self.patch_word_pool != "max" and not self.patch_word_weight:
            raise ValueError("patch_word_pool needs patch_word_weight > 0")
        if self.mosaic_student != "half" and not self.mosaic_weight:
            raise ValueError("mosaic_student needs mosaic_weight > 0")
        if self.bare_map_separation and not self.bare_map_weight:
            raise ValueError("bare_map_separation needs bare_map_weight > 0")
        if set(self.peak_contrast_kinds) != set(WORD_KINDS) and not self.peak_contrast_weight:
            raise ValueError("peak_contrast_kinds needs peak_contrast_weight > 0")
        if self.mosaic_weight and ((self.batch_size // 2) % 4 or (self.image_size // self.patch_size) % 2):
            raise ValueError("mosaic_weight needs batch_size / 2 a multiple of 4 (four scenes a mosaic) and an even "
                             f"patch grid, got batch_size {self.batch_size} and a "
                             f"{self.image_size // self.patch_size}-patch grid")
        for weight, start in LATE_TERMS.items():
            if getattr(self, start) and not (getattr(self, weight) and 0 < getattr(self, start) < self.steps):
                raise ValueError(f"{start} needs {weight} > 0 and 0 < {start} < steps, got {getattr(self, start)} "
                                 f"with {weight} {getattr(self, weight)} and {self.steps} steps")
        if (self.schedule_steps or self.schedule_stretch_start) and not (
                self.warmup_steps < self.schedule_stretch_start < min(self.schedule_steps, self.steps)):
            raise ValueError("schedule_steps and schedule_stretch_start go together, with warmup_steps < "
                             "schedule_stretch_start < schedule_steps and < steps, got "
                             f"{self.schedule_steps} and {self.schedule_stretch_start} with {self.steps} steps")
        if self.schedule_steps and self.curriculum_restart:
            raise ValueError("schedule_steps cannot be combined with curriculum_restart (one schedule or the other)")
        if not 0 <= self.stem_frozen_start < self.steps:
            raise ValueError(f"stem_frozen_start must be >= 0 (0: never) and < steps, got {self.stem_frozen_start} "
                             f"with {self.steps} steps")
        if self.curriculum_restart and not 0 < self.curriculum_steps < self.steps:
            raise ValueError(f"curriculum_restart needs 0 < curriculum_steps < steps, got {self.curriculum_steps} "
                             f"and {self.steps}")
        # Each cosine decay (`learning_rate_schedule`) needs steps after its warm-up.
        spans = ((self.curriculum_steps, self.steps - self.curriculum_steps) if self.curriculum_restart
                 else (self.schedule_steps or self.steps,))
        if not 0 <= self.warmup_steps < min(spans):
            raise ValueError(f"warmup_steps must be >= 0 and shorter than the {min(spans)} steps it warms up, got "
                             f"{self.warmup_steps}")
        model_config(self)  # the model's own checks (CLIPConfig: stem_channels, ...), before training builds it


# The shipped checkpoints' recipes (`--recipe NAME`): overrides of TrainConfig's defaults, which stay the first
# embedded models' (the recipe search's rows are relative to them). `clip_only` is still the first models' schedule:
# the default recipe with CLIP's loss alone (tried at 1800 steps) learnt less within the budget (RECIPE_SEARCH.md).
RECIPES = {
    "default": {"objective": "clip", "steps": 2400, "patch_size": 16, "stem_channels": (16, 32, 64),
                "vision_layers": 1, "curriculum_steps": 1200, "curriculum_objects": 1, "text_length_step": 8,
                "eval_every": 300, "word_weight": 3.0, "patch_word_weight": 3.0, "patch_word_head": "text",
                "select_step": "validation", "bare_map_weight": 3.0, "bare_map_start": 1800,
                "peak_contrast_weight": 10.0, "peak_contrast_start": 1800, "peak_contrast_kinds": ("colour",)},
    "clip_only": {"objective": "clip"},
}


def added_terms(config: dict) -> dict[str, float]:
    """{weight field: weight} of the terms a run trains with beside CLIP's global loss, from its configuration as
    a checkpoint records it (`TrainConfig.to_dict`). A run that predates a word term recorded no weight for it: the
    term did not exist, so it was off."""
    terms = {name: config[name] for name in TOKEN_TERMS} if config["objective"] == "clip_tokens" else {}
    return {**terms, **{name: config[name] for name in WORD_TERMS if config.get(name)}}


def train_config(recipe: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig's defaults, then `RECIPES[recipe]`, then `overrides` (field: value)."""
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; available: {', '.join(RECIPES)}")
    return TrainConfig.from_dict({**RECIPES.get(recipe, {}), **(overrides or {})})


def model_config(config: TrainConfig) -> CLIPConfig:
    """OpenAI's ViT design (64-dim heads, MLP ratio 4, QuickGELU, BPE vocabulary, 77 tokens) at a small size (a
    width of at least one head). ValueError, naming the field, for what CLIPConfig refuses."""
    return CLIPConfig(
        embed_dim=config.embed_dim, image_size=config.image_size, patch_size=config.patch_size,
        vision_width=config.vision_width, vision_layers=config.vision_layers,
        vision_heads=config.vision_width // 64, vision_mlp_dim=4 * config.vision_width,
        vocab_size=49408, context_length=77, text_width=config.text_width, text_layers=config.text_layers,
        text_heads=config.text_width // 64, text_mlp_dim=4 * config.text_width, activation="quick_gelu",
        stem_channels=config.stem_channels)


# ------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The TrainConfig fields a step's inputs are made from (`batch`, `step_inputs` read nothing else): runs that
    agree on them train on the same batches, which training/search_recipes.py makes once for all of them."""
    batch_size: int
    negatives: int
    curriculum_steps: int
    curriculum_objects: int
    curriculum_form_weights: tuple[float, ...]
    form_weights: tuple[float, ...]
    relation_rate: float
    step_colours: int
    step_colours_rate: float
    variant_attributes: tuple[str, ...]
    negative_kinds: tuple[str, ...]
    image_size: int
    text_length: int
    text_length_step: int


def data_config(config: TrainConfig | DataConfig) -> DataConfig:
    return DataConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(DataConfig)})


def batch(config: TrainConfig | DataConfig, step: int) -> tuple[np.ndarray, list[str], list[str]]:
    """(images [B, S, S, 3] uint8, their B captions, hard-negative captions) of training step `step`."""
    config = data_config(config)
    pairs = config.batch_size // 2
    if step < config.curriculum_steps:
        most = config.curriculum_objects
        base = dataclasses.replace(EASY_STYLE, counts=EASY_STYLE.counts[:most],
                                   count_weights=EASY_STYLE.count_weights[:most])
        forms = config.curriculum_form_weights or config.form_weights
    else:
        base, forms = TRAINING_STYLE, config.form_weights
    style = dataclasses.replace(base, form_weights=forms, relation_rate=config.relation_rate,
                                colours=step_palette(config, step))
    images, captions, negatives = [], [], []
    for seed in train_seeds(pairs, step * pairs):
        scene = make_scene(seed, None, style)
        variant = scene_variant(scene, seed, style, config.variant_attributes)
        if variant is None:  # no change keeps the objects distinct (rare): a scene of a far training seed instead,
            # half the training seeds on, wrapping round within them, so that it is never a held-out scene
            span = HELDOUT_SEED_START - TRAIN_SEED_START
            variant = make_scene(train_seeds(1, (seed - TRAIN_SEED_START + span // 2) % span)[0], None, style)
        square = (config.image_size, config.image_size)  # resized whole, as TCLIP's `whole` protocol feeds the model
        images += [resize_rgb(scene.image, square), resize_rgb(variant.image, square)]
        captions += [scene.caption, variant.caption]
        negatives += negative_captions(scene, seed, config.negatives, also_false_of=(variant.objects,),
                                       kinds=config.negative_kinds)
    taken = set(captions)
    negatives = [c for c in dict.fromkeys(negatives) if c not in taken]
    return np.stack(images), captions, negatives


def step_palette(config: DataConfig, step: int) -> tuple[str, ...]:
    """The colours the scenes of step `step` are drawn from: all COLOURS, or (`step_colours` = k, on a share
    `step_colours_rate` of steps) k of them drawn for the step, so that colour alone cannot tell most of the
    batch's scenes apart and only shape can. Variants and negative captions may still bring other colours."""
    if config.step_colours == 0:
        return tuple(COLOURS)
    rng = np.random.default_rng([step, 11])
    if rng.random() >= config.step_colours_rate:
        return tuple(COLOURS)
    chosen = set(rng.choice(len(COLOURS), size=config.step_colours, replace=False).tolist())
    return tuple(c for i, c in enumerate(COLOURS) if i in chosen)


def encode_captions(captions: list[str], length: int, step: int = 0) -> np.ndarray:
    """Token rows [N, length], or with `step` > 0 cut after the longest caption rounded up to a multiple of `step`.

    The text tower is causal, so the end-of-text token and every piece before it see no padding: cutting padding
    changes no embedding mathematically (most steps need 32 positions, not 48), only the summation order."""
    ids = default_tokenizer().encode(captions)
    needed = int((ids != PAD_ID).sum(axis=1).max())
    if needed > length:
        raise ValueError(f"a caption needs {needed} positions, more than text_length={length}")
    return ids[:, :min(length, -(-needed // step) * step) if step > 0 else length]


def step_inputs(config: TrainConfig | DataConfig, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """What training step `step` feeds the device: images, token rows (the captions, then the hard negatives,
    padded to a fixed count with masked rows, since a changing count recompiles), the mask of real text columns
    and the number of negatives."""
    config = data_config(config)
    images, captions, negatives = batch(config, step)
    rows = config.batch_size + config.batch_size // 2 * config.negatives
    texts = (captions + negatives)[:rows]
    token_ids = encode_captions(texts + [captions[0]] * (rows - len(texts)), config.text_length,
                                config.text_length_step)
    return images, token_ids, np.arange(rows) < len(texts), len(negatives)


# ------------------------------------------------------------------------------------------------ losses
def infonce(logits: jax.Array, texts: int, columns: jax.Array | None = None) -> jax.Array:
    """CLIP's symmetric loss with extra negative text columns: logits [images, texts + negatives], pair i is (i, i).

    image->text: cross-entropy over the columns where `columns` (bool) is set; text->image: over the images, for
    the `texts` true captions."""
    labels = jnp.arange(logits.shape[0])
    if columns is not None:
        logits = jnp.where(columns[None, :], logits, -1e9)
    image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits[:, :texts].T, labels).mean()
    return 0.5 * (image_to_text + text_to_image)


def piece_mask(token_ids: jax.Array, sot_id: int, eot_id: int) -> jax.Array:
    return ((token_ids != PAD_ID) & (token_ids != sot_id) & (token_ids != eot_id)).astype(jnp.float32)


def token_losses(text_tokens: jax.Array, pieces: jax.Array, patch_tokens: jax.Array, scale: jax.Array,
                 texts: int, columns: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(FILIP late-interaction InfoNCE, per-piece retrieval) on unit final-layer tokens.

    FILIP (Yao et al. 2022, text-to-image side): caption t scores image i by the mean over t's pieces of each
    piece's best cosine with i's patches; the symmetric InfoNCE (with the negative captions) runs on these scores.
    Per-piece retrieval: each piece of a true caption must find its own image by its best cosine alone."""
    best = jnp.einsum("tld,ind->tlin", text_tokens, patch_tokens).max(axis=-1)  # [T, L, I]
    weights = pieces / pieces.sum(axis=1, keepdims=True)
    dense = infonce(scale * jnp.einsum("tli,tl->it", best, weights), texts, columns)
    own = best[:texts]
    labels = jnp.broadcast_to(jnp.arange(texts)[:, None], own.shape[:2])
    per_piece = optax.softmax_cross_entropy_with_integer_labels(scale * own, labels)
    return dense, (per_piece * pieces[:texts]).sum() / pieces[:texts].sum()


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


def fine_grained_loss(text_tokens: jax.Array, pieces: jax.Array, patch_tokens: jax.Array,
                      scale: jax.Array) -> jax.Array:
    """SPARC's fine-grained loss (Bica et al. 2024) within each caption (true captions and their own images).

    Each piece token is grouped with the weighted mean of its patches (`group_weights`); every piece must pick
    out its own group among the groups of the caption's pieces, and every group its piece (one-hot targets,
    as SPARC). text_tokens [B, L, D], patch_tokens [B, N, D] unit rows.
    """
    weights = group_weights(text_tokens, patch_tokens)
    groups = l2_normalize(jnp.einsum("bln,bnd->bld", weights, patch_tokens))
    valid = (pieces[:, :, None] * pieces[:, None, :]) > 0
    logits = jnp.where(valid, scale * jnp.einsum("bld,bkd->blk", text_tokens, groups), -1e9)  # token l, group k
    diagonal = jnp.diagonal(logits, axis1=1, axis2=2)
    token_to_group = jax.nn.logsumexp(logits, axis=2) - diagonal
    group_to_token = jax.nn.logsumexp(logits, axis=1) - diagonal
    return 0.5 * ((token_to_group + group_to_token) * pieces).sum() / pieces.sum()


def word_idf(config: TrainConfig) -> np.ndarray:
    """[vocab] inverse document frequency log(N / df) of each piece over the N true captions of the run's first
    WORD_IDF_STEPS steps; 0 for pieces they never use (SuperClass weights its targets so). Read-only, and made once
    per process for runs that draw the same batches (their `DataConfig`): a recipe search's runs, a resumed run's
    check and its training (drawing the scenes is most of its cost)."""
    return _word_idf(data_config(config), model_config(config).vocab_size)


@functools.lru_cache(maxsize=16)
def _word_idf(data: DataConfig, vocab_size: int) -> np.ndarray:
    tokenizer = default_tokenizer()
    ids = tokenizer.encode([c for step in range(WORD_IDF_STEPS) for c in batch(data, step)[1]])
    pieces = np.asarray(piece_mask(ids, tokenizer.sot_id, tokenizer.eot_id)) > 0
    counts = np.zeros(vocab_size)
    for row, keep in zip(ids, pieces):
        counts[np.unique(row[keep])] += 1
    idf = np.where(counts > 0, np.log(len(ids) / np.maximum(counts, 1)), 0.0).astype(np.float32)
    idf.setflags(write=False)  # shared by the runs that asked for it
    return idf


def word_targets(token_ids: jax.Array, pieces: jax.Array, idf: np.ndarray) -> jax.Array:
    """[B, vocab] SuperClass's targets: each caption's bag of pieces (token_ids and pieces [B, L]) weighted by
    `idf` and normalized to sum 1."""
    rows = jnp.arange(token_ids.shape[0])[:, None]
    bag = jnp.zeros((token_ids.shape[0], idf.shape[0])).at[rows, token_ids].add(pieces) * idf
    return bag / bag.sum(axis=1, keepdims=True)


def word_loss(image_embeds: jax.Array, kernel: jax.Array, targets: jax.Array) -> jax.Array:
    """SuperClass's classification loss (Huang et al. 2024): each image predicts its caption's word pieces with one
    softmax over the vocabulary (logits: image embedding @ `kernel` [D, vocab]) against `word_targets`."""
    return optax.softmax_cross_entropy(image_embeds @ kernel, targets).mean()


def patch_word_loss(patch_tokens: jax.Array, kernel: jax.Array, targets: jax.Array,
                    valid: jax.Array | None = None, compete: bool = False, pool: str = "max") -> jax.Array:
    """`word_loss` read from the patch tokens [B, P, D], so that a caption's pieces must be found somewhere in the
    image rather than only in its class embedding: a piece's logit is its best patch's (patch token @ `kernel`
    [D, U]), as in multiple-instance learning; one softmax over the U pieces scored (`targets` [B, U]), or over
    those `valid` [B, U] marks. With `compete`, each patch's scores are first log-softmax-normalized over the U
    pieces, so a piece's logit is its log-probability at the patch where it dominates most. `pool="logsumexp"`
    replaces the best patch by log(mean_p exp(score_p)), a soft maximum over the patches."""
    scores = patch_tokens @ kernel
    if compete:
        scores = jax.nn.log_softmax(scores, axis=-1)
    if pool == "logsumexp":
        logits = jax.nn.logsumexp(scores, axis=1) - np.log(scores.shape[1])
    else:
        logits = jnp.max(scores, axis=1)
    if valid is not None:
        logits = jnp.where(valid, logits, -1e9)
    return optax.softmax_cross_entropy(logits, targets).mean()


def caption_word_targets(token_ids: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets, valid) [B, B * L] of `patch_word_loss` whose kernel holds every piece of the B true captions
    ([B, L] rows, flattened caption by caption), each as its own caption's token embedding; `weights` [B, L] are
    the pieces' IDF (`caption_weights`), 0 for pieces not counted.

    Image i must pick its own caption's pieces (IDF-weighted, as `word_targets`) over the other captions' pieces.
    A piece whose id is also in caption i is no word to beat for image i (the batch repeats words), so it is left
    out of i's softmax, as are pieces the IDF does not count."""
    captions = token_ids.shape[0]
    own = jnp.eye(captions, dtype=bool)[:, :, None]  # [i, c, 1]
    # in_caption[i, c, l]: piece (c, l) has an id that caption i counts
    in_caption = ((token_ids[:, :, None, None] == token_ids[None, None]) & (weights[:, :, None, None] > 0)).any(1)
    valid = (weights[None] > 0) & (own | ~in_caption)
    targets = jnp.where(own, weights[None], 0.0)
    targets = targets / targets.sum(axis=(1, 2), keepdims=True)
    return targets.reshape(captions, -1), valid.reshape(captions, -1)


def caption_weights(token_ids: jax.Array, pieces: jax.Array, idf: np.ndarray) -> jax.Array:
    """[B, L] each caption piece's IDF (`word_idf`), 0 where `pieces` [B, L] is 0: what the word terms count."""
    return pieces * jnp.asarray(idf)[token_ids]


def pair_partner(x: jax.Array) -> jax.Array:
    """`x` with rows 2i and 2i + 1 swapped: each scene's variant in its place, and the variant's scene in its."""
    return x.reshape(-1, 2, *x.shape[1:])[:, ::-1].reshape(x.shape)


def vocab_index(vocab: np.ndarray, token_ids: jax.Array) -> jax.Array:
    """Each id's place in the sorted ids `vocab` (ids not in it get a valid place; callers weight them 0)."""
    return jnp.clip(jnp.searchsorted(jnp.asarray(vocab), token_ids), 0, len(vocab) - 1)


def bare_anchor_loss(caption_tokens: jax.Array, token_ids: jax.Array, weights: jax.Array, bare: jax.Array,
                     vocab: np.ndarray, scale: jax.Array) -> jax.Array:
    """Each caption piece, as its unit embedding inside its caption (`caption_tokens` [B, L, D], ids `token_ids`
    [B, L]), must pick its own bare embedding among `bare` [U, D] (`piece_embeddings` of the sorted ids `vocab`
    [U]): InfoNCE on `scale` times their cosines, averaged with `weights` [B, L] (0 for pieces not counted). A piece
    whose S row equals its bare word's is grounded wherever the bare word is."""
    per_piece = optax.softmax_cross_entropy_with_integer_labels(scale * caption_tokens @ bare.T,
                                                                 vocab_index(vocab, token_ids))
    return (per_piece * weights).sum() / weights.sum()


def changed_pieces(token_ids: jax.Array, weights: jax.Array) -> jax.Array:
    """[B, L] bool: the counted pieces (`weights` > 0) of each caption of a scene / variant pair (rows 2i and
    2i + 1, as `batch` puts them) whose id the pair's other caption lacks: the word the variant changed. Pairs where
    either caption has more than one such piece (a stand-in scene of a far seed, not a variant) have none."""
    changed = (weights > 0) & ~(token_ids[:, :, None] == pair_partner(token_ids)[:, None, :]).any(axis=2)
    one_word = (changed.sum(axis=1) <= 1).reshape(-1, 2).all(axis=1).repeat(2)
    return changed & one_word[:, None]


def pair_locality_loss(patch_tokens: jax.Array, bare: jax.Array, vocab: np.ndarray, token_ids: jax.Array,
                       weights: jax.Array) -> jax.Array:
    """A scene and its variant (images 2i and 2i + 1, unit patch tokens [B, P, D]) differ in one object, so the S
    of the word the variant changed (`changed_pieces`; bare embeddings `bare` [U, D] of the sorted ids `vocab`)
    should differ between the two at that object's patches alone. Per changed piece, with d_p the image's S at patch
    p minus its partner's: mean_p |d_p| - max_p d_p, lowest when the difference sits at few patches and is large
    there (0 when it is the same positive value everywhere, or 0); averaged with `weights` [B, L]."""
    scores = patch_tokens @ bare.T  # [B, P, U]
    difference = scores - pair_partner(scores)
    d = jnp.take_along_axis(difference, vocab_index(vocab, token_ids)[:, None, :], axis=2)  # [B, P, L]
    per_piece = jnp.abs(d).mean(axis=1) - d.max(axis=1)
    counted = changed_pieces(token_ids, weights) * weights
    return (per_piece * counted).sum() / jnp.maximum(counted.sum(), 1e-9)


def mosaic(images: jax.Array) -> jax.Array:
    """[N / 4, S, S, C]: images [N, S, S, C] (N a multiple of 4) shrunk to half size (linear, antialiased) and tiled
    2 x 2, image 4m + 2r + c at row r, column c of mosaic m."""
    count, size, _, channels = images.shape
    half = jax.image.resize(images, (count, size // 2, size // 2, channels), "linear", antialias=True)
    return tile_quarters(half)


def quadrant_zooms(images: jax.Array) -> jax.Array:
    """[4N, S, S, C]: the quadrants of images [N, S, S, C] enlarged 2 x 2 (linear), quadrant (r, c) of image n at
    4n + 2r + c, the order `tile_quarters` tiles back."""
    count, size, _, channels = images.shape
    half = size // 2
    quarters = images.reshape(count, 2, half, 2, half, channels).swapaxes(2, 3).reshape(4 * count, half, half, channels)
    return jax.image.resize(quarters, (4 * count, size, size, channels), "linear")


def tile_quarters(quarters: jax.Array) -> jax.Array:
    """[N / 4, 2h, 2w, ...] from [N, h, w, ...]: item 4m + 2r + c at row r, column c of tile m."""
    count, height, width = quarters.shape[:3]
    rest = quarters.shape[3:]
    tiles = quarters.reshape(count // 4, 2, 2, height, width, *rest).swapaxes(2, 3)
    return tiles.reshape(count // 4, 2 * height, 2 * width, *rest)


def block_mean_mosaic(maps: jax.Array) -> jax.Array:
    """[N / 4, G, G, U]: maps [N, G, G, U] of full-size images averaged over 2 x 2 patch blocks (what one patch of
    the half-size copy shows) and tiled as `mosaic` tiles the images."""
    count, grid, _, pieces = maps.shape
    return tile_quarters(maps.reshape(count, grid // 2, 2, grid // 2, 2, pieces).mean(axis=(2, 4)))


def map_correlation_loss(student: jax.Array, teacher: jax.Array, present: jax.Array) -> jax.Array:
    """1 - the Pearson correlation over the patches between an image's map of a piece (`student` [M, ..., U], the
    patch axes between the first and the last) and its target (`teacher`, the same shape), averaged over the
    (image, piece) pairs `present` [M, U] marks. A correlation, because TCLIP's box (Otsu) and soft map read a map's
    shape, not its offset or scale."""
    student = student.reshape(student.shape[0], -1, student.shape[-1])
    teacher = teacher.reshape(student.shape)
    student = student - student.mean(axis=1, keepdims=True)
    teacher = teacher - teacher.mean(axis=1, keepdims=True)
    correlation = (student * teacher).sum(axis=1) * jax.lax.rsqrt(
        (student ** 2).sum(axis=1) * (teacher ** 2).sum(axis=1) + 1e-12)
    return ((1 - correlation) * present).sum() / jnp.maximum(present.sum(), 1)


@functools.cache
def word_kind_ids() -> tuple[np.ndarray, np.ndarray]:
    """(colour ids, shape ids): the one BPE piece of each synthetic colour word and of each shape word."""
    tokenizer = default_tokenizer()
    kinds = []
    for words in (tuple(COLOURS), SHAPES):
        rows = tokenizer.encode(list(words))
        if ((rows != PAD_ID).sum(axis=1) != 3).any():  # <sot> piece <eot>
            raise ValueError(f"every word of {words} must be one BPE piece")
        kinds.append(rows[:, 1])
    return kinds[0], kinds[1]


def word_kinds(token_ids: jax.Array) -> jax.Array:
    """[B, L] int: 1 at colour-word pieces, 2 at shape-word pieces (`word_kind_ids`), 0 elsewhere."""
    colour_ids, shape_ids = word_kind_ids()
    return jnp.where(jnp.isin(token_ids, colour_ids), 1, jnp.where(jnp.isin(token_ids, shape_ids), 2, 0))


def exclusive_loss(caption_tokens: jax.Array, patch_tokens: jax.Array, token_ids: jax.Array) -> jax.Array:
    """Distinct words of one kind in a caption name different objects (`word_kinds`: distinct colours, distinct
    shapes), so their maps over the caption's own image should not coincide: the mean, over every pair of caption
    positions holding distinct ids of one kind, of max(0, the Pearson correlation over the patches of their S).
    caption_tokens [B, L, D] (inside their captions, ids `token_ids` [B, L]) and patch_tokens [B, P, D], unit rows.
    Correlation, not cosine, as `map_correlation_loss`: TCLIP reads a map's shape; above 0 only, since two objects
    on a background leave the two maps near 0, not -1."""
    maps = standardized(jnp.einsum("bld,bpd->blp", caption_tokens, patch_tokens))
    correlation = jnp.einsum("blp,bkp->blk", maps, maps)
    pairs = distinct_pairs_of_a_kind(token_ids)
    return (jax.nn.relu(correlation) * pairs).sum() / jnp.maximum(pairs.sum(), 1)


def standardized(maps: jax.Array) -> jax.Array:
    """Maps [..., P] centred and scaled to unit norm over their last (patch) axis: dot products are Pearson
    correlations."""
    maps = maps - maps.mean(axis=-1, keepdims=True)
    return maps * jax.lax.rsqrt((maps ** 2).sum(axis=-1, keepdims=True) + 1e-12)


def distinct_pairs_of_a_kind(token_ids: jax.Array) -> jax.Array:
    """[B, L, L] bool: positions l, k of a caption holding distinct pieces of one kind (`word_kinds`: two colours,
    or two shapes), which name different objects."""
    kinds = word_kinds(token_ids)
    return ((kinds[:, :, None] == kinds[:, None, :]) & (kinds[:, :, None] > 0)
            & (token_ids[:, :, None] != token_ids[:, None, :]))


def bare_map_loss(caption_tokens: jax.Array, patch_tokens: jax.Array, token_ids: jax.Array, bare: jax.Array,
                  vocab: np.ndarray, weights: jax.Array, separation: float = 0.0) -> jax.Array:
    """Each colour or shape piece inside its caption (`word_kinds`, counted: `weights` [B, L] > 0) should give, over
    its caption's own image, the map its bare word gives there: `map_correlation_loss` between the two S rows over
    the patches. With `separation` s > 0, plus s times the mean, over the counted pairs of distinct pieces of one
    kind in a caption (`distinct_pairs_of_a_kind`), of max(0, the correlation of one's map inside the caption with
    the other's bare map). caption_tokens [B, L, D] (inside their captions, ids `token_ids` [B, L]), patch_tokens
    [B, P, D] and `bare` [U, D] (`piece_embeddings` of the sorted ids `vocab` [U]), unit rows."""
    student = jnp.einsum("bld,bpd->bpl", caption_tokens, patch_tokens)
    teacher = jnp.take_along_axis(patch_tokens @ bare.T, vocab_index(vocab, token_ids)[:, None, :], axis=2)
    counted = (word_kinds(token_ids) > 0) & (weights > 0)
    match = map_correlation_loss(student, teacher, counted)
    if not separation:
        return match
    correlation = jnp.einsum("blp,bkp->blk", standardized(jnp.swapaxes(student, 1, 2)),
                             standardized(jnp.swapaxes(teacher, 1, 2)))
    pairs = distinct_pairs_of_a_kind(token_ids) & counted[:, :, None] & counted[:, None, :]
    return match + separation * (jax.nn.relu(correlation) * pairs).sum() / jnp.maximum(pairs.sum(), 1)


def first_occurrences(token_ids: jax.Array) -> jax.Array:
    """[B, L] bool: positions whose id no earlier position of the caption holds."""
    same = token_ids[:, :, None] == token_ids[:, None, :]
    earlier = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)
    return ~(same & earlier).any(axis=2)


def peak_contrast_loss(patch_tokens: jax.Array, bare: jax.Array, vocab: np.ndarray, token_ids: jax.Array,
                       weights: jax.Array, scale: jax.Array, kinds: tuple[str, ...] = WORD_KINDS) -> jax.Array:
    """Distinct words of one kind in a caption name different objects (`distinct_pairs_of_a_kind`), and each bare
    word's map over the caption's image peaks on its object once the patch term grounds it. So each bare word (each
    counted colour or shape piece, `weights` [B, L] > 0, once per caption) must score the peak of its own map above
    the peaks of the caption's other words of its kind: InfoNCE over those peaks of `scale` times its S, the peaks'
    patches (each bare map's argmax) held fixed; the mean over the words that have another of their kind, of the
    `kinds` asked (`WORD_KINDS`).
    patch_tokens [B, P, D] and `bare` [U, D] (`piece_embeddings` of the sorted ids `vocab` [U]), unit rows."""
    maps = jnp.take_along_axis(patch_tokens @ bare.T, vocab_index(vocab, token_ids)[:, None, :], axis=2)  # [B, P, L]
    peaks = jnp.argmax(jax.lax.stop_gradient(maps), axis=1)                                             # [B, L]
    at_peaks = jnp.swapaxes(jnp.take_along_axis(maps, peaks[:, :, None], axis=1), 1, 2)  # [b, l, k]: S_l at k's peak
    asked = jnp.isin(word_kinds(token_ids), np.array([1 + WORD_KINDS.index(k) for k in kinds]))
    counted = asked & (weights > 0) & first_occurrences(token_ids)
    pairs = distinct_pairs_of_a_kind(token_ids) & counted[:, :, None] & counted[:, None, :]
    rows = pairs.any(axis=2)
    candidates = pairs | (jnp.eye(token_ids.shape[1], dtype=bool) & rows[:, :, None])
    logits = jnp.where(candidates, scale * at_peaks, -jnp.inf)
    own = scale * jnp.diagonal(at_peaks, axis1=1, axis2=2)
    per_word = jnp.where(rows, jax.nn.logsumexp(jnp.where(rows[:, :, None], logits, 0.0), axis=2) - own, 0.0)
    return per_word.sum() / jnp.maximum(rows.sum(), 1)


def piece_embeddings(model: CLIP, params: dict, pieces: np.ndarray, sot_id: int, eot_id: int) -> jax.Array:
    """[U, D] unit text-tower embeddings of each piece alone (its position in "<sot> piece <eot>"): the rows of
    TCLIP's S for a bare one-piece word."""
    rows = np.stack([np.full(len(pieces), sot_id), pieces, np.full(len(pieces), eot_id)], axis=1)
    return l2_normalize(model.apply({"params": params}, jnp.asarray(rows), method="encode_text").tokens[:, 1])


def clip_params(params: dict) -> dict:
    """The CLIP parameters of a training state (without the training-only word head)."""
    return {name: value for name, value in params.items() if name != "word_head"}


def losses(params, model: CLIP, images_u8: jax.Array, token_ids: jax.Array, columns: jax.Array, sot_id: int,
           eot_id: int, config: TrainConfig, objective: str,
           idf: np.ndarray | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective on one batch: images [B, S, S, 3] uint8, token rows [B + N, L] (true captions, then negatives),
    `columns` [B + N] bool (False for padding rows). With a word term (`WORD_TERMS`), `idf` is `word_idf`'s, and
    params also hold "word_head" (not a CLIP parameter) if a term uses the random head."""
    texts = images_u8.shape[0]
    head = params.get("word_head")
    params = clip_params(params)
    image = model.apply({"params": params}, clip_normalize(images_u8), method="encode_image")
    text = model.apply({"params": params}, token_ids, method="encode_text")
    scale = jnp.exp(params["logit_scale"])
    clip_loss = infonce(scale * l2_normalize(image.embeds) @ l2_normalize(text.embeds).T, texts, columns)
    metrics = {"clip_loss": clip_loss, "logit_scale": scale}
    total = clip_loss
    if objective == "clip_tokens":
        text_tokens, patch_tokens = l2_normalize(text.tokens), l2_normalize(image.tokens[:, 1:])
        pieces = piece_mask(token_ids, sot_id, eot_id)
        dense, per_piece = token_losses(text_tokens, pieces, patch_tokens, scale, texts, columns)
        fine = fine_grained_loss(text_tokens[:texts], pieces[:texts], patch_tokens, scale)
        total = (total + config.dense_weight * dense + config.token_weight * per_piece
                 + config.fine_grained_weight * fine)
        metrics.update(dense_loss=dense, token_loss=per_piece, fine_grained_loss=fine)
    if idf is not None:
        caption_pieces = piece_mask(token_ids[:texts], sot_id, eot_id)
        targets = word_targets(token_ids[:texts], caption_pieces, idf)
        vocab = np.flatnonzero(idf)  # the pieces the targets can weight
        weights = caption_weights(token_ids[:texts], caption_pieces, idf)
        if config.word_weight:
            words = word_loss(image.embeds, head, targets)
            total = total + config.word_weight * words
            metrics["word_loss"] = words
        if config.patch_word_weight:
            if config.patch_word_head == "text":  # scale * S: patches against each piece's own text embedding
                patches = l2_normalize(image.tokens[:, 1:])
                kernel = scale * piece_embeddings(model, params, vocab, sot_id, eot_id).T
            else:
                patches, kernel = image.tokens[:, 1:], head[:, vocab]
            patch_words = patch_word_loss(patches, kernel, targets[:, vocab], compete=bool(config.patch_word_compete),
                                          pool=config.patch_word_pool)
            total = total + config.patch_word_weight * patch_words
            metrics["patch_word_loss"] = patch_words
        if config.caption_word_weight:  # scale * S of each caption piece in its caption: the words TCLIP reads
            kernel = scale * l2_normalize(text.tokens[:texts]).reshape(-1, text.tokens.shape[-1]).T
            caption_targets, valid = caption_word_targets(token_ids[:texts], weights)
            caption_words = patch_word_loss(l2_normalize(image.tokens[:, 1:]), kernel, caption_targets, valid)
            total = total + config.caption_word_weight * caption_words
            metrics["caption_word_loss"] = caption_words
        if config.bare_anchor_weight:
            # The term's gradient reaches the words inside captions only: the bare words are its anchor (they still
            # move with the text tower, under the other terms), and it does not set CLIP's temperature.
            bare = jax.lax.stop_gradient(piece_embeddings(model, params, vocab, sot_id, eot_id))
            anchor = bare_anchor_loss(l2_normalize(text.tokens[:texts]), token_ids[:texts], weights, bare, vocab,
                                      jax.lax.stop_gradient(scale))
            total = total + config.bare_anchor_weight * anchor
            metrics["bare_anchor_loss"] = anchor
        if config.pair_locality_weight:
            # Its own bare embeddings, as each term has: one shared with the patch term sums their gradients in
            # another order, and the card's runs would no longer reproduce bit for bit.
            bare = piece_embeddings(model, params, vocab, sot_id, eot_id)
            locality = pair_locality_loss(l2_normalize(image.tokens[:, 1:]), bare, vocab, token_ids[:texts], weights)
            total = total + config.pair_locality_weight * locality
            metrics["pair_locality_loss"] = locality
        if config.mosaic_weight:
            # The term trains the image tower only: the bare words and the teacher's maps are held fixed.
            bare = jax.lax.stop_gradient(piece_embeddings(model, params, vocab, sot_id, eot_id))
            grid = config.image_size // config.patch_size

            def word_maps(tokens):  # [N, G, G, U]: every counted piece's S over an image's patches
                return (l2_normalize(tokens[:, 1:]) @ bare.T).reshape(-1, grid, grid, len(vocab))

            if config.mosaic_student == "half":  # the true scenes teach their half-size mosaic
                teacher = block_mean_mosaic(jax.lax.stop_gradient(word_maps(image.tokens[::2])))
                small = model.apply({"params": params}, mosaic(clip_normalize(images_u8[::2])), method="encode_image")
                student = word_maps(small.tokens)
                present = (targets[::2, vocab] > 0).reshape(-1, 4, len(vocab)).any(axis=1)
            else:  # every fourth true scene is taught by its enlarged quadrants
                zoomed = model.apply({"params": params}, quadrant_zooms(clip_normalize(images_u8[::8])),
                                     method="encode_image")
                teacher = block_mean_mosaic(jax.lax.stop_gradient(word_maps(zoomed.tokens)))
                student = word_maps(image.tokens[::8])
                present = targets[::8, vocab] > 0
            tiled = map_correlation_loss(student, teacher, present)
            total = total + config.mosaic_weight * tiled
            metrics["mosaic_loss"] = tiled
        if config.bare_map_weight:
            # The term trains the text tower's caption words only: the bare words' maps and the image are the anchor.
            bare = jax.lax.stop_gradient(piece_embeddings(model, params, vocab, sot_id, eot_id))
            bare_map = bare_map_loss(l2_normalize(text.tokens[:texts]),
                                     jax.lax.stop_gradient(l2_normalize(image.tokens[:, 1:])), token_ids[:texts],
                                     bare, vocab, weights, config.bare_map_separation)
            total = total + config.bare_map_weight * bare_map
            metrics["bare_map_loss"] = bare_map
        if config.peak_contrast_weight:
            # Both towers learn: the bare words' maps are what the term sharpens. It reads CLIP's temperature but does
            # not train it. Its own bare embeddings, as each term has: sharing the patch term's would sum their
            # gradients in another order, and logged runs would no longer reproduce.
            contrast = peak_contrast_loss(l2_normalize(image.tokens[:, 1:]),
                                          piece_embeddings(model, params, vocab, sot_id, eot_id), vocab,
                                          token_ids[:texts], weights, jax.lax.stop_gradient(scale),
                                          config.peak_contrast_kinds)
            total = total + config.peak_contrast_weight * contrast
            metrics["peak_contrast_loss"] = contrast
    if config.exclusive_weight:  # needs no IDF: it pairs words by kind
        exclusive = exclusive_loss(l2_normalize(text.tokens[:texts]), l2_normalize(image.tokens[:, 1:]),
                                   token_ids[:texts])
        total = total + config.exclusive_weight * exclusive
        metrics["exclusive_loss"] = exclusive
    return total, {"loss": total, **metrics}


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up, then cosine decay to 0 at the last step; with `curriculum_restart`, one such schedule over
    the curriculum and a second over the steps after it; with `schedule_steps`, the schedule of a run of that many
    steps, its part from `schedule_stretch_start` on stretched over this run's remaining steps."""
    def warmup_cosine(steps):
        return optax.warmup_cosine_decay_schedule(0.0, config.peak_learning_rate, config.warmup_steps, steps)

    if config.curriculum_restart:
        return optax.join_schedules([warmup_cosine(config.curriculum_steps),
                                     warmup_cosine(config.steps - config.curriculum_steps)],
                                    [config.curriculum_steps])
    if not config.schedule_steps:
        return warmup_cosine(config.steps)
    shorter, start = warmup_cosine(config.schedule_steps), config.schedule_stretch_start
    rate = (config.schedule_steps - start) / (config.steps - start)
    # Before the stretch, the shorter run's rates at its own integer steps: its first steps bit for bit.
    return lambda count: jnp.where(count < start, shorter(count), shorter(start + (count - start) * rate))


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config)
    # Decay weight matrices only: not biases, norms, embeddings or the temperature (as CLIP).
    decayed = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf.ndim >= 2 and "embedding" not in path[-1].key, params)
    # Adam's b1, b2 and eps are CLIP's for its ViTs (Radford et al. 2021, appendix F: 0.9, 0.98, 1e-6).
    return optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=config.weight_decay, mask=decayed)


def checkpoint_text_tower(folder: str, expected: dict) -> dict:
    """The float32 text tower of checkpoint `folder`, checked against the shapes of `expected` (arrays or
    `jax.eval_shape` structs of this run's text tower)."""
    source = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), load_clip(folder).params["text"])
    if (jax.tree_util.tree_structure(source) != jax.tree_util.tree_structure(expected)
            or jax.tree_util.tree_map(np.shape, source) != jax.tree_util.tree_map(np.shape, expected)):
        raise ValueError(f"text_init {folder}: its text tower has another architecture than this run's")
    return source


def check_text_init(config: TrainConfig) -> None:
    """A missing or mismatched `text_init` checkpoint fails here, before any step (shapes only)."""
    if config.text_init:
        checkpoint_text_tower(config.text_init,
                              jax.eval_shape(lambda: init_params(model_config(config), config.seed))["text"])


def text_tower_from(folder: str, fresh: dict) -> dict:
    """The text tower of checkpoint `folder` (`TrainConfig.text_init`) for a run whose fresh text tower is `fresh`.

    Token-embedding rows the source run never used are zero in its checkpoint (`zero_unused_rows`); they keep
    their fresh initialisation, so that words the source never saw stay apart."""
    source = checkpoint_text_tower(folder, fresh)
    embedding = source["token_embedding"]
    unused = ~embedding.any(axis=1, keepdims=True)
    return {**source, "token_embedding": np.where(unused, np.asarray(fresh["token_embedding"]), embedding)}


def make_train_step(model: CLIP, tx: optax.GradientTransformation, config: TrainConfig, objective: str, sot_id: int,
                    eot_id: int, train_text: bool = True, idf: np.ndarray | None = None, train_stem: bool = True):
    """One jitted step; without `train_text` the text tower is neither moved (not even by weight decay) nor
    given optimiser moments, and without `train_stem` neither are the stem and the patch embedding (their
    gradients, never read, are not computed)."""
    def frozen(tree):
        zeros = functools.partial(jax.tree_util.tree_map, jnp.zeros_like)
        if not train_text:
            tree = {**tree, "text": zeros(tree["text"])}
        if not train_stem:
            tree = {**tree, "visual": {name: zeros(part) if name == "patch_embed" or name.startswith("stem_") else part
                                       for name, part in tree["visual"].items()}}
        return tree

    @jax.jit
    def step(params, opt_state, images_u8, token_ids, columns):
        grads, metrics = jax.grad(losses, has_aux=True)(params, model, images_u8, token_ids, columns, sot_id, eot_id,
                                                        config, objective, idf)
        grads = frozen(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = frozen(updates)
        params = optax.apply_updates(params, updates)
        params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, config.max_logit_scale)
        return params, opt_state, metrics

    return step


@jax.jit
def ema_update(average: dict, params: dict, decay: jax.Array) -> dict:
    """`TrainConfig.ema_decay`'s moving average after one more step whose parameters are `params`."""
    return jax.tree_util.tree_map(lambda a, p: decay * a + (1 - decay) * p, average, params)


# ------------------------------------------------------------------------------------------------ training
def validation_record(clip: LoadedClip, validation: list, config: TrainConfig) -> dict:
    """Validation figures of `clip` at a step: image <-> text retrieval top-1 on the `validation` scenes and, when
    the run selects its step by validation, TCLIP's pointing game (default settings, all words) per
    VALIDATION_PROTOCOLS on `validation_grounding_scenes` held-out scenes from VALIDATION_OFFSET, and `score`: the
    mean, with equal weights, of those pointing games and of the two retrieval directions' mean."""
    record = retrieval_top1(clip, [s.image for s in validation], [s.caption for s in validation])
    if config.select_step == "validation":
        method = TCLIP(clip)
        pointing = {protocol: grounding_scores(synthetic_report(method, protocol, config.validation_grounding_scenes,
                                                                offset=VALIDATION_OFFSET))["all"]["pointing_game"]
                    for protocol in VALIDATION_PROTOCOLS}
        retrieval = (record["image_to_text_top1"] + record["text_to_image_top1"]) / 2
        record = {**record, "pointing_game": pointing, "score": float(np.mean([*pointing.values(), retrieval]))}
    return record


STATE_FORMAT = "tclip_jax/training-state"
STATE_HEADER_KEYS = ("step", "config", "selected", "used_ids", "records")  # what save_state writes beside the format


def prefix_config(config: TrainConfig, step: int) -> dict:
    """The fields of `config` that decide its first `step` steps: all of them (as JSON), with each late term
    (`LATE_TERMS`) that starts at `step` or later, or is off, set to off, and so the stem's freezing; a schedule
    stretched from `step` or later is, so far, its shorter run's."""
    fields = config.to_dict()
    for weight, start in LATE_TERMS.items():
        if not fields[weight] or fields[start] >= step:
            fields.update({weight: 0.0, start: 0, **LATE_TERM_PARTS[weight]})
    if fields["stem_frozen_start"] >= step:
        fields["stem_frozen_start"] = 0
    if fields["schedule_stretch_start"] >= step:  # so far the rates of the shorter run, which is that run
        fields.update(steps=fields["schedule_steps"], schedule_steps=0, schedule_stretch_start=0)
    return json.loads(json.dumps(fields))  # tuples as lists (LATE_TERM_PARTS' too), as a saved header has them


@dataclasses.dataclass
class RunState:
    """A run after `step` steps: what `train` needs to go on as if it had not stopped. `selected` is the validation
    choice so far (score, step, parameters); `records` the log's lines."""
    step: int
    config: dict
    params: dict
    opt_state: object
    average: dict | None
    selected: tuple[float, int, dict] | None
    used_ids: list[int]
    records: list[dict]

    def trees(self) -> tuple:
        return self.params, self.opt_state, self.average, None if self.selected is None else self.selected[2]


def save_state(path: pathlib.Path, state: RunState) -> None:
    """`state` as a compressed .npz (no pickle): the arrays of its trees in order, and a JSON header (the Adam
    moments of the vocabulary rows no caption uses are zeros)."""
    header = {"format": STATE_FORMAT, "version": 1, "step": state.step, "config": state.config,
              "selected": None if state.selected is None else list(state.selected[:2]),
              "used_ids": state.used_ids, "records": state.records}
    leaves = jax.tree_util.tree_leaves(state.trees())
    arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as file:
        np.savez_compressed(file, header=np.array(json.dumps(header)), **arrays)


def load_state(path: pathlib.Path, config: TrainConfig, template: RunState) -> RunState:
    """The state saved at `path`, its trees shaped as `template`'s (a fresh run's); refused, naming the field,
    unless `config` trains the saved steps as the saved run did (`prefix_config`)."""
    header, archive = read_state(path)
    step = header["step"]
    unknown = header["config"].keys() - set(TrainConfig.field_names())
    if unknown:
        raise ValueError(f"--resume {path}: saved by a run with fields this script lacks "
                         f"({', '.join(sorted(unknown))})")
    saved = prefix_config(TrainConfig.from_dict(header["config"]), step)
    ours = prefix_config(config, step)
    keeps_last = config.select_step == "last"
    if keeps_last:  # a run that keeps its last step may go on from one that selects by validation
        saved["select_step"] = "last"
    for name in ours:
        if saved.get(name) != ours[name]:
            raise ValueError(f"--resume {path}: this run's first {step} steps differ from the saved run's ({name}: "
                             f"{saved.get(name)!r} saved, {ours[name]!r} here)")
    selected = header["selected"]
    kept = clip_params(template.params) if template.average is None else template.average
    shape = RunState(step, header["config"], template.params, template.opt_state, template.average,
                     None if selected is None else (0.0, 0, kept), [], []).trees()
    leaves, treedef = jax.tree_util.tree_flatten(shape)
    names = [f"leaf_{i:05d}" for i in range(len(leaves))]
    stored = [archive[n] for n in names] if sorted(archive) == sorted(names) else None
    if stored is None or any(a.shape != np.shape(b) or a.dtype != np.asarray(b).dtype
                             for a, b in zip(stored, leaves)):
        raise ValueError(f"--resume {path}: its arrays do not fit this run's model and optimiser")
    params, opt_state, average, kept = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in stored])
    return RunState(step, header["config"], params, opt_state, average,
                    None if selected is None or keeps_last else (selected[0], selected[1], jax.device_get(kept)),
                    header["used_ids"], header["records"])


def saved_step(path: pathlib.Path) -> int:
    """The step after which the state at `path` was saved (`load_state` checks the rest)."""
    return read_state(path, header_only=True)[0]["step"]


def read_state(path: pathlib.Path, header_only: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, the arrays of its trees, none with `header_only`) of the state `save_state` wrote at `path`;
    ValueError naming --resume for any other file (`read_npz`: an empty, truncated or corrupt one, one numpy would
    read as a pickle)."""
    try:
        arrays = read_npz(path, ["header"] if header_only else None)
    except OSError as error:
        raise ValueError(f"--resume {path}: {error.strerror or error}") from None
    except ValueError as error:  # it names the path
        raise ValueError(f"--resume {error}; it is not a training state") from None
    if "header" not in arrays:
        raise ValueError(f"--resume {path}: not a training state (no header)")
    try:
        header = json.loads(str(arrays.pop("header")))
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
        raise ValueError(f"--resume {path}: not a training state (format "
                         f"{header.get('format') if isinstance(header, dict) else None!r})")
    missing = [key for key in STATE_HEADER_KEYS if key not in header]  # a header edited by hand
    if missing:
        raise ValueError(f"--resume {path}: its header lacks {', '.join(missing)} (a training state's holds "
                         f"{', '.join(STATE_HEADER_KEYS)})")
    if isinstance(header["step"], bool) or not isinstance(header["step"], int) or header["step"] < 0:
        raise ValueError(f"--resume {path}: its header's step must be a step number, got {header['step']!r}")
    if not isinstance(header["config"], dict):
        raise ValueError(f"--resume {path}: its header's config must be an object, got {header['config']!r}")
    return header, arrays


def run_idf(config: TrainConfig) -> np.ndarray | None:
    """`word_idf`, for a run with a word term (`WORD_TERMS`)."""
    return word_idf(config) if any(getattr(config, name) for name in WORD_TERMS) else None


def initial_state(config: TrainConfig, idf: np.ndarray | None) -> RunState:
    """A run before its first step: initial parameters (with the word head when a term uses it), optimiser state and
    moving average."""
    params = init_params(model_config(config), config.seed)
    if config.text_init:
        text = text_tower_from(config.text_init, params["text"])
        params = {**params, "text": jax.tree_util.tree_map(jnp.asarray, text)}
    if config.word_weight or (config.patch_word_weight and config.patch_word_head == "random"):
        # The head starts random, N(0, 1/D): a zero head would pass the tower no gradient.
        head = np.random.default_rng(config.seed).normal(0.0, config.embed_dim ** -0.5, (config.embed_dim, len(idf)))
        params = {**params, "word_head": jnp.asarray(head, jnp.float32)}
    average = clip_params(params) if config.ema_decay else None  # what validation and the checkpoint read
    return RunState(0, config.to_dict(), params, optimizer(config).init(params), average, None, [], [])


def train(config: TrainConfig, log_path: pathlib.Path, stop_after: int | None = None,
          inputs: Callable[[int], concurrent.futures.Future] | None = None, resume: pathlib.Path | None = None,
          save_state_at: tuple[int, pathlib.Path] | None = None) -> tuple[dict, np.ndarray, dict]:
    """Returns (float32 params, sorted token ids the captions used, run summary); logs to `log_path`.

    `stop_after` ends the run after that many steps (the schedule stays the config's): determinism checks.
    `inputs(step)` gives a future of `step_inputs(config, step)`; by default one thread draws each step's scenes
    while the step before runs. `resume` goes on from a saved `RunState` (`load_state`); `save_state_at` = (step,
    path) saves one after that step (`save_state`)."""
    clip_config = model_config(config)
    model = CLIP(clip_config)
    tokenizer = default_tokenizer()
    idf = run_idf(config)
    tx = optimizer(config)
    state = initial_state(config, idf) if resume is None else load_state(resume, config, initial_state(config, idf))
    params, opt_state, average, selected = state.params, state.opt_state, state.average, state.selected
    used_ids, records = set(state.used_ids), state.records
    first = state.step
    if save_state_at is not None:
        parse_save_state([str(save_state_at[0]), str(save_state_at[1])], config, first)
    step_fns: dict[tuple[str, bool, bool, tuple[str, ...]], Callable] = {}

    def step_fn(step: int) -> Callable:
        """The jitted step of `step`'s objective, with or without training the text tower, the stem and each late
        term."""
        curriculum = step < config.curriculum_steps and config.curriculum_objective
        objective = config.curriculum_objective if curriculum else config.objective
        train_text = step >= config.text_frozen_steps
        train_stem = not 0 < config.stem_frozen_start <= step
        late_off = tuple(weight for weight, start in LATE_TERMS.items() if step < getattr(config, start))
        key = objective, train_text, train_stem, late_off
        if key not in step_fns:
            off = {}
            for weight in late_off:
                off.update({weight: 0.0, LATE_TERMS[weight]: 0, **LATE_TERM_PARTS[weight]})
            step_config = dataclasses.replace(config, **off)
            step_fns[key] = make_train_step(model, tx, step_config, objective, tokenizer.sot_id, tokenizer.eot_id,
                                            train_text, idf, train_stem)
        return step_fns[key]

    validation = retrieval_scenes(config.validation_scenes, VALIDATION_OFFSET)
    loaded = LoadedClip(model, params, tokenizer, "tclip", "training")  # params replaced at each validation

    record: dict = records[-1] if records else {}
    # A resumed run's clocks go on from the saved run's.
    start = time.perf_counter() - record.get("elapsed_s", 0.0)
    cpu_start = time.process_time() - record.get("cpu_s", 0.0)
    with log_path.open("w") as log, concurrent.futures.ThreadPoolExecutor(1) as prefetch:
        log.writelines(json.dumps(r) + "\n" for r in records)
        fetch = inputs or functools.partial(prefetch.submit, step_inputs, config)
        steps = config.steps if stop_after is None else min(stop_after, config.steps)
        next_inputs = fetch(first)
        for step in range(first, steps):
            images, token_ids, columns, negatives = next_inputs.result()
            if step + 1 < steps:  # the next scenes are drawn while this step runs
                next_inputs = fetch(step + 1)
            used_ids.update(np.unique(token_ids).tolist())
            step_start = time.perf_counter()
            params, opt_state, metrics = step_fn(step)(params, opt_state, images, token_ids, columns)
            if average is not None:
                average = ema_update(average, clip_params(params), np.float32(config.ema_decay))
            current = clip_params(params) if average is None else average  # what is evaluated and kept
            record = {"step": step + 1, **{k: float(v) for k, v in metrics.items()},
                      "negatives": negatives}
            record["samples_per_s"] = config.batch_size / (time.perf_counter() - step_start)
            record["elapsed_s"] = time.perf_counter() - start
            record["cpu_s"] = time.process_time() - cpu_start  # all threads: the compute a shared machine gave us
            if (step + 1) % config.eval_every == 0 or step + 1 == steps:
                record["validation"] = validation_record(dataclasses.replace(loaded, params=current), validation,
                                                         config)
                if config.select_step == "validation" and (selected is None or
                                                           record["validation"]["score"] > selected[0]):
                    selected = (record["validation"]["score"], step + 1, jax.device_get(current))
            log.write(json.dumps(record) + "\n")
            log.flush()
            records.append(record)
            if save_state_at is not None and step + 1 == save_state_at[0]:
                save_state(save_state_at[1], RunState(step + 1, config.to_dict(), params, opt_state, average,
                                                      selected, sorted(used_ids), records))
    used_ids.discard(PAD_ID)  # padding follows the end-of-text token, so it never reaches a real token
    summary = {"train_seconds": record["elapsed_s"], "train_cpu_seconds": record["cpu_s"], "final": record}
    if first:
        summary["resumed_from_step"] = first
    if selected is not None:  # the earliest step of the best score
        summary["selected_step"] = selected[1]
    kept = selected[2] if selected is not None else jax.device_get(current)
    return kept, np.array(sorted(used_ids), np.int32), summary


def zero_unused_rows(params: dict, used_ids: np.ndarray) -> dict:
    """Zeroes the token-embedding rows no caption used, so the compressed checkpoint stays small."""
    embedding = np.asarray(params["text"]["token_embedding"])
    kept = np.zeros_like(embedding)
    kept[used_ids] = embedding[used_ids]
    return {**params, "text": {**params["text"], "token_embedding": kept}}


def train_and_save(config: TrainConfig, out: pathlib.Path,
                   inputs: Callable[[int], concurrent.futures.Future] | None = None, resume: pathlib.Path | None = None,
                   save_state_at: tuple[int, pathlib.Path] | None = None) -> dict:
    """Trains `config` (`train`, with its `resume` and `save_state_at`) and writes checkpoint folder `out` with its
    training log (`save_model`: a README.md already in `out`, a model card, is kept). Returns the run summary."""
    log_path = out.parent / f".{out.name}.{LOG_FILE}"  # moved into the folder once it is written
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        params, used_ids, summary = train(config, log_path, inputs=inputs, resume=resume, save_state_at=save_state_at)
        metadata = {"training": {"config": config.to_dict(), **summary,
                                 "used_token_ids": used_ids.tolist(), "cpu_count": os.cpu_count()}}
        save_model(out, zero_unused_rows(params, used_ids), model_config(config), metadata, log_path)
    finally:
        log_path.unlink(missing_ok=True)  # a run that stopped leaves no hidden log beside --out
    return summary


def save_model(out: pathlib.Path, params: dict, clip_config: CLIPConfig, metadata: dict,
               log_path: pathlib.Path) -> None:
    """Writes model folder `out` whole or not at all: the checkpoint and the log at `log_path` replace the files an
    earlier model there had (`MODEL_FILES`), and everything else in it (a model card, a file browser's files) is
    carried into the new folder with its permissions (`staged_folder`), so nothing this script did not write is
    lost."""
    with staged_folder(out, replaces=MODEL_FILES) as staging:
        written = save_checkpoint(staging / "model", params, clip_config, metadata=metadata,
                                  storage_dtype=np.float16, compressed=True)
        for path in written.iterdir():
            path.rename(staging / path.name)
        written.rmdir()
        log_path.rename(staging / LOG_FILE)


def held_model_folder(out: pathlib.Path) -> contextlib.AbstractContextManager:
    """Held while a run trains into model folder `out` and records its gates: a second run into it is refused in
    one line (two runs into one folder ended with one's weights beside the other's log, and a traceback)."""
    return held_lock_beside(out, "training run")


@contextlib.contextmanager
def held_for_gates(out: pathlib.Path) -> Iterator[None]:
    """`held_model_folder` for --heldout-only, which writes inside `out` alone: where nothing can be written beside
    `out` (a read-only parent), no run can replace it either (training and `tclip convert` stage beside it), and the
    gates are recorded without the lock."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(held_model_folder(out))
        except OSError as error:
            if error.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
        yield


def is_trained_model(folder: pathlib.Path) -> bool:
    """Whether `folder` holds a checkpoint header this script wrote (a tclip_jax header with a training record)."""
    try:
        header = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT_NAME and "training" in header


def check_model_folder(out: pathlib.Path, flag: str = "--out") -> pathlib.Path:
    """`out` as a folder a run may save its model to, checked before training: one to make, an empty one (a file
    browser's files aside), or a model folder this script wrote, holding its `MODEL_FILES` and perhaps a model card
    (README.md), which saving keeps; never the current folder or one above it (it cannot be replaced). ValueError
    (or OSError) on any other: saving replaces the folder, and would delete what the run did not write. Saving
    stages the new folder beside `out`: the folder holding it must be writable too."""
    out = check_output_folder(out, flag, replaced=True)
    if not out.exists():
        return out
    try:
        check_replaceable(out)
    except ValueError as error:
        raise ValueError(f"{flag} {error}") from None
    if not unwritten_entries(out, ()):
        return out
    if not is_trained_model(out):
        raise ValueError(f"{flag} {out} is not empty and not a model folder train_default.py wrote (it has no "
                         f"{CONFIG_FILE} with a training record), and saving would replace it; name another folder")
    others = unwritten_entries(out, (*MODEL_FILES, README_FILE), files_only=True)
    if others:
        raise ValueError(f"{flag} {out} holds {others[0]}, which train_default.py does not write; move it or name "
                         "another folder")
    return out


def check_state_path(path: pathlib.Path, out: pathlib.Path) -> None:
    """`--save-state`'s PATH, checked before training: a file this run can write, not inside --out `out` (the
    model folder holds the model alone)."""
    check_output_file(path, "--save-state", make_folders=True)  # save_state makes the missing folders
    if path.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"--save-state {path} is inside --out {out}, which holds the model alone; name a path "
                         "outside it")


def config_from_flags(recipe: str | None, flags: dict, assignments: list[str]) -> TrainConfig:
    """The configuration a command line names: the recipe, then the fields its own flags give (`flags`, None for
    a flag not given), then the `--set` assignments, which may not give a field a flag gives; its text_init
    folder checked. ValueError or OSError on what it refuses (the scripts say it in one line)."""
    named = {name: value for name, value in flags.items() if value is not None}
    overrides = parse_overrides(assignments)
    if named.keys() & overrides.keys():
        raise ValueError(f"--set gives {min(named.keys() & overrides.keys())}, which its own flag gives too")
    config = train_config(recipe, {**named, **overrides})
    check_text_init(config)
    return config


def parse_overrides(items: list[str], flag: str = "--set") -> dict:
    """`FIELD=VALUE` strings as typed TrainConfig values (`TrainConfig.parse_assignments`); an error names `flag`,
    the command-line option that gave them."""
    try:
        return TrainConfig.parse_assignments(items)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None


def parse_save_state(item: list[str] | None, config: TrainConfig, first: int = 0) -> tuple[int, pathlib.Path] | None:
    """`--save-state STEP PATH` as (step, path), STEP inside the run (after its `first` step, before its last)."""
    if item is None:
        return None
    step, path = item
    if not step.isdigit() or not first < int(step) < config.steps:
        raise ValueError(f"--save-state {step} {path}: STEP must be a step after the run's first ({first}) and before "
                         f"its last ({config.steps})")
    return int(step), pathlib.Path(path)


def check_resume(path: pathlib.Path, config: TrainConfig) -> None:
    """Refuses a state `config` cannot go on from (`load_state`'s checks, on a fresh run's shapes)."""
    load_state(path, config, initial_state(config, run_idf(config)))


def main() -> None:
    """The command line (`run_command`), a SIGTERM handled as a Ctrl-C is (`interrupted`), as `tclip` handles them."""
    with redelivered_interrupts(), sigterm_as_interrupt("train_default.py"):
        run_command()


def run_command() -> None:
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--recipe", choices=tuple(RECIPES), help="a shipped checkpoint's recipe (`RECIPES`); "
                        "--objective, --steps and --set override it")
    parser.add_argument("--objective", choices=OBJECTIVES, help=f"default: {TrainConfig.objective}")
    parser.add_argument("--steps", type=int, help=f"default: {TrainConfig.steps}")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="FIELD=VALUE",
                        help="override other TrainConfig fields (for recipe search; may be repeated)")
    parser.add_argument("--save-state", nargs=2, metavar=("STEP", "PATH"),
                        help="also write the run's state after STEP steps to PATH (.npz), for --resume")
    parser.add_argument("--resume", type=pathlib.Path, metavar="PATH",
                        help="go on from a state --save-state wrote (the run's first steps must be the saved run's)")
    parser.add_argument("--heldout-only", action="store_true",
                        help=f"train nothing: record the {HELDOUT_METRICS_FILE} of the checkpoint already in --out "
                             "(what a run interrupted after training left out)")
    args = parser.parse_args()
    if args.heldout_only:
        record_only(parser, args)
    left = "nothing was written"  # what a stop or a failed write leaves, said with it
    # The interruptions are handled outside the lock: `interrupted` ends the process at once, and the lock's file
    # would be left beside --out.
    try:
        with contextlib.ExitStack() as held:
            try:
                check_model_folder(args.out)  # before training: saving replaces the folder
                config = config_from_flags(args.recipe, {"objective": args.objective, "steps": args.steps}, args.set)
                if args.resume is not None:  # checked now, not after compiling
                    check_resume(args.resume, config)
                save_state_at = parse_save_state(args.save_state, config,
                                                 0 if args.resume is None else saved_step(args.resume))
                if save_state_at is not None:
                    check_state_path(save_state_at[1], args.out)
                held.enter_context(held_model_folder(args.out))
            except (ValueError, OSError) as error:  # a bad override, folder or state, or --out in use: one line
                parser.refuse(str(error))
            left = f"{args.out} was not written"
            summary = train_and_save(config, args.out, resume=args.resume, save_state_at=save_state_at)
            print(json.dumps(summary["final"]))
            left = (f"{args.out} holds the checkpoint but not its {HELDOUT_METRICS_FILE} (--out {args.out} "
                    "--heldout-only records it)")
            # the fast held-out gates the card quotes and tests/test_default_model.py re-measures
            print(json.dumps(record_heldout_metrics(args.out)))
    except KeyboardInterrupt as stop:
        interrupted(parser, left, stop)
    except OSError as error:  # a full disk: what was being written is removed (`staged_folder`, `atomic_file`)
        parser.refuse(f"{left}: {error}")


def record_only(parser: OneLineErrors, args: argparse.Namespace) -> None:
    """--heldout-only: the held-out stage alone, on a checkpoint a finished training stage wrote."""
    given = [flag for flag, value in (("--recipe", args.recipe), ("--objective", args.objective),
                                      ("--steps", args.steps), ("--set", args.set or None),
                                      ("--save-state", args.save_state), ("--resume", args.resume))
             if value is not None]
    if given:
        parser.refuse(f"--heldout-only trains nothing; {given[0]} does not apply")
    if not is_checkpoint(args.out):
        parser.refuse(f"--heldout-only: {args.out} holds no checkpoint")
    try:
        with held_for_gates(args.out):
            print(json.dumps(record_heldout_metrics(args.out)))
    except KeyboardInterrupt as stop:
        interrupted(parser, f"{args.out}/{HELDOUT_METRICS_FILE} was not written", stop)
    except (ValueError, OSError) as error:  # a folder load_clip refuses, --out in use, a full disk
        parser.refuse(str(error))
    sys.exit(0)


def interrupted(parser: argparse.ArgumentParser, what: str, stop: KeyboardInterrupt | None = None) -> None:
    """Ctrl-C ends a script with one line saying what it left, and status 130, and a SIGTERM (`stop` a
    `Terminated`) with status 143, as `tclip` does. The process ends here, without the interpreter's teardown: after
    a Ctrl-C inside an XLA compilation that teardown crashed (SIGSEGV), and every file of the run is closed by now
    (its folders are written whole or not at all)."""
    terminated = isinstance(stop, Terminated)
    print(f"{parser.prog}: {'terminated' if terminated else 'interrupted'}; {what}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(143 if terminated else 130)


if __name__ == "__main__":
    main()
