"""training/train_default.py's recipes and recipe-search options: what `--recipe` and `--set` build is what they say."""
import concurrent.futures
import dataclasses
import errno
import functools
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "training"))
import check_determinism  # noqa: E402
import search_recipes  # noqa: E402
import train_default  # noqa: E402

from tclip_jax.checkpoints.folder import save_checkpoint  # noqa: E402
from tclip_jax.methods.base import Method  # noqa: E402
from tclip_jax.methods.tclip.method import TCLIP, _maps_program  # noqa: E402
from tclip_jax.methods.tclip.relevance import token_embeddings  # noqa: E402
from tclip_jax.model import CLIP, init_params, l2_normalize  # noqa: E402
from tclip_jax.image import clip_normalize, resize_rgb  # noqa: E402
from tclip_jax import synthetic  # noqa: E402
from tclip_jax.sweep import heldout  # noqa: E402
from tclip_jax.synthetic import RELATIONS, make_scene, negative_captions, scene_variant, train_seeds  # noqa: E402

SCRIPT = pathlib.Path(train_default.__file__)
KNOWN_FIELDS = f"known settings: {', '.join(train_default.TrainConfig.field_names())}"  # an unknown field's error
DEFAULT_MODEL = SCRIPT.parents[1] / "tclip_jax" / "data" / "default_model"


def test_overrides_give_the_training_tower_a_convolutional_stem():
    config = dataclasses.replace(train_default.TrainConfig(),
                                 **train_default.parse_overrides(["stem_channels=16,32,64", "patch_size=32"]))
    assert config.stem_channels == (16, 32, 64)
    params = jax.eval_shape(lambda: init_params(train_default.model_config(config), 0))["visual"]
    assert [params[f"stem_{i}"]["kernel"].shape for i in range(3)] == [(3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 64)]
    assert params["patch_embed"]["kernel"].shape == (4, 4, 64, config.vision_width)  # 32 px = 2**3 x 4
    assert train_default.parse_overrides(["stem_channels="])["stem_channels"] == ()


def test_a_recipe_overrides_the_defaults_and_explicit_values_override_the_recipe():
    defaults, recipe = train_default.TrainConfig(), train_default.RECIPES["default"]
    config = train_default.train_config("default")
    assert config == dataclasses.replace(defaults, **recipe)
    assert config.vision_layers == 1 and config.word_weight == 3 and config.objective == "clip"
    overridden = train_default.train_config("default", {"steps": 1900, "word_weight": 0.5})
    assert (overridden.steps, overridden.word_weight, overridden.vision_layers) == (1900, 0.5, 1)
    # The recipe's late term must start within the run: a shorter run says so rather than silently dropping it.
    with pytest.raises(ValueError, match="bare_map_start needs bare_map_weight > 0 and 0 < bare_map_start < steps"):
        train_default.train_config("default", {"steps": 70})
    short = train_default.train_config("default", {"steps": 70, "bare_map_start": 0, "peak_contrast_start": 0})
    assert (short.bare_map_weight, short.peak_contrast_weight) == (3, 10)
    assert train_default.train_config() == train_default.train_config(None, {}) == defaults
    with pytest.raises(ValueError, match="unknown recipe 'nope'; available: default, clip_only"):
        train_default.train_config("nope")


def test_set_reads_every_field_back_and_the_recorded_json_makes_the_same_config():
    """Each field of a config, written as `--set` text, parses back to its value, and the JSON a log, a model folder
    or a saved state records (`to_dict`) makes the same config (`from_dict`: lists back to tuples)."""
    config = train_default.train_config("default", {"curriculum_form_weights": (0.0, 0.0, 1.0, 0.0)})
    assignments = [f"{name}={','.join(map(str, value)) if isinstance(value, list) else value}"
                   for name, value in config.to_dict().items()]
    assert train_default.TrainConfig(**train_default.parse_overrides(assignments)) == config
    assert train_default.TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("bad, message", [
    ("peak_learning_rate=nan", "peak_learning_rate must be a finite number, got nan"),
    ("word_weight=nan", "word_weight must be a finite number"),
    ("form_weights=0.5,nan,0,0", "form_weights must be a finite number, got nan"),
    ("steps=0", "steps must be >= 1, got 0"),  # named itself, not through a field derived from it
    ("batch_size=0", "batch_size must be >= 2"),
    ("batch_size=3", r"batch_size must be even \(each scene beside its variant\), got 3"),
    ("negatives=-1", "negatives must be >= 0"),
    ("eval_every=0", "eval_every must be >= 1"),
    ("validation_scenes=0", "validation_scenes must be >= 1"),
    ("patch_size=0", "patch_size must be >= 1"),
    ("image_size=30", "image_size must be a multiple of patch_size, got 30 and 32"),
    ("form_weights=1,2", "form_weights must be 4 weights >= 0"),
    ("form_weights=0,0,0,0", "form_weights must be 4 weights >= 0 .*not all 0"),
    ("peak_learning_rate=0", "peak_learning_rate must be > 0"),
    ("text_length=2", "text_length must be >= 46"),
    # the model's own checks (CLIPConfig), in training before: a traceback after the scenes were drawn
    ("stem_channels=0", r"stem_channels must be a tuple of positive integers, got \(0,\)"),
    ("vision_width=32", "vision_width must be >= 64, got 32"),  # one 64-dim head; it said vision_heads
    ("text_width=63", "text_width must be >= 64, got 63"),
    # accepted before: a negative decay grows the weights, a negative clamp holds the logit scale under 1
    ("weight_decay=-0.1", r"weight_decay must be >= 0, got -0.1"),
    ("max_logit_scale=-1", r"max_logit_scale must be >= 0, got -1.0"),
    ("dense_weight=-1", r"dense_weight must be >= 0, got -1.0"),
    ("seed=-1", "seed must be >= 0, got -1"),
    ("curriculum_steps=-5", "curriculum_steps must be >= 0, got -5"),
    ("text_length_step=-8", "text_length_step must be >= 0, got -8"),
])
def test_values_that_cannot_train_are_refused_before_training(bad, message):
    with pytest.raises(ValueError, match=message):
        train_default.TrainConfig(**train_default.parse_overrides([bad]))


def test_a_run_that_stops_leaves_no_hidden_log_beside_its_folder(tmp_path, monkeypatch):
    def stopped(config, log_path, **kwargs):  # a run cut by Ctrl-C after its first log line
        log_path.write_text('{"step": 1}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr(train_default, "train", stopped)
    with pytest.raises(KeyboardInterrupt):
        train_default.train_and_save(train_default.TrainConfig(), tmp_path / "model")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("stop, status, said", [("ctrl_c", 130, "interrupted"), ("sigterm", 143, "terminated")])
def test_a_stopped_training_run_ends_with_one_line_saying_what_it_left(stop, status, said, tmp_path, monkeypatch,
                                                                       capsys):
    """A Ctrl-C, or a SIGTERM (a batch system stopping the job), raised while the run trains or records its gates:
    train_and_save removes what it started (`test_a_run_that_stops_leaves_no_hidden_log_beside_its_folder`) and the
    script ends with one line and status 130 or 143; the previous SIGTERM handler is back once main() returns."""
    def stopped(*args, **kwargs):
        if stop == "ctrl_c":
            raise KeyboardInterrupt
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise AssertionError("no SIGTERM handler: the signal would end the process and leave the hidden log")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises here
        raise AssertionError("the SIGTERM did not stop the run")

    def process_exit(code):  # the script ends its process at once (os._exit); here, this test's must go on
        raise SystemExit(code)

    monkeypatch.setattr(train_default.os, "_exit", process_exit)
    previous = signal.getsignal(signal.SIGTERM)
    argv = [str(SCRIPT), "--out", str(tmp_path / "model"), "--steps", "3", "--set", "warmup_steps=1"]
    for stage, message in [("train_and_save", f"{tmp_path / 'model'} was not written"),
                           ("record_heldout_metrics", f"{tmp_path / 'model'} holds the checkpoint but not its "
                                                      f"heldout_metrics.json (--out {tmp_path / 'model'} "
                                                      "--heldout-only records it)")]:
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", argv)
            if stage == "record_heldout_metrics":  # a run that trained: its checkpoint is written
                patch.setattr(train_default, "train_and_save", lambda *a, **k: {"final": {}})
            patch.setattr(train_default, stage, stopped)
            with pytest.raises(SystemExit) as raised:
                train_default.main()
        assert raised.value.code == status
        assert capsys.readouterr().err.strip().splitlines() == [f"train_default.py: {said}; {message}"]
        assert signal.getsignal(signal.SIGTERM) is previous


def test_a_second_run_into_a_folder_a_run_holds_is_refused_in_one_line_before_it_trains(tmp_path, monkeypatch,
                                                                                           capsys):
    """Two runs into one --out ended with one's weights beside the other's training log, and the second with a
    traceback: a run holds its --out while it trains and while it records the gates, and a second run into it then,
    or a recipe search with a run of that name, is refused in one line naming the folder, training nothing. Once
    the first ends nothing of its lock is left beside the folder."""
    out = tmp_path / "model"
    refusals, trainings = [], []

    def second_run(main, argv):  # started while the first is inside its run
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", argv)
            with pytest.raises(SystemExit) as raised:
                main()
        refusals.append((raised.value.code, capsys.readouterr().err.strip().splitlines()[-1]))

    def first_training(config, folder, **kwargs):
        trainings.append(folder)
        if len(trainings) > 1:  # a second run that got this far was not refused
            pytest.fail("a second run trained into the folder the first run holds")
        second_run(train_default.main, [str(SCRIPT), "--out", str(out), "--steps", "3", "--set", "warmup_steps=1"])
        return {"final": {}}

    def first_gates(folder):
        second_run(search_recipes.main, [str(SEARCH_SCRIPT), "--out", str(tmp_path), "--no-heldout", "--workers", "1",
                                         "--set", *TINY_OVERRIDES, "--run", "model"])
        return {}

    monkeypatch.setattr(train_default, "train_and_save", first_training)
    monkeypatch.setattr(train_default, "record_heldout_metrics", first_gates)
    monkeypatch.setattr(search_recipes, "search", lambda *args: pytest.fail("the search trained"))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(out), "--steps", "3", "--set", "warmup_steps=1"])
    train_default.main()
    assert [code for code, _ in refusals] == [2, 2]
    for (_, line), script in zip(refusals, ("train_default.py", "search_recipes.py")):
        assert line.startswith(f"{script}: error: another training run (process {os.getpid()} ") and \
            f" is running in {out} " in line and line.endswith("; wait for it to end or choose another --out"), line
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("stage", ["checkpoint", "gates"])
def test_a_full_disk_ends_a_run_in_one_line_and_leaves_nothing_half_written(stage, tmp_path, monkeypatch, capsys):
    """A write that fails (here the disk full as the checkpoint's archive or the gates' file is written) ended the
    script with a traceback: it is said in one line with what the run left, exit status 2; the checkpoint's
    staging folder, the hidden log and the lock are removed, and a checkpoint already saved stays whole."""
    out = tmp_path / "model"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def trained(config, log_path, **kwargs):  # what training returns, without the training
        log_path.write_text('{"step": 3}\n')
        return tiny_params(config), np.arange(8, dtype=np.int32), {"final": {"step": 3}}

    def archive_on_a_full_disk(file, **arrays):  # the archive is begun, then there is no room
        pathlib.Path(file).write_bytes(b"PK\x03\x04")
        raise full

    def fsync_on_a_full_disk(fd):  # where a delayed write finds the disk full
        raise full

    real_record = train_default.record_heldout_metrics

    def record_on_a_full_disk(folder):
        with monkeypatch.context() as patch:
            patch.setattr(heldout, "heldout_metrics", lambda clip: {"scenes": 0})
            patch.setattr(os, "fsync", fsync_on_a_full_disk)
            return real_record(folder)

    monkeypatch.setattr(train_default, "train", trained)
    if stage == "checkpoint":
        monkeypatch.setattr(np, "savez_compressed", archive_on_a_full_disk)
    monkeypatch.setattr(train_default, "record_heldout_metrics", record_on_a_full_disk)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(out), "--set", *TINY_MODEL, "steps=3",
                                      "warmup_steps=1"])
    with pytest.raises(SystemExit) as raised:
        train_default.main()
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "Traceback" not in err
    if stage == "checkpoint":
        assert err.strip().splitlines()[-1] == f"train_default.py: error: {out} was not written: {full}"
        assert not any(tmp_path.iterdir())
    else:
        assert err.strip().splitlines()[-1] == (f"train_default.py: error: {out} holds the checkpoint but not its "
                                                f"heldout_metrics.json (--out {out} --heldout-only records it): {full}")
        assert [p.name for p in tmp_path.iterdir()] == ["model"]
        assert sorted(p.name for p in out.iterdir()) == sorted(["params.npz", "tclip_config.json",
                                                                train_default.LOG_FILE])
        assert train_default.is_trained_model(out)


TINY_MODEL = ["image_size=32", "patch_size=16", "embed_dim=16", "vision_width=64", "vision_layers=1", "text_width=64",
              "text_layers=1"]


def tiny_params(config: train_default.TrainConfig) -> dict:
    return jax.tree_util.tree_map(np.asarray, init_params(train_default.model_config(config), 0))


def model_folder(folder: pathlib.Path, training: bool = True) -> pathlib.Path:
    """A folder as train_default.py leaves it (a tiny model, its log, held-out metrics and a card), or with
    `training=False` a checkpoint another tool wrote (no training record)."""
    config = train_default.TrainConfig(**train_default.parse_overrides(TINY_MODEL))
    save_checkpoint(folder, tiny_params(config), train_default.model_config(config), storage_dtype=np.float16,
                    compressed=True, metadata={"training": {"config": config.to_dict()}} if training else None)
    if training:
        (folder / train_default.LOG_FILE).write_text('{"step": 1}\n')
        (folder / "heldout_metrics.json").write_text("{}\n")
        (folder / "README.md").write_text("the card\n")
    return folder


