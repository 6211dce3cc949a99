"""`tclip explain` end to end: files per image, result.json contents, baselines, and clear errors; and the
model-loading flags every command shares."""
import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
from typing import Optional

import cv2
import jax
import numpy as np
import pytest
from PIL import Image

from tclip_jax.cli import build_parser, main as tclip
from tclip_jax.model.config import ACTIVATIONS


def test_explain_writes_overlays_grid_json_and_npz(tmp_path, fixtures_dir, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.chdir(fixtures_dir)  # the image named by a relative path: result.json records it resolved
    status = tclip(["explain", "scene_wide_320x240.png", "--prompt", "a red circle.",
                    "--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--translations", "1",
                    "--out", str(out), "--save-npz"])
    assert status == 0
    folder = out / "scene_wide_320x240"
    record = json.loads((folder / "result.json").read_text())
    words = record["prompts"][0]["words"]
    assert [w["word"] for w in words] == ["a", "red", "circle"]  # the full stop is not explained
    assert record["schema"] == "tclip_jax/result" and record["version"] == 2
    assert record["image"]["size_hw"] == [240, 320] and record["run"]["settings"]["translations"] == 1
    assert record["image"]["path"] == str((fixtures_dir / "scene_wide_320x240.png").resolve())  # a rerun's key
    assert record["run"]["method"] == "tclip" and record["run"]["input_protocol"] == "whole"
    assert record["run"]["model"]["origin"].endswith("tiny_openai_clip.npz")
    environment = record["environment"]  # the versions it ran under, as the running modules say them; the backend
    assert (environment["jax"], environment["numpy"], environment["opencv"], environment["backend"]) == (
        jax.__version__, np.__version__, cv2.__version__, jax.default_backend())
    for word in words:
        assert (folder / word["overlay"]).is_file()
        x1, y1, x2, y2 = word["box_xyxy"]
        assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 240
    assert (folder / record["prompts"][0]["grid_figure"]).is_file()
    with np.load(folder / "maps.npz") as maps:
        assert maps["p0_w2_circle/heatmap"].shape == maps["p0_w2_circle/soft"].shape == (240, 320)
        assert maps["p0_similarity"].shape == (4, 49)  # every piece, "." included
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    page = (out / "index.html").read_text(encoding="utf-8")  # the explorer, on by default (tests/test_explorer.py)
    data = json.loads(page.split('id="tclip-data">', 1)[1].split("</script>", 1)[0])
    assert [p["label"] for p in data["images"][0]["panels"]] == ["TCLIP K=1"]  # a K=1 run is not compared with K=1


def test_maps_npz_holds_exactly_the_results_maps_under_their_names(tmp_path, fixtures_dir, monkeypatch):
    """maps.npz (--save-npz) holds every map of the run's result, the same float32 values, under the names it has
    always had: per word `pP_wW_<word>/heatmap` and `/soft`, per prompt `pP_prompt/...` and `pP_similarity`
    (S), nothing else; a plain .npz that np.load reads."""
    from tclip_jax.cli import explain

    seen = []
    views = explain.Plan.views
    monkeypatch.setattr(explain.Plan, "views", lambda plan, image: seen.append(views(plan, image)) or seen[-1])
    out = tmp_path / "out"
    assert tclip(["explain", str(fixtures_dir / "scene_wide_320x240.png"), "--prompt", "a red circle.", "--prompt",
                  "red, square", "--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--translations", "1",
                  "--out", str(out), "--save-npz", "--no-html"]) == 0
    [[view]] = seen
    result = view.result
    expected = {}
    for p, words in enumerate([["a", "red", "circle"], ["red", "square"]]):
        prompt = result.prompts[p]
        assert [word.text for word in prompt.words] == words
        for w, (word, maps) in enumerate(zip(words, prompt.word_maps)):
            expected[f"p{p}_w{w}_{word}/heatmap"], expected[f"p{p}_w{w}_{word}/soft"] = maps.heatmap, maps.soft
        expected[f"p{p}_prompt/heatmap"], expected[f"p{p}_prompt/soft"] = prompt.phrase.heatmap, prompt.phrase.soft
        expected[f"p{p}_similarity"] = prompt.similarity
    with np.load(out / "scene_wide_320x240" / "maps.npz", allow_pickle=False) as saved:
        assert sorted(saved.files) == sorted(expected)
        for name, array in expected.items():
            assert saved[name].dtype == np.float32 and array.dtype == np.float32, name
            np.testing.assert_array_equal(saved[name], array, err_msg=name)
    # ... the names README gives (`p{P}_w{W}_{word}/heatmap`, ...: it named pN_similarity alone), each name one of its
    # patterns, P the prompt and W its word; and result.json names the file, and each map's keys by its overlay
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    patterns = {pattern: re.escape(pattern).replace(r"\{P\}", r"(?P<p>\d+)").replace(r"\{W\}", r"(?P<w>\d+)")
                .replace(r"\{word\}", r"(?P<word>[A-Za-z0-9_]{1,40})")
                for pattern in re.findall(r"`(p\{P\}_[^`]+)`", readme)}
    for name in expected:
        matches = [m for m in (re.fullmatch(regex, name) for regex in patterns.values()) if m]
        assert len(matches) == 1, (name, sorted(patterns))
        fields = matches[0].groupdict()
        if "w" in fields:
            word = result.prompts[int(fields["p"])].words[int(fields["w"])].text
            assert fields["word"] == word, name
    assert {regex for regex in patterns.values() if not any(re.fullmatch(regex, name) for name in expected)} == set()
    record = json.loads((out / "scene_wide_320x240" / "result.json").read_text())
    assert record["npz"] == "maps.npz"
    overlays = [m["overlay"] for p in record["prompts"] for m in (*p["words"], p["phrase"])]
    assert {f"{overlay.removesuffix('.png')}/{kind}" for overlay in overlays for kind in ("heatmap", "soft")} == {
        name for name in expected if not name.endswith("_similarity")}
    # the size README and the help state: 2 float32 maps of H x W per word and per prompt (and S), uncompressed
    # (each entry adds its .npy header and zip records, a few hundred bytes)
    maps_bytes = 8 * 240 * 320 * (3 + 1 + 2 + 1) + 4 * sum(prompt.similarity.size for prompt in result.prompts)
    assert maps_bytes < os.path.getsize(out / "scene_wide_320x240" / "maps.npz") < maps_bytes + 400 * len(expected)


def test_maps_npz_is_written_without_a_copy_of_the_maps(tmp_path):
    """maps.npz was written from a copy of every map (`astype(np.float32)` of float32 maps, one per name even where
    names share a map): 2.5 GB more at 2000x1500 pixels and 10 prompts. The write allocates far less than the maps
    it writes (a map two names share is written under each), and reads back as given."""
    import tracemalloc

    from tclip_jax.cli.explain import write_maps_npz

    rng = np.random.default_rng(0)
    maps = [rng.random((240, 320), dtype=np.float32) for _ in range(6)]
    arrays = {f"p0_w{i}_x/heatmap": m for i, m in enumerate(maps)}
    arrays["p0_w6_x/heatmap"] = maps[0]  # shared
    arrays["p0_w0_x/soft"] = maps[1][:, ::-1]  # a view that is not contiguous
    arrays["p0_similarity"] = rng.random((4, 49))  # float64: saved as float32
    written = sum(a.nbytes for a in arrays.values())
    tracemalloc.start()
    try:
        write_maps_npz(tmp_path / "maps.npz", arrays)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # numpy writes one map at a time, through a buffer of at most 16 MiB (and a contiguous copy of a view): the old
    # way held a copy of all 9 at once
    assert peak < 3 * maps[0].nbytes < written / 2, (peak, written)
    with np.load(tmp_path / "maps.npz", allow_pickle=False) as saved:
        assert sorted(saved.files) == sorted(arrays)
        for name, array in arrays.items():
            assert saved[name].dtype == np.float32
            np.testing.assert_array_equal(saved[name], array.astype(np.float32), err_msg=name)


def test_a_words_piece_indices_in_result_json_are_its_rows_of_the_saved_similarity(tmp_path, fixtures_dir):
    """result.json gave a word's token-row positions (SOT at 0) beside its prompt's 0-based `pieces` and S rows:
    "dog" of "a dog, a ..." named position 2, whose piece is ",". From the files alone: a word's `piece_indices` pick
    its `pieces` out of the prompt's, and the mean of those rows of the saved S, upsampled as PyTorch does
    (bilinear, align_corners=False), is the word's saved map (K=1: one copy of a 224-pixel image, the model's)."""
    import torch

    out = tmp_path / "out"
    assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "a dog, a hippopotamus.", "--prompt",
                  "<|startoftext|>red, square", "--model", str(fixtures_dir / "tiny_openai_clip.npz"),
                  "--translations", "1", "--out", str(out), "--save-npz", "--no-html"]) == 0
    record = json.loads((out / "scene_224" / "result.json").read_text())
    with np.load(out / "scene_224" / "maps.npz") as saved:
        maps = dict(saved)
    checked = 0
    for p, prompt in enumerate(record["prompts"]):
        similarity = maps[f"p{p}_similarity"].astype(np.float64)
        assert len(similarity) == len(prompt["pieces"])
        for w, word in enumerate(prompt["words"]):
            assert [prompt["pieces"][i] for i in word["piece_indices"]] == word["pieces"]
            assert "".join(word["pieces"]).replace("</w>", "") == word["word"].lower()
            grid = similarity[word["piece_indices"]].mean(0).reshape(record["grid"])
            expected = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(224, 224),
                                                       mode="bilinear", align_corners=False)[0, 0].numpy()
            [heatmap] = [v for k, v in maps.items() if k.startswith(f"p{p}_w{w}_") and k.endswith("/heatmap")]
            np.testing.assert_allclose(heatmap, expected, atol=1e-6, err_msg=word["word"])
            checked += 1
    assert checked == 6  # a, dog, a, hippopotamus; red, square


def test_explain_with_a_baseline(tmp_path, fixtures_dir):
    out = tmp_path / "out"
    assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "red circle", "--prompt", "cat",
                  "--method", "similarity", "--model", str(fixtures_dir / "tiny_openai_clip.npz"),
                  "--out", str(out)]) == 0
    record = json.loads((out / "scene_224" / "result.json").read_text())
    assert record["run"]["method"] == "similarity" and record["run"]["input_protocol"] == "whole"
    assert [p["prompt"] for p in record["prompts"]] == ["red circle", "cat"]
    for prompt in record["prompts"]:  # one map per prompt, no words and no soft map
        assert prompt["words"] == [] and prompt["phrase"]["tau"] is None
        assert (out / "scene_224" / prompt["phrase"]["overlay"]).is_file()
    assert "compare" not in record  # TCLIP K=1 joins TCLIP runs only
    page = (out / "index.html").read_text(encoding="utf-8")
    data = json.loads(page.split('id="tclip-data">', 1)[1].split("</script>", 1)[0])
    entry = data["images"][0]
    assert [p["label"] for p in entry["panels"]] == ["similarity"]
    assert [p["words"] for p in entry["prompts"]] == [[], []]  # no method here maps words: whole prompts only
    assert entry["panels"][0]["maps"]["p0"]["shows"] == "the prompt “red circle”"


