"""The shipped embedded models (default and clip_only): they load, they are what the training script says, and the
fast held-out gates re-measured here (TCLIP K=25 through the sweep scorer, and retrieval) reproduce the figures
their heldout_metrics.json records and their cards quote."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tclip_jax.checkpoints.folder import flatten, load_checkpoint
from tclip_jax.checkpoints.load import DEFAULT_MODEL_DIR, load_clip
from tclip_jax.model.tokenizer import default_tokenizer
from tclip_jax.sweep.heldout import FAST_SCENES, HELDOUT_METRICS_FILE
from tclip_jax.synthetic import make_scene, negative_captions, scene_variant, train_seeds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "training"))
import train_default  # noqa: E402
from conftest import XLA_FLAGS_OPTIMISED  # noqa: E402

MAX_FOLDER_BYTES = 10 * 2**20
CLIP_ONLY_DIR = DEFAULT_MODEL_DIR.parent / "clip_only_model"
FOLDERS = [DEFAULT_MODEL_DIR, CLIP_ONLY_DIR]


@pytest.fixture(scope="module", params=FOLDERS, ids=lambda p: p.name)
def folder(request):
    return request.param


@pytest.fixture(scope="module")
def loaded(folder):
    return load_clip(folder)


@pytest.fixture(scope="module")
def recorded_config(folder):
    """The training configuration the checkpoint records (its TrainConfig's `to_dict`)."""
    return load_checkpoint(folder)[2]["training"]["config"]


@pytest.fixture(scope="module")
def measured_by_folder() -> dict[str, dict]:
    """{folder: its fast held-out gates (`heldout_metrics`: TCLIP K=25, the FAST_PROTOCOLS, retrieval), measured
    now}, both folders in one process of their own, at XLA's default optimisation (as the training script records
    them; conftest's quick compile makes these 25-copy maps of 100 scenes slower to run than they are to compile).
    Each protocol's scenes in one batch: the figures are those of the script's batches of 8 (a sweep gives the same
    bytes at any batch size, test_sweep), from 5 compiled programs of the maps instead of 11."""
    code = ("import json, sys\n"
            "from tclip_jax.checkpoints.load import load_clip\n"
            "from tclip_jax.sweep.heldout import heldout_metrics\n"
            "print(json.dumps({f: heldout_metrics(load_clip(f), batch_size=int(sys.argv[1])) for f in sys.argv[2:]}))")
    done = subprocess.run([sys.executable, "-c", code, str(FAST_SCENES), *map(str, FOLDERS)], capture_output=True,
                          text=True, timeout=1200, env={**os.environ, "XLA_FLAGS": XLA_FLAGS_OPTIMISED})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def measured_metrics(folder, measured_by_folder):
    return measured_by_folder[str(folder)]


def test_load_clip_without_a_name_loads_the_embedded_checkpoint():
    default, by_path = load_clip(), load_clip(DEFAULT_MODEL_DIR)
    params, config, _ = load_checkpoint(DEFAULT_MODEL_DIR)
    assert default.source == by_path.source == "tclip"
    assert default.config == by_path.config == config
    stored = flatten(params)
    for tree in (default.params, by_path.params):
        loaded = flatten(tree)
        assert loaded.keys() == stored.keys()
        for key, value in stored.items():
            np.testing.assert_array_equal(loaded[key], value)


def test_architecture_is_openai_clip_at_a_small_size(loaded):
    config = loaded.config
    assert (config.vocab_size, config.context_length, config.activation) == (49408, 77, "quick_gelu")
    assert config.vision_width // config.vision_heads == config.text_width // config.text_heads == 64
    assert config.vision_mlp_dim == 4 * config.vision_width and config.text_mlp_dim == 4 * config.text_width
    assert loaded.tokenizer.vocab_size == default_tokenizer().vocab_size == 49408


def test_objective_is_what_the_folder_says(folder, recorded_config):
    """clip_only_model is trained with CLIP's loss alone; each card names its objective and every added term."""
    objective, terms = recorded_config["objective"], train_default.added_terms(recorded_config)
    card = (folder / "README.md").read_text()
    assert f"`{objective}`" in card
    if folder == CLIP_ONLY_DIR:
        assert objective == "clip" and not terms
    else:
        assert terms, "the default model is the one trained with terms beside CLIP's loss"
        for name, weight in terms.items():
            assert f"{name}={weight:g}" in card, name


def test_checkpoint_was_trained_with_its_recipe_and_the_card_gives_its_command(folder, recorded_config):
    """The training configuration the checkpoint records is the script's recipe for it, and the card's command."""
    recipe = "clip_only" if folder == CLIP_ONLY_DIR else "default"
    expected, defaults = train_default.train_config(recipe).to_dict(), train_default.TrainConfig().to_dict()
    assert recorded_config == {name: expected[name] for name in recorded_config}
    # Fields added to the script after a run must keep, at their defaults, what the run did.
    assert all(expected[name] == defaults[name] for name in expected.keys() - recorded_config.keys())
    command = f"train_default.py --recipe {recipe} --out tclip_jax/data/{folder.name}"
    assert command in (folder / "README.md").read_text()


def test_checkpoint_is_small_float16_and_keeps_only_used_vocabulary_rows(folder, loaded):
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_FOLDER_BYTES
    with np.load(folder / "params.npz") as archive:
        assert {archive[k].dtype for k in archive.files} == {np.dtype(np.float16)}
    _, _, header = load_checkpoint(folder)
    used = np.array(header["training"]["used_token_ids"])
    embedding = np.asarray(loaded.params["text"]["token_embedding"])
    np.testing.assert_array_equal(np.flatnonzero(np.abs(embedding).sum(axis=1) > 0), used)
    # Every id of training captions and their hard negatives (not padding) is among the kept rows.
    captions = []
    for seed in train_seeds(32):
        scene = make_scene(seed, None)
        variant = scene_variant(scene, seed)
        captions += [scene.caption] + ([variant.caption] if variant else []) + negative_captions(scene, seed, 2)
    ids = default_tokenizer().encode(captions)
    assert set(ids[ids != 0].tolist()) <= set(used.tolist())


def test_training_log_records_loss_throughput_and_validation_retrieval(folder):
    records = [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]
    _, _, header = load_checkpoint(folder)
    assert [r["step"] for r in records] == list(range(1, header["training"]["config"]["steps"] + 1))
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records)
    assert np.mean([r["loss"] for r in records[-20:]]) < np.mean([r["loss"] for r in records[:20]])
    validation = [r["validation"] for r in records if "validation" in r]
    assert validation and validation[-1]["image_to_text_top1"] > validation[0]["image_to_text_top1"]
    # The budget: 45 minutes on 2 cores (wall time on the shared build machine also counts other jobs' load).
    assert header["training"]["train_cpu_seconds"] <= 2 * 45 * 60