def test_an_out_folder_this_script_did_not_write_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """Saving replaces --out: a folder neither empty nor a model folder train_default.py wrote (a user's notes, a
    sub-folder, tclip_jax/data holding both embedded models) is refused in one line before any training, as is each
    run's folder of a recipe search, and left as it was."""
    trained = []
    monkeypatch.setattr(train_default, "train_and_save", lambda config, out, **kwargs: trained.append(out) or
                        {"final": {}})
    monkeypatch.setattr(train_default, "record_heldout_metrics", lambda folder: {})

    def run(main, argv):
        monkeypatch.setattr(sys, "argv", argv)
        try:
            main()
        except SystemExit as raised:
            return raised.code, capsys.readouterr().err.strip().splitlines()
        return 0, capsys.readouterr().err.strip().splitlines()

    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("notes\n")
    (mine / "sub" / "x.txt").write_text("x\n")
    noted = model_folder(tmp_path / "noted")
    (noted / "notes.txt").write_text("notes\n")
    nested = model_folder(tmp_path / "nested")
    (nested / "sub").mkdir()
    converted = model_folder(tmp_path / "converted", training=False)
    data = DEFAULT_MODEL.parent
    before = {folder: sorted(p.relative_to(folder) for p in folder.rglob("*"))
              for folder in (mine, noted, nested, converted, data)}
    not_ours = "is not empty and not a model folder train_default.py wrote (it has no tclip_config.json with a " \
               "training record), and saving would replace it; name another folder"
    for out, message in [(mine, not_ours), (data, not_ours), (converted, not_ours),
                         (noted, "holds notes.txt, which train_default.py does not write; move it or name another "
                                 "folder"),
                         (nested, "holds sub, which train_default.py does not write")]:
        code, err = run(train_default.main, [str(SCRIPT), "--out", str(out), "--steps", "3", "--set", "warmup_steps=1"])
        assert code == 2 and err[-1].startswith(f"train_default.py: error: --out {out} {message}"), err
    search = tmp_path / "search"
    shutil.copytree(mine, search / "b")
    code, err = run(search_recipes.main, [str(SEARCH_SCRIPT), "--out", str(search), "--no-heldout", "--workers", "1",
                                          "--set", *TINY_OVERRIDES, "--run", "a", "--run", "b"])
    assert code == 2 and err[-1] == f"search_recipes.py: error: --out {search / 'b'} {not_ours}", err
    assert trained == [] and sorted(p.name for p in search.iterdir()) == ["b"]
    assert before == {folder: sorted(p.relative_to(folder) for p in folder.rglob("*")) for folder in before}
    # What a run may replace: a new folder, an empty one (a file browser's files aside), a model folder this script
    # wrote with its card (the embedded models' README.md).
    (tmp_path / "empty").mkdir()
    (tmp_path / "browsed").mkdir()
    (tmp_path / "browsed" / ".DS_Store").write_text("")
    ours = model_folder(tmp_path / "ours")
    (ours / ".DS_Store").write_text("")
    for out in (tmp_path / "new", tmp_path / "empty", tmp_path / "browsed", ours):
        assert run(train_default.main, [str(SCRIPT), "--out", str(out), "--steps", "3", "--set", "warmup_steps=1"]) \
            == (0, [])
    assert trained == [tmp_path / "new", tmp_path / "empty", tmp_path / "browsed", ours]


def test_paths_a_run_could_not_save_to_are_refused_before_training(tmp_path, monkeypatch, capsys):
    """--out the current folder or one above it (which cannot be replaced), --save-state under a file, at a folder
    or inside --out (which saving replaces): one line before the model is built, not a traceback after training."""
    monkeypatch.setattr(train_default, "train", None)  # any training would fail
    here = tmp_path / "here"
    here.mkdir()
    (tmp_path / "afile").write_text("x\n")
    monkeypatch.chdir(here)
    for arguments, message in [(["--out", "."], "--out . holds the current folder, which cannot be replaced; name "
                                                "another folder"),
                               (["--out", ".."], "--out .. holds the current folder, which cannot be replaced"),
                               (["--out", "m", "--save-state", "1", "../afile/state.npz"],
                                "--save-state ../afile/state.npz: ../afile is a file, not a folder"),
                               (["--out", "m", "--save-state", "1", ".."], "--save-state .. is a folder, not a file"),
                               (["--out", "m", "--save-state", "1", "m/state.npz"],
                                "--save-state m/state.npz is inside --out m, which holds the model alone; name a path "
                                "outside it")]:
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), *arguments, "--steps", "3", "--set", "warmup_steps=1"])
        with pytest.raises(SystemExit) as raised:
            train_default.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert raised.value.code == 2 and err[-1].startswith(f"train_default.py: error: {message}"), err
    assert not any(here.iterdir()) and (tmp_path / "afile").read_text() == "x\n"


def test_an_out_folder_whose_parent_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """Saving stages the new model folder beside --out and swaps it in: a folder holding --out that this process may
    not write in was found only after training. (As root every access check passes, so os.access is replaced.)"""
    monkeypatch.setattr(train_default, "train", None)  # any training would fail
    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: pathlib.Path(path) != out.parent and real_access(path, mode))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(out), "--steps", "3", "--set", "warmup_steps=1"])
    with pytest.raises(SystemExit) as raised:
        train_default.main()
    assert raised.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train_default.py: error: --out {out}: cannot write in {out.parent}, where its replacement is written before "
        "it replaces the folder")


def test_saving_a_model_replaces_only_the_files_this_script_writes(tmp_path, monkeypatch):
    """A model folder trained again in place: its model files are replaced (the stale heldout_metrics.json goes, the
    next stage writes it again), and all else it holds is kept, its card and what arrived there during training."""
    config = train_default.TrainConfig(**train_default.parse_overrides(TINY_MODEL + ["steps=3", "warmup_steps=1"]))
    out = model_folder(tmp_path / "model")
    (out / ".DS_Store").write_text("browser\n")

    def train(config, log_path, **kwargs):  # writes its log; meanwhile someone puts notes in the folder
        log_path.write_text('{"step": 3}\n')
        (out / "notes.txt").write_text("notes\n")
        (out / "notes.txt").chmod(0o600)  # private notes stay private
        (out / "sub").mkdir()
        (out / "sub" / "x.txt").write_text("x\n")
        (out / "sub" / "run.sh").write_text("true\n")
        (out / "sub" / "run.sh").chmod(0o750)
        return tiny_params(config), np.array([1, 2], np.int32), {"final": {"step": 3}}

    monkeypatch.setattr(train_default, "train", train)
    train_default.train_and_save(config, out)
    assert sorted(p.name for p in out.iterdir()) == [".DS_Store", "README.md", "notes.txt", "params.npz", "sub",
                                                     "tclip_config.json", train_default.LOG_FILE]
    assert [(out / name).read_text() for name in ("README.md", "notes.txt", "sub/x.txt", ".DS_Store",
                                                   train_default.LOG_FILE)] == [
        "the card\n", "notes\n", "x\n", "browser\n", '{"step": 3}\n']
    assert [(out / name).stat().st_mode & 0o777 for name in ("notes.txt", "sub/run.sh")] == [0o600, 0o750]
    assert json.loads((out / "tclip_config.json").read_text())["training"]["final"] == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder or hidden log left


def test_a_sigterm_to_a_training_process_leaves_nothing_beside_its_folder(tmp_path):
    """As a user's job is stopped: its own process, SIGTERM once the first step is logged (the td_sig.sh repro:
    the default handler ended it with the hidden log left beside --out)."""
    out, log = tmp_path / "model", tmp_path / f".model.{train_default.LOG_FILE}"
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--set", *TINY_MODEL, "steps=100000",
                                "warmup_steps=1", "batch_size=4", "validation_scenes=2", "eval_every=100000"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=SCRIPT.parent.parent)
    try:
        deadline = time.monotonic() + 240
        while not (log.is_file() and log.read_text()):  # a step is done: the run is training
            assert process.poll() is None and time.monotonic() < deadline, process.returncode
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"train_default.py: terminated; {out} was not " \
                                                                      "written"
    assert not any(tmp_path.iterdir())


def test_one_object_curriculum_draws_one_object_scenes_then_the_training_style():
    config = train_default.TrainConfig(batch_size=8, curriculum_steps=2, curriculum_objects=1)
    one_object = dataclasses.replace(train_default.EASY_STYLE, counts=(1,), count_weights=(1.0,),
                                     form_weights=config.form_weights)
    images, captions, _ = train_default.batch(config, 1)
    seeds = train_seeds(4, 4)
    expected = [make_scene(seed, None, one_object) for seed in seeds]
    assert captions[::2] == [scene.caption for scene in expected]
    np.testing.assert_array_equal(images[0], resize_rgb(expected[0].image, (config.image_size,) * 2))
    # After the curriculum: the full training style, whose scenes hold up to five objects.
    _, later, _ = train_default.batch(config, 2)
    assert later[::2] == [make_scene(seed, None, dataclasses.replace(
        train_default.TRAINING_STYLE, form_weights=config.form_weights)).caption for seed in train_seeds(4, 8)]
    with pytest.raises(ValueError, match="curriculum_objects"):
        train_default.batch(dataclasses.replace(config, curriculum_objects=4), 0)


def test_curriculum_form_weights_name_shapes_only_during_the_curriculum():
    config = train_default.TrainConfig(batch_size=8, curriculum_steps=1, curriculum_objects=1,
                                       curriculum_form_weights=(0.0, 0.0, 1.0, 0.0))
    shape_only = dataclasses.replace(train_default.EASY_STYLE, counts=(1,), count_weights=(1.0,),
                                     form_weights=(0.0, 0.0, 1.0, 0.0))
    _, captions, _ = train_default.batch(config, 0)
    scenes = [make_scene(seed, None, shape_only) for seed in train_seeds(4, 0)]
    assert captions[::2] == [scene.caption for scene in scenes]
    for caption, scene in zip(captions[::2], scenes):  # the shape is named, the colour is not
        assert scene.objects[0].shape in caption and scene.objects[0].colour not in caption
    _, later, _ = train_default.batch(config, 1)
    assert later[::2] == [make_scene(seed, None, dataclasses.replace(
        train_default.TRAINING_STYLE, form_weights=config.form_weights)).caption for seed in train_seeds(4, 4)]


def test_relation_rate_sets_how_often_captions_relate_two_objects():
    with_relations = train_default.TrainConfig(batch_size=32)
    without = dataclasses.replace(with_relations, relation_rate=0.0)
    _, captions, negatives = train_default.batch(without, 0)
    assert captions[::2] == [make_scene(seed, None, dataclasses.replace(
        train_default.TRAINING_STYLE, relation_rate=0.0)).caption for seed in train_seeds(16, 0)]
    assert not any(relation in caption for caption in captions + negatives for relation in RELATIONS)
    _, default_captions, _ = train_default.batch(with_relations, 0)
    assert any(relation in caption for caption in default_captions for relation in RELATIONS)
    with pytest.raises(ValueError, match="relation_rate"):
        train_default.TrainConfig(relation_rate=1.5)


def test_variant_attributes_and_negative_kinds_choose_the_batch_hard_negatives():
    config = train_default.TrainConfig(batch_size=16, variant_attributes=("shape",), negative_kinds=("shape",))
    _, captions, negatives = train_default.batch(config, 0)
    style = dataclasses.replace(train_default.TRAINING_STYLE, form_weights=config.form_weights)
    expected_negatives = []
    for k, seed in enumerate(train_seeds(8, 0)):
        scene = make_scene(seed, None, style)
        variant = scene_variant(scene, seed, style, ("shape",))
        assert captions[2 * k:2 * k + 2] == [scene.caption, variant.caption]
        expected_negatives += negative_captions(scene, seed, 2, (variant.objects,), kinds=("shape",))
    assert negatives == [c for c in dict.fromkeys(expected_negatives) if c not in captions]
    default_captions = train_default.batch(dataclasses.replace(config, variant_attributes=("colour", "shape")), 0)[1]
    assert default_captions != captions  # the option is not ignored
    for bad in ("variant_attributes=size", "negative_kinds=colour,size", "negative_kinds="):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            train_default.TrainConfig(**train_default.parse_overrides([bad]))


def test_command_line_overrides_accumulate_and_bad_ones_get_one_line(tmp_path, monkeypatch, capsys):
    def run(*overrides):  # main() in this process: a fresh interpreter for each case costs seconds of imports
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(tmp_path / "model"), *overrides])
        with pytest.raises(SystemExit) as raised:
            train_default.main()
        return raised.value.code, capsys.readouterr().err

    # Each --set adds its fields: the error names values from all three, and nothing was trained or written. Once
    # as a user runs it: its own process, exit status 2 and one line, no traceback.
    both = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "model"), "--recipe", "default",
                           "--set", "mosaic_weight=1", "--set", "mosaic_start=5", "--set", "steps=3"],
                          capture_output=True, text=True, cwd=SCRIPT.parent.parent, timeout=300)
    assert both.returncode == 2 and "got 5 with mosaic_weight 1.0 and 3 steps" in both.stderr
    assert "Traceback" not in both.stderr
    for overrides, message in [(("--set", "steps=1", "steps=2"), "--set: option steps is given twice"),
                               (("--set", "steps"), "--set: an option is KEY=VALUE, got 'steps'"),
                               (("--set", "colour=red"),
                                f"--set: unknown option 'colour' (did you mean 'step_colours'?); {KNOWN_FIELDS}"),
                               (("--set", "curriculum_objective=tokens"), "--set: option curriculum_objective: must "
                                                                          "be one of '', clip, clip_tokens, got "
                                                                          "'tokens'"),
                               (("--steps", "4", "--set", "steps=3"), "--set gives steps, which its own flag gives too"),
                               (("--steps", "40",), "warmup_steps must be >= 0 and shorter than the 40 steps it warms "
                                                    "up, got 50")]:
        code, stderr = run(*overrides)
        assert code == 2 and stderr.count("\n") == 1 and stderr.strip().endswith(message), stderr  # no usage block
    # argparse's own refusals too, with the hint the usage block was
    assert run("--steps", "abc") == (2, "train_default.py: error: argument --steps: invalid int value: 'abc' (see "
                                        "train_default.py --help)\n")
    assert not any(tmp_path.iterdir())
    (tmp_path / "a_file").write_text("x")  # refused before any step, not after the run
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(tmp_path / "a_file"), "--steps", "3"])
    with pytest.raises(SystemExit):
        train_default.main()
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"--out {tmp_path / 'a_file'} is a file, not a "
                                                                     "folder")


def test_check_determinism_refuses_what_it_cannot_train_with_one_line_before_training(monkeypatch, capsys):
    for arguments, message in [(("--set", "foo=1"), f"--set: unknown option 'foo'; {KNOWN_FIELDS}"),
                               (("--set", "steps"), "--set: an option is KEY=VALUE, got 'steps'"),
                               (("--set", "batch_size=3"), "batch_size must be even (each scene beside its variant), "
                                                           "got 3"),
                               (("--objective", "clip", "--set", "objective=clip"),
                                "--set gives objective, which its own flag gives too"),
                               (("--steps", "0"), "--steps must be >= 1, got 0"),
                               (("--steps", "5", "--set", "steps=3", "warmup_steps=1"),
                                "--steps 5: the configuration trains only 3 steps")]:
        monkeypatch.setattr(sys, "argv", ["check_determinism.py", *arguments])
        with pytest.raises(SystemExit) as raised:
            check_determinism.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert raised.value.code == 2 and err[-1].startswith("check_determinism.py: error: ") and len(err) == 1, err
        assert err[-1].endswith(message), err


def test_check_determinism_set_overrides_accumulate_as_in_the_training_script(monkeypatch, capsys):
    trained = []

    def train(config, log_path, stop_after):  # records the configuration instead of training it
        trained.append((config, stop_after))
        return {"w": np.zeros(2, np.float32)}, None, None

    monkeypatch.setattr(train_default, "train", train)
    monkeypatch.setattr(sys, "argv", ["check_determinism.py", "--steps", "2", "--set", "steps=3", "warmup_steps=1",
                                      "--set", "batch_size=4"])
    with pytest.raises(SystemExit) as raised:
        check_determinism.main()
    assert raised.value.code == 0 and json.loads(capsys.readouterr().out)["bit_identical"]
    # Both runs train every --set's fields, not only the last --set's.
    assert [(c.steps, c.warmup_steps, c.batch_size, stop) for c, stop in trained] == [(3, 1, 4, 2)] * 2