def test_explain_errors_name_the_problem(tmp_path, fixtures_dir, capsys):
    model = str(fixtures_dir / "tiny_openai_clip.npz")
    assert tclip(["explain", str(tmp_path / "missing.png"), "--prompt", "x", "--model", model]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "...", "--model", model,
                  "--out", str(tmp_path / "o")]) == 2
    assert "no words to explain" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a bad prompt
    for method in ("similarity", "clip_surgery"):  # a prompt-level method too: a map of SOT and EOT alone
        for prompt in ("", "   "):  # the message quotes it as given
            assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", prompt, "--method", method,
                          "--model", model, "--out", str(tmp_path / "o")]) == 2
            assert f"prompt {prompt!r} is empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "\U0001F355", "--method", "similarity",
                  "--model", model, "--out", str(tmp_path / "emoji")]) == 0  # mapped whole
    assert "\r" not in capsys.readouterr().err  # stderr is no terminal here: no progress bar's frames
    assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "a cat", "--method", "decomposition",
                  "--model", model, "--out", str(tmp_path / "o")]) == 2
    assert "so it needs at least 2 that differ; got 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "o"):
        assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "a cat", "--model", model,
                      "--out", str(out)]) == 2
        assert "a_file is a file, not a folder" in capsys.readouterr().err
    # Stopped at its first image (here one damaged past its header, so found when it is decoded, after --out is
    # made; Ctrl-C alike): the folder it made goes too, and a folder the user had is left as it was, with no page
    # of no images.
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)).save(tmp_path / "noise.jpg")
    (tmp_path / "broken.jpg").write_bytes((tmp_path / "noise.jpg").read_bytes()[:-4000])
    for existed in (False, True):
        if existed:
            (tmp_path / "o").mkdir()
        assert tclip(["explain", str(tmp_path / "broken.jpg"), "--prompt", "a cat", "--model", model,
                      "--translations", "1", "--out", str(tmp_path / "o")]) == 2
        assert "cannot read image file" in capsys.readouterr().err
        assert (tmp_path / "o").exists() == existed and not (existed and any((tmp_path / "o").iterdir()))


