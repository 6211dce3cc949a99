"""The Colab notebook runs headless on CPU against the embedded model; its helpers behave."""
import base64
import json
import pathlib
import re

import nbclient
import nbformat
import numpy as np
import pytest

import browser
from tclip_jax import notebook

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "colab" / "tclip_demo.ipynb"


def test_notebook_executes_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits it: the embedded model is used
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    text = "\n".join(out.get("text", "") for out in outputs)
    assert "cpu" in text and "default_model" in text and "pointing_game" in text
    assert any("image/png" in out.get("data", {}) for out in outputs)  # result.figure()
    # The explorer inline: the result as a cell's last value, and the compare view.
    views = [out["data"]["text/html"] for out in outputs
             if "TCLIPExplorer.mount" in out.get("data", {}).get("text/html", "")]
    assert len(views) == 2
    assert '"view":"single"' in views[0] and '"view":"compare"' in views[1]
    assert all(label in views[1] for label in ("TCLIP K=25", "TCLIP K=1", "similarity"))
    # ... and it renders: in a real browser where there is one (tests/browser.py), with no console errors.
    if browser.missing() is None:
        page = tmp_path / "notebook_outputs.html"
        page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'></head><body>"
                        + "".join(views) + "</body></html>", encoding="utf-8")
        with browser.chromium() as driver:
            driver.get(page.as_uri())
            browser.wait_for(lambda: len([r for r in driver.find_elements("css selector", ".tclip-x")
                                          if r.get_attribute("data-rendered")]) == 2, what="both explorers")
            cards = driver.find_elements("css selector", ".tclip-x")[1].find_elements("css selector", ".tclip-card")
            assert len(cards) == 3  # the compare view: K=25, K=1, similarity side by side
            assert browser.console_problems(driver) == []


def test_the_notebooks_first_cell_says_how_to_ask_for_float32_matmuls_on_a_tpu_or_a_tf32_gpu():
    """Colab's TPU runs float32 matmuls as single bfloat16 passes under JAX's default precision, and a GPU with TF32
    (A100, L4, H100) as TF32, which the notebook did not say (then said of the TPU alone); its first cell says how to
    ask for float32 and points to the README's section, which gives the same call."""
    first = "".join(nbformat.read(NOTEBOOK, as_version=4).cells[0].source)
    call = 'jax.default_matmul_precision("float32")'
    assert "TPU" in first and "bfloat16" in first and call in first and "*Dtype policy*" in first
    assert "GPU with TF32" in first and "as TF32" in first
    readme = (NOTEBOOK.parents[1] / "README.md").read_text(encoding="utf-8")
    assert "**Dtype policy**" in readme and f"`{call}`" in readme


def test_a_word_alone_under_a_label_set_method_says_what_it_was_mapped_against(fixtures_dir):
    """CLIP Surgery maps a word alone against the page's words (its label set), not as a prompt by itself: the
    panel says so, and the map is the method's map of the word with those words as the label set. So does a class
    of its own outside the registry ("module:Class"), which the page does not look up by name."""
    from tclip_jax.methods.clip_surgery import CLIPSurgery

    class MySurgery(CLIPSurgery):
        pass

    surgery = MySurgery.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"))
    assert surgery.name == f"{__name__}:{MySurgery.__qualname__}"
    image = notebook.fetch_image(str(fixtures_dir / "scene_224.png"))
    explorer = notebook.compare(surgery, image, ["a red circle"], "tclip")
    fragment = explorer._repr_html_()
    assert json.dumps("the prompt “red” alone, against the page's words as its label set (a prompt-level method "
                      "has no per-word map)") in fragment
    np.testing.assert_array_equal(explorer.views[0].words_alone.prompts[1].phrase.heatmap,
                                  surgery.explain(image, ["a", "red", "circle"]).prompts[1].phrase.heatmap)


def test_a_whole_prompt_under_a_label_set_method_says_what_it_was_mapped_against(fixtures_dir):
    """CLIP Surgery's whole-prompt panel said "the prompt “a red circle”", yet its map is computed against the page's
    prompts as its label set (another second prompt gives another map): the panel says so where there are two
    prompts, and not for one prompt alone, which CLIP Surgery maps by itself."""
    from tclip_jax.methods.clip_surgery import CLIPSurgery

    surgery = CLIPSurgery.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"))
    image = notebook.fetch_image(str(fixtures_dir / "scene_224.png"))
    prompts = ["a red circle", "a blue square"]
    explorer = notebook.compare(surgery, image, prompts, "similarity")
    fragment = explorer._repr_html_()
    assert json.dumps("the prompt “a red circle”, against the page's prompts as its label set") in fragment
    shown = explorer.views[0].result.prompts[0].phrase.heatmap
    np.testing.assert_array_equal(shown, surgery.explain(image, prompts).prompts[0].phrase.heatmap)
    assert not np.allclose(shown, surgery.explain(image, ["a red circle", "cat"]).prompts[0].phrase.heatmap)
    alone = notebook.compare(surgery, image, ["a red circle"], "similarity")._repr_html_()
    assert json.dumps("the prompt “a red circle”") in alone and "as its label set" not in alone
    # A result shown by itself, as a cell's last value, says so too (it did not: only compare views knew).
    assert json.dumps("the prompt “a red circle”, against the page's prompts as its label set") in (
        surgery.explain(image, prompts)._repr_html_())
    # Without feature surgery its maps are plain cosines, which no label set changes: no claim either.
    plain = CLIPSurgery.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"), feature_surgery=False)
    assert "as its label set" not in notebook.compare(plain, image, prompts, "similarity")._repr_html_()