def test_step_colours_draw_a_steps_scenes_from_its_own_palette():
    config = train_default.TrainConfig(batch_size=16, step_colours=1, variant_attributes=("shape",))
    for step in range(3):
        palette = train_default.step_palette(config, step)
        assert len(palette) == 1 and set(palette) <= set(train_default.COLOURS)
        _, captions, _ = train_default.batch(config, step)
        style = dataclasses.replace(train_default.TRAINING_STYLE, form_weights=config.form_weights, colours=palette)
        for k, seed in enumerate(train_seeds(8, 8 * step)):
            scene = make_scene(seed, None, style)
            assert {o.colour for o in scene.objects} == set(palette)  # every object of every scene: one colour
            variant = scene_variant(scene, seed, style, ("shape",))  # None: batch draws a far scene instead
            assert captions[2 * k] == scene.caption and (variant is None or captions[2 * k + 1] == variant.caption)
    palettes = {train_default.step_palette(config, step) for step in range(60)}
    assert len(palettes) == len(train_default.COLOURS)  # the colour changes from step to step
    # A share of the steps: the rest keep every colour; rate 0 is the default batch.
    half = dataclasses.replace(config, step_colours=2, step_colours_rate=0.5)
    sizes = [len(train_default.step_palette(half, step)) for step in range(400)]
    assert set(sizes) == {2, len(train_default.COLOURS)} and 0.4 < sizes.count(2) / 400 < 0.6
    never = dataclasses.replace(config, step_colours_rate=0.0)
    assert train_default.batch(never, 0)[1] == train_default.batch(dataclasses.replace(config, step_colours=0), 0)[1]
    for bad in ("step_colours=7", "step_colours=-1", "step_colours_rate=1.5"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            train_default.TrainConfig(**train_default.parse_overrides([bad]))


def test_a_scene_without_a_variant_takes_a_far_training_seed_never_a_held_out_one(monkeypatch):
    """A scene with no variant takes the scene of the training seed half the training seeds on, wrapping round
    within them (closed form): as before below the half (the shipped runs' seeds), never a held-out seed above it."""
    drawn = []

    def make_scene(seed, *args):
        drawn.append(seed)
        return real_make_scene(seed, *args)

    real_make_scene = train_default.make_scene
    monkeypatch.setattr(train_default, "make_scene", make_scene)
    monkeypatch.setattr(train_default, "scene_variant", lambda *args: None)  # every scene lacks a variant
    config = train_default.TrainConfig(batch_size=2, negatives=0)  # one scene a step: step s draws seed s
    start, end = synthetic.TRAIN_SEED_START, synthetic.HELDOUT_SEED_START
    half = (end - start) // 2
    for seed, far in ((start, start + half), (start + half - 1, end - 1), (start + half, start),
                      (end - 1, start + half - 1)):
        drawn.clear()
        train_default.batch(config, seed - start)
        assert drawn == [seed, far], seed
    assert half == 5_000_000  # the shipped runs' far seed: their seed + 5,000,000


def test_curriculum_restart_gives_the_rest_its_own_warmup_and_cosine_decay():
    peak, warmup, curriculum, steps = 1e-3, 10, 100, 300
    config = train_default.TrainConfig(peak_learning_rate=peak, warmup_steps=warmup, steps=steps,
                                       curriculum_steps=curriculum, curriculum_restart=1)

    def expected(step):  # warm-up then cosine, restarted at the curriculum's end (closed form)
        start, length = (0, curriculum) if step < curriculum else (curriculum, steps - curriculum)
        t = step - start
        if t < warmup:
            return peak * t / warmup
        return peak * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (length - warmup)))

    schedule = train_default.learning_rate_schedule(config)
    for step in (0, 5, 10, 60, 99, 100, 105, 110, 200, 299):
        np.testing.assert_allclose(float(schedule(step)), expected(step), rtol=1e-5, atol=1e-9)
    plain = train_default.learning_rate_schedule(dataclasses.replace(config, curriculum_restart=0))
    assert float(plain(100)) > 0.5 * peak  # no restart: one cosine over all steps
    with pytest.raises(ValueError, match="curriculum_restart"):  # nothing to restart after: said, not ignored
        dataclasses.replace(config, curriculum_steps=0)
    for bad in (-1, 2, curriculum, steps + 1):  # a switch, 0 or 1: any other integer ran as 1
        with pytest.raises(ValueError, match=re.escape(f"curriculum_restart must be one of (0, 1), got {bad}")):
            dataclasses.replace(config, curriculum_restart=bad)


def test_a_stretched_schedule_is_the_shorter_runs_then_its_rest_stretched():
    peak, warmup, shorter, start, steps = 1e-3, 10, 300, 200, 500
    config = train_default.TrainConfig(peak_learning_rate=peak, warmup_steps=warmup, steps=steps,
                                       schedule_steps=shorter, schedule_stretch_start=start)

    def cosine(t):  # the shorter run's decay at (possibly fractional) step t, closed form
        return peak * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (shorter - warmup)))

    schedule = train_default.learning_rate_schedule(config)
    plain = train_default.learning_rate_schedule(dataclasses.replace(config, steps=shorter, schedule_steps=0,
                                                                     schedule_stretch_start=0))
    for step in (0, 5, 10, 100, 199):  # the shorter run's rates, bit for bit
        assert float(schedule(step)) == float(plain(step))
    for step in (200, 201, 350, 499, 500):  # its last 100 steps' decay over the last 300
        np.testing.assert_allclose(float(schedule(step)), cosine(start + (step - start) * 100 / 300), rtol=1e-5,
                                   atol=1e-9)
    assert float(schedule(500)) == pytest.approx(0.0, abs=1e-12)
    for bad in (dict(schedule_stretch_start=0), dict(schedule_steps=0), dict(schedule_stretch_start=300),
                dict(schedule_stretch_start=5), dict(steps=200)):
        with pytest.raises(ValueError, match="schedule_steps and schedule_stretch_start go together"):
            dataclasses.replace(config, **bad)
    with pytest.raises(ValueError, match="curriculum_restart"):
        dataclasses.replace(config, curriculum_steps=100, curriculum_restart=1)


def test_a_frozen_stem_keeps_its_step_and_a_stretched_run_resumes_from_its_shorter_run(tmp_path):
    """The late phase the two options make: from the stretch on, more steps at the shorter run's late rates with the
    pixel layers kept, resumed from the shorter run's saved state as if it had run from the start."""
    tiny = dict(batch_size=4, steps=4, warmup_steps=1, validation_scenes=2, eval_every=100, image_size=32,
                patch_size=16, stem_channels=(4,), embed_dim=16, vision_width=64, vision_layers=1, text_width=64,
                text_layers=1)
    shorter = train_default.TrainConfig(**tiny)
    at_two, _, _ = train_default.train(shorter, tmp_path / "shorter.jsonl", stop_after=2,
                                       save_state_at=(2, tmp_path / "state.npz"))
    stretched = dataclasses.replace(shorter, steps=5, schedule_steps=4, schedule_stretch_start=2, stem_frozen_start=2)
    straight, _, _ = train_default.train(stretched, tmp_path / "straight.jsonl")
    resumed, _, _ = train_default.train(stretched, tmp_path / "resumed.jsonl", resume=tmp_path / "state.npz")
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, straight)
    for name in ("stem_0", "patch_embed"):  # kept from step 3 on: no gradient step, no weight decay
        jax.tree_util.tree_map(np.testing.assert_array_equal, straight["visual"][name], at_two["visual"][name])
    assert not np.array_equal(straight["visual"]["proj"], at_two["visual"]["proj"])
    # Not the saved run's first steps: the rates of another shorter run, or the stem kept from step 2.
    for other in (dict(schedule_steps=5), dict(stem_frozen_start=1)):
        with pytest.raises(ValueError, match="first 2 steps differ"):
            train_default.train(dataclasses.replace(stretched, **other), tmp_path / "bad.jsonl",
                                resume=tmp_path / "state.npz")
    with pytest.raises(ValueError, match="stem_frozen_start"):
        dataclasses.replace(stretched, stem_frozen_start=5)


def logsumexp(x) -> float:
    return float(np.logaddexp.reduce(np.asarray(x, np.float64)))


def test_token_terms_are_filip_per_piece_retrieval_and_sparc():
    """`clip_tokens`' three terms against explicit loops on toy unit tokens (4 images; 4 captions, a negative and a
    padding row whose column is masked; 5 positions; 6 patches): FILIP's best patch per piece and mean over the
    caption's pieces, its InfoNCE without the masked column; per-piece retrieval over the true captions' pieces only;
    SPARC's groups (min-max scaled cosines, those below 1/N dropped, l2-normalized) and its loss both ways among each
    caption's pieces. A wrong axis or mask would still train: only the values show it."""
    rng = np.random.default_rng(0)
    images, positions, patches, dim = 4, 5, 6, 7

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    text = unit(rng.normal(size=(images + 2, positions, dim)))
    patch = unit(rng.normal(size=(images, patches, dim)))
    pieces = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 1, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 0],
                       [0, 1, 1, 0, 0]], np.float32)
    columns = np.array([True] * (images + 1) + [False])
    scale = 3.0

    def infonce(logits):  # [images, texts]: image i -> its caption i among the real columns, caption i -> image i
        image_to_text = [logsumexp(logits[i][columns]) - logits[i, i] for i in range(images)]
        text_to_image = [logsumexp(logits[:, t]) - logits[t, t] for t in range(images)]
        return 0.5 * (np.mean(image_to_text) + np.mean(text_to_image))

    def best(t, l, i):  # piece l of caption t: its best cosine among image i's patches
        return max(text[t, l] @ patch[i, p] for p in range(patches))

    filip = np.array([[np.mean([best(t, l, i) for l in range(positions) if pieces[t, l]]) for t in range(len(text))]
                      for i in range(images)])
    retrieval = [logsumexp([scale * best(t, l, i) for i in range(images)]) - scale * best(t, l, t)
                 for t in range(images) for l in range(positions) if pieces[t, l]]
    dense, per_piece = train_default.token_losses(text.astype(np.float32), pieces, patch.astype(np.float32),
                                                  np.float32(scale), images, columns)
    assert float(dense) == pytest.approx(infonce(scale * filip), rel=1e-5)
    assert float(per_piece) == pytest.approx(np.mean(retrieval), rel=1e-5)
    sparc = []
    for b in range(images):
        groups = []
        for l in range(positions):
            cosines = patch[b] @ text[b, l]
            scaled = (cosines - cosines.min()) / (cosines.max() - cosines.min() + 1e-6)
            weights = np.where(scaled >= 1 / patches, scaled, 0.0)
            groups.append(unit((weights / weights.sum()) @ patch[b]))
        own = [l for l in range(positions) if pieces[b, l]]
        logits = np.array([[scale * text[b, l] @ groups[k] for k in own] for l in own])  # piece, group
        sparc += [0.5 * (logsumexp(logits[a]) + logsumexp(logits[:, a])) - logits[a, a] for a in range(len(own))]
    fine = train_default.fine_grained_loss(text[:images].astype(np.float32), pieces[:images],
                                           patch.astype(np.float32), np.float32(scale))
    assert float(fine) == pytest.approx(np.mean(sparc), rel=1e-5)


def _assert_same_losses(log: pathlib.Path, expected_log: pathlib.Path) -> None:
    """The two runs' first steps logged the same loss terms with the same values. Their parameters after it are
    equal whatever the loss (warm-up starts the learning rate at 0), so only the losses tell the objectives apart."""
    record, expected = (json.loads(path.read_text().splitlines()[0]) for path in (log, expected_log))
    terms = sorted(key for key in expected if key.endswith("loss"))
    assert sorted(key for key in record if key.endswith("loss")) == terms
    assert [record[key] for key in terms] == [expected[key] for key in terms]


def test_curriculum_objective_trains_the_curriculum_with_its_own_loss(tmp_path):
    """Step 1 trains the curriculum's objective alone; step 2 the run's, whose token terms enter the total each with
    its own weight, on each caption's own tokens and image (`test_token_terms_are_filip_per_piece_retrieval_and_sparc`
    checks the terms themselves)."""
    tiny = dict(batch_size=4, steps=2, curriculum_steps=1, warmup_steps=1, validation_scenes=2, eval_every=100,
                image_size=32, patch_size=16, embed_dim=16, vision_width=64, vision_layers=1, text_width=64,
                text_layers=1)
    weights = dict(dense_weight=0.5, token_weight=2.0, fine_grained_weight=3.0)
    mixed = train_default.TrainConfig(objective="clip_tokens", curriculum_objective="clip", **weights, **tiny)
    global_only = dataclasses.replace(mixed, objective="clip", curriculum_objective="")
    first, _, _ = train_default.train(mixed, tmp_path / "first.jsonl", stop_after=1)
    expected, _, _ = train_default.train(global_only, tmp_path / "expected.jsonl", stop_after=1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, expected)  # step 1: the global loss alone
    _assert_same_losses(tmp_path / "first.jsonl", tmp_path / "expected.jsonl")  # (its learning rate is 0)
    train_default.train(mixed, tmp_path / "both.jsonl")
    records = [json.loads(line) for line in (tmp_path / "both.jsonl").read_text().splitlines()]
    assert "dense_loss" not in records[0] and "dense_loss" in records[1]  # step 2: the token terms too
    logged = records[1]
    assert logged["loss"] == pytest.approx(logged["clip_loss"] + 0.5 * logged["dense_loss"]
                                           + 2.0 * logged["token_loss"] + 3.0 * logged["fine_grained_loss"], rel=1e-6)
    # Step 2 reads the parameters after step 1 and its own batch: each caption's tokens against its own image.
    model = CLIP(train_default.model_config(mixed))
    images, token_ids, columns, _ = train_default.step_inputs(mixed, 1)
    tokenizer = train_default.default_tokenizer()
    texts = len(images)

    @jax.jit  # one compilation: op by op, the towers and terms cost several CPU seconds more
    def terms(params):
        text = l2_normalize(model.apply({"params": params}, token_ids, method="encode_text").tokens)
        image = model.apply({"params": params}, clip_normalize(images), method="encode_image")
        patches = l2_normalize(image.tokens[:, 1:])
        pieces = train_default.piece_mask(token_ids, tokenizer.sot_id, tokenizer.eot_id)
        scale = jnp.exp(params["logit_scale"])
        return (*train_default.token_losses(text, pieces, patches, scale, texts, columns),
                train_default.fine_grained_loss(text[:texts], pieces[:texts], patches, scale))

    assert [logged[name] for name in ("dense_loss", "token_loss", "fine_grained_loss")] == \
        pytest.approx([float(term) for term in terms(first)], rel=1e-5)
    with pytest.raises(ValueError, match="curriculum_objective"):
        dataclasses.replace(mixed, curriculum_objective="tokens")
    with pytest.raises(ValueError, match="^objective must"):
        dataclasses.replace(mixed, objective="tokens")