def test_an_empty_path_is_refused_in_one_line_not_read_as_the_current_folder(tmp_path, fixtures_dir, capsys,
                                                                            monkeypatch):
    """pathlib reads "" as ".": `--out ""` wrote the results into the current folder, and `--model ""` or
    `convert ""` read it as the model."""
    monkeypatch.chdir(tmp_path)
    image, model = str(fixtures_dir / "scene_224.png"), str(fixtures_dir / "tiny_openai_clip.npz")
    for argv, said in [(["explain", image, "--prompt", "red", "--model", model, "--out", ""], "--out is empty"),
                       (["explain", image, "--prompt", "red", "--model", "", "--out", "o"],
                        "the model's path is empty"),
                       (["convert", "", "--out", "o"], "the model's path is empty"),
                       (["sweep", "synthetic", "--out", "", "--no-progress"], "--out is empty"),
                       (["train-eclip", "--synthetic", "2", "--out", ""], "--out is empty"),
                       (["train-eclip", "--data", "", "--out", "o"], "the training data's path is empty"),
                       (["sweep", "coco", "--data", "", "--out", "o", "--no-progress"], "--data is empty")]:
        assert tclip(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_is_a_link_to_nothing_or_a_loop_is_refused_in_one_line(tmp_path, fixtures_dir, capsys,
                                                                           monkeypatch):
    """A loop of links ended in "internal error (RuntimeError): Symlink loop" (Path.resolve), and a link to nothing
    in a sweep or an explain in "[Errno 17] File exists", neither naming --out."""
    monkeypatch.chdir(tmp_path)
    pathlib.Path("loop_a").symlink_to("loop_b")
    pathlib.Path("loop_b").symlink_to("loop_a")
    pathlib.Path("dangling").symlink_to("nowhere")
    before = sorted(p.name for p in tmp_path.iterdir())
    image, model = str(fixtures_dir / "scene_224.png"), str(fixtures_dir / "tiny_openai_clip.npz")
    for out, what in (("loop_a", "a loop of links"), ("dangling", "a link to nothing")):
        for command in (["convert", model], ["explain", image, "--prompt", "red", "--model", model],
                        ["sweep", "synthetic", "--no-progress"]):
            assert tclip([*command, "--out", out]) == 2, command
            assert capsys.readouterr().err == (f"tclip {command[0]}: error: --out {out} is {what}; remove it or "
                                               "name another folder\n")
            # a folder under such a link: mkdir's "[Errno 17] File exists: 'dangling'" or "Too many levels"
            assert tclip([*command, "--out", f"{out}/sub"]) == 2, command
            assert capsys.readouterr().err == (f"tclip {command[0]}: error: --out {out}/sub: {out} is {what}; "
                                               "remove it or name another folder\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_sigma_past_its_limit_is_refused_in_one_line_before_anything_runs(tmp_path, fixtures_dir, capsys):
    """--sigma 1e308 ended in 'internal error (OverflowError)' and 1e9 ran out of memory, in the blur."""
    model = str(fixtures_dir / "tiny_openai_clip.npz")
    for command in (["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "a cat"], ["sweep", "synthetic"]):
        for sigma, shown in (("1e308", "1e+308"), ("1e9", "1e+09")):
            assert tclip([*command, "--model", model, "--sigma", sigma, "--out", str(tmp_path / "o")]) == 2
            err = capsys.readouterr().err
            assert err == f"tclip {command[0]}: error: --sigma must lie in [0, 1000] (pixels), got {shown}\n"
    assert not (tmp_path / "o").exists()


def test_a_postscript_file_named_jpg_is_refused_in_one_line_and_ghostscript_never_runs(tmp_path, fixtures_dir, capsys,
                                                                                       fake_ghostscript):
    from conftest import EPS_BYTES

    (tmp_path / "photo.jpg").write_bytes(EPS_BYTES)
    assert tclip(["explain", str(tmp_path / "photo.jpg"), "--prompt", "a cat", "--model",
                  str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"tclip explain: error: cannot read image file {tmp_path / 'photo.jpg'}: the file is "
                            "not an image PIL can decode")
    assert error.count("\n") == 1 and not (tmp_path / "o").exists()
    assert not fake_ghostscript.exists()


def test_a_png_damaged_past_its_header_is_refused_in_one_line(tmp_path, fixtures_dir, capsys):
    """PIL raises SyntaxError on a broken PNG chunk: it was an "internal error (SyntaxError)" (exit 1)."""
    import io

    from conftest import png_broken_past_its_header

    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)).save(encoded, "PNG")
    (tmp_path / "bad.png").write_bytes(png_broken_past_its_header(encoded.getvalue()))
    assert tclip(["explain", str(tmp_path / "bad.png"), "--prompt", "a cat", "--model",
                  str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"tclip explain: error: cannot read image file {tmp_path / 'bad.png'}: broken PNG file")
    assert error.count("\n") == 1 and not (tmp_path / "o").exists()


def test_every_image_is_checked_before_anything_is_written(tmp_path, fixtures_dir, capsys):
    from PIL import Image

    model, good = str(fixtures_dir / "tiny_openai_clip.npz"), str(fixtures_dir / "scene_224.png")
    Image.new("RGB", (400, 20)).save(tmp_path / "strip.png")  # beyond 10:1: the whole protocol refuses it
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)).save(tmp_path / "noise.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "noise.jpg").read_bytes()[:-4000])  # its header is whole
    run = ["--prompt", "a cat", "--model", model, "--translations", "1", "--out", str(tmp_path / "o")]
    assert tclip(["explain", good, str(tmp_path / "strip.png"), *run]) == 2
    assert f"{tmp_path / 'strip.png'}: the image is 400x20 (W x H), more than 10:1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # A compare method is checked under its own input protocol, and the error names it.
    assert tclip(["explain", str(tmp_path / "strip.png"), *run, "--input-protocol", "patch_multiple",
                  "--compare", "similarity"]) == 2
    assert f"{tmp_path / 'strip.png'}: --compare similarity: the image is 400x20" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # Damage past the header is found when the image is decoded: the images before it keep their page.
    assert tclip(["explain", good, str(tmp_path / "truncated.jpg"), *run]) == 2
    assert "cannot read image file" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["index.html", "scene_224"]
    assert "scene_224" in (tmp_path / "o" / "index.html").read_text(encoding="utf-8")


def test_images_whose_names_collide_get_a_folder_each(tmp_path, fixtures_dir):
    from PIL import Image

    scene = Image.open(fixtures_dir / "scene_224.png").convert("RGB")
    paths = [tmp_path / "photo.png", tmp_path / "photo.jpg", tmp_path / "photo_2.jpg", tmp_path / "c" / "photo.png",
             tmp_path / "Photo_2.png"]
    (tmp_path / "c").mkdir()
    for i, path in enumerate(paths):  # each image its own content, so a result.json tells which one it holds
        Image.fromarray(np.roll(np.asarray(scene), 16 * i, axis=1)).save(path)
    out = tmp_path / "out"
    assert tclip(["explain", *map(str, paths), "--prompt", "red", "--model", str(fixtures_dir / "tiny_openai_clip.npz"),
                  "--translations", "1", "--compare", "none", "--out", str(out)]) == 0
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len({p.name.casefold() for p in folders}) == len(paths)  # distinct even where case is not told apart
    recorded = sorted(json.loads((p / "result.json").read_text())["image"]["path"] for p in folders)
    assert recorded == sorted(map(str, paths))
    page = (out / "index.html").read_text(encoding="utf-8")
    data = json.loads(page.split('id="tclip-data">', 1)[1].split("</script>", 1)[0])
    assert sorted(entry["name"] for entry in data["images"]) == sorted(p.name for p in folders)


def test_a_setting_given_as_a_flag_and_as_an_option_is_refused(tmp_path, fixtures_dir, capsys):
    assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "red", "--translations", "1",
                  "--option", "translations=25", "--model", str(fixtures_dir / "tiny_openai_clip.npz"),
                  "--out", str(tmp_path / "o")]) == 2
    assert "--translations and --option translations set the same setting twice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_settings_flags_must_belong_to_the_method(tmp_path, fixtures_dir, capsys):
    model = str(fixtures_dir / "tiny_openai_clip.npz")
    image = str(fixtures_dir / "scene_224.png")
    assert tclip(["explain", image, "--prompt", "a cat", "--method", "hilacam", "--translations", "1",
                  "--model", model, "--out", str(tmp_path / "o")]) == 2
    assert "--translations is not a setting of hilacam" in capsys.readouterr().err
    assert tclip(["explain", image, "--prompt", "a cat", "--method", "hilacam", "--option", "depth=2",
                  "--model", model, "--out", str(tmp_path / "o")]) == 2
    assert "unknown option 'depth'; known settings: box_rule, truncate, start_layer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_running_out_of_memory_is_one_line_that_says_so_and_a_bug_says_it_is_internal(monkeypatch, capsys):
    import jax
    import jax.numpy as jnp

    import tclip_jax.cli.explain as explain_command

    def too_big(args):  # XLA's own allocation failure (4 TiB), raised at once
        jax.jit(lambda: jnp.ones((1 << 40,), jnp.float32))().block_until_ready()

    monkeypatch.setattr(explain_command, "run", too_big)
    assert tclip(["explain", "x.png", "--prompt", "red", "--out", "nowhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tclip explain: error: out of memory (RESOURCE_EXHAUSTED: Out of "
                                               "memory allocating 4398046511104 bytes")
    assert "fewer prompts" in err[0]

    def exhausted(args):  # XLA's words on a GPU, without "Out of memory"
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Failed to allocate request for 4.00TiB on device")

    monkeypatch.setattr(explain_command, "run", exhausted)
    assert tclip(["explain", "x.png", "--prompt", "red", "--out", "nowhere"]) == 2
    assert capsys.readouterr().err.startswith("tclip explain: error: out of memory (RESOURCE_EXHAUSTED: Failed")

    def missing_package(args):  # an optional package a method needs is not installed: the user's to install
        raise ImportError("No module named 'optional_package'")

    monkeypatch.setattr(explain_command, "run", missing_package)
    assert tclip(["explain", "x.png", "--prompt", "red", "--out", "nowhere"]) == 2
    assert capsys.readouterr().err == "tclip explain: error: No module named 'optional_package'\n"
    monkeypatch.setattr(explain_command, "run", lambda args: {}["missing"])
    assert tclip(["explain", "x.png", "--prompt", "red", "--out", "nowhere"]) == 1
    assert capsys.readouterr().err.strip() == ("tclip explain: internal error (KeyError): 'missing' (set "
                                               "TCLIP_TRACEBACK=1 for the traceback)")


def test_an_empty_item_in_a_list_is_refused_not_dropped(tmp_path, monkeypatch, capsys):
    """`--scale-fractions 0.25,,0.5` ran as 0.25,0.5: empty items were skipped. A list with an empty item (inside,
    at either end) is refused in one line naming the flag or option and the text; "" is still the empty list (the
    parse_tuple docstring; --scale-fractions refuses it as a setting, with its own words)."""
    from tclip_jax.settings import parse_tuple

    monkeypatch.chdir(tmp_path)
    explain = ["explain", "a.png", "--prompt", "red"]
    for text in ("0.25,,0.5", "0.25,0.5,", ",0.5", "0.5, "):
        assert tclip([*explain, "--scale-fractions", text]) == 2
        assert capsys.readouterr().err == f"tclip explain: error: argument --scale-fractions: empty item in {text!r}\n"
        assert tclip([*explain, "--option", f"scale_fractions={text}"]) == 2
        err = capsys.readouterr().err
        assert err.endswith(f": empty item in {text!r}\n") and err.count("\n") == 1, err
        with pytest.raises(ValueError, match="^empty item in "):
            parse_tuple(float)(text)
    assert parse_tuple(float)("") == parse_tuple(float)(" ") == ()
    assert parse_tuple(float)(" 0.25, 0.5") == (0.25, 0.5)
    assert tclip([*explain, "--scale-fractions", ""]) == 2
    assert "--scale-fractions must be a non-empty tuple, got ()" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_backend_jax_cannot_start_is_the_users_error_naming_jax_platforms(monkeypatch, capsys):
    """JAX_PLATFORMS=cuda on a machine without CUDA: jax raises a bare AssertionError where a computation first asks
    for a device, which was said as "internal error (AssertionError)"."""
    import jax

    import tclip_jax.cli.explain as explain_command

    def no_backend():
        raise AssertionError

    def computes(args):
        return jax.devices()

    monkeypatch.setattr(explain_command, "run", computes)
    monkeypatch.setattr(jax, "devices", no_backend)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert tclip(["explain", "x.png", "--prompt", "red", "--out", "nowhere"]) == 2
    assert capsys.readouterr().err == ("tclip explain: error: JAX cannot start the platform JAX_PLATFORMS='cuda' names "
                                       "(AssertionError); unset JAX_PLATFORMS, or name one this machine has (e.g. "
                                       "cpu)\n")
    monkeypatch.delenv("JAX_PLATFORMS")
    assert tclip(["explain", "x.png", "--prompt", "red", "--out", "nowhere"]) == 2
    assert "error: JAX cannot start a backend (AssertionError); JAX_PLATFORMS=cpu runs" in capsys.readouterr().err
    monkeypatch.undo()  # a backend that starts: the same AssertionError is a bug
    monkeypatch.setattr(explain_command, "run", lambda args: no_backend())
    assert tclip(["explain", "x.png", "--prompt", "red", "--out", "nowhere"]) == 1
    assert "internal error (AssertionError)" in capsys.readouterr().err


def test_an_xla_flags_xla_refuses_is_one_line_naming_it_and_nothing_is_made_at_out(tmp_path, fixtures_dir):
    """XLA_FLAGS=--bogus_flag: XLA aborted the process from C++ as JAX started its backend (its raw fatal line,
    status 1) after `tclip explain` had made --out and its lock, left behind. The flags are tried first: one line
    naming XLA_FLAGS and XLA's reason, status 2, nothing made; flags XLA takes are not refused."""
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "XLA_FLAGS": "--bogus_flag"}
    done = subprocess.run([sys.executable, "-m", "tclip_jax", "explain", str(fixtures_dir / "scene_224.png"),
                           "--prompt", "red", "--translations", "1", "--no-html", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (2, "tclip explain: error: XLA refuses XLA_FLAGS='--bogus_flag' (Unknown "
                                                 "flag in XLA_FLAGS: --bogus_flag); correct it or unset XLA_FLAGS\n")
    assert list(tmp_path.iterdir()) == []
    from tclip_jax.cli import _xla_flags_refused

    assert _xla_flags_refused() is None  # this session's own flags (conftest's), which its backend took
    from tclip_jax.cli import _xla_refusal

    # a TPU flag is libtpu's, unknown to jaxlib's XLA (a TPU VM aborts on it in XLA_FLAGS too): say where it goes
    assert _xla_refusal("--xla_tpu_enable_latency_hiding_scheduler=true").endswith(
        "; TPU flags (--xla_tpu_...) go in LIBTPU_INIT_ARGS; correct it or unset XLA_FLAGS")


def test_a_commands_warnings_are_said_in_one_line_while_it_runs_and_the_process_keeps_its_own(monkeypatch, capsys):
    """The command's hook for warnings stayed after main returned: every later warning of the process (a notebook's,
    a test's) was said as "tclip explain: warning: ..."."""
    import warnings

    import tclip_jax.cli.explain as explain_command

    def warns(args):
        warnings.warn("careful\nnow", UserWarning)
        return 0

    monkeypatch.setattr(explain_command, "run", warns)
    before = warnings.showwarning
    assert tclip(["explain", "x.png", "--prompt", "red", "--out", "nowhere"]) == 0
    assert capsys.readouterr().err == "tclip explain: warning: careful now\n"
    assert warnings.showwarning is before


def test_commands_that_overlap_leave_matplotlibs_logger_as_they_found_it(capsys):
    """Two commands in threads whose blocks overlap (A starts, B starts, A ends, B ends): each said matplotlib's
    records as its lines and then put back the logger's propagation it found, A's setting it off for good, so a
    notebook's own handler never got matplotlib's records again. The logger is left as found, and a handler the
    process set up gets matplotlib's records during a command too."""
    import logging

    from tclip_jax.cli import warnings_as_lines

    logger, seen = logging.getLogger("matplotlib"), []
    notebook = logging.Handler(logging.WARNING)
    notebook.emit = lambda record: seen.append(record.getMessage())
    before = (logger.propagate, list(logger.handlers))
    logging.getLogger().addHandler(notebook)
    try:
        first, second = warnings_as_lines("tclip A"), warnings_as_lines("tclip B")
        first.__enter__(), second.__enter__()
        first.__exit__(None, None, None)
        logger.warning("during B")
        second.__exit__(None, None, None)
        logger.warning("after both")
    finally:
        logging.getLogger().removeHandler(notebook)
    assert (logger.propagate, logger.handlers) == before
    assert seen == ["during B", "after both"]
    assert capsys.readouterr().err == "tclip B: warning: during B\n"


def test_matplotlibs_unwritable_config_folder_is_one_warning_line_of_the_command(tmp_path, fixtures_dir):
    """A HOME matplotlib cannot make its config folder in (here a file; /proc/nohome, a user without a home): it
    logged "mkdir -p failed for path ..." and "Matplotlib created a temporary cache directory ..." raw on stderr,
    through logging. One warning line of the command now, naming the folder and MPLCONFIGDIR."""
    import subprocess
    import sys

    home = tmp_path / "home"
    home.write_text("not a folder")
    env = {name: value for name, value in os.environ.items()
           if name not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-m", "tclip_jax", "explain", str(fixtures_dir / "scene_224.png"),
                           "--prompt", "red", "--translations", "1", "--no-html", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    folder = home.resolve() / ".config" / "matplotlib"  # matplotlib's default on Linux: $HOME/.config/matplotlib
    assert done.stderr == (f"tclip explain: warning: matplotlib cannot write its config folder {folder}, so it uses "
                           "a temporary one; set MPLCONFIGDIR to a writable folder to give it one\n")
    assert (tmp_path / "out" / "scene_224" / "result.json").is_file()


def test_an_out_folder_that_cannot_be_made_is_named_as_the_flag_not_as_a_lock(tmp_path, fixtures_dir, monkeypatch,
                                                                             capsys):
    """--out under /proc as root passed the check (access() allows root everything) and failed making it: explain
    said "[Errno 2] No such file or directory: '/proc/tclipx'" and convert named '/proc/.tclipconv.lock', a lock
    file the user never typed. Where the lock of every command is made (`held_lock`): "--out PATH: cannot create it:
    REASON", the OS's reason. Made the same way as any user here: access() allowing everything, as it does root."""
    import errno

    from tclip_jax.cli.explain import LOCK_FILE
    from tclip_jax.files import held_lock, held_lock_beside

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "out"  # under a file: ENOTDIR, for every user
    not_a_folder = os.strerror(errno.ENOTDIR)
    with pytest.raises(NotADirectoryError, match=f"^--out {re.escape(str(out))}: cannot create it: {not_a_folder}$"):
        with held_lock(out / LOCK_FILE, "tclip explain", out, make_folder=True):
            pass
    beside = blocker / "models" / "converted"  # convert's lock is beside its folder: .converted.lock
    with pytest.raises(NotADirectoryError, match=f"^--out {re.escape(str(beside))}: cannot create it: "
                                                 f"{not_a_folder}$"):
        with held_lock_beside(beside, "tclip convert"):
            pass
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    for command, out in (("explain", "/proc/tclip-no-such-out"), ("convert", "/proc/tclip-no-such-conv")):
        try:  # the reason the OS gives here, for this user
            os.mkdir(out)
        except OSError as err:
            reason = err.strerror
        else:
            os.rmdir(out)
            pytest.fail(f"{out} could be made")
        given = {"explain": ["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "red"],
                 "convert": ["convert", str(fixtures_dir / "tiny_openai_clip.npz"), "--activation", "quick_gelu"]}
        assert tclip([*given[command], "--out", out]) == 2
        assert capsys.readouterr().err == f"tclip {command}: error: --out {out}: cannot create it: {reason}\n"
    # another user's lock left beside a convert's folder not made yet is refused as that lock, not as --out
    models = tmp_path / "models"
    models.mkdir()
    (models / ".converted.lock").write_text("process 1 on a killed run's host")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ValueError, match=f"^cannot open {re.escape(str(models / '.converted.lock'))}, the lock of a "
                                         f"tclip convert in {re.escape(str(models / 'converted'))} \\(Permission "
                                         "denied\\): if no tclip convert runs there, remove it$"):
        with held_lock_beside(models / "converted", "tclip convert"):
            pass


def test_a_prompt_level_main_methods_word_alone_maps_are_in_result_json_as_on_the_page(tmp_path, fixtures_dir):
    """Beside a per-word compare method the page shows the main method's map of each word alone; result.json
    records them as it records a compare method's, with the page or without it (--no-html left them out)."""
    records = []
    for html in ([], ["--no-html"]):
        out = tmp_path / f"out{len(records)}"
        assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "a red circle", "--method",
                      "similarity", "--compare", "tclip:translations=1", *html,
                      "--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(out)]) == 0
        records.append(json.loads((out / "scene_224" / "result.json").read_text()))
    with_page, without = records
    assert [p["prompt"] for p in with_page["words_alone"]] == ["a", "red", "circle"]
    assert with_page["compare"][0]["prompts"][0]["words"][1]["word"] == "red"
    assert "words_alone" not in with_page["compare"][0]  # TCLIP maps its words itself
    assert without["words_alone"] == with_page["words_alone"]


def test_a_rerun_replaces_its_own_images_results_and_never_another_images(tmp_path, fixtures_dir, monkeypatch):
    """a/photo.png and b/photo.png share a stem: b's rerun (alone, from another folder, by another path) replaces
    b's earlier result, not a's in OUT/photo; a new image of that stem takes the next free folder."""
    from tclip_jax.visualize.explorer import page_images

    scene = Image.open(fixtures_dir / "scene_224.png").convert("RGB")
    images = {}
    for i, folder in enumerate(["a", "b", "c"]):
        (tmp_path / folder).mkdir()
        images[folder] = tmp_path / folder / "photo.png"
        Image.fromarray(np.roll(np.asarray(scene), 32 * i, axis=1)).save(images[folder])
    out = tmp_path / "out"
    run = ["--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--translations", "1", "--compare", "none",
           "--out", str(out)]

    def held():  # folder -> (the image file its result.json records, its first prompt)
        records = {p.name: json.loads((p / "result.json").read_text()) for p in out.iterdir() if p.is_dir()}
        return {name: (pathlib.Path(r["image"]["path"]).resolve(), r["prompts"][0]["prompt"])
                for name, r in records.items()}

    assert tclip(["explain", str(images["a"]), str(images["b"]), "--prompt", "red", *run]) == 0
    assert held() == {"photo": (images["a"], "red"), "photo_2": (images["b"], "red")}
    monkeypatch.chdir(tmp_path / "b")
    assert tclip(["explain", "photo.png", "--prompt", "blue", *run]) == 0
    assert held() == {"photo": (images["a"], "red"), "photo_2": (images["b"], "blue")}
    assert page_images(out / "index.html") == ["photo_2"]  # the page shows the run's images (README)
    assert tclip(["explain", "../c/photo.png", "./photo.png", "--prompt", "green", *run]) == 0
    assert held() == {"photo": (images["a"], "red"), "photo_2": (images["b"], "green"),
                      "photo_3": (images["c"], "green")}
    # A folder freed in between is filled by a new image, while each earlier image keeps its folder.
    shutil.rmtree(out / "photo")
    assert tclip(["explain", "../a/photo.png", "photo.png", "--prompt", "red", *run]) == 0
    assert held() == {"photo": (images["a"], "red"), "photo_2": (images["b"], "red"),
                      "photo_3": (images["c"], "green")}
    # Two names of one file (a link beside it) each keep the folder of their own name on a rerun, in either order.
    (tmp_path / "a" / "alias.png").symlink_to("photo.png")
    for images in (["../a/alias.png", "../a/photo.png"], ["../a/photo.png", "../a/alias.png"]):  # OUT/photo is a's
        assert tclip(["explain", *images, "--prompt", "red", *run]) == 0
        assert page_images(out / "index.html") == [pathlib.Path(image).stem for image in images]


def test_a_link_to_an_image_named_in_other_case_takes_a_folder_of_its_own(tmp_path):
    """The run's folder names are compared case-blind: alias.png, a link to Scene.png whose earlier result OUT/Scene
    holds, takes OUT/alias, not OUT/Scene as well (two images' results written into one folder)."""
    from tclip_jax.cli.explain import result_folders

    (tmp_path / "Scene.png").write_bytes(b"")
    (tmp_path / "alias.png").symlink_to("Scene.png")
    (tmp_path / "out" / "Scene").mkdir(parents=True)
    record = {"image": {"path": str(tmp_path / "Scene.png")}}  # all result_folders reads of an earlier result
    (tmp_path / "out" / "Scene" / "result.json").write_text(json.dumps(record))
    images = [str(tmp_path / "Scene.png"), str(tmp_path / "alias.png")]
    assert result_folders(tmp_path / "out", images) == ["Scene", "alias"]
    assert result_folders(tmp_path / "out", images[::-1]) == ["alias", "Scene"]


def test_a_tclip_runs_page_compares_it_with_k1_unasked(tmp_path, fixtures_dir, monkeypatch):
    """The README: a TCLIP run's page shows TCLIP K=1 beside it, whether or not --compare names methods (a K=1 run's
    page shows it once: test_explain_writes_overlays_grid_json_and_npz)."""
    import tclip_jax.cli.explain as explain_command

    planned = []  # the run's compare methods, as planned before its images
    monkeypatch.setattr(explain_command, "_explain_all",
                        lambda args, method, plan, out, names: planned.append([c.spec for c in plan.compared]) or 0)
    assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "red", "--model",
                  str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(tmp_path / "o")]) == 0
    assert planned == [["tclip:translations=1"]]


def test_a_run_replaces_only_what_tclip_explain_wrote_and_refuses_before_loading_the_model(tmp_path, fixtures_dir,
                                                                                           monkeypatch, capsys):
    """An image's folder OUT/<stem> is replaced only if it is empty or an earlier result, and never when it holds an
    input image; OUT/index.html only if it is an earlier page. Otherwise nothing is touched, and the refusal comes
    before the model loads (here a model that does not exist, whose error would come first otherwise)."""
    monkeypatch.chdir(tmp_path)
    scene = (fixtures_dir / "scene_224.png").read_bytes()
    (tmp_path / "cat").mkdir()
    for name in ("cat.png", "other.png"):  # the user's images, in a folder named like the first image's stem
        (tmp_path / "cat" / name).write_bytes(scene)
    (tmp_path / "photo").mkdir()
    (tmp_path / "photo" / "notes.txt").write_text("mine")  # unrelated to the image photo.png
    (tmp_path / "photo.png").write_bytes(scene)
    (tmp_path / "dog").mkdir()  # a result.json alone, of another program's schema
    (tmp_path / "dog" / "result.json").write_text('{"schema": "someone-else/1", "prompts": []}')
    (tmp_path / "dog.png").write_bytes(scene)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    nowhere = ["--prompt", "red", "--model", str(tmp_path / "no_such_model.npz"), "--out", "."]
    assert tclip(["explain", "cat/cat.png", "cat/other.png", *nowhere]) == 2
    assert "cat holds cat/cat.png, which replacing it would delete" in capsys.readouterr().err
    assert tclip(["explain", "photo.png", *nowhere]) == 2
    err = capsys.readouterr().err
    assert "photo is not an earlier result of tclip explain (it has no result.json)" in err
    assert len(err.strip().splitlines()) == 1
    assert tclip(["explain", "dog.png", *nowhere]) == 2
    assert "dog is not an earlier result of tclip explain (its result.json is not one tclip explain wrote)" in \
        capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched or added

    # Re-running into the same --out replaces the earlier results (and an empty folder is filled).
    run = ["--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--translations", "1", "--compare", "none",
           "--out", "out"]
    (tmp_path / "out" / "cat").mkdir(parents=True)
    assert tclip(["explain", "cat/cat.png", "--prompt", "red", "--save-npz", *run]) == 0
    assert tclip(["explain", "cat/cat.png", "--prompt", "blue circle", *run]) == 0
    record = json.loads((tmp_path / "out" / "cat" / "result.json").read_text())
    assert [w["word"] for w in record["prompts"][0]["words"]] == ["blue", "circle"]
    assert not (tmp_path / "out" / "cat" / "maps.npz").exists()  # the earlier run's files went with it
    # A result the user has added a file to is theirs too; so is an index.html of their own.
    (tmp_path / "out" / "cat" / "notes.txt").write_text("mine")
    assert tclip(["explain", "cat/cat.png", "--prompt", "red", *run]) == 2
    assert "it holds notes.txt, which tclip explain did not write" in capsys.readouterr().err
    (tmp_path / "out" / "cat" / "notes.txt").unlink()
    (tmp_path / "out" / "index.html").write_text("<html>my page</html>")
    assert tclip(["explain", "cat/cat.png", "--prompt", "red", *run]) == 2
    assert "index.html is not a page tclip explain wrote" in capsys.readouterr().err
    assert (tmp_path / "out" / "index.html").read_text() == "<html>my page</html>"
    (tmp_path / "out" / "index.html").unlink()
    (tmp_path / "out" / "index.html").mkdir()  # a folder is no page either (refused before the model loads)
    assert tclip(["explain", "cat/cat.png", *nowhere[:4], "--out", "out"]) == 2
    assert "index.html is not a page tclip explain wrote" in capsys.readouterr().err
    (tmp_path / "out" / "index.html").rmdir()
    (tmp_path / "out" / "index.html").write_text("<html>my page</html>")
    assert tclip(["explain", "cat/cat.png", "--prompt", "red", "--no-html", *run]) == 0
    # What a file browser drops into a result does not make it the user's; a link where the folder goes is refused
    # up front (a link to nothing failed only at the end, after the maps were computed).
    (tmp_path / "out" / "cat" / ".DS_Store").write_bytes(b"\0")
    assert tclip(["explain", "cat/cat.png", "--prompt", "red", "--no-html", *run]) == 0
    shutil.rmtree(tmp_path / "out" / "cat")
    (tmp_path / "out" / "cat").symlink_to(tmp_path / "gone")
    assert tclip(["explain", "cat/cat.png", "--prompt", "red", "--no-html", *nowhere[2:4], "--out", "out"]) == 2
    assert "cat is a symbolic link where this run writes the results of an image" in capsys.readouterr().err


def test_a_no_html_run_removes_an_earlier_page_that_shows_an_image_it_replaces(tmp_path, fixtures_dir, monkeypatch,
                                                                              capsys):
    """The earlier page inlines its images' maps and prompts and links their folders' files: once a --no-html run
    replaces one of them, the page showed the old results beside links to the new ones. It goes, as the run swaps
    in that image's results, and not before: a run that replaces none of its images, or stops first, leaves it."""
    from tclip_jax.visualize.explorer import page_images

    monkeypatch.chdir(tmp_path)
    scene = Image.open(fixtures_dir / "scene_224.png").convert("RGB")
    scene.save("a.png")
    scene.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save("b.png")
    scene.save("c.png")
    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)
    Image.fromarray(noise).save("whole.jpg")
    pathlib.Path("damaged.jpg").write_bytes(pathlib.Path("whole.jpg").read_bytes()[:-4000])  # its header is whole
    run = ["--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--translations", "1", "--compare", "none",
           "--out", "out"]
    index = tmp_path / "out" / "index.html"
    assert tclip(["explain", "a.png", "b.png", "--prompt", "red", *run]) == 0
    page = index.read_bytes()
    assert page_images(index) == ["a", "b"]
    capsys.readouterr()
    # Images the page does not show: it stays, and nothing is said about it.
    assert tclip(["explain", "c.png", "--prompt", "blue square", "--no-html", *run]) == 0
    assert index.read_bytes() == page and "index.html" not in capsys.readouterr().out
    # Stopped before it replaced anything (an image damaged past its header): the page stays, and no staging folder.
    assert tclip(["explain", "damaged.jpg", "a.png", "--prompt", "blue square", "--no-html", *run]) == 2
    assert index.read_bytes() == page
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b", "c", "index.html"]
    # b replaced: the page goes (said once, in one line), the results are the new run's, nothing else is touched.
    assert tclip(["explain", "b.png", "a.png", "--prompt", "blue square", "--no-html", *run]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "index.html" in line]
    assert said == [f"{pathlib.Path('out') / 'index.html'}: removed (--no-html); it showed earlier results of images "
                    "this run replaces"]
    assert not index.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b", "c"]
    for name in ("a", "b"):
        record = json.loads((tmp_path / "out" / name / "result.json").read_text())
        assert [w["word"] for w in record["prompts"][0]["words"]] == ["blue", "square"]
    # A page of the user's own is never removed (check_replaced keeps it from --html runs).
    index.write_text("<html>my page</html>")
    assert tclip(["explain", "a.png", "--prompt", "red", "--no-html", *run]) == 0
    assert index.read_text() == "<html>my page</html>"


def test_a_page_never_shows_old_results_beside_the_new_files_it_links_even_if_the_run_is_killed(tmp_path,
                                                                                                 fixtures_dir,
                                                                                                 monkeypatch):
    """A rerun with a page wrote its page only at the end: killed (SIGKILL) after it had replaced an image's
    results, it left the earlier page showing that image's old results beside links to the new result.json. What
    a kill would leave is looked at as each image's results are written: the earlier page, if still there, shows
    each of its images as its folder holds it; the run's own page comes at the end."""
    import tclip_jax.cli.explain as explain
    from tclip_jax.visualize.explorer import _PAGE_DATA_TAG

    def shown_prompts(index: pathlib.Path) -> dict:  # image -> its prompts, as the page shows them
        text = index.read_text(encoding="utf-8")
        start = text.index(_PAGE_DATA_TAG) + len(_PAGE_DATA_TAG)
        images = json.loads(text[start:text.index("</script>", start)])["images"]
        return {entry["name"]: [p["prompt"] for p in entry["prompts"]] for entry in images}

    def recorded_prompts(name: str) -> list:
        return [p["prompt"] for p in json.loads((out / name / "result.json").read_text())["prompts"]]

    monkeypatch.chdir(tmp_path)
    scene = Image.open(fixtures_dir / "scene_224.png").convert("RGB")
    scene.save("a.png")
    scene.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save("b.png")
    run = ["--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--translations", "1", "--compare", "none",
           "--out", "out"]
    out, index = tmp_path / "out", tmp_path / "out" / "index.html"
    assert tclip(["explain", "a.png", "b.png", "--prompt", "red", *run]) == 0
    assert shown_prompts(index) == {"a": ["red"], "b": ["red"]}
    left_by_a_kill = []
    write_result = explain.write_result

    def looked_at(*args, **kwargs):  # as the next image is written: the files a SIGKILL would leave
        left_by_a_kill.append({name: (shown, recorded_prompts(name)) for name, shown in
                               (shown_prompts(index) if index.exists() else {}).items()})
        return write_result(*args, **kwargs)

    monkeypatch.setattr(explain, "write_result", looked_at)
    assert tclip(["explain", "a.png", "b.png", "--prompt", "blue square", *run]) == 0
    assert len(left_by_a_kill) == 2 and left_by_a_kill[0] == {"a": (["red"], ["red"]), "b": (["red"], ["red"])}
    for shown in left_by_a_kill[1:]:  # a's results replaced: a page still there must show a's new ones
        assert all(page == recorded for page, recorded in shown.values()), shown
    assert shown_prompts(index) == {"a": ["blue square"], "b": ["blue square"]}


def test_results_a_killed_swap_hid_are_put_back_before_a_run_chooses_its_folders(tmp_path, fixtures_dir,
                                                                                  monkeypatch):
    """A SIGKILL between a swap's two renames leaves an image's earlier results hidden beside OUT/<stem>
    (`.<stem>.HOST.old.*/<stem>`). A later run on another image of that stem found the name free, chose it, and the
    save put the hidden results back only to replace them: they were lost. They are put back first, so the other
    image goes to <stem>_2 as for any image whose stem is taken."""
    import os
    import socket

    monkeypatch.chdir(tmp_path)
    scene = Image.open(fixtures_dir / "scene_224.png").convert("RGB")
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    scene.save("first/photo.png")
    scene.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save("second/photo.png")
    run = ["--prompt", "red", "--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--translations", "1",
           "--no-html", "--out", "out"]
    assert tclip(["explain", "first/photo.png", *run]) == 0
    out = tmp_path / "out"
    recorded = (out / "photo" / "result.json").read_bytes()
    hidden = out / f".photo.{socket.gethostname()}.old.abcdefgh"  # as a kill between the two renames leaves it
    hidden.mkdir()
    (out / "photo").rename(hidden / "photo")
    os.utime(hidden, (0, 0))  # older than any live run's
    assert tclip(["explain", "second/photo.png", *run]) == 0
    assert (out / "photo" / "result.json").read_bytes() == recorded and not hidden.exists()
    second = json.loads((out / "photo_2" / "result.json").read_text())
    assert second["image"]["path"] == str(tmp_path / "second" / "photo.png")


def test_a_no_html_run_keeps_a_page_whose_folders_differ_from_its_own_in_case_alone(tmp_path, fixtures_dir,
                                                                                     monkeypatch, capsys):
    """A --no-html run of PHOTO.png writes OUT/PHOTO: on a case-sensitive file system not the folder OUT/photo an
    earlier page shows, so the page (still right) stays; the folder the page shows under another name (a link, as
    a case-blind file system's "PHOTO" is its "photo") is replaced, and the page goes."""
    monkeypatch.chdir(tmp_path)
    Image.open(fixtures_dir / "scene_224.png").convert("RGB").save("photo.png")
    shutil.copy("photo.png", "PHOTO.png")
    run = ["--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--translations", "1", "--compare", "none",
           "--prompt", "red", "--out", "out"]
    out = tmp_path / "out"
    assert tclip(["explain", "photo.png", *run]) == 0
    page = (out / "index.html").read_bytes()
    if (out / "PHOTO").exists():
        pytest.skip("the file system does not tell names apart by case")
    capsys.readouterr()
    assert tclip(["explain", "PHOTO.png", "--no-html", *run]) == 0
    assert (out / "index.html").read_bytes() == page and "index.html" not in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["PHOTO", "index.html", "photo"]
    # The page's folder reached by another name: the run replaces what the page shows.
    shutil.rmtree(out / "photo")
    (out / "photo").symlink_to("PHOTO")
    assert tclip(["explain", "PHOTO.png", "--no-html", *run]) == 0
    assert "index.html: removed (--no-html)" in capsys.readouterr().out
    assert not (out / "index.html").exists()


def test_a_method_module_that_fails_as_it_runs_is_the_users_error(tmp_path, fixtures_dir, monkeypatch, capsys):
    """`--method module:Class` whose module raises something other than ImportError (its own NameError, a syntax
    error) was reported as tclip's internal error (status 1); it is the user's: one line naming the module, the
    error and where, status 2, and TCLIP_TRACEBACK=1 still shows the module's traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "plugin_bad_name.py").write_text("import math\nx = undefined_name\n")
    (tmp_path / "plugin_bad_syntax.py").write_text("def f(:\n")
    run = ["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "a cat", "--model",
           str(fixtures_dir / "tiny_openai_clip.npz"), "--out", "out", "--method"]
    for spec, error in [("plugin_bad_name:Mine", "NameError: name 'undefined_name' is not defined at "
                                                 "plugin_bad_name.py:2"),
                        ("plugin_bad_syntax:Mine", "SyntaxError: invalid syntax at plugin_bad_syntax.py:1")]:
        assert tclip(run + [spec]) == 2
        err = capsys.readouterr().err
        module = spec.split(":")[0]
        assert err == f"tclip explain: error: method module '{module}' of '{spec}' cannot be imported: {error}\n"
    monkeypatch.setenv("TCLIP_TRACEBACK", "1")
    with pytest.raises(ValueError, match="cannot be imported") as raised:
        tclip(run + ["plugin_bad_name:Mine"])
    assert isinstance(raised.value.__cause__, NameError)
    assert not (tmp_path / "out").exists()


# Each command with what it requires besides the model-loading flags.
REQUIRED = {"explain": ["a.png", "--prompt", "a cat"], "sweep": ["synthetic", "--out", "o"],
            "train-eclip": ["--out", "o", "--synthetic", "2"], "convert": ["src.pt", "--out", "o"]}


def test_the_model_loading_flags_are_declared_once_from_the_models_constants(capsys):
    """--model, --activation and --max-pixels read the same in every command that takes them (convert, which reads
    no image and converts SRC, takes --activation alone); --activation takes exactly the model's ACTIVATIONS and
    --max-pixels's help gives PIL's limit."""
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == set(REQUIRED)
    helps = {}
    for name, parser in commands.items():
        flags = {action.option_strings[0]: action for action in parser._actions if action.option_strings}
        expected = ["--activation"] if name == "convert" else ["--activation", "--model", "--max-pixels"]
        assert [flag for flag in ("--activation", "--model", "--max-pixels") if flag in flags] == expected
        helps[name] = {flag: flags[flag].help for flag in expected}
        for value in (*ACTIVATIONS, "relu", "GELU", "quick-gelu", ""):
            try:
                args = parser.parse_args([*REQUIRED[name], "--activation", value])
            except SystemExit:
                assert value not in ACTIVATIONS and "invalid choice" in capsys.readouterr().err
            else:
                assert args.activation == value in ACTIVATIONS
    assert helps["explain"] == helps["sweep"] == helps["train-eclip"]
    assert helps["convert"]["--activation"] == helps["explain"]["--activation"]
    assert f"{Image.MAX_IMAGE_PIXELS})" in helps["explain"]["--max-pixels"]


def test_arguments_argparse_refuses_are_one_line_with_status_2_for_every_command(capsys):
    """The README promises one line per error; argparse's refusals printed the whole usage block first."""
    for argv in (["nope"], *([name, "--nope"] for name in REQUIRED), ["explain", "a.png"],
                 ["sweep", "synthetic", "--out", "o", "--batch-size", "x"]):
        with pytest.raises(SystemExit) as ended:
            tclip(argv)
        err = capsys.readouterr().err
        command = "tclip" if argv == ["nope"] else f"tclip {argv[0]}"
        assert ended.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"{command}: error: ") and err.endswith(f" (see {command} --help)\n"), err


