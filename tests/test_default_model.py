"""The embedded default model: it loads, it is what the training script says, and it localises words."""
import json

import numpy as np
import pytest

from tclip_jax.checkpoints.folder import flatten, load_checkpoint
from tclip_jax.checkpoints.load import DEFAULT_MODEL_DIR, load_clip
from tclip_jax.sweep.heldout import HELDOUT_METRICS_FILE, heldout_metrics
from tclip_jax.synthetic import make_batch, train_seeds
from tclip_jax.model.tokenizer import default_tokenizer

MAX_FOLDER_BYTES = 10 * 2**20


@pytest.fixture(scope="module")
def default_clip():
    return load_clip()


@pytest.fixture(scope="module")
def computed_metrics(default_clip):
    return json.loads(json.dumps(heldout_metrics(default_clip)))  # as JSON stores it (tuples become lists)


def test_load_clip_without_a_name_loads_the_embedded_checkpoint(default_clip):
    by_path = load_clip(DEFAULT_MODEL_DIR)
    params, config, _ = load_checkpoint(DEFAULT_MODEL_DIR)
    assert default_clip.source == by_path.source == "tclip"
    assert default_clip.config == by_path.config == config
    stored = flatten(params)
    for tree in (default_clip.params, by_path.params):
        loaded = flatten(tree)
        assert loaded.keys() == stored.keys()
        for key, value in stored.items():
            np.testing.assert_array_equal(loaded[key], value)


def test_architecture_is_clip_vit_32_with_the_clip_tokenizer(default_clip):
    config = default_clip.config
    assert (config.image_size, config.patch_size, config.grid_size) == (224, 32, 7)
    assert (config.vocab_size, config.context_length) == (49408, 77)
    assert config.activation == "quick_gelu"
    assert default_clip.tokenizer.vocab_size == default_tokenizer().vocab_size == 49408


def test_checkpoint_is_small_float16_and_keeps_only_used_vocabulary_rows(default_clip):
    files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_FOLDER_BYTES
    with np.load(DEFAULT_MODEL_DIR / "params.npz") as archive:
        assert {archive[k].dtype for k in archive.files} == {np.dtype(np.float16)}
    _, _, header = load_checkpoint(DEFAULT_MODEL_DIR)
    used = np.array(header["training"]["used_token_ids"])
    embedding = np.asarray(default_clip.params["text"]["token_embedding"])
    nonzero_rows = np.flatnonzero(np.abs(embedding).sum(axis=1) > 0)
    np.testing.assert_array_equal(nonzero_rows, used)
    # Every id of a training caption (SOT, pieces, EOT; not padding) is among the kept rows.
    _, captions = make_batch(train_seeds(64))
    ids = default_tokenizer().encode(captions)
    assert set(ids[ids != 0].tolist()) <= set(used.tolist())


def test_training_log_records_loss_throughput_and_validation_retrieval():
    records = [json.loads(line) for line in (DEFAULT_MODEL_DIR / "training_log.jsonl").read_text().splitlines()]
    _, _, header = load_checkpoint(DEFAULT_MODEL_DIR)
    assert [r["step"] for r in records] == list(range(1, header["training"]["config"]["steps"] + 1))
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    validation = [r["validation"] for r in records if "validation" in r]
    assert validation and validation[-1]["image_to_text_top1"] > validation[0]["image_to_text_top1"]


def test_tclip_localises_colour_and_shape_words_on_heldout_scenes(computed_metrics):
    captions = computed_metrics["protocols"]["captions"]
    assert captions["segmentation"]["pointing_game"] >= 0.9
    assert captions["detection"]["box_accuracy"] >= 0.6


def _close(computed, recorded, where=""):
    """Equal structure; numbers within 1e-6."""
    if isinstance(recorded, dict):
        assert computed.keys() == recorded.keys(), where
        for key in recorded:
            _close(computed[key], recorded[key], f"{where}/{key}")
    elif isinstance(recorded, list):
        assert len(computed) == len(recorded), where
        for i, (c, r) in enumerate(zip(computed, recorded)):
            _close(c, r, f"{where}/{i}")
    elif isinstance(recorded, float):
        assert computed == pytest.approx(recorded, abs=1e-6), where
    else:
        assert computed == recorded, where


def test_recorded_heldout_metrics_are_reproduced(computed_metrics):
    _close(computed_metrics, json.loads((DEFAULT_MODEL_DIR / HELDOUT_METRICS_FILE).read_text()))