def test_text_frozen_steps_keep_the_text_tower_at_its_initialisation(tmp_path):
    """While frozen, the text tower is neither moved nor given Adam moments (`make_train_step`): its moments are still
    exactly 0 after the frozen steps, so it starts training from fresh moments, not from gradients it never took."""
    tiny = dict(batch_size=4, steps=3, warmup_steps=1, validation_scenes=2, eval_every=100, image_size=32,
                patch_size=16, embed_dim=16, vision_width=64, vision_layers=1, text_width=64, text_layers=1)
    config = train_default.TrainConfig(objective="clip_tokens", text_frozen_steps=2, **tiny)
    start = init_params(train_default.model_config(config), config.seed)
    frozen, _, _ = train_default.train(config, tmp_path / "frozen.jsonl", stop_after=2,
                                       save_state_at=(2, tmp_path / "frozen.npz"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen["text"], start["text"])
    adam = train_default.load_state(tmp_path / "frozen.npz", config,
                                    train_default.initial_state(config, None)).opt_state[0]
    for moments in (adam.mu, adam.nu):
        assert not any(np.any(leaf) for leaf in jax.tree_util.tree_leaves(moments["text"]))
        assert np.any(moments["visual"]["proj"])  # the image tower's moments are there
    assert not np.array_equal(frozen["visual"]["proj"], start["visual"]["proj"])
    assert frozen["logit_scale"] != start["logit_scale"]
    trained, _, _ = train_default.train(config, tmp_path / "trained.jsonl")  # step 3 trains the text tower
    assert not np.array_equal(trained["text"]["projection"], start["text"]["projection"])
    with pytest.raises(ValueError, match="text_frozen_steps"):
        dataclasses.replace(config, text_frozen_steps=-1)


def test_weight_decay_reaches_the_weight_matrices_only():
    """AdamW decays the weight matrices (kernels, convolutions included, and the two projections) and nothing else: not
    biases, LayerNorm scales, the embeddings or the temperature, as the optimiser's comment says (CLIP's choice).
    With zero gradients Adam's moments stay 0, so the update after step 1 (learning rate 0) is the decay alone:
    -peak learning rate * weight_decay * the parameter."""
    config = train_default.TrainConfig(batch_size=4, steps=10, warmup_steps=1, image_size=32, patch_size=16,
                                       stem_channels=(4,), embed_dim=16, vision_width=64, vision_layers=1,
                                       text_width=64, text_layers=1)
    params = init_params(train_default.model_config(config), config.seed)
    tx = train_default.optimizer(config)
    update = jax.jit(tx.update)  # one compilation: op by op, the tree's leaves cost about 3 CPU seconds more
    zeros = jax.tree_util.tree_map(np.zeros_like, params)
    _, state = update(zeros, tx.init(params), params)  # step 1
    updates, _ = update(zeros, state, params)  # step 2: the peak rate, the warm-up being one step
    kept = []
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        name = "/".join(key.key for key in path)
        param = functools.reduce(lambda tree, key: tree[key.key], path, params)
        if path[-1].key in ("kernel", "proj", "projection"):
            np.testing.assert_allclose(update, -config.peak_learning_rate * config.weight_decay * param, rtol=1e-6,
                                       err_msg=name)
        else:
            assert not np.any(update), name
            kept.append(name)
    assert {"logit_scale", "text/token_embedding", "text/positional_embedding", "visual/class_embedding",
            "visual/ln_pre/scale", "text/transformer/block_0/ln_1/scale", "visual/stem_0/bias"} <= set(kept)


def test_the_optimiser_is_adamw_with_clips_vit_moments_and_epsilon():
    """Two updates of `optimizer` against AdamW written out with CLIP's ViT values (b1 0.9, b2 0.98, eps 1e-6): two
    different gradients tell b1 and b2 apart, and gradients of about 1e-6 make eps count. The updates are compared,
    not the parameters, which would hide them in their float32 rounding."""
    config = train_default.TrainConfig(batch_size=4, steps=10, warmup_steps=1, image_size=32, patch_size=16)
    b1, b2, eps = 0.9, 0.98, 1e-6
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 4)).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)}
    scales = {"kernel": np.array([[1e-6], [1e-3], [1.0]], np.float32), "bias": np.float32(1e-6)}
    gradients = [{k: (rng.normal(size=v.shape) * scales[k] * size).astype(np.float32) for k, v in params.items()}
                 for size in (10, 1)]
    tx = train_default.optimizer(config)
    schedule = train_default.learning_rate_schedule(config)
    state = tx.init(params)
    m = {k: np.zeros(p.shape) for k, p in params.items()}  # Adam's moments, float64
    v = {k: np.zeros(p.shape) for k, p in params.items()}
    for t, g in enumerate(gradients, 1):
        updates, state = tx.update(g, state, params)
        for name, p in params.items():
            m[name] = b1 * m[name] + (1 - b1) * g[name]
            v[name] = b2 * v[name] + (1 - b2) * g[name].astype(np.float64) ** 2
            step = (m[name] / (1 - b1 ** t)) / (np.sqrt(v[name] / (1 - b2 ** t)) + eps)
            decay = config.weight_decay * p if name == "kernel" else 0.0  # weight matrices only
            np.testing.assert_allclose(updates[name], -float(schedule(t - 1)) * (step + decay), rtol=1e-5,
                                       err_msg=f"{name}, update {t}")
        params = {k: params[k] + updates[k] for k in params}


def test_word_idf_and_word_loss_follow_their_definitions():
    config = train_default.TrainConfig(batch_size=4, image_size=32, patch_size=16)
    tokenizer = train_default.default_tokenizer()
    captions = [c for step in range(train_default.WORD_IDF_STEPS) for c in train_default.batch(config, step)[1]]
    special = {tokenizer.sot_id, tokenizer.eot_id, train_default.PAD_ID}
    documents = [set(tokenizer.encode([c])[0].tolist()) - special for c in captions]
    idf = train_default.word_idf(config)
    used = set().union(*documents)
    for piece in used:
        assert idf[piece] == pytest.approx(np.log(len(captions) / sum(piece in d for d in documents)), rel=1e-6)
    assert not np.delete(idf, sorted(used)).any()
    # The loss: cross-entropy of softmax(embedding @ kernel) against the idf-weighted, normalized bag of pieces.
    rng = np.random.default_rng(0)
    ids = tokenizer.encode(captions[:3])
    pieces = np.asarray(train_default.piece_mask(ids, tokenizer.sot_id, tokenizer.eot_id))
    embeds, kernel = rng.normal(size=(3, 8)), rng.normal(size=(8, len(idf)))
    expected = []
    for row, keep, embed in zip(ids, pieces, embeds):
        target = np.zeros(len(idf))
        for piece, k in zip(row, keep):
            target[piece] += k * idf[piece]
        logits = embed @ kernel
        log_softmax = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        expected.append(-(target / target.sum() * log_softmax).sum())
    targets = train_default.word_targets(ids, pieces, idf)
    loss = train_default.word_loss(embeds.astype(np.float32), kernel.astype(np.float32), targets)
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-4)
    # Read from patches: each piece of the vocabulary (idf > 0) scores its best patch; the softmax over those pieces.
    # With `compete`, each patch's scores become log-probabilities over the pieces first.
    vocab = np.flatnonzero(idf)
    patches = rng.normal(size=(3, 5, 8))
    # With pool="logsumexp", the best patch's score becomes log(mean over patches of exp(score)).
    variants = [(compete, pool) for compete in (False, True) for pool in ("max", "logsumexp")]
    expected = {variant: [] for variant in variants}
    for row, keep, image in zip(ids, pieces, patches):
        per_patch = np.array([[patch @ kernel[:, piece] for piece in vocab] for patch in image])  # [P, U]
        target = np.array([sum(k * idf[p] for p, k in zip(row, keep) if p == piece) for piece in vocab])
        for compete, pool in variants:
            at_patch = per_patch - np.log(np.exp(per_patch).sum(axis=1, keepdims=True)) if compete else per_patch
            scores = at_patch.max(axis=0) if pool == "max" else np.log(np.exp(at_patch).mean(axis=0))
            log_softmax = scores - scores.max() - np.log(np.exp(scores - scores.max()).sum())
            expected[compete, pool].append(-(target / target.sum() * log_softmax).sum())
    loss = {(compete, pool): float(train_default.patch_word_loss(patches.astype(np.float32),
                                                                 kernel[:, vocab].astype(np.float32),
                                                                 targets[:, vocab], compete=compete, pool=pool))
            for compete, pool in variants}
    for variant in variants:
        assert loss[variant] == pytest.approx(np.mean(expected[variant]), rel=1e-4)
    assert loss[True, "max"] != pytest.approx(loss[False, "max"], rel=1e-2)
    assert loss[False, "logsumexp"] != pytest.approx(loss[False, "max"], rel=1e-2)


def test_word_weight_trains_the_image_tower_through_a_head_that_is_not_saved(tmp_path):
    tiny = dict(batch_size=4, steps=2, warmup_steps=1, validation_scenes=2, eval_every=100, image_size=32,
                patch_size=16, embed_dim=16, vision_width=64, vision_layers=1, text_width=64, text_layers=1)
    with_words = train_default.TrainConfig(objective="clip", word_weight=1.0, **tiny)
    without = dataclasses.replace(with_words, word_weight=0.0)
    first, _, _ = train_default.train(with_words, tmp_path / "words.jsonl")  # step 1 has learning rate 0
    plain, _, _ = train_default.train(without, tmp_path / "plain.jsonl")
    assert jax.tree_util.tree_structure(first) == jax.tree_util.tree_structure(plain)  # no head in the result
    # The term reads the image embedding only: the text tower takes the same steps, the image tower others.
    jax.tree_util.tree_map(np.testing.assert_array_equal, first["text"], plain["text"])
    assert not np.array_equal(first["visual"]["proj"], plain["visual"]["proj"])
    record = json.loads((tmp_path / "words.jsonl").read_text().splitlines()[0])
    assert record["loss"] == pytest.approx(record["clip_loss"] + record["word_loss"], rel=1e-6)
    assert "word_loss" not in json.loads((tmp_path / "plain.jsonl").read_text().splitlines()[0])
    with pytest.raises(ValueError, match="word_weight"):
        dataclasses.replace(with_words, word_weight=-1.0)
    # The term read from the patch tokens alone: the same head, not saved; the text tower again untouched.
    patch_words = dataclasses.replace(without, patch_word_weight=2.0)
    from_patches, _, _ = train_default.train(patch_words, tmp_path / "patches.jsonl")
    assert jax.tree_util.tree_structure(from_patches) == jax.tree_util.tree_structure(plain)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_patches["text"], plain["text"])
    assert not np.array_equal(from_patches["visual"]["proj"], plain["visual"]["proj"])
    record = json.loads((tmp_path / "patches.jsonl").read_text().splitlines()[0])
    assert "word_loss" not in record
    assert record["loss"] == pytest.approx(record["clip_loss"] + 2.0 * record["patch_word_loss"], rel=1e-6)
    with pytest.raises(ValueError, match="patch_word_weight"):
        dataclasses.replace(with_words, patch_word_weight=-1.0)
    with pytest.raises(ValueError, match="patch_word_head"):
        dataclasses.replace(patch_words, patch_word_head="zero")
    with pytest.raises(ValueError, match="patch_word_compete"):
        dataclasses.replace(patch_words, patch_word_compete=2)
    with pytest.raises(ValueError, match="patch_word_compete needs patch_word_weight"):
        dataclasses.replace(without, patch_word_compete=1)
    with pytest.raises(ValueError, match="patch_word_pool"):
        dataclasses.replace(patch_words, patch_word_pool="mean")
    with pytest.raises(ValueError, match="patch_word_pool needs patch_word_weight"):
        dataclasses.replace(without, patch_word_pool="logsumexp")
    # Through each piece's own text embedding (bare, or inside its caption) instead: no head at all, and the
    # term trains the text tower too.
    trained = {}
    for name, overrides, term in [("text", dict(patch_word_weight=2.0, patch_word_head="text"), "patch_word_loss"),
                                  ("compete", dict(patch_word_weight=2.0, patch_word_head="text",
                                                   patch_word_compete=1), "patch_word_loss"),
                                  ("soft", dict(patch_word_weight=2.0, patch_word_head="text",
                                                patch_word_pool="logsumexp"), "patch_word_loss"),
                                  ("captions", dict(caption_word_weight=2.0), "caption_word_loss"),
                                  ("pairs", dict(pair_locality_weight=2.0), "pair_locality_loss"),
                                  ("exclusive", dict(exclusive_weight=2.0), "exclusive_loss"),
                                  ("bare_map", dict(bare_map_weight=2.0), "bare_map_loss"),
                                  ("anchor", dict(bare_anchor_weight=2.0), "bare_anchor_loss")]:
        trained[name], _, _ = train_default.train(dataclasses.replace(without, **overrides),
                                                  tmp_path / f"{name}.jsonl")
        assert jax.tree_util.tree_structure(trained[name]) == jax.tree_util.tree_structure(plain)
        assert not np.array_equal(trained[name]["text"]["projection"], plain["text"]["projection"])
        record = json.loads((tmp_path / f"{name}.jsonl").read_text().splitlines()[0])
        assert record["loss"] == pytest.approx(record["clip_loss"] + 2.0 * record[term], rel=1e-6)
    first_term = {name: json.loads((tmp_path / f"{name}.jsonl").read_text().splitlines()[0])["patch_word_loss"]
                  for name in ("text", "compete", "soft")}
    for name in ("compete", "soft"):  # the flag reaches the term
        assert first_term[name] != pytest.approx(first_term["text"], rel=1e-3)
    # The anchor and bare-map terms are text-side only: the image tower takes the plain run's steps.
    for name in ("anchor", "bare_map"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, trained[name]["visual"], plain["visual"])
    for name in ("caption_word_weight", "bare_anchor_weight", "pair_locality_weight", "exclusive_weight",
                 "bare_map_weight"):
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(with_words, **{name: -1.0})