def test_an_argument_a_command_does_not_know_is_refused_by_that_command_naming_its_help(capsys):
    """`tclip explain x.png --prompt a --bogus` said "tclip: error: unrecognized arguments: --bogus (see tclip
    --help)": argparse hands a sub-command's leftovers up to the top-level parser. Each command refuses its own, in
    argparse's words; one before the command is still the top level's."""
    reference = argparse.ArgumentParser(prog="p")
    for name in REQUIRED:
        for extra in (["--bogus"], ["--bogus", "1"], ["stray"]):
            if name == "explain" and extra == ["stray"]:
                continue  # explain takes any number of images
            expected = _parse_error(reference, extra, capsys).split(": error: ")[1]
            with pytest.raises(SystemExit) as ended:
                tclip([name, *REQUIRED[name], *extra])
            assert ended.value.code == 2
            assert capsys.readouterr().err == f"tclip {name}: error: {expected} (see tclip {name} --help)\n"
    with pytest.raises(SystemExit):
        tclip(["--bogus", "explain", *REQUIRED["explain"]])
    assert capsys.readouterr().err == "tclip: error: unrecognized arguments: --bogus (see tclip --help)\n"


def test_a_flag_is_taken_only_as_spelled_in_full(capsys):
    """argparse took any unambiguous prefix (`--transl 1` ran as `--translations 1`), so a flag added later that
    shares it would change what a line means: no parser of the package's takes a prefix (`OneLineErrors`, which the
    commands, the demo and the training scripts build theirs with). A flag cut by one letter, where that is no flag
    of its own, is refused as argparse refuses any unknown flag."""
    from tclip_jax.cli import OneLineErrors

    assert OneLineErrors().allow_abbrev is False
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert parser.allow_abbrev is False and all(command.allow_abbrev is False for command in commands.values())
    tried = 0
    for name, command in commands.items():
        flags = {flag for action in command._actions for flag in action.option_strings}
        for flag in sorted(flags):
            if flag.startswith("--") and len(flag) > 3 and flag[:-1] not in flags:
                with pytest.raises(SystemExit):
                    command.parse_args([*REQUIRED[name], f"{flag[:-1]}=1"])
                assert f"unrecognized arguments: {flag[:-1]}=1 (see" in capsys.readouterr().err, (name, flag)
                tried += 1
    assert tried > 40
    with pytest.raises(SystemExit):
        tclip(["explain", *REQUIRED["explain"], "--transl", "1"])
    assert capsys.readouterr().err == ("tclip explain: error: unrecognized arguments: --transl 1 "
                                       "(see tclip explain --help)\n")