def test_compare_by_default_adds_tclip_k1_as_the_command_line_does_and_none_compares_nothing(fixtures_dir):
    """compare's default was ("tclip:translations=1",): with a K=1 explainer it warned "the same method and settings as
    the run's method; shown once" and showed one panel. The default compares as `tclip explain` without --compare
    (TCLIP K=1 beside a TCLIP run not at K=1 by itself; nothing beside one at K=1), and [] or "none" compares
    nothing, as `--compare none`. The explorer's repr names its views and the image's size."""
    import warnings

    from tclip_jax.methods.tclip import TCLIP

    model = str(fixtures_dir / "tiny_openai_clip.npz")
    image = np.zeros((32, 48, 3), np.uint8)
    k25, k1 = TCLIP.from_pretrained(model), TCLIP.from_pretrained(model, translations=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explorers = {"k25": notebook.compare(k25, image, ["red"]), "k1": notebook.compare(k1, image, ["red"]),
                     "k25 []": notebook.compare(k25, image, ["red"], []),
                     "k25 none": notebook.compare(k25, image, ["red"], "none")}
    labels = {what: [(v.result.run["method"], v.result.run["settings"]["translations"]) for v in e.views]
              for what, e in explorers.items()}
    assert labels == {"k25": [("tclip", 25), ("tclip", 1)], "k1": [("tclip", 1)], "k25 []": [("tclip", 25)],
                      "k25 none": [("tclip", 25)]}
    assert repr(explorers["k25"]) == "<Explorer of 2 views (TCLIP K=25; TCLIP K=1): image size_hw (32, 48)>"
    assert repr(explorers["k1"]) == "<Explorer of 1 view (TCLIP K=1): image size_hw (32, 48)>"


def test_compare_names_a_bad_method_spec_alone_not_after_the_command_lines_flag(fixtures_dir):
    from tclip_jax.methods.similarity import Similarity

    baseline = Similarity.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"))
    image = np.zeros((32, 32, 3), np.uint8)
    for methods, message in [("tclip:bogus=1", r"^tclip:bogus=1: unknown option 'bogus'"),
                             (["none", "tclip"], r"^none turns comparing off; it cannot go with other methods$"),
                             ("decomposition", r"^decomposition: .*needs at least 2")]:
        with pytest.raises(ValueError, match=message):
            notebook.compare(baseline, image, ["a red circle"], methods)


def test_compare_with_a_prompt_level_method_first_shows_its_maps_of_each_word_alone(fixtures_dir):
    from tclip_jax.methods.similarity import Similarity

    baseline = Similarity.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"))
    image = notebook.fetch_image(str(fixtures_dir / "scene_224.png"))
    explorer = notebook.compare(baseline, image, ["a red circle"], "tclip")  # one method named: a string will do
    assert [v.result.run["method"] for v in explorer.views] == ["similarity", "tclip"]
    alone = explorer.views[0].words_alone
    assert [p.prompt for p in alone.prompts] == ["a", "red", "circle"]
    fragment = explorer._repr_html_()
    for word in ("a", "red", "circle"):  # the page shows them, as `tclip explain --method similarity --compare`
        assert json.dumps(f"the prompt “{word}” alone (a prompt-level method has no per-word map)") in fragment
    np.testing.assert_array_equal(  # and they are the method's maps of the word alone
        alone.prompts[1].phrase.heatmap, baseline.explain(image, ["red"]).prompts[0].phrase.heatmap)
    # Its result.json link holds what `tclip explain`'s result.json holds for these panels: the word-alone maps
    # and the compare records.
    record = json.loads(base64.b64decode(re.search(r'"href":"data:application/json;base64,([^"]*)"', fragment)[1]))
    assert [p["prompt"] for p in record["words_alone"]] == ["a", "red", "circle"]
    assert record["words_alone"][1]["phrase"]["box_xyxy"] == [int(v) for v in alone.prompts[1].phrase.box]
    compared = explorer.views[1].result.prompts[0]
    assert [c["label"] for c in record["compare"]] == ["TCLIP K=25"]
    assert [(w["word"], w["box_xyxy"]) for w in record["compare"][0]["prompts"][0]["words"]] == \
        [(w.text, [int(v) for v in m.box]) for w, m in zip(compared.words, compared.word_maps)]


def test_offline_means_embedded_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not notebook.online()


OFFLINE_ENVS = [*({"HF_HUB_OFFLINE": value} for value in ("1", "true", "YES", "On", "0", "no", "")),
                {"TRANSFORMERS_OFFLINE": "1"}, {"TRANSFORMERS_OFFLINE": "true"},
                {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, {}]


def test_online_is_false_wherever_huggingface_hub_is_offline(monkeypatch):
    """online() took only HF_HUB_OFFLINE=1 as offline: with "true" (or TRANSFORMERS_OFFLINE=1) and the network up, the
    notebook chose the hub's ViT-B/32, which huggingface_hub then refused to fetch. The reference: what
    huggingface_hub itself makes of each setting as it is imported (in a fresh interpreter, since it reads them
    then); and a setting it took at import counts, whatever the environment says now."""
    import socket
    import subprocess
    import sys

    from huggingface_hub import constants

    script = ("import os, sys, json\nfor env in json.loads(sys.argv[1]):\n"
              "    for name in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'): os.environ.pop(name, None)\n"
              "    os.environ.update(env)\n"
              "    sys.modules.pop('huggingface_hub.constants', None)\n"
              "    import huggingface_hub.constants as c\n"
              "    print(c.HF_HUB_OFFLINE)\n")
    hub = subprocess.run([sys.executable, "-c", script, json.dumps(OFFLINE_ENVS)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert hub == ["True"] * 4 + ["False"] * 3 + ["True", "True", "False", "False"]

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: Connection())  # the network is up
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as imported, online
    for env, offline in zip(OFFLINE_ENVS, hub):
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert notebook.online() == (offline == "False"), env
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline as imported: the hub refuses, whatever the env
    assert not notebook.online()


def test_fetch_image_from_path_and_default(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((5, 7), 200, np.uint8)).save(tmp_path / "gray.png")
    assert notebook.fetch_image(str(tmp_path / "gray.png")).shape == (5, 7, 3)
    assert notebook.fetch_image(None).shape == (224, 224, 3)
    with pytest.raises(FileNotFoundError):
        notebook.fetch_image(str(tmp_path / "missing.png"))


def test_fetch_image_takes_what_load_image_takes_and_colabs_upload(tmp_path):
    """fetch_image took only a str: a pathlib.Path was an AttributeError, bytes a TypeError, and the dict Colab's
    files.upload() returns (file name -> bytes), which the notebook said "gives you a path", an AttributeError.
    load_image of the same file is the reference."""
    from PIL import Image

    from tclip_jax.image import load_image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (6, 9, 3), np.uint8)).save(tmp_path / "photo.png")
    expected = load_image(tmp_path / "photo.png")
    encoded = (tmp_path / "photo.png").read_bytes()
    for source in (tmp_path / "photo.png", encoded, bytearray(encoded), {"photo.png": encoded}):
        np.testing.assert_array_equal(notebook.fetch_image(source), expected)
    with pytest.raises(ValueError, match="^fetch_image takes one uploaded file, and the dict holds 2 \\('a.png', "
                                         "'b.png'\\): pass one, fetch_image\\(uploaded\\[name\\]\\)$"):
        notebook.fetch_image({"a.png": encoded, "b.png": encoded})
    with pytest.raises(ValueError, match="^fetch_image takes one uploaded file, and the dict holds 0$"):
        notebook.fetch_image({})


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, before our refusal
def test_fetch_image_from_a_url_decodes_as_a_file_does_with_its_pixel_limit(tmp_path, monkeypatch):
    import functools
    import http.server
    import threading

    from PIL import Image

    from tclip_jax.image import load_image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8)).save(tmp_path / "photo.png")
    agents = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            agents.append(self.headers.get("User-Agent"))
            super().do_GET()

        def log_message(self, *args):
            pass

    handler = functools.partial(Handler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/photo.png"
        np.testing.assert_array_equal(notebook.fetch_image(url), load_image(tmp_path / "photo.png"))
        assert agents[0].startswith("tclip_jax/"), agents  # Wikimedia refuses urllib's default, Python-urllib/3.x
        # A URL's scheme is case-blind (RFC 3986 3.1): not taken for a file name and refused as a URL.
        np.testing.assert_array_equal(notebook.fetch_image(url.replace("http", "HTTP", 1)),
                                      load_image(tmp_path / "photo.png"))
        missing = url.replace("photo", "missing")
        with pytest.raises(OSError, match=f"^cannot fetch {re.escape(missing)}: HTTP Error 404: "):  # names the URL
            notebook.fetch_image(missing)
        # A URL pasted with spaces around it is fetched (it was taken for a file name, "https:/..." in the message).
        np.testing.assert_array_equal(notebook.fetch_image(f"  {url}\n"), load_image(tmp_path / "photo.png"))
        # A web page where the image was meant names the URL and what the server sent ("cannot read image bytes: the
        # bytes are not an image PIL can decode" named neither); http.server sends an .html file as text/html.
        (tmp_path / "page.html").write_text("<html><body>a page about a photo</body></html>")
        page = url.replace("photo.png", "page.html")
        with pytest.raises(ValueError, match=f"^cannot read image file {re.escape(page)}: the file is not an image PIL "
                                             r"can decode \(the server sent text/html, not an image\)$"):
            notebook.fetch_image(page)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 pixels: under PIL's own refusal at twice it
        with pytest.raises(ValueError, match="has 1,200 pixels, more than the limit of 1,000"):
            notebook.fetch_image(url)
    finally:
        server.shutdown()