def test_the_recipe_reproduces_the_first_steps_of_the_checkpoints_training_log(folder, tmp_path, monkeypatch):
    """The recipe, run today, repeats the logged losses of the run that made the checkpoint over its first three
    steps (the first has learning rate 0, so the third is the first to follow an update; XLA may sum in another order
    on another CPU, hence the tolerance). The validation a stopped run ends with reads the parameters and changes
    nothing, so it is left out here (it is most of the time)."""
    recipe = "clip_only" if folder == CLIP_ONLY_DIR else "default"
    logged = [json.loads(line) for line in (folder / "training_log.jsonl").open().readlines()[:3]]
    monkeypatch.setattr(train_default, "validation_record", lambda *args: {"score": 0.0})
    train_default.train(train_default.train_config(recipe), tmp_path / "log.jsonl", stop_after=3)
    again = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    for before, now in zip(logged, again, strict=True):
        losses = sorted(k for k in before if k.endswith("loss"))
        assert losses and losses == sorted(k for k in now if k.endswith("loss"))
        np.testing.assert_allclose([now[k] for k in losses], [before[k] for k in losses], rtol=1e-4)
        assert now["negatives"] == before["negatives"]


def test_recorded_heldout_metrics_are_reproduced(folder, measured_metrics):
    """The figures the card quotes from heldout_metrics.json are what this checkpoint gives now."""
    _close(measured_metrics, json.loads((folder / HELDOUT_METRICS_FILE).read_text()))


# The card's status rows that quote heldout_metrics.json: {row label: the figures' paths, "protocol/group/key"}.
CARD_GATES = {
    "captions: colour words, pointing": ["captions/colour/pointing_game"],
    "captions: shape words, pointing": ["captions/shape/pointing_game"],
    "captions: BoxAcc (all words)": ["captions/all/box_accuracy"],
    "bare colour word: pointing / BoxAcc": ["bare_words/colour/pointing_game", "bare_words/colour/box_accuracy"],
    "bare shape word: pointing / BoxAcc": ["bare_words/shape/pointing_game", "bare_words/shape/box_accuracy"],
    "same-colour twins, shape word: pointing / BoxAcc": ["colour_twins/shape/pointing_game",
                                                         "colour_twins/shape/box_accuracy"],
    "small_objects (16-24 px): pointing": ["small_objects/all/pointing_game"],
    "wrong_attribute: map on the wrongly named object": ["wrong_attribute/all/wrong_pointing"],
}


def test_the_cards_status_table_quotes_the_recorded_heldout_metrics(folder):
    """Each fast gate's row of the card's status table gives heldout_metrics.json's figures to two decimals, so a
    new checkpoint cannot ship under an old card."""
    recorded = json.loads((folder / HELDOUT_METRICS_FILE).read_text())
    card = (folder / "README.md").read_text()
    status = card[card.index("## Status"):].split("\n\n")[2]  # the heading, the table's caption, the table
    measured = {row.split(" | ")[0].lstrip("| "): row.split(" | ")[1] for row in status.splitlines()[2:]}
    for label, paths in CARD_GATES.items():
        figures = []
        for path in paths:
            protocol, group, key = path.split("/")
            figures.append(f"{recorded['protocols'][protocol][group][key]:.2f}")
        assert measured[label] == " / ".join(figures), label
    retrieval = recorded["retrieval"]
    assert measured["retrieval top-1 image->text / text->image (256 scenes)"] == \
        f"{retrieval['image_to_text_top1']:.2f} / {retrieval['text_to_image_top1']:.2f}"
    assert measured["the same, any caption / scene it is true of counting"] == \
        f"{retrieval['image_to_true_text_top1']:.2f} / {retrieval['text_to_true_image_top1']:.2f}"


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