def test_a_warning_while_a_progress_bar_is_shown_gets_a_line_of_its_own(capsys):
    """A command's warning was printed onto the bar's line ("...| 1/2 [00:00<?, ?it/s]tclip x: warning: ...")."""
    import sys
    import warnings

    from tqdm import tqdm

    from tclip_jax.cli import warnings_as_lines

    with warnings_as_lines("tclip x"), tqdm(total=2, file=sys.stderr, desc="bar") as bar:
        bar.update()
        warnings.warn("careful")
    assert "\rtclip x: warning: careful\n" in capsys.readouterr().err  # the bar cleared first


def test_progress_bars_are_one_flag_of_every_command_that_draws_them_on_by_default_on_a_terminal_only(monkeypatch):
    """Bars wrote their \\r frames into logs and pipes; explain and train-eclip had no flag to turn them off."""
    import sys

    from tclip_jax.cli.common import progress_bars

    commands = build_parser()._subparsers._group_actions[0].choices
    helps = []
    for name in ("explain", "sweep", "train-eclip"):
        parser = commands[name]
        helps.append(next(action.help for action in parser._actions if "--progress" in action.option_strings))
        for terminal in (False, True):
            monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
            assert progress_bars(parser.parse_args(REQUIRED[name])) is terminal
            assert progress_bars(parser.parse_args([*REQUIRED[name], "--progress"])) is True
            assert progress_bars(parser.parse_args([*REQUIRED[name], "--no-progress"])) is False
    assert helps[0] == helps[1] == helps[2]