def test_caption_word_term_asks_each_image_for_its_own_caption_pieces_over_the_batchs_others():
    config = train_default.TrainConfig(batch_size=8, image_size=32, patch_size=16)
    tokenizer = train_default.default_tokenizer()
    idf = train_default.word_idf(config)
    ids = tokenizer.encode(train_default.batch(config, 0)[1])  # scenes next to their variants: shared words
    pieces = np.asarray(train_default.piece_mask(ids, tokenizer.sot_id, tokenizer.eot_id))
    rng = np.random.default_rng(0)
    tokens, patches = rng.normal(size=(*ids.shape, 8)), rng.normal(size=(len(ids), 5, 8))
    expected = []
    for i, image in enumerate(patches):  # the softmax over the pieces of all captions that image i may score
        own = {p for p, k in zip(ids[i], pieces[i]) if k and idf[p] > 0}
        scores, target = [], []
        for c, (row, keep) in enumerate(zip(ids, pieces)):
            for l, (piece, k) in enumerate(zip(row, keep)):
                if k and idf[piece] > 0 and (c == i or piece not in own):
                    scores.append(max(patch @ tokens[c, l] for patch in image))
                    target.append(idf[piece] if c == i else 0.0)
        scores, target = np.array(scores), np.array(target)
        log_softmax = scores - scores.max() - np.log(np.exp(scores - scores.max()).sum())
        expected.append(-(target / target.sum() * log_softmax).sum())
    targets, valid = train_default.caption_word_targets(ids, train_default.caption_weights(ids, pieces, idf))
    kernel = tokens.reshape(-1, 8).T.astype(np.float32)
    loss = train_default.patch_word_loss(patches.astype(np.float32), kernel, targets, valid)
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-5)
    assert not np.asarray(valid).all()  # the batch does share words, so the test reaches the mask


def test_bare_anchor_term_asks_each_caption_piece_for_its_own_bare_word_held_fixed():
    config = train_default.TrainConfig(objective="clip", bare_anchor_weight=1.0, batch_size=4, embed_dim=16,
                                       vision_width=64, vision_layers=1, text_width=64, text_layers=1,
                                       image_size=32, patch_size=16)
    tokenizer = train_default.default_tokenizer()
    idf = train_default.word_idf(config)
    vocab = np.flatnonzero(idf)
    images, captions, _ = train_default.batch(config, 0)
    ids = tokenizer.encode(captions)
    pieces = np.asarray(train_default.piece_mask(ids, tokenizer.sot_id, tokenizer.eot_id))
    rng = np.random.default_rng(0)
    tokens, bare, scale = rng.normal(size=(*ids.shape, 8)), rng.normal(size=(len(vocab), 8)), 3.0
    losses, weights = [], []
    for row, keep, row_tokens in zip(ids, pieces, tokens):
        for piece, k, token in zip(row, keep, row_tokens):
            if k and idf[piece] > 0:
                logits = scale * bare @ token
                own = list(vocab).index(piece)
                losses.append(-(logits[own] - logits.max() - np.log(np.exp(logits - logits.max()).sum())))
                weights.append(idf[piece])
    weight_rows = pieces * idf[ids]
    loss = train_default.bare_anchor_loss(tokens.astype(np.float32), ids, weight_rows, bare.astype(np.float32),
                                          vocab, scale)
    assert float(loss) == pytest.approx(np.average(losses, weights=weights), rel=1e-5)
    # In the objective, the bare embeddings and the temperature are constants: the term's gradient is that of the
    # loss with both taken from fixed parameters.
    model = CLIP(train_default.model_config(config))
    params = init_params(model.config, 0)
    columns = np.ones(len(ids), bool)

    def term(p):  # the whole objective less CLIP's loss
        total, metrics = train_default.losses(p, model, images, ids, columns, tokenizer.sot_id, tokenizer.eot_id,
                                              config, "clip", idf)
        return total - metrics["clip_loss"]

    bare_fixed = train_default.piece_embeddings(model, params, vocab, tokenizer.sot_id, tokenizer.eot_id)

    def anchored(p):
        text = model.apply({"params": p}, ids, method="encode_text")
        return train_default.bare_anchor_loss(train_default.l2_normalize(text.tokens), ids, weight_rows, bare_fixed,
                                              vocab, np.exp(params["logit_scale"]))

    got, expected = jax.jit(jax.grad(term))(params), jax.jit(jax.grad(anchored))(params)  # one program each
    # Two programs summing the same terms in their own orders: equal up to float32 rounding of the gradient's scale.
    scale = max(float(np.abs(leaf).max()) for leaf in jax.tree_util.tree_leaves(expected))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale), got, expected)
    assert float(np.abs(got["text"]["projection"]).max()) > 0


