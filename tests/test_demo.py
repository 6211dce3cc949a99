"""`make demo`: a same-colour pair explained word by word, with a verdict per word that agrees with result.json."""
import json

import pytest

from tclip_jax import demo, synthetic
from tclip_jax.evaluation.metrics.boxes import box_ious


def test_demo_prints_a_verdict_per_named_word_that_matches_the_boxes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    scene = synthetic.protocol_sample(demo.DEMO_PROTOCOL, demo.DEMO_SEED).scene
    colours = [o.colour for o in scene.objects]
    assert any(colours.count(c) == 2 for c in colours)  # the scene has a same-colour pair
    words = json.loads((tmp_path / "demo_out" / "scene" / "result.json").read_text())["prompts"][0]["words"]
    by_span = {tuple(w["span"]): w["box_xyxy"] for w in words}
    lines = out.split("where each word's box landed")[1].strip().splitlines()[2:2 + len(scene.words)]  # after the header
    assert len(lines) == len(scene.words)
    for word, line in zip(scene.words, lines):
        best = box_ious(by_span[(word.start, word.end)], [scene.objects[i].box for i in word.referents]).max()
        assert line.split()[0] == word.text
        assert ("hit" in line.split()) == (best >= 0.5) and (" miss" in line) == (best < 0.5)
    assert (tmp_path / "demo_out" / "index.html").is_file()


def test_demo_takes_an_output_folder_and_refuses_unknown_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--frobnicate"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "python -m tclip_jax.demo: error: unrecognized arguments: --frobnicate (see " \
                                      "python -m tclip_jax.demo --help)\n"  # one line, no usage block
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out
    assert demo.main(["--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "scene" / "result.json").is_file() and not (tmp_path / "demo_out").exists()
    assert demo.main(["--out", str(tmp_path / "elsewhere")]) == 0  # a rerun replaces the demo's own files
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["index.html", "scene", "scene.png"]


def test_demo_refuses_an_output_folder_it_cannot_write_with_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for out, message in [(tmp_path / "afile", "afile is a file, not a folder"),
                         (tmp_path / "afile" / "sub", "afile is a file, not a folder")]:
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--out", str(out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing drawn or written


def test_demo_says_in_one_line_why_it_could_not_write_its_scene(tmp_path, monkeypatch, capsys):
    import errno

    def full_disk(path, rgb):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(demo, "write_image", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"error: cannot write {tmp_path / 'out' / 'scene.png'}: No space left on device" in err


def test_demo_refuses_to_replace_a_users_files_before_writing_anything(tmp_path, fixtures_dir, capsys):
    """A scene.png that is not the demo's scene, or an index.html that is not an explorer page, in --out: refused
    in one line before the scene is written (the scene.png was written over first, and lost)."""
    own_picture = (fixtures_dir / "scene_224.png").read_bytes()
    cases = {"picture": {"scene.png": own_picture}, "page": {"index.html": b"<html>mine</html>"},
             "both": {"scene.png": own_picture, "index.html": b"<html>mine</html>"},
             "result folder": {"scene/notes.txt": b"mine"}}
    for case, files in cases.items():
        out = tmp_path / case.replace(" ", "_")
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--out", str(out)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, case
        assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files, case
    assert "picture/scene.png is not the demo's scene" in demo_error(tmp_path / "picture", capsys)
    assert "page/index.html is not a page tclip explain wrote" in demo_error(tmp_path / "page", capsys)


def demo_error(out, capsys) -> str:
    with pytest.raises(SystemExit):
        demo.main(["--out", str(out)])
    return capsys.readouterr().err


def test_ctrl_c_while_the_demo_imports_is_one_line_and_status_130(run_interrupted_while_importing, capsys):
    """`python -m tclip_jax.demo` interrupted while its modules load ended in a KeyboardInterrupt traceback."""
    assert run_interrupted_while_importing("tclip_jax.demo") == 130
    assert capsys.readouterr().err == "python -m tclip_jax.demo: interrupted\n"