def test_a_refused_value_is_named_by_the_flag_that_gave_it(tmp_path, monkeypatch, capsys):
    """Values checked once the settings are made were named by their fields ("batch_size must be >= 1"), --max-pixels
    not at all, and --option's numbers in Python's words ("invalid literal for int() with base 10: ''")."""
    monkeypatch.chdir(tmp_path)
    explain = ["explain", "a.png", "--prompt", "red"]
    for argv, said in [
            (["sweep", "synthetic", "--out", "o", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
            (["sweep", "synthetic", "--out", "o", "--pg-tolerance", "0"], "--pg-tolerance must be >= 1, got 0"),
            (["sweep", "synthetic", "--out", "o", "--save-vis", "-1"], "--save-vis must be >= 0, got -1"),
            (["sweep", "synthetic", "--out", "o", "--limit", "0"], "--limit must be >= 1, got 0"),
            (["train-eclip", "--synthetic", "2", "--out", "o", "--batch-size", "1"], "--batch-size must be >= 2"),
            ([*explain, "--max-pixels", "0"], "--max-pixels must be >= 1, got 0"),
            ([*explain, "--translations", "5", "--scale-fractions", "0.5"],
             "--translations must be 1 (off) or 9 (identity + 8 directions x 1 scale), got 5"),
            ([*explain, "--scale-fractions", "0.25,0.25"], "--scale-fractions must differ, got 0.25,0.25"),
            ([*explain, "--scale-fractions", "2"], "--scale-fractions must lie in (0, 1]"),
            ([*explain, "--option", "translations="], "option translations: invalid int value: ''"),
            ([*explain, "--option", "translations=5"], "translations must be 1 (off) or 25"),  # as the option names it
    ]:
        assert tclip(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"tclip {argv[0]}: error: {said}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_method_compare_or_option_name_suggests_the_closest_known_one(tmp_path, fixtures_dir, monkeypatch,
                                                                                  capsys):
    monkeypatch.chdir(tmp_path)
    image, model = str(fixtures_dir / "scene_224.png"), str(fixtures_dir / "tiny_openai_clip.npz")
    explain = ["explain", image, "--prompt", "red", "--model", model, "--out", "o"]
    for given, said in [(["--method", "hilacm"], "unknown method 'hilacm' (did you mean 'hilacam'?); available: "),
                        (["--method", "CLIP-Surgery"], "unknown method 'CLIP-Surgery' (did you mean 'clip_surgery'?)"),
                        (["--method", "xyz"], "unknown method 'xyz'; available: "),
                        (["--option", "Transations=9"], "unknown option 'Transations' (did you mean 'translations'?)"),
                        (["--compare", "simlarity"], "--compare simlarity: unknown method 'simlarity' (did you mean "
                                                     "'similarity'?)"),
                        (["--compare", "similarity:box_rul=contour"], "unknown option 'box_rul' (did you mean "
                                                                      "'box_rule'?)")]:
        assert tclip([*explain, *given]) == 2
        assert said in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_every_commands_help_is_complete_and_worded_alike():
    """Helps that said "(default: False)" beside "(default: on)", "--data DATA" beside "--data PATH", a positional
    with no help, and an --out that named only some of what a sweep writes there."""
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, (name, action.dest)
            assert "(default: False)" not in action.help and "(default: True)" not in action.help, (name, action.dest)
    flags = {name: {a.option_strings[0]: a for a in parser._actions if a.option_strings}
             for name, parser in commands.items()}
    assert flags["sweep"]["--data"].metavar == flags["train-eclip"]["--data"].metavar == "PATH"
    assert "(default: off)" in flags["sweep"]["--resume"].help
    out = flags["sweep"]["--out"].help
    assert all(written in out for written in ("sweep.json", "report.md", "report.json", "report.html", "gallery/",
                                              "vis/"))
    assert "vis/" in flags["sweep"]["--save-vis"].help


def test_data_that_is_missing_or_a_file_is_named_so(tmp_path, capsys):
    (tmp_path / "rgb.png").write_bytes(b"")
    for argv, said in [(["sweep", "coco", "--data", str(tmp_path / "rgb.png")],
                        f"--data {tmp_path / 'rgb.png'} is a file; coco reads the dataset's root folder"),
                       (["sweep", "voc", "--data", str(tmp_path / "rgb.png")], "is a file; voc reads"),
                       (["train-eclip", "--data", str(tmp_path / "nosuch")], f"training data {tmp_path / 'nosuch'} "
                                                                             "not found")]:
        assert tclip([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rgb.png"]


INT_SIGMA = """
import dataclasses

from tclip_jax.methods.settings import MethodSettings
from tclip_jax.methods.similarity import Similarity
from tclip_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class IntSigmaSettings(MethodSettings):
    sigma: int = setting(2, "blur radius in patches", parse=int)


class IntSigma(Similarity):
    Settings = IntSigmaSettings
"""


def test_tclips_flags_are_read_by_the_chosen_methods_own_settings(tmp_path, monkeypatch, capsys):
    """TCLIP's flags (--sigma, --trim, --translations, ...) were parsed as TCLIP's settings and handed to any method
    with a setting of that name: a method's `sigma: int` was refused for --sigma 3 ("--sigma must be an integer, got
    3.0"). The flag's text is read by the chosen method's own setting, as its --option reads it."""
    from tclip_jax.cli.common import method_settings
    from tclip_jax.methods import get
    from tclip_jax.methods.tclip import TCLIP

    (tmp_path / "int_sigma.py").write_text(INT_SIGMA)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    method_class = get("int_sigma:IntSigma")

    def settings(method, *flags):
        args = build_parser().parse_args(["explain", "a.png", "--prompt", "red", "--method", method, *flags])
        return method_settings(get(method), args)

    for text in ("3", "-1"):
        given = settings("int_sigma:IntSigma", "--sigma", text)
        assert given == method_class.Settings.from_dict(method_class.Settings.parse_assignments([f"sigma={text}"]))
        assert type(given.sigma) is int
    assert settings("tclip", "--sigma", "3") == TCLIP.Settings(sigma=3.0)  # TCLIP's own: a float
    assert tclip(["explain", "a.png", "--prompt", "red", "--method", "int_sigma:IntSigma", "--sigma", "3.5"]) == 2
    assert capsys.readouterr().err == "tclip explain: error: argument --sigma: invalid int value: '3.5'\n"
    assert tclip(["explain", "a.png", "--prompt", "red", "--method", "int_sigma:IntSigma", "--trim", "0.1"]) == 2
    assert capsys.readouterr().err.startswith("tclip explain: error: --trim is not a setting of int_sigma:IntSigma")
    assert sorted(p.name for p in tmp_path.iterdir()) in (["int_sigma.py"], ["__pycache__", "int_sigma.py"])


LAYER_SIM = """
import dataclasses
from typing import Optional

from tclip_jax.methods.settings import MethodSettings
from tclip_jax.methods.similarity import Similarity
from tclip_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class LayerSimSettings(MethodSettings):
    layer: Optional[int] = setting(None, "residual-stream index (None: the last)")
    block: int | None = setting(None, "written as Python 3.10 spells Optional")
    weights: tuple[float, ...] = setting((1.0,), "per-layer weights")
    scales: Optional[tuple[float, ...]] = setting(None, "a tuple or None")


class LayerSim(Similarity):
    Settings = LayerSimSettings


@dataclasses.dataclass(frozen=True)
class BareTupleSettings(MethodSettings):
    weights: tuple = setting((1.0,), "per-layer weights")


class BareTuple(Similarity):
    Settings = BareTupleSettings
"""


def test_a_methods_settings_are_read_from_text_as_their_annotations_say(tmp_path, monkeypatch, capsys):
    """A method's `layer: Optional[int] = setting(None, ...)` or `weights: tuple[float, ...]` declared without
    `parse=` could not be given on the command line ("option layer: cannot parse '0'") though Python and JSON took
    it: a field without `parse` is read as its annotation says, as the package's own settings say it explicitly
    (parse_optional, parse_tuple); a field whose type says no reader is refused, in one line, naming `parse=`."""
    from tclip_jax.cli.common import method_settings
    from tclip_jax.methods import get
    from tclip_jax.settings import parse_optional, parse_tuple

    (tmp_path / "layer_sim.py").write_text(LAYER_SIM)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    settings = get("layer_sim:LayerSim").Settings
    for text in ("0", "-2", "none", "None"):
        assert settings.parse_assignments([f"layer={text}", f"block={text}"]) == \
            {"layer": parse_optional(int)(text), "block": parse_optional(int)(text)}
    for text in ("1,2", "0", "", "0.5,-1"):
        assert settings.parse_assignments([f"weights={text}"]) == {"weights": parse_tuple(float)(text)}
    with pytest.raises(ValueError, match="^option layer: invalid int value: 'x'$"):
        settings.parse_assignments(["layer=x"])
    args = build_parser().parse_args(["explain", "a.png", "--prompt", "red", "--method", "layer_sim:LayerSim",
                                      "--option", "layer=0", "--option", "weights=1,2"])
    assert method_settings(get("layer_sim:LayerSim"), args) == settings(layer=0, weights=(1.0, 2.0))
    # Read back from JSON (sweep.json, result.json), which has no tuples: as made, an Optional tuple too.
    made = settings(layer=0, weights=(1.0, 2.0), scales=(0.5,))
    assert settings.from_dict(json.loads(json.dumps(made.to_dict()))) == made

    bare = get("layer_sim:BareTuple")
    refusal = (r"^setting weights of BareTupleSettings is of type tuple, which does not say how to read it from text "
               r"\(--option weights=VALUE\): give setting\(\.\.\., parse=\.\.\.\)")
    with pytest.raises(TypeError, match=refusal):
        bare.Settings.parse_assignments(["weights=1,2"])
    with pytest.raises(TypeError, match=refusal):  # refused from Python too: the class, not a value
        bare.Settings()
    for options in ([], ["--option", "weights=1,2"]):
        assert tclip(["explain", "a.png", "--prompt", "red", "--method", "layer_sim:BareTuple", *options]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "give setting(..., parse=...)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) in (["layer_sim.py"], ["__pycache__", "layer_sim.py"])


def test_tuple_settings_inside_tuples_are_read_back_as_made():
    """from_dict made only a setting's outer list a tuple again: `boxes: tuple[tuple[int, ...], ...]` read back from
    JSON or through `replace()` held lists, unequal to the settings made and unhashable. The annotation says which
    lists are tuples, at every depth (fixed tuples and Optional ones too); lists it names stay lists."""
    from tclip_jax.settings import Options, parse_tuple, setting

    def read_boxes(text):
        return tuple(parse_tuple(int)(part) for part in text.split(";"))

    @dataclasses.dataclass(frozen=True)
    class Nested(Options):
        boxes: tuple[tuple[int, ...], ...] = setting(((1, 2),), "boxes", parse=read_boxes)
        pair: Optional[tuple[float, tuple[int, int]]] = setting(None, "a fixed tuple inside an Optional", parse=str)
        size: tuple[int, int] = setting((2, 3), "fixed", parse=parse_tuple(int))
        listed: tuple[list[int], ...] = setting(([1],), "lists stay lists", parse=str)

    made = Nested(boxes=((1, 2), (3,)), pair=(0.5, (1, 2)), size=(4, 5))
    back = Nested.from_dict(json.loads(json.dumps(made.to_dict())))
    assert back == made and isinstance(back.boxes[1], tuple) and isinstance(back.pair[1], tuple)
    assert back.listed == ([1],) and isinstance(back.listed, tuple) and isinstance(back.listed[0], list)
    hashable = dataclasses.replace(made, listed=())
    assert hashable.replace(size=(4, 5)) == hashable and hash(hashable.replace(size=[4, 5])) == hash(hashable)
    assert hashable.replace(boxes=[[1, 2], [3]]) == hashable


def test_a_fixed_length_tuple_setting_is_read_as_that_many_values():
    """A field `size: tuple[int, int] = setting((2, 3), ...)` without `parse=` refused its whole class, from Python
    and JSON too (Python and JSON took it before annotations chose the readers): it is read as parse_tuple(int) of
    exactly two values, another count refused in one line. A field no annotation reads names its items' reader in
    the refusal, where one is known."""
    from tclip_jax.settings import Options, setting

    @dataclasses.dataclass(frozen=True)
    class Sized(Options):
        size: tuple[int, int] = setting((2, 3), "fixed", flag=False)
        rgb: Optional[tuple[float, float, float]] = setting(None, "Optional, of three")

    assert Sized() == Sized.from_dict(json.loads(json.dumps(Sized().to_dict())))
    assert Sized.parse_assignments(["size=4,5", "rgb=0.5,1,0"]) == {"size": (4, 5), "rgb": (0.5, 1.0, 0.0)}
    assert Sized.parse_assignments(["rgb=none"]) == {"rgb": None}
    for text, count in (("4", 1), ("1,2,3", 3), ("", 0)):
        with pytest.raises(ValueError, match=f"^option size: expected 2 comma-separated values, got {count} in "
                                             f"'{text}'$"):
            Sized.parse_assignments([f"size={text}"])
    with pytest.raises(ValueError, match="^option size: invalid int value: 'x'$"):
        Sized.parse_assignments(["size=1,x"])

    @dataclasses.dataclass(frozen=True)
    class BareInts(Options):
        counts: tuple = setting((1, 2), "a bare tuple of ints")

    @dataclasses.dataclass(frozen=True)
    class Mixed(Options):
        pair: tuple[int, str] = setting((1, "a"), "a tuple of mixed types")

    with pytest.raises(TypeError, match=r"give setting\(\.\.\., parse=\.\.\.\), e\.g\. "
                                        r"parse=tclip_jax\.settings\.parse_tuple\(int\)$"):
        BareInts()
    with pytest.raises(TypeError, match=r"of type tuple\[int, str\], .* give setting\(\.\.\., parse=\.\.\.\)$"):
        Mixed()

    # Each item as its position's type says: a count after a real stays an int (it was made a float with the real).
    @dataclasses.dataclass(frozen=True)
    class Typed(Options):
        pair: tuple[float, int] = setting((1, 2), "a real and a count", parse=str)

    assert [type(v) for v in Typed().pair] == [float, int] and Typed().pair == (1.0, 2)
    # From Python and JSON, as from the command line: a fixed tuple of its length, each item of its type.
    for made, message in (((1, 2, 3), r"^pair must hold 2 values, got 3: \(1, 2, 3\)$"),
                          ((1.5, 2.5), r"^pair must be an integer, got 2\.5"), (("x", 2), r"^pair must be")):
        with pytest.raises(ValueError, match=message):
            Typed(pair=made)
    with pytest.raises(ValueError, match=r"^pair must hold 2 values, got 1"):
        Typed.from_dict({"pair": [1]})

    # Tuples in a tuple: one comma-separated list cannot say them ("1,2" was read as ((1,), (2,))).
    @dataclasses.dataclass(frozen=True)
    class Nested(Options):
        boxes: tuple[tuple[int, ...], ...] = setting(((1, 2),), "tuples in a tuple")

    with pytest.raises(TypeError, match=r"^setting boxes of Nested is of type tuple\[tuple\[int, \.\.\.\], \.\.\.\], "
                                        r"which does not say how to read it from text"):
        Nested.parse_assignments(["boxes=1,2"])


def test_a_union_setting_is_read_from_text_as_python_and_json_take_it():
    """`x: Union[str, float] = setting("mean", ...)` without `parse=` read `--option x=0.5` as its default's type,
    the text '0.5', where JSON and Python gave the number 0.5; `Union[int, float] = 1` refused "0.5" ("invalid int
    value") which JSON and Python take. A union of bool, int, float and str reads text as a number where it has a
    number type, else as its other members: each text below gives what its value gives from JSON and from Python."""
    from typing import Union

    from tclip_jax.settings import Options, setting

    table = [  # annotation, default, text, the value it stands for (from JSON, from Python), what the class holds
        (Union[str, float], "mean", "0.5", 0.5, 0.5), (Union[str, float], "mean", "mean", "mean", "mean"),
        (Union[str, float], "mean", "2", 2, 2.0), (float | str, "mean", "-1e-3", -1e-3, -0.001),
        (Union[int, float], 1, "0.5", 0.5, 0.5), (Union[int, float], 1, "2", 2, 2.0),
        (Union[int, str], 1, "3", 3, 3), (Union[int, str], 1, "otsu", "otsu", "otsu"),
        (Union[bool, str], True, "false", False, False), (Union[bool, str], True, "otsu", "otsu", "otsu"),
    ]
    for annotation, default, text, value, held in table:
        settings = dataclasses.make_dataclass("S", [("x", annotation, setting(default, "a union"))], bases=(Options,),
                                              frozen=True)
        read = settings.from_dict(settings.parse_assignments([f"x={text}"])).x
        from_json = settings.from_dict(json.loads(json.dumps({"x": value}))).x
        from_python = settings(x=value).x
        for got in (read, from_json, from_python):
            assert got == held and type(got) is type(held), (annotation, text, read, from_json, from_python)
    numbers = dataclasses.make_dataclass("S", [("x", Union[int, float], setting(1, "a number"))], bases=(Options,),
                                         frozen=True)
    with pytest.raises(ValueError, match=r"^option x: invalid float value: 'abc'$"):
        numbers.parse_assignments(["x=abc"])
    # a union with a member no reader names (a Literal: how the package writes its threshold, which gives parse=)
    # read "0.5" as the default's type, the text '0.5', where Python gives 0.5: refused without parse=
    from typing import Literal
    literal = dataclasses.make_dataclass("S", [("e", Union[Literal["x", "y"], float], setting("x", "a union"))],
                                         bases=(Options,), frozen=True)
    with pytest.raises(TypeError, match=r"^setting e of S is of type Union\[Literal\['x', 'y'\], float\], which does "
                                        r"not say how to read it from text \(--option e=VALUE\): give setting\(\.\.\., "
                                        r"parse=\.\.\.\)$"):
        literal.parse_assignments(["e=0.5"])
    # from JSON and Python, a value that is none of the members is refused as the text is ("abc" was held as such)
    for annotation, default, value in [(Union[int, float], 1, "abc"), (Union[int, str], 1, 2.0),
                                       (Union[bool, str], True, 1), (Union[int, str], 1, None)]:
        settings = dataclasses.make_dataclass("S", [("x", annotation, setting(default, "a union"))], bases=(Options,),
                                              frozen=True)
        kinds = " or ".join(kind.__name__ for kind in annotation.__args__)
        for make in (lambda: settings.from_dict({"x": value}), lambda: settings(x=value)):
            with pytest.raises(ValueError, match=f"^x must be {kinds}, got {value!r}$"):
                make()


def _parse_error(parser: argparse.ArgumentParser, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    return capsys.readouterr().err.strip().splitlines()[-1].removesuffix(f" (see {parser.prog} --help)")


def test_a_settings_flag_that_is_not_a_number_is_refused_in_argparses_words(tmp_path, monkeypatch, capsys):
    """`--max-pixels abc` said "invalid literal for int() with base 10: 'abc'" (Python's int(), not the CLI's
    words): every settings flag of a number, Optional or in a list too, reads as argparse's own `type=int` /
    `type=float` does; a settings flag's message of its own is kept. TCLIP's flags are read by the chosen method's
    settings (`method_settings`), so the command refuses them, in the same words, without the --help hint."""
    commands = build_parser()._subparsers._group_actions[0].choices
    number_flags = {"explain": {"--max-pixels": int, "--translations": int, "--trim": float, "--sigma": float},
                    "sweep": {"--batch-size": int, "--workers": int, "--limit": int, "--save-vis": int,
                              "--pg-tolerance": int, "--max-pixels": int}}
    monkeypatch.chdir(tmp_path)
    method_flags = {"--translations", "--trim", "--sigma"}

    def refused(command, argv):
        if command == "explain" and argv[-1].split("=")[0] in method_flags | {"--scale-fractions"}:
            assert tclip([command, *argv]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            return err.strip()
        return _parse_error(commands[command], argv, capsys)

    for command, flags in number_flags.items():
        for flag, kind in flags.items():
            reference = argparse.ArgumentParser(prog="p")
            reference.add_argument(flag, type=kind)
            for text in ("abc", "1.5x", "", " "):
                expected = _parse_error(reference, [f"{flag}={text}"], capsys).split(": error: ")[1]
                said = refused(command, [*REQUIRED[command], f"{flag}={text}"])
                assert said.split(": error: ")[1] == expected, (command, flag, text)
    # A list of numbers names the part that is not one.
    said = refused("explain", [*REQUIRED["explain"], "--scale-fractions=0.5,abc"])
    assert said.endswith("argument --scale-fractions: invalid float value: 'abc'")
    # A choice not among a flag's choices, in argparse's words for `choices=` (they were its settings' own).
    from tclip_jax.methods.tclip import Settings as TCLIPSettings

    choice_flags = {f.name: f.metadata["choices"] for f in dataclasses.fields(TCLIPSettings)
                    if f.metadata.get("choices")}
    assert {"input_protocol", "token_weighting", "box_rule"} <= set(choice_flags)
    for name, choices in choice_flags.items():
        flag = "--" + name.replace("_", "-")
        reference = argparse.ArgumentParser(prog="p")
        reference.add_argument(flag, choices=choices)
        expected = _parse_error(reference, [flag, "bogus"], capsys).split(": error: ")[1]
        assert tclip(["explain", *REQUIRED["explain"], flag, "bogus"]) == 2
        assert capsys.readouterr().err.strip().split(": error: ")[1] == expected, flag
    assert list(tmp_path.iterdir()) == []
    said = _parse_error(commands["sweep"], [*REQUIRED["sweep"], "--threshold", "abc"], capsys)
    assert said.endswith("argument --threshold: threshold must be mean, otsu, gmm or a number in [0, 1), got 'abc'")
    # No settings flag of any command that refuses "abc" says it in Python's words.
    for command, parser in commands.items():
        for action in parser._actions:
            if getattr(action.type, "__module__", None) == "tclip_jax.settings":
                try:
                    parser.parse_args([*REQUIRED[command], action.option_strings[0], "abc"])
                except SystemExit:
                    said = capsys.readouterr().err
                    assert "invalid literal" not in said and "could not convert" not in said, said


def test_max_pixels_sets_the_image_limit_for_the_run():
    from tclip_jax.cli.common import ModelOptions
    from tclip_jax.image import io

    parser = argparse.ArgumentParser()
    ModelOptions.add_arguments(parser)
    def run(argv):
        ModelOptions.from_dict(ModelOptions.given_arguments(parser.parse_args(argv))).set_max_pixels()

    limit = io.max_pixels()
    try:
        run([])
        assert io.max_pixels() == limit  # not given: left alone
        run(["--max-pixels", "1000"])
        assert io.max_pixels() == 1000
    finally:
        io.set_max_pixels(limit)


def test_a_second_run_into_an_out_in_use_is_refused_in_one_line_and_the_first_ends_as_if_alone(tmp_path, fixtures_dir,
                                                                                              monkeypatch, capsys):
    """Two runs into one OUT at once chose their folders before either wrote: a page showed the other run's results,
    and of two images of one stem, one's results were reported written but lost. While a run writes OUT, another
    into it (here started as the first loads its model) is refused in one line, writing nothing; the first
    ends as if alone, and leaves no lock behind."""
    from tclip_jax.cli import explain
    from tclip_jax.visualize.explorer import page_images

    out = tmp_path / "out"
    images = {}
    for folder in ("a", "b"):  # one stem: both would take OUT/s
        (tmp_path / folder).mkdir()
        images[folder] = tmp_path / folder / "s.png"
        shutil.copy(fixtures_dir / "scene_224.png", images[folder])
    run = ["--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--translations", "1", "--compare", "none",
           "--out", str(out)]
    second = []
    real_build_method = explain.build_method

    def build_method(args):  # the first run has chosen its folders
        if not second:  # the first run's; the second run's own goes on
            second.append("started")
            second.append(tclip(["explain", str(images["b"]), "--prompt", "green", *run]))
            second.append(capsys.readouterr().err.strip().splitlines())
        return real_build_method(args)

    monkeypatch.setattr(explain, "build_method", build_method)
    assert tclip(["explain", str(images["a"]), "--prompt", "red", *run]) == 0
    _, code, err = second
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"tclip explain: error: another tclip explain (process {os.getpid()} ") and \
        f" is running in {out} " in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "s"]
    record = json.loads((out / "s" / "result.json").read_text())
    assert pathlib.Path(record["image"]["path"]).resolve() == images["a"] and record["prompts"][0]["prompt"] == "red"
    assert page_images(out / "index.html") == ["s"]


def test_the_option_help_says_it_takes_any_methods_settings(capsys):
    """`setting(..., flag=True)` registers a flag for TCLIP's settings only; --option's help said "any other setting"
    without saying that every setting of another method, registered or 'package.module:Class', goes there."""
    for command in ("explain", "sweep"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        said = " ".join(capsys.readouterr().out.split())
        assert "--option KEY=VALUE a setting of the chosen method, of any method (registered or " \
               "'package.module:Class')" in said, command


def test_the_matmul_dtype_flag_takes_the_librarys_dtypes_float64_under_x64_mode(tmp_path, fixtures_dir, capsys):
    """--matmul-dtype took argparse's own list, without float64, so float64 under JAX's x64 mode (which runs as
    recorded) was refused; the flag takes `load.matmul_dtype`'s list: a bad name or float64 without the mode is
    refused in one line naming the flag, before anything is written, and float64 under the mode runs."""
    command = ["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "a cat", "--model",
               str(fixtures_dir / "tiny_openai_clip.npz"), "--translations", "1"]
    for dtype, reason in (("int8", "got 'int8'"), ("float64", "got 'float64' (float64 needs JAX's x64 mode)")):
        assert tclip([*command, "--matmul-dtype", dtype, "--out", str(tmp_path / "refused")]) == 2
        assert capsys.readouterr().err == (f"tclip explain: error: --matmul-dtype {dtype}: the matmul dtype must be "
                                           f"one of float32, bfloat16, float16, {reason}\n")
    assert not (tmp_path / "refused").exists()
    with jax.enable_x64(True):
        assert tclip([*command, "--matmul-dtype", "float64", "--no-html", "--out", str(tmp_path / "o")]) == 0
    record = json.loads(next((tmp_path / "o").glob("*/result.json")).read_text())
    assert record["run"]["model"]["matmul_dtype"] == "float64"