def test_pair_locality_term_asks_a_scene_and_its_variant_to_differ_at_few_patches_in_the_changed_word():
    config = train_default.TrainConfig(batch_size=16, image_size=32, patch_size=16)
    tokenizer = train_default.default_tokenizer()
    idf = train_default.word_idf(config)
    vocab = np.flatnonzero(idf)
    ids = tokenizer.encode(train_default.batch(config, 0)[1])  # scene, variant, scene, variant, ...
    pieces = np.asarray(train_default.piece_mask(ids, tokenizer.sot_id, tokenizer.eot_id))
    weights = pieces * idf[ids]
    expected_changed = np.zeros(ids.shape, bool)
    for pair in range(len(ids) // 2):  # the counted pieces whose id the other caption lacks, if one per caption
        rows = (2 * pair, 2 * pair + 1)
        changed = {r: [l for l in range(ids.shape[1]) if weights[r, l] > 0 and ids[r, l] not in ids[partner]]
                   for r, partner in zip(rows, rows[::-1])}
        if all(len(c) <= 1 for c in changed.values()):
            for r in rows:
                expected_changed[r, changed[r]] = True
    changed = np.asarray(train_default.changed_pieces(ids, weights))
    np.testing.assert_array_equal(changed, expected_changed)
    assert changed.sum() >= len(ids) // 2  # most variants change one word
    rng = np.random.default_rng(0)
    patches, bare = rng.normal(size=(len(ids), 5, 8)), rng.normal(size=(len(vocab), 8))
    losses, loss_weights = [], []
    for r, l in zip(*np.nonzero(expected_changed)):
        partner = r + 1 if r % 2 == 0 else r - 1
        word = bare[list(vocab).index(ids[r, l])]
        d = np.array([patches[r, p] @ word - patches[partner, p] @ word for p in range(5)])
        losses.append(np.abs(d).mean() - d.max())
        loss_weights.append(weights[r, l])
    loss = train_default.pair_locality_loss(patches.astype(np.float32), bare.astype(np.float32), vocab, ids,
                                            weights)
    assert float(loss) == pytest.approx(np.average(losses, weights=loss_weights), rel=1e-5)
    # Closed form: a pair of identical images costs 0.
    twins = np.repeat(patches[::2], 2, axis=0).astype(np.float32)
    assert float(train_default.pair_locality_loss(twins, bare.astype(np.float32), vocab, ids, weights)) == 0.0


def test_exclusive_term_keeps_the_maps_of_distinct_colour_or_shape_words_of_a_caption_apart():
    config = train_default.TrainConfig(batch_size=16, image_size=32, patch_size=16)
    tokenizer = train_default.default_tokenizer()
    captions = train_default.batch(config, 0)[1]
    ids = tokenizer.encode(captions)
    kinds = np.asarray(train_default.word_kinds(ids))
    for caption, row, kind in zip(captions, ids, kinds):  # the kinds are the words' own, read from the text
        words = caption.split()
        expected = [1 if w in train_default.COLOURS else 2 if w in train_default.SHAPES else 0 for w in words]
        assert [k for k, i in zip(kind, row) if i not in (tokenizer.sot_id, tokenizer.eot_id, 0)] == expected
    rng = np.random.default_rng(0)
    tokens, patches = rng.normal(size=(*ids.shape, 8)), rng.normal(size=(len(ids), 6, 8))
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
    correlations = []
    for b, l, k in itertools.product(range(len(ids)), range(ids.shape[1]), range(ids.shape[1])):
        if kinds[b, l] and kinds[b, l] == kinds[b, k] and ids[b, l] != ids[b, k]:
            correlations.append(np.corrcoef(patches[b] @ tokens[b, l], patches[b] @ tokens[b, k])[0, 1])
    assert len(correlations) > 0 and min(correlations) < 0 < max(correlations)
    loss = train_default.exclusive_loss(tokens.astype(np.float32), patches.astype(np.float32), ids)
    assert float(loss) == pytest.approx(np.maximum(correlations, 0).mean(), rel=1e-5)
    # One caption, "a red circle and a red cross": the two shape words pair, the repeated colour does not.
    ids = tokenizer.encode(["a red circle and a red cross"])
    tokens = np.zeros((*ids.shape, 8), np.float32)
    tokens[0, :, 0] = 1.0
    patches = np.eye(8, dtype=np.float32)[None, :6] + np.eye(8, dtype=np.float32)[None, 1:7]
    patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
    assert float(train_default.exclusive_loss(tokens, patches, ids)) == pytest.approx(1.0, abs=1e-5)  # same maps
    circle, cross = (list(ids[0]).index(tokenizer.encode([w])[0, 1]) for w in ("circle", "cross"))
    tokens[0, cross] = -tokens[0, circle]  # opposite maps: correlation -1, nothing to pay
    assert float(train_default.exclusive_loss(tokens, patches, ids)) == pytest.approx(0.0, abs=1e-6)


def test_bare_map_term_asks_colour_and_shape_words_inside_captions_for_their_bare_words_maps():
    config = train_default.TrainConfig(batch_size=16, image_size=32, patch_size=16)
    tokenizer = train_default.default_tokenizer()
    idf = train_default.word_idf(config)
    vocab = np.flatnonzero(idf)
    captions = train_default.batch(config, 0)[1]
    ids = tokenizer.encode(captions)
    pieces = np.asarray(train_default.piece_mask(ids, tokenizer.sot_id, tokenizer.eot_id))
    weights = pieces * idf[ids]
    rng = np.random.default_rng(0)
    tokens, patches, bare = (rng.normal(size=(*ids.shape, 8)), rng.normal(size=(len(ids), 6, 8)),
                             rng.normal(size=(len(vocab), 8)))
    words = set(train_default.COLOURS) | set(train_default.SHAPES)
    expected, positions = [], []
    for b, caption in enumerate(captions):  # each position of a colour or shape word of the caption, by its text
        for word in set(caption.split()) & words:
            piece = tokenizer.encode([word])[0, 1]
            for l in np.flatnonzero(ids[b] == piece):
                positions.append((b, l))
                expected.append(1 - np.corrcoef(patches[b] @ tokens[b, l],
                                                patches[b] @ bare[list(vocab).index(piece)])[0, 1])
    assert len(positions) > len(captions) and all(weights[b, l] > 0 for b, l in positions)

    def loss(tokens):
        return float(train_default.bare_map_loss(tokens.astype(np.float32), patches.astype(np.float32), ids,
                                                 bare.astype(np.float32), vocab, weights))

    assert loss(tokens) == pytest.approx(np.mean(expected), rel=1e-5)
    # Closed form: a caption word whose embedding is its bare word's has its map: nothing to pay.
    for b, l in positions:
        tokens[b, l] = bare[list(vocab).index(ids[b, l])]
    assert loss(tokens) == pytest.approx(0.0, abs=1e-5)
    others = np.ones(ids.shape, bool)  # every other position (articles, relations, <sot>, <eot>, padding)
    others[tuple(np.array(positions).T)] = False
    tokens[others] = rng.normal(size=(others.sum(), 8))
    assert loss(tokens) == pytest.approx(0.0, abs=1e-5)


def first_batch_captions():
    """(config, tokenizer, idf, vocab, captions, ids, weights, kind) of a 16-scene batch: the word terms' counted
    pieces (`vocab` as a list, IDF `weights` [B, L]) and each colour or shape piece's kind (0 colour, 1 shape)."""
    config = train_default.TrainConfig(batch_size=16, image_size=32, patch_size=16)
    tokenizer = train_default.default_tokenizer()
    idf = train_default.word_idf(config)
    vocab = list(np.flatnonzero(idf))
    captions = train_default.batch(config, 0)[1]
    ids = tokenizer.encode(captions)
    weights = np.asarray(train_default.piece_mask(ids, tokenizer.sot_id, tokenizer.eot_id)) * idf[ids]
    kind = {tokenizer.encode([w])[0, 1]: k for k, words in enumerate((train_default.COLOURS, train_default.SHAPES))
            for w in words}
    return config, tokenizer, idf, vocab, captions, ids, weights, kind


def test_bare_map_separation_keeps_a_words_map_off_the_bare_maps_of_its_captions_other_words_of_its_kind():
    config, _, _, vocab, captions, ids, weights, kind = first_batch_captions()
    rng = np.random.default_rng(1)
    tokens, patches, bare = (rng.normal(size=(*ids.shape, 8)).astype(np.float32),
                             rng.normal(size=(len(ids), 6, 8)).astype(np.float32),
                             rng.normal(size=(len(vocab), 8)).astype(np.float32))
    separated = []
    for b in range(len(captions)):  # every ordered pair of positions with distinct colours, or distinct shapes
        for l, k in itertools.permutations(range(ids.shape[1]), 2):
            i, j = ids[b, l], ids[b, k]
            if i in kind and j in kind and kind[i] == kind[j] and i != j:
                correlation = np.corrcoef(patches[b] @ tokens[b, l], patches[b] @ bare[vocab.index(j)])[0, 1]
                separated.append(max(correlation, 0.0))
    assert len(separated) > len(captions)  # most captions name two colours and two shapes

    def loss(separation):
        return float(train_default.bare_map_loss(tokens, patches, ids, bare, np.array(vocab), weights, separation))

    assert loss(2.0) - loss(0.0) == pytest.approx(2.0 * np.mean(separated), rel=1e-4)
    with pytest.raises(ValueError, match="bare_map_separation needs bare_map_weight > 0"):
        dataclasses.replace(config, bare_map_separation=1.0)
    with pytest.raises(ValueError, match="bare_map_separation must be >= 0"):
        dataclasses.replace(config, bare_map_weight=1.0, bare_map_separation=-1.0)


def test_peak_contrast_asks_each_bare_word_to_score_its_own_peak_above_its_captions_other_words_peaks():
    config, tokenizer, idf, vocab, captions, ids, weights, kind = first_batch_captions()
    rng = np.random.default_rng(2)
    patches, bare = rng.normal(size=(len(ids), 6, 8)), rng.normal(size=(len(vocab), 8))
    scale = 7.0
    losses = {0: [], 1: []}  # per kind: colour words, shape words
    for b, caption in enumerate(captions):  # each distinct colour or shape word of the caption, read from its text
        words = [tokenizer.encode([w])[0, 1] for w in dict.fromkeys(caption.split()) if w in
                 set(train_default.COLOURS) | set(train_default.SHAPES)]
        maps = {w: patches[b] @ bare[vocab.index(w)] for w in words}
        for w in words:
            rivals = [v for v in words if v != w and kind[v] == kind[w]]
            if rivals:
                logits = scale * np.array([maps[w][np.argmax(maps[v])] for v in [w, *rivals]])
                losses[kind[w]].append(np.log(np.exp(logits).sum()) - logits[0])
    assert len(losses[0]) > len(captions) / 2 and len(losses[1]) > len(captions) / 2  # most name two of each

    def loss(patches, bare, kinds=train_default.WORD_KINDS):
        return float(train_default.peak_contrast_loss(patches.astype(np.float32), bare.astype(np.float32),
                                                      np.array(vocab), ids, weights, scale, kinds))

    assert loss(patches, bare) == pytest.approx(np.mean(losses[0] + losses[1]), rel=1e-5)
    assert loss(patches, bare, ("colour",)) == pytest.approx(np.mean(losses[0]), rel=1e-5)
    assert loss(patches, bare, ("shape",)) == pytest.approx(np.mean(losses[1]), rel=1e-5)
    with pytest.raises(ValueError, match="peak_contrast_kinds needs peak_contrast_weight > 0"):
        dataclasses.replace(config, peak_contrast_kinds=("colour",))
    with pytest.raises(ValueError, match="peak_contrast_kinds"):
        dataclasses.replace(config, peak_contrast_weight=1.0, peak_contrast_kinds=("size",))
    # One caption, two objects: each word's map peaks on its own object's patch and scores the other's far lower.
    ids = tokenizer.encode(["a red circle and a blue cross"])
    weights = np.asarray(train_default.piece_mask(ids, tokenizer.sot_id, tokenizer.eot_id)) * idf[ids]
    bare = np.zeros((len(vocab), 8))
    for word, axis in (("red", 0), ("circle", 0), ("blue", 1), ("cross", 1)):
        bare[vocab.index(tokenizer.encode([word])[0, 1]), axis] = 1.0
    apart = np.eye(8)[None, [0, 1, 2]]  # patch 0 the red circle, patch 1 the blue cross, patch 2 background
    assert loss(apart, bare) == pytest.approx(np.log(1 + np.exp(-scale)), abs=1e-6)  # float32 logsumexp
    lit = apart.copy()
    lit[0, 1] = [0.8, 0.6, 0, 0, 0, 0, 0, 0]  # the cross's patch also lights the red circle's words (0.8 of 1)
    red_circle, blue_cross = np.log1p(np.exp(-scale * (1 - 0.8))), np.log1p(np.exp(-scale * (0.6 - 0)))
    assert loss(lit, bare) == pytest.approx((red_circle + blue_cross) / 2, rel=1e-5)
    # In training the term reads CLIP's temperature but does not train it: what it adds to the total has gradient 0
    # on logit_scale (else it would sharpen its peaks by raising the temperature CLIP's own loss sets).
    small = train_default.TrainConfig(peak_contrast_weight=1.0, batch_size=8, image_size=32, patch_size=16,
                                      embed_dim=16, vision_width=64, vision_layers=1, text_width=64, text_layers=1)
    small_idf = train_default.word_idf(small)
    model = CLIP(train_default.model_config(small))
    params = init_params(model.config, small.seed)
    images, token_ids, columns, _ = train_default.step_inputs(small, 0)

    def term(logit_scale):
        total, metrics = train_default.losses({**params, "logit_scale": logit_scale}, model, images, token_ids,
                                              columns, tokenizer.sot_id, tokenizer.eot_id, small, "clip", small_idf)
        return total - metrics["clip_loss"]

    value, gradient = jax.jit(jax.value_and_grad(term))(params["logit_scale"])
    assert float(value) > 0 and float(gradient) == 0.0


def test_mosaic_term_tiles_half_size_scenes_and_asks_for_their_block_mean_maps():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    tiled = np.asarray(train_default.mosaic(images))
    assert tiled.shape == (2, 32, 32, 3)
    for m in range(2):  # image 4m + 2r + c at row r, column c, shrunk as jax.image.resize shrinks it
        for r in range(2):
            for c in range(2):
                half = jax.image.resize(images[4 * m + 2 * r + c], (16, 16, 3), "linear", antialias=True)
                np.testing.assert_allclose(tiled[m, 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)], half, atol=1e-6)
    maps = rng.normal(size=(8, 4, 4, 3))
    pooled = np.asarray(train_default.block_mean_mosaic(maps))
    for m, r, c, y, x in np.ndindex(2, 2, 2, 2, 2):  # block (y, x) of image 4m + 2r + c: patch (2r + y, 2c + x)
        np.testing.assert_allclose(pooled[m, 2 * r + y, 2 * c + x],
                                   maps[4 * m + 2 * r + c, 2 * y:2 * y + 2, 2 * x:2 * x + 2].mean(axis=(0, 1)))
    student, teacher = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
    present = np.array([[True, False, True], [False, False, True]])
    expected = np.mean([1 - np.corrcoef(student[m, ..., u].ravel(), teacher[m, ..., u].ravel())[0, 1]
                        for m, u in zip(*np.nonzero(present))])
    assert float(train_default.map_correlation_loss(student, teacher, present)) == pytest.approx(expected, rel=1e-6)
    # Closed form: a map that is an affine copy of its target (positive scale) costs 0.
    assert float(train_default.map_correlation_loss(3 * teacher + 1, teacher, present)) == pytest.approx(0.0, abs=1e-6)
    # The term losses() adds, against its construction from the parts checked above: the true scenes (each beside its
    # variant in the batch) shrunk into mosaics; a piece counts in a mosaic if one of its four captions has it; the
    # teacher's maps (of the full-size scenes) and the bare words computed apart, so that no gradient passes through
    # them ("held fixed"). Value, and gradient on the image tower's projection, which student and teacher both read.
    tiny = dict(batch_size=16, steps=2, warmup_steps=1, validation_scenes=2, eval_every=100, image_size=64,
                patch_size=16, embed_dim=16, vision_width=64, vision_layers=1, text_width=64, text_layers=1)
    config = train_default.TrainConfig(mosaic_weight=1.0, **tiny)
    tokenizer = train_default.default_tokenizer()
    idf = train_default.word_idf(config)
    vocab = np.flatnonzero(idf)
    model = CLIP(train_default.model_config(config))
    params = init_params(model.config, config.seed)
    images, token_ids, columns, _ = train_default.step_inputs(config, 0)

    def with_proj(proj):
        return {**params, "visual": {**params["visual"], "proj": proj}}

    def term(proj):
        total, metrics = train_default.losses(with_proj(proj), model, images, token_ids, columns, tokenizer.sot_id,
                                              tokenizer.eot_id, config, "clip", idf)
        return total - metrics["clip_loss"]

    bare = train_default.piece_embeddings(model, params, vocab, tokenizer.sot_id, tokenizer.eot_id)
    grid = config.image_size // config.patch_size

    def word_maps(tokens):  # [N, G, G, U]: each counted piece's cosine with each patch
        return (l2_normalize(tokens[:, 1:]) @ bare.T).reshape(len(tokens), grid, grid, len(vocab))

    scenes = clip_normalize(images[::2])
    full_size = model.apply({"params": params}, scenes, method="encode_image").tokens
    teacher = train_default.block_mean_mosaic(word_maps(full_size))
    present = np.array([[any(piece in token_ids[2 * (4 * m + j)] for j in range(4)) for piece in vocab]
                        for m in range(len(scenes) // 4)])

    def explicit(proj):
        small = model.apply({"params": with_proj(proj)}, train_default.mosaic(scenes), method="encode_image")
        return train_default.map_correlation_loss(word_maps(small.tokens), teacher, present)

    proj = params["visual"]["proj"]
    (value, gradient), (expected, expected_gradient) = (jax.jit(jax.value_and_grad(f))(proj) for f in (term, explicit))
    assert float(value) == pytest.approx(float(expected), rel=1e-5) and 0 < float(value) <= 2
    np.testing.assert_allclose(gradient, expected_gradient, rtol=0, atol=1e-4 * np.abs(expected_gradient).max())
    with pytest.raises(ValueError, match="mosaic_weight needs"):
        dataclasses.replace(config, batch_size=12)
    with pytest.raises(ValueError, match="mosaic_weight needs"):
        dataclasses.replace(config, image_size=48)


def test_mosaic_read_the_other_way_teaches_full_size_scenes_with_their_enlarged_quadrants(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    zooms = np.asarray(train_default.quadrant_zooms(images))
    assert zooms.shape == (8, 8, 8, 3)
    for n, r, c in np.ndindex(2, 2, 2):  # quadrant (r, c) of image n, enlarged as jax.image.resize enlarges it
        quadrant = images[n, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
        np.testing.assert_allclose(zooms[4 * n + 2 * r + c], jax.image.resize(quadrant, (8, 8, 3), "linear"),
                                   atol=1e-6)
    # Constant quadrants stay constant when enlarged, and tiling their block means gives the image back.
    blocks = np.repeat(np.repeat(rng.normal(size=(2, 2, 2, 3)), 4, axis=1), 4, axis=2).astype(np.float32)
    np.testing.assert_allclose(np.asarray(train_default.tile_quarters(
        np.asarray(train_default.quadrant_zooms(blocks))[:, ::2, ::2])), blocks, atol=1e-6)
    tiny = dict(batch_size=16, steps=2, warmup_steps=1, validation_scenes=2, eval_every=100, image_size=64,
                patch_size=16, embed_dim=16, vision_width=64, vision_layers=1, text_width=64, text_layers=1)
    config = train_default.TrainConfig(mosaic_weight=1.0, mosaic_student="full", mosaic_start=1, **tiny)
    train_default.train(config, tmp_path / "full.jsonl")
    records = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert "mosaic_loss" not in records[0] and 0 < records[1]["mosaic_loss"] <= 2
    with pytest.raises(ValueError, match="mosaic_student must be one of"):
        dataclasses.replace(config, mosaic_student="zoom")
    with pytest.raises(ValueError, match="mosaic_student needs mosaic_weight"):
        dataclasses.replace(config, mosaic_weight=0.0, mosaic_start=0)


@pytest.mark.parametrize("weight, start, logged", [("mosaic_weight", "mosaic_start", "mosaic_loss"),
                                                    ("bare_map_weight", "bare_map_start", "bare_map_loss"),
                                                    ("peak_contrast_weight", "peak_contrast_start",
                                                     "peak_contrast_loss")])
def test_a_late_term_leaves_the_steps_before_its_start_as_if_it_were_off(tmp_path, weight, start, logged):
    assert train_default.LATE_TERMS[weight] == start
    tiny = dict(batch_size=8, steps=2, warmup_steps=1, validation_scenes=2, eval_every=100, image_size=32,
                patch_size=16, embed_dim=16, vision_width=64, vision_layers=1, text_width=64, text_layers=1)
    assert train_default.LATE_TERM_PARTS.keys() == train_default.LATE_TERMS.keys()
    part = {"bare_map_separation": 1.0} if weight == "bare_map_weight" else {}  # a part of the term, off with it
    late = train_default.TrainConfig(**{weight: 3.0, start: 1}, **part, **tiny)
    first, _, _ = train_default.train(late, tmp_path / "first.jsonl", stop_after=1)
    off = {weight: 0.0, start: 0, **dict.fromkeys(part, 0.0)}
    expected, _, _ = train_default.train(dataclasses.replace(late, **off), tmp_path / "expected.jsonl", stop_after=1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, expected)  # step 1: as if the term were off
    _assert_same_losses(tmp_path / "first.jsonl", tmp_path / "expected.jsonl")  # (its learning rate is 0)
    train_default.train(late, tmp_path / "both.jsonl")
    records = [json.loads(line) for line in (tmp_path / "both.jsonl").read_text().splitlines()]
    assert logged not in records[0] and 0 < records[1][logged] <= 2 + sum(part.values())  # step 2: the term acts
    assert records[1]["loss"] == pytest.approx(records[1]["clip_loss"] + 3.0 * records[1][logged], rel=1e-6)
    for bad in ({start: 2}, {weight: 0.0, **dict.fromkeys(part, 0.0)}):
        with pytest.raises(ValueError, match=f"{start} needs {weight} > 0"):
            dataclasses.replace(late, **bad)


def test_piece_embeddings_are_the_rows_of_s_for_a_bare_word():
    config = train_default.TrainConfig(embed_dim=16, text_width=64, text_layers=1, image_size=32, patch_size=16)
    model = CLIP(train_default.model_config(config))
    params = init_params(model.config, 0)
    tokenizer = train_default.default_tokenizer()
    rows = tokenizer.encode(["circle", "red"])  # one piece each, then EOT and padding
    assert (rows[:, 2] == tokenizer.eot_id).all()
    expected = token_embeddings(model, params, rows)[:, 1]  # TCLIP's own unit embeddings of the word's position
    pieces = rows[:, 1]
    got = train_default.piece_embeddings(model, params, pieces, tokenizer.sot_id, tokenizer.eot_id)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_text_init_starts_the_text_tower_from_a_checkpoint(tmp_path):
    tiny = dict(batch_size=4, steps=2, warmup_steps=1, validation_scenes=2, eval_every=100, image_size=32,
                patch_size=16, embed_dim=16, vision_width=64, vision_layers=1, text_width=64, text_layers=1)
    source_config = train_default.TrainConfig(objective="clip", **tiny)
    trained, used_ids, _ = train_default.train(source_config, tmp_path / "source.jsonl", stop_after=1)
    save_checkpoint(tmp_path / "source", train_default.zero_unused_rows(trained, used_ids),
                    train_default.model_config(source_config))
    config = dataclasses.replace(source_config, seed=1, text_init=str(tmp_path / "source"), text_frozen_steps=1)
    fresh = init_params(train_default.model_config(config), config.seed)["text"]
    start = train_default.text_tower_from(config.text_init, fresh)
    used = np.zeros(len(fresh["token_embedding"]), bool)
    used[used_ids] = True
    np.testing.assert_array_equal(start["token_embedding"][used], trained["text"]["token_embedding"][used])
    np.testing.assert_array_equal(start["token_embedding"][~used], fresh["token_embedding"][~used])
    np.testing.assert_array_equal(start["transformer"]["block_0"]["fc"]["kernel"],
                                  trained["text"]["transformer"]["block_0"]["fc"]["kernel"])
    run, _, _ = train_default.train(config, tmp_path / "run.jsonl", stop_after=1)  # text frozen: still the start
    jax.tree_util.tree_map(np.testing.assert_array_equal, run["text"], start)
    with pytest.raises(ValueError, match="text_init"):
        train_default.text_tower_from(config.text_init, init_params(train_default.model_config(
            dataclasses.replace(config, text_width=128)), 0)["text"])


def test_ema_decay_keeps_the_moving_average_of_the_steps_parameters(tmp_path, monkeypatch):
    """The average is what a run validates and, with select_step=validation, keeps: not the step's own parameters."""
    tiny = dict(batch_size=4, steps=3, warmup_steps=1, validation_scenes=2, eval_every=100, image_size=32,
                patch_size=16, embed_dim=16, vision_width=64, vision_layers=1, text_width=64, text_layers=1)
    plain = train_default.TrainConfig(**tiny)
    decay = 0.75
    scores, validated = iter([0.5, 0.9, 0.1]), []  # validated after steps 1, 2 and 3: step 2 is kept
    monkeypatch.setattr(train_default, "validation_record", lambda clip, validation, config: validated.append(
        jax.device_get(clip.params)) or {"score": next(scores)})
    averaged, _, summary = train_default.train(
        dataclasses.replace(plain, ema_decay=decay, eval_every=1, select_step="validation"), tmp_path / "ema.jsonl")
    assert summary["selected_step"] == 2 and len(validated) == 3
    monkeypatch.undo()
    # The average leaves training alone: it is the loop's over the plain run's parameters after each step.
    expected = jax.tree_util.tree_map(np.asarray, init_params(train_default.model_config(plain), plain.seed))
    for step in (1, 2, 3):
        trained, _, _ = train_default.train(plain, tmp_path / f"{step}.jsonl", stop_after=step)
        expected = jax.tree_util.tree_map(lambda a, p: decay * a + (1 - decay) * p, expected, trained)
        jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7),
                               validated[step - 1], expected)
        if step == 2:
            jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7),
                                   averaged, expected)
            assert not np.allclose(averaged["visual"]["proj"], trained["visual"]["proj"])
    with pytest.raises(ValueError, match="ema_decay"):
        dataclasses.replace(plain, ema_decay=1.0)


def test_select_step_validation_keeps_the_evaluated_step_with_the_best_validation_score(tmp_path, monkeypatch):
    """A run validates every eval_every steps and at its last step, which is therefore a candidate even when the steps
    are not a multiple of eval_every (5 steps, every 2: steps 2, 4 and 5); it keeps the earliest best."""
    tiny = dict(batch_size=4, steps=5, warmup_steps=1, validation_scenes=2, eval_every=2, image_size=32,
                patch_size=16, embed_dim=16, vision_width=64, vision_layers=1, text_width=64, text_layers=1,
                validation_grounding_scenes=1)
    config = train_default.TrainConfig(select_step="validation", **tiny)
    last_config = dataclasses.replace(config, select_step="last")
    clip = train_default.LoadedClip(train_default.CLIP(train_default.model_config(config)),
                                    init_params(train_default.model_config(config), 0),
                                    train_default.default_tokenizer(), "tclip", "tiny")
    validation = train_default.retrieval_scenes(2, train_default.VALIDATION_OFFSET)
    record = train_default.validation_record(clip, validation, config)
    retrieval = (record["image_to_text_top1"] + record["text_to_image_top1"]) / 2
    assert set(record["pointing_game"]) == set(train_default.VALIDATION_PROTOCOLS)
    assert record["score"] == pytest.approx(np.mean([*record["pointing_game"].values(), retrieval]))
    assert "score" not in train_default.validation_record(clip, validation, last_config)
    scores = iter([0.2, 0.5, 0.5])  # steps 2, 4 and 5: the best score first reached at step 4, which is kept
    monkeypatch.setattr(train_default, "validation_record", lambda *args: {"score": next(scores)})
    selected, _, summary = train_default.train(config, tmp_path / "selected.jsonl")
    assert summary["selected_step"] == 4
    with (tmp_path / "selected.jsonl").open() as log:
        assert ["validation" in json.loads(line) for line in log] == [False, True, False, True, True]
    monkeypatch.undo()
    expected, _, _ = train_default.train(last_config, tmp_path / "four.jsonl", stop_after=4)
    jax.tree_util.tree_map(np.testing.assert_array_equal, selected, expected)
    last, _, summary = train_default.train(last_config, tmp_path / "last.jsonl")
    assert "selected_step" not in summary
    assert not np.array_equal(last["visual"]["proj"], selected["visual"]["proj"])
    with pytest.raises(ValueError, match="select_step"):
        dataclasses.replace(config, select_step="best")


def test_validations_trace_the_map_program_once_and_score_as_a_fresh_tclip(monkeypatch, request):
    """A run's validations, each of other weights, share one compiled map program per input shape; each one's
    sweep reports are those of a TCLIP compiled for it alone (as each validation's was before)."""
    _maps_program.cache_clear()  # programs other tests compiled; and the counting one below is not kept
    request.addfinalizer(_maps_program.cache_clear)
    tiny = dict(image_size=32, patch_size=16, embed_dim=16, vision_width=64, vision_layers=1, text_width=64,
                text_layers=1, validation_scenes=2, validation_grounding_scenes=2)
    config = train_default.TrainConfig(select_step="validation", **tiny)
    clips = [train_default.LoadedClip(train_default.CLIP(train_default.model_config(config)),
                                      init_params(train_default.model_config(config), seed),
                                      train_default.default_tokenizer(), "tclip", "tiny") for seed in (0, 1)]
    validation = train_default.retrieval_scenes(2, train_default.VALIDATION_OFFSET)
    traced, maps_per_image = [], TCLIP.maps_per_image
    monkeypatch.setattr(TCLIP, "maps_per_image", lambda self, params, pixels, queries, rows: traced.append(
        (pixels.shape, rows.shape, queries.per_query.shape)) or maps_per_image(self, params, pixels, queries, rows))
    reports, synthetic_report = [], train_default.synthetic_report
    monkeypatch.setattr(train_default, "synthetic_report", lambda *args, **kw: reports.append(
        synthetic_report(*args, **kw)) or reports[-1])

    def validate(clip):
        reports.clear()
        return train_default.validation_record(clip, validation, config), list(reports)

    shared = [validate(clip) for clip in clips]
    assert traced and len(traced) == len(set(traced))  # once per input shape, all in the first validation
    monkeypatch.setattr(TCLIP, "jitted_maps", Method.jitted_maps)  # a program of each TCLIP's own
    assert [validate(clip) for clip in clips] == shared
    assert [r["segmentation"] for r in shared[0][1]] != [r["segmentation"] for r in shared[1][1]]  # other maps


def test_step_selection_sweeps_validation_scenes_not_the_evaluation_scenes(monkeypatch):
    """select_step=validation scores grounding on held-out seeds from VALIDATION_OFFSET: if it swept the gates' or
    a default sweep's scenes (offset 0), the evaluation scenes would choose the checkpoint they then score."""
    from tclip_jax.evaluation.datasets.synthetic import synthetic_dataset
    from tclip_jax.sweep import heldout
    from tclip_jax.synthetic import HELDOUT_SEED_START, SYNTHETIC_SCENES

    swept = {}

    def record_keys(dataset, *args, **kwargs):  # the scenes a sweep would take, no model run
        swept[dataset.name] = [int(sample.key) for sample in dataset.samples()]
        return dataclasses.make_dataclass("Result", ["report"])({"errors": [], "units": 1, "segmentation": {
            "pointing_game": 0.5}, "detection": {"box_accuracy": 0.5}})
    monkeypatch.setattr(heldout, "run_sweep", record_keys)
    monkeypatch.setattr(train_default, "retrieval_top1", lambda *args: {"image_to_text_top1": 0.5,
                                                                        "text_to_image_top1": 0.5})
    monkeypatch.setattr(train_default, "TCLIP", lambda clip: None)
    config = train_default.TrainConfig(select_step="validation", validation_grounding_scenes=3)
    train_default.validation_record(None, [], config)
    first = HELDOUT_SEED_START + train_default.VALIDATION_OFFSET
    assert swept == {f"synthetic-{protocol}": [first, first + 1, first + 2]
                     for protocol in train_default.VALIDATION_PROTOCOLS}
    evaluated = {int(sample.key) for sample in synthetic_dataset(SYNTHETIC_SCENES).samples()}
    assert evaluated == set(range(HELDOUT_SEED_START, HELDOUT_SEED_START + SYNTHETIC_SCENES))
    assert not evaluated & set(range(first, first + config.validation_grounding_scenes))


SEARCH_SCRIPT = SCRIPT.parent / "search_recipes.py"
TINY_OVERRIDES = ["batch_size=8", "steps=3", "warmup_steps=1", "validation_scenes=2", "eval_every=2", "image_size=32",
                  "patch_size=16", "embed_dim=16", "vision_width=64", "vision_layers=1", "text_width=64",
                  "text_layers=1"]


def test_a_recipe_search_trains_each_run_exactly_as_it_trains_alone(tmp_path):
    runs = {"base": [], "other": ["seed=1", "peak_learning_rate=0.003", "word_weight=1"]}
    command = [sys.executable, str(SEARCH_SCRIPT), "--out", str(tmp_path / "search"), "--workers", "2",
               "--ahead", "1", "--no-heldout", "--set", *TINY_OVERRIDES]
    for name, overrides in runs.items():
        command += ["--run", name, *overrides]
    done = subprocess.run(command, capture_output=True, text=True, cwd=SCRIPT.parent.parent, timeout=600)
    assert done.returncode == 0, done.stderr
    for name, overrides in runs.items():
        config = train_default.TrainConfig(**train_default.parse_overrides(TINY_OVERRIDES + overrides))
        train_default.train_and_save(config, tmp_path / "alone" / name)
        searched, alone = (np.load(tmp_path / folder / name / "params.npz") for folder in ("search", "alone"))
        assert searched.files == alone.files
        for key in alone.files:
            np.testing.assert_array_equal(searched[key], alone[key])
        logs = [[json.loads(line) for line in (tmp_path / folder / name / train_default.LOG_FILE).open()]
                for folder in ("search", "alone")]
        timing = {"samples_per_s", "elapsed_s", "cpu_s"}
        assert [{k: v for k, v in r.items() if k not in timing} for r in logs[0]] == \
               [{k: v for k, v in r.items() if k not in timing} for r in logs[1]]
        assert "validation" in logs[0][1] and not (tmp_path / "search" / name / "heldout_metrics.json").exists()


def test_a_recipe_search_records_each_runs_heldout_metrics_once_unless_told_not_to(tmp_path, monkeypatch):
    """As train_default.py does for its run (here with training stubbed out: no input is ever drawn)."""
    config = train_default.TrainConfig(**train_default.parse_overrides(TINY_OVERRIDES))
    configs = {"a": config, "b": dataclasses.replace(config, seed=1)}
    monkeypatch.setattr(train_default, "train_and_save", lambda config, out, inputs, resume: {"trained": out.name})
    recorded = []
    monkeypatch.setattr(search_recipes, "record_heldout_metrics", lambda folder: recorded.append(folder) or folder.name)
    summaries = search_recipes.search(configs, tmp_path, workers=1, ahead=1)
    assert summaries == {name: {"trained": name, "heldout": name} for name in configs}
    assert recorded == [tmp_path / name for name in configs]
    recorded.clear()
    assert search_recipes.search(configs, tmp_path, workers=1, ahead=1, heldout=False) == {
        name: {"trained": name} for name in configs} and not recorded


def test_shared_inputs_make_each_step_once_and_hold_few(monkeypatch):
    made = []
    monkeypatch.setattr(train_default, "step_inputs", lambda data, step: made.append(step) or step)
    steps, ahead, runs = 40, 3, 4
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        shared = search_recipes.SharedInputs(None, steps, pool, ahead, runs)
        held = []

        def run(member: int, pause: float) -> list:
            got = []
            for step in range(steps):
                got.append(shared.take(member, step).result())
                held.append(len(shared.futures))
                time.sleep(pause)
            shared.leave(member)
            return got

        # Daemons, joined against one deadline: a run left waiting by a broken SharedInputs fails the test
        # instead of keeping pytest from exiting.
        members = [threading.Thread(target=lambda m=m, p=p: results.append(run(m, p)), daemon=True)
                   for m, p in enumerate((0.004, 0, 0.001, 0.002))]
        results: list = []
        for m in members:
            m.start()
        deadline = time.monotonic() + 60
        for m in members:
            m.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(m.is_alive() for m in members), "a run waits for ever"
    assert len(results) == runs and all(r == list(range(steps)) for r in results)
    assert sorted(made) == list(range(steps))  # each step made once, for every run
    assert max(held) <= ahead and not shared.futures
    # Stopped (Ctrl-C reaches the main thread only): a run waiting for its step, and any run after, stops.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        shared = search_recipes.SharedInputs(None, steps, pool, 1, 2)
        shared.take(0, 0).result()
        stopped = []

        def next_step() -> None:  # one step ahead of the other run: it waits
            try:
                shared.take(0, 1)
            except search_recipes.Stopped as err:
                stopped.append(err)

        waiting = threading.Thread(target=next_step, daemon=True)
        waiting.start()
        time.sleep(0.1)
        shared.stop()
        waiting.join(timeout=10)
        assert not waiting.is_alive() and stopped
        with pytest.raises(search_recipes.Stopped):
            shared.take(1, 0)
    with pytest.raises(ValueError, match="asked for step 5, expected 0"):
        search_recipes.SharedInputs(None, steps, None, ahead, 1).take(0, 5)


def process_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent's id) of process `pid` from /proc, None once it has gone; state "Z" once it has exited but
    is not reaped yet (reparented to an init that does not reap)."""
    try:
        state, parent = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    return state, int(parent)


def running(pid: int) -> bool:
    stat = process_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").is_file(), reason="reads processes from /proc")
def test_a_sigterm_to_a_recipe_search_ends_its_workers_and_leaves_nothing_beside_its_folders(tmp_path):
    """As a job is stopped: SIGTERM once a run has logged a step. The search ended without a line, its input worker
    went on (reparented, holding the script's stdout and stderr) and each run's lock and hidden log stayed; now it
    stops as after a Ctrl-C, with status 143 and one line, its worker processes ended."""
    log = tmp_path / "search" / f".a.{train_default.LOG_FILE}"
    with open(tmp_path / "err", "w+") as err:  # not a pipe: a worker left running would hold it open
        process = subprocess.Popen([sys.executable, str(SEARCH_SCRIPT), "--out", str(tmp_path / "search"),
                                    "--workers", "1", "--no-heldout", "--set", *TINY_MODEL, "steps=100000",
                                    "warmup_steps=1", "batch_size=4", "validation_scenes=2", "eval_every=100000",
                                    "--run", "a"], stdout=subprocess.DEVNULL, stderr=err, cwd=SCRIPT.parent.parent)
        try:
            deadline = time.monotonic() + 240
            while not (log.is_file() and log.read_text()):  # a step is done: the workers are drawing
                assert process.poll() is None and time.monotonic() < deadline, process.returncode
                time.sleep(0.1)
            workers = {int(entry.name) for entry in pathlib.Path("/proc").iterdir() if entry.name.isdigit()
                       and (process_stat(int(entry.name)) or ("", 0))[1] == process.pid}
            assert workers  # the pool's worker, and multiprocessing's resource tracker
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
            deadline = time.monotonic() + 10  # multiprocessing's resource tracker ends once the worker has
            while any(map(running, workers)) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            process.kill()
            left = [pid for pid in workers if running(pid)] if "workers" in locals() else []
            for pid in left:
                os.kill(pid, signal.SIGKILL)
        err.seek(0)
        lines = err.read().strip().splitlines()
    assert process.returncode == 143, lines
    assert lines[-1] == "search_recipes.py: terminated; each run's folder is written whole or not at all", lines
    assert not any("Traceback" in line for line in lines)
    assert not left, "the search's worker processes outlived it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err"]  # no run folder, lock or hidden log


def test_a_recipe_search_refuses_runs_that_would_draw_different_batches(tmp_path, monkeypatch, capsys):
    def search(*arguments):  # main() in this process, as in the overrides test above
        monkeypatch.setattr(sys, "argv", [str(SEARCH_SCRIPT), "--out", str(tmp_path / "search"), *arguments])
        with pytest.raises(SystemExit) as raised:
            search_recipes.main()
        return raised.value.code, capsys.readouterr().err

    # Each case here is refused before the search: one that reached it would end without an exit status (and
    # fail), not train (with --ahead 0, for ever).
    monkeypatch.setattr(search_recipes, "search", lambda *args: {})
    # Once as a user runs it: its own process, exit status 2 and one line, no traceback.
    bad = subprocess.run([sys.executable, str(SEARCH_SCRIPT), "--out", str(tmp_path / "search"), "--run", "a",
                          "--run", "b", "batch_size=32"], capture_output=True, text=True, cwd=SCRIPT.parent.parent,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].endswith(
        "runs a and b draw different batches (batch_size: 64 vs 32); search them separately"), bad.stderr
    for arguments, message in [
            (("--run", "a", "--run", "b", "steps=500"), "the runs must train the same number of steps"),
            (("--run", "a", "--run", "a", "seed=1"), "--run a is given twice"),
            (("--set", "seed=1", "--run", "a", "seed=2"), "--run a gives seed, which --set gives too"),
            (("--run", "../a"), "a run's name must be a folder name of letters, digits, '_', '.', '-'"),
            (("--run", "a", "colour=red"),
             f"--run a: unknown option 'colour' (did you mean 'step_colours'?); {KNOWN_FIELDS}"),
            (("--workers", "0", "--run", "a"), "--workers and --ahead must be >= 1, got 0 and 64"),
            (("--ahead", "0", "--run", "a"), "--workers and --ahead must be >= 1, got 4 and 0"),
            (("--run", "a", f"text_init={tmp_path / 'none'}"), f"{tmp_path / 'none'} is neither a file, a folder nor a "
                                                                "hub name")]:
        code, stderr = search(*arguments)
        assert code == 2 and stderr.count("\n") == 1 and stderr.strip().endswith(message), stderr  # no usage block
    assert search("--run", "a", "--workers", "x") == (2, "search_recipes.py: error: argument --workers: invalid int "
                                                         "value: 'x' (see search_recipes.py --help)\n")
    assert not tmp_path.joinpath("search").exists()


def test_a_recipe_search_refuses_a_run_folder_it_could_not_save_before_training(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "b").write_text("precious\n")
    for out, message in [("a_file", f"--out {tmp_path / 'a_file'} is a file, not a folder"),
                         ("search", f"--out {tmp_path / 'search' / 'b'} is a file, not a folder")]:
        monkeypatch.setattr(sys, "argv", [str(SEARCH_SCRIPT), "--out", str(tmp_path / out), "--no-heldout",
                                          "--workers", "1", "--set", *TINY_OVERRIDES, "--run", "a", "--run", "b"])
        with pytest.raises(SystemExit) as raised:
            search_recipes.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert raised.value.code == 2 and err[-1].endswith(message), err
    assert sorted(p.name for p in (tmp_path / "search").iterdir()) == ["b"]  # run a was not trained and saved
    assert (tmp_path / "search" / "b").read_text() == "precious\n"
    import errno

    def full_disk(*args):  # as a run's save on a full disk raises it
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "full" / "a" / "params.npz"))

    monkeypatch.setattr(search_recipes, "search", full_disk)
    monkeypatch.setattr(sys, "argv", [str(SEARCH_SCRIPT), "--out", str(tmp_path / "full"), "--no-heldout",
                                      "--workers", "1", "--set", *TINY_OVERRIDES, "--run", "a"])
    with pytest.raises(SystemExit) as raised:
        search_recipes.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert raised.value.code == 2 and err[-1].endswith("the search stopped (each run's folder is written whole or "
                                                        "not at all): [Errno 28] No space left on device: "
                                                        f"'{tmp_path / 'full' / 'a' / 'params.npz'}'"), err
    assert not (tmp_path / "full").exists()  # made for the runs' locks, and left empty


RESUMABLE = [o for o in TINY_OVERRIDES if not o.startswith("steps=")] + [
    "steps=4", "word_weight=1", "ema_decay=0.5", "select_step=validation", "validation_grounding_scenes=1"]
LATE = ["peak_contrast_weight=1", "peak_contrast_start=2"]


def resumable_config(*extra: str) -> train_default.TrainConfig:
    return train_default.TrainConfig(**train_default.parse_overrides(RESUMABLE + list(extra)))


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory) -> pathlib.Path:
    """The state of a RESUMABLE run after its step 2 of 4 (one validation, so a selected step, behind it)."""
    folder = tmp_path_factory.mktemp("state")
    train_default.train(resumable_config(), folder / "first.jsonl", stop_after=2, save_state_at=(2, folder / "s.npz"))
    assert [json.loads(line)["step"] for line in (folder / "first.jsonl").open()] == [1, 2]
    return folder / "s.npz"


def test_a_run_resumed_from_its_saved_state_is_the_run_that_never_stopped(tmp_path, saved_state):
    """Parameters and log (but its clocks), bit for bit: a run whose late term starts at the saved step, resumed alone
    and searched from the state, against the same run from the start."""
    def same_run(folder, expected):
        got, want = (np.load(f / "params.npz") for f in (folder, expected))
        assert got.files == want.files
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key])
        logs = [[json.loads(line) for line in (f / train_default.LOG_FILE).open()] for f in (folder, expected)]
        timing = {"samples_per_s", "elapsed_s", "cpu_s"}
        assert [{k: v for k, v in r.items() if k not in timing} for r in logs[0]] == \
               [{k: v for k, v in r.items() if k not in timing} for r in logs[1]]
        assert all(r["cpu_s"] > 0 for r in logs[0]) and "validation" in logs[0][1]

    late = resumable_config(*LATE)
    train_default.train_and_save(late, tmp_path / "straight")
    summary = train_default.train_and_save(late, tmp_path / "resumed", resume=saved_state)
    assert summary["resumed_from_step"] == 2 and summary["selected_step"] in (2, 4)
    same_run(tmp_path / "resumed", tmp_path / "straight")
    assert "peak_contrast_loss" in json.loads((tmp_path / "straight" / train_default.LOG_FILE).read_text()
                                              .splitlines()[2])
    command = [sys.executable, str(SEARCH_SCRIPT), "--out", str(tmp_path / "search"), "--workers", "1",
               "--no-heldout", "--resume", str(saved_state), "--set", *RESUMABLE, "--run", "late", *LATE]
    done = subprocess.run(command, capture_output=True, text=True, cwd=SCRIPT.parent.parent, timeout=600)
    assert done.returncode == 0, done.stderr
    same_run(tmp_path / "search" / "late", tmp_path / "straight")
    # A run that keeps its last step goes on from one that selects by validation: the last step's parameters.
    last = dataclasses.replace(late, select_step="last")
    straight, _, _ = train_default.train(last, tmp_path / "last.jsonl", save_state_at=(2, tmp_path / "last.npz"))
    resumed, _, summary = train_default.train(last, tmp_path / "last_resumed.jsonl", resume=saved_state)
    assert "selected_step" not in summary
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, straight)
    with pytest.raises(ValueError, match=re.escape("(select_step: 'last' saved, 'validation' here)")):
        train_default.train(late, tmp_path / "x.jsonl", resume=tmp_path / "last.npz")  # no scores to select by


def test_a_run_refuses_a_state_it_cannot_go_on_from(tmp_path, saved_state, monkeypatch, capsys):
    config, state = resumable_config(), saved_state
    for changed, message in [({"seed": 1}, "first 2 steps differ from the saved run's (seed: 0 saved, 1 here)"),
                             ({"peak_contrast_weight": 1.0, "peak_contrast_start": 1},
                              "(peak_contrast_weight: 0.0 saved, 1.0 here)"),
                             ({"embed_dim": 32}, "(embed_dim: 16 saved, 32 here)")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            train_default.train(dataclasses.replace(config, **changed), tmp_path / "x.jsonl", resume=state)
    # A state whose arrays are not this run's trees: one missing, or one of another shape.
    with np.load(state) as archive:
        arrays = {name: archive[name] for name in archive.files}
    last = max(name for name in arrays if name != "header")
    for name, broken in (("missing", {k: v for k, v in arrays.items() if k != last}),
                         ("reshaped", {**arrays, last: arrays[last].reshape(-1)[:-1]})):
        np.savez(tmp_path / f"{name}.npz", **broken)
        with pytest.raises(ValueError, match="its arrays do not fit this run's model and optimiser"):
            train_default.train(config, tmp_path / "x.jsonl", resume=tmp_path / f"{name}.npz")
    with pytest.raises(ValueError, match=re.escape("STEP must be a step after the run's first (0) and before its last "
                                                   "(4)")):
        train_default.train(config, tmp_path / "x.jsonl", save_state_at=(4, tmp_path / "late.npz"))
    # A search refuses it before any run folder is made, naming the field.
    monkeypatch.setattr(sys, "argv", [str(SEARCH_SCRIPT), "--out", str(tmp_path / "search"), "--resume", str(state),
                                      "--set", *RESUMABLE, "--run", "a", "seed=1"])
    with pytest.raises(SystemExit) as raised:
        search_recipes.main()
    assert raised.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "first 2 steps differ from the saved run's (seed: 0 saved, 1 here)")
    assert not (tmp_path / "search").exists()
    (tmp_path / "text.npz").write_text("not a state")
    cli = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--resume",
                          str(tmp_path / "text.npz"), "--set", *RESUMABLE],
                         capture_output=True, text=True, cwd=SCRIPT.parent.parent, timeout=300)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.strip().splitlines()[-1] == (
        f"train_default.py: error: --resume {tmp_path / 'text.npz'} is neither an .npz archive nor an .npy array "
        "(numpy would read it as a pickle), and tclip never unpickles anything; it is not a training state")
    assert not (tmp_path / "out").exists()
    # A damaged state (a copy cut short, a disk's bad block): EOFError, zipfile's and zlib's errors were tracebacks.
    whole = state.read_bytes()
    with zipfile.ZipFile(state) as archive:
        member = max(archive.infolist(), key=lambda info: info.compress_size)
    start = member.header_offset + 30 + int.from_bytes(whole[member.header_offset + 26:member.header_offset + 28],
                                                       "little") + \
        int.from_bytes(whole[member.header_offset + 28:member.header_offset + 30], "little")  # the local header's

    def flipped(at):  # 16 bytes of the member's compressed data inverted
        return whole[:at] + bytes(b ^ 0xFF for b in whole[at:at + 16]) + whole[at + 16:]

    for name, data in [("empty", b""), ("cut", whole[:len(whole) // 2]),  # EOFError, zipfile.BadZipFile
                       ("inflated", flipped(start)), ("crc", flipped(start + member.compress_size // 2))]:  # zlib, CRC
        (tmp_path / f"{name}.npz").write_bytes(data)
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(tmp_path / "out"), "--resume",
                                          str(tmp_path / f"{name}.npz"), "--set", *RESUMABLE])
        with pytest.raises(SystemExit) as raised:
            train_default.main()
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert raised.value.code == 2 and line.startswith(
            f"train_default.py: error: --resume {tmp_path / f'{name}.npz'} is a damaged .npz archive (truncated or "
            "corrupt?): ") and line.endswith("; it is not a training state"), line
        assert not (tmp_path / "out").exists()
    # A header edited by hand: a key missing, or of another type, was a KeyError (TypeError) traceback.
    header = json.loads(str(arrays["header"]))
    for name, edited, message in [
            ("no_step", {k: v for k, v in header.items() if k != "step"}, "its header lacks step (a training state's "
                                                                          "holds step, config, selected, used_ids, "
                                                                          "records)"),
            ("no_records", {k: v for k, v in header.items() if k not in ("records", "used_ids")},
             "its header lacks used_ids, records"),
            ("text_step", {**header, "step": "2"}, "its header's step must be a step number, got '2'"),
            ("list_config", {**header, "config": []}, "its header's config must be an object, got []")]:
        np.savez(tmp_path / f"{name}.npz", **{**arrays, "header": np.array(json.dumps(edited))})
        for extra in ([], ["--save-state", "3", str(tmp_path / "again.npz")]):  # read whole, or its header alone
            monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(tmp_path / "out"), "--resume",
                                              str(tmp_path / f"{name}.npz"), *extra, "--set", *RESUMABLE])
            with pytest.raises(SystemExit) as raised:
                train_default.main()
            err = capsys.readouterr().err.strip().splitlines()
            assert raised.value.code == 2 and len(err) == 1 and err[0].startswith(
                f"train_default.py: error: --resume {tmp_path / f'{name}.npz'}: {message}"), err
            assert not (tmp_path / "out").exists()
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(tmp_path / "out"), "--resume", str(state),
                                      "--save-state", "2", str(tmp_path / "again.npz"), "--set", *RESUMABLE])
    with pytest.raises(SystemExit) as raised:  # main() in this process: the same check, without the imports
        train_default.main()
    assert raised.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "STEP must be a step after the run's first (2) and before its last (4)")
    assert not (tmp_path / "out").exists()


def test_heldout_only_records_the_gates_of_a_written_checkpoint_and_trains_nothing(tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model, ignore=shutil.ignore_patterns("heldout_metrics.json"))
    recorded = []
    monkeypatch.setattr(train_default, "record_heldout_metrics", lambda folder: recorded.append(folder) or {"ok": 1})
    monkeypatch.setattr(train_default, "train_and_save", None)  # any training call would fail
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(model), "--heldout-only"])
    with pytest.raises(SystemExit) as raised:
        train_default.main()
    assert raised.value.code == 0 and recorded == [model]
    assert json.loads(capsys.readouterr().out) == {"ok": 1}
    for extra, message in [(["--steps", "3"], "--heldout-only trains nothing; --steps does not apply"),
                           (["--recipe", "default"], "--heldout-only trains nothing; --recipe does not apply")]:
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(model), "--heldout-only", *extra])
        with pytest.raises(SystemExit) as raised:
            train_default.main()
        assert raised.value.code == 2 and capsys.readouterr().err.strip().endswith(message)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(tmp_path / "empty"), "--heldout-only"])
    with pytest.raises(SystemExit) as raised:
        train_default.main()
    assert capsys.readouterr().err.strip().endswith(f"--heldout-only: {tmp_path / 'empty'} holds no checkpoint")
    assert recorded == [model]
    # A model folder in a read-only folder: the gates are written inside it, and no run can replace it (they stage
    # beside it), so its lock beside it, which cannot be made, is not needed.
    import errno

    def read_only_parent(folder, what):
        raise OSError(errno.EROFS, "Read-only file system", str(folder.parent / f".{folder.name}.lock"))

    monkeypatch.setattr(train_default, "held_lock_beside", read_only_parent)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(model), "--heldout-only"])
    with pytest.raises(SystemExit) as raised:
        train_default.main()
    assert raised.value.code == 0 and recorded == [model, model] and json.loads(capsys.readouterr().out) == {"ok": 1}


def test_a_state_save_that_fails_leaves_the_state_saved_before_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    path.write_bytes(b"the state saved before")
    state = train_default.RunState(step=1, config={}, params={"w": np.zeros(3, np.float32)}, opt_state=(),
                                   average=None, selected=None, used_ids=[], records=[])

    def full_disk(file, **arrays):
        file.write(b"part of an npz")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train_default.save_state(path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"] and path.read_bytes() == b"the state saved before"
