"""The results explorer: what `tclip explain` puts into index.html, and the page itself in a real headless browser
(Debian's chromium, `tests/browser.py`): clicking a word shows that word's map (pixel for pixel), the box and τ on
the page are result.json's, the compare view, the keyboard, linked data scripts, the notebook fragment, and no
console errors. Static figures: wrapped grids naming the method and τ, whole-image boxes inset.
"""
import base64
import contextlib
import json
import pathlib
import re

import cv2
import numpy as np
import pytest

import browser
from tclip_jax.cli import main as tclip
from tclip_jax.cli.explain import parse_compare
from tclip_jax.methods import METHODS
from tclip_jax.visualize import draw_box, explorer, overlay, turbo_lut
from tclip_jax.visualize.figures import is_whole_image

PROMPTS = ["a red circle.", "cat"]
LABELS = ["TCLIP K=25", "TCLIP K=1", "similarity"]


def page_json(index: pathlib.Path) -> dict:
    text = index.read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="tclip-data">(.*?)</script>', text, re.S)
    return json.loads(match.group(1))


def decode_blob(uri: str) -> np.ndarray:
    header, data = uri.split(",", 1)
    assert header == "data:image/png;base64"
    q = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_UNCHANGED)
    assert q.dtype == np.uint8 and q.ndim == 2  # 8-bit grayscale
    return q


def explain(out, fixtures_dir, *extra, images=("scene_wide_320x240.png", "scene_224.png")) -> int:
    return tclip(["explain", *(str(fixtures_dir / i) for i in images), *sum((["--prompt", p] for p in PROMPTS), []),
                  "--model", str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory, fixtures_dir) -> pathlib.Path:
    """One run: two images, two prompts, TCLIP K=25 with K=1 (by default) and the similarity baseline. The wide
    image is stored turned a quarter (240 x 320) with the EXIF orientation that turns it back."""
    from PIL import Image, ImageOps

    work = tmp_path_factory.mktemp("explorer")
    wide = work / "scene_wide_320x240.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored row 0 is the visual right side: display rotates 90 degrees clockwise
    displayed = np.asarray(Image.open(fixtures_dir / wide.name).convert("RGB"))
    Image.fromarray(np.rot90(displayed)).save(wide, exif=exif)
    np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(Image.open(wide))), displayed)
    out = work / "out"
    assert explain(out, fixtures_dir, "--compare", "similarity", "--save-npz", images=(wide, "scene_224.png")) == 0
    return out


@pytest.fixture(scope="module")
def driver():
    with browser.chromium() as d:
        yield d


# ------------------------------------------------------------------------------------------ the page's data
CUT = " ".join(["red circle and blue square"] * 20)  # 100 pieces: over the context alone and in each template


@pytest.fixture(scope="module")
def cut_results(fixtures_dir) -> tuple:
    """CLIP Surgery (85 templates, each text cut by itself) and TCLIP K=1 on CUT, cut to fit the context."""
    from tclip_jax.methods.tclip import TCLIP

    model, image = str(fixtures_dir / "tiny_openai_clip.npz"), str(fixtures_dir / "scene_224.png")
    with (pytest.warns(UserWarning, match="^prompt .* keeping the first 75 pieces$"),  # the bare prompt's too
          pytest.warns(UserWarning, match="template texts of a prompt were cut")):
        surgery = METHODS["clip_surgery"].from_pretrained(model, truncate=True).explain(image, CUT)
    with pytest.warns(UserWarning, match="keeping the first 75 pieces"):
        tclip_result = TCLIP.from_pretrained(model, translations=1, truncate=True).explain(image, CUT)
    return surgery, tclip_result


def test_a_prompt_cut_inside_each_template_text_says_what_its_templates_left_out(cut_results):
    """A cut prompt's card read the bare prompt's tokens: CLIP Surgery's said its last 135 characters were not
    mapped, where each of its template texts had left out 142 to 178. The card, the prompt list and result.json say
    what the template that kept least and the one that kept most left out (`PromptResult.mapped_ends`, checked
    against each template text's pieces in test_methods)."""
    surgery, tclip_result = cut_results
    fewest, most = surgery.prompts[0].mapped_ends
    words = tclip_result.prompts[0].words
    assert fewest < most < words[-1].end == tclip_result.prompts[0].mapped_ends[0]  # the bare prompt keeps more
    note = (f"(cut to fit the model's context in each template text by itself: its last {len(CUT) - most} to "
            f"{len(CUT) - fewest} characters, by template, were not mapped)")
    alone = explorer.image_entry("x", [explorer.View(surgery)])
    assert (alone["prompts"][0]["cut"], alone["prompts"][0]["partly"]) == (most, fewest)
    assert alone["panels"][0]["maps"]["p0"]["shows"] == f"the prompt “{CUT[:most]} …” {note}"
    # Beside TCLIP the prompt list is TCLIP's words, marked where TCLIP stopped; each card says its own.
    both = explorer.image_entry("x", [explorer.View(tclip_result), explorer.View(surgery)])
    assert (both["prompts"][0]["cut"], both["prompts"][0]["partly"]) == (words[-1].end, None)
    assert both["panels"][0]["maps"]["p0"]["shows"].endswith(
        f"(cut to fit the model's context: its last {len(CUT) - words[-1].end} characters were not mapped)")
    assert both["panels"][1]["maps"]["p0"]["shows"].endswith(note)
    assert surgery.to_record()["prompts"][0]["mapped_ends"] == [fewest, most]
    assert tclip_result.to_record()["prompts"][0]["mapped_ends"] == [words[-1].end] * 2


def test_page_is_self_contained_and_covers_the_run(run):
    index = run / "index.html"
    text = index.read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)  # nothing fetched from elsewhere
    assert "@import" not in text and not re.search(r"url\((?!#)", text)
    assert not list(run.glob("*/explorer.js"))  # inlined, so the per-image data scripts are gone
    data = page_json(index)
    assert data["format"] == "tclip_jax/explorer" and [i["name"] for i in data["images"]] == ["scene_wide_320x240",
                                                                                                "scene_224"]
    assert data["run"]["method"] == "tclip" and len(bytes.fromhex(data["turbo"])) == 768
    for entry in data["images"]:
        assert [p["label"] for p in entry["panels"]] == LABELS
        assert [[w["text"] for w in p["words"]] for p in entry["prompts"]] == [["a", "red", "circle"], ["cat"]]
        assert {link["text"]: link["href"] for link in entry["links"]}["result.json"] == f"{entry['name']}/result.json"
        assert entry["photo"].startswith(("data:image/webp;base64,", "data:image/png;base64,"))


def test_numbers_and_maps_in_the_page_are_the_results(run):
    data = page_json(run / "index.html")
    for entry in data["images"]:
        folder = run / entry["name"]
        record = json.loads((folder / "result.json").read_text())
        main, k1, similarity = entry["panels"]
        height, width = record["image"]["size_hw"]
        for panel in entry["panels"]:  # a box is whole-image when it is the image's own (320x240: x2 320, y2 240)
            for m in panel["maps"].values():
                assert m["whole_image"] == (m["box"] == [0, 0, width, height]), (panel["label"], m)
        with np.load(folder / "maps.npz") as npz:
            for p, prompt in enumerate(record["prompts"]):
                for w, word in enumerate(prompt["words"]):
                    shown = main["maps"][f"p{p}w{w}"]
                    assert shown["tau"] == word["tau"] and shown["box"] == word["box_xyxy"]
                    assert shown["fallback"] == word["gmm_fallback"]
                    values = npz[f"p{p}_w{w}_{word['word']}/heatmap"]
                    lo, hi = shown["heatmap"]["range"]
                    assert (lo, hi) == (float(values.min()), float(values.max()))  # exact value ranges
                    q = decode_blob(entry["blobs"][shown["heatmap"]["blob"]]).astype(np.float64)
                    scale = min(1.0, explorer.MAP_MAX_SIDE / max(values.shape))  # (rows, columns) as the map's
                    assert q.shape == tuple(round(n * scale) for n in values.shape)
                    expected = cv2.resize(values, q.shape[::-1], interpolation=cv2.INTER_AREA)
                    np.testing.assert_allclose(lo + q / 255 * (hi - lo), expected, atol=(hi - lo) / 510 + 1e-6)
                    assert shown["soft"] is not None
                assert main["maps"][f"p{p}"]["tau"] == prompt["phrase"]["tau"]
            # The compare panels carry result.json's "compare" records.
            compare = {c["label"]: c for c in record["compare"]}
            assert list(compare) == LABELS[1:]
            for w, word in enumerate(compare["TCLIP K=1"]["prompts"][0]["words"]):
                assert k1["maps"][f"p0w{w}"]["tau"] == word["tau"] and k1["maps"][f"p0w{w}"]["box"] == word["box_xyxy"]
            assert compare["TCLIP K=1"]["run"]["settings"]["translations"] == 1
            # A prompt-level baseline: its map of the whole prompt, and of each word alone as the prompt.
            alone = {p["prompt"]: p for p in compare["similarity"]["words_alone"]}
            assert similarity["maps"]["p0w1"]["shows"].startswith("the prompt “red” alone")
            assert similarity["maps"]["p0w1"]["box"] == alone["red"]["phrase"]["box_xyxy"]
            assert similarity["maps"]["p0"]["shows"] == "the prompt “a red circle.”"
            assert similarity["maps"]["p0"]["tau"] is None and similarity["maps"]["p0"]["soft"] is None
    # "cat" is a one-word prompt: its word and phrase are one query, stored once.
    entry = data["images"][0]
    assert entry["panels"][0]["maps"]["p1w0"]["heatmap"]["blob"] == entry["panels"][0]["maps"]["p1"]["heatmap"]["blob"]


def test_page_size_stays_small(run):
    # Two images x two prompts x three methods, heatmaps and soft maps: well under a megabyte.
    assert (run / "index.html").stat().st_size < 1_000_000


def test_any_image_name_and_text_is_read_back_from_the_page(tmp_path):
    """Writing index.html took an image's name to end at its first ", " (a name holding one failed with 'Extra
    data'), and a "</script>" in the page's data would end its script element early: both read back as written."""
    entry = {"name": "photo, 2 </script><b>", "title": "a </script><b>", "blobs": [], "panels": []}
    (tmp_path / "a").mkdir()
    explorer.PageWriter.write_data(tmp_path / "a", entry)
    writer = explorer.PageWriter(tmp_path, "page </script>")
    writer.add(entry["name"], entry["title"], "a")
    index, inline = writer.finish()
    assert inline and page_json(index)["images"] == [entry] and page_json(index)["title"] == "page </script>"


def test_no_html_compare_none_and_bad_compare_specs(tmp_path, fixtures_dir, capsys):
    out = tmp_path / "plain"
    assert explain(out, fixtures_dir, "--no-html", images=("scene_224.png",)) == 0
    assert not (out / "index.html").exists() and not list(out.glob("*/explorer.js"))
    assert "compare" not in json.loads((out / "scene_224" / "result.json").read_text())
    out = tmp_path / "alone"
    assert explain(out, fixtures_dir, "--compare", "none", "--translations", "1", images=("scene_224.png",)) == 0
    assert [p["label"] for p in page_json(out / "index.html")["images"][0]["panels"]] == ["TCLIP K=1"]
    assert "explorer: " in capsys.readouterr().out
    for spec, message in [("nosuch", "unknown method 'nosuch'"),
                          ("tclip:bogus=1", "--compare tclip:bogus=1: unknown option 'bogus'"),
                          ("similarity:translations=1", "--compare similarity:translations=1: unknown option")]:
        assert explain(tmp_path / "bad", fixtures_dir, "--compare", spec, images=("scene_224.png",)) == 2
        assert message in capsys.readouterr().err
    assert explain(tmp_path / "bad", fixtures_dir, "--compare", "none", "--compare", "similarity",
                   images=("scene_224.png",)) == 2
    assert "turns comparing off" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written before the specs are checked


def test_parse_compare():
    assert parse_compare("similarity") == ("similarity", [])
    assert parse_compare("tclip:translations=1") == ("tclip", ["translations=1"])
    assert parse_compare("tclip:translations=9,scale_fractions=0.25,0.5") == (
        "tclip", ["translations=9", "scale_fractions=0.25,0.5"])
    assert parse_compare("my.module:Method") == ("my.module:Method", [])
    assert parse_compare("my.module:Method:depth=2") == ("my.module:Method", ["depth=2"])
    # A value may hold colons (a path), in a registered method's options or a module's.
    assert parse_compare("eclip:projections=/data/run:2/p.safetensors") == (
        "eclip", ["projections=/data/run:2/p.safetensors"])
    assert parse_compare("my.module:Method:path=a:b,depth=2") == ("my.module:Method", ["path=a:b", "depth=2"])
    # A registered name is never a module: what follows it is options, a word without "=" among them.
    assert parse_compare("clip_surgery:feature_surgery") == ("clip_surgery", ["feature_surgery"])


def test_a_compare_option_without_a_value_is_named_as_such(tmp_path, fixtures_dir, capsys):
    """As --option says of the same mistake, not that a module 'clip_surgery' cannot be imported."""
    for spec in ["clip_surgery:feature_surgery", "tclip:translations"]:
        assert explain(tmp_path / "bad", fixtures_dir, "--compare", spec) == 2
        err = capsys.readouterr().err
        option = spec.split(":")[1]
        assert f"error: --compare {spec}: an option is KEY=VALUE, got '{option}'" in err, err
        assert len(err.strip().splitlines()) == 1


def test_a_compare_method_of_the_runs_class_starts_from_the_runs_settings(fixtures_dir):
    from tclip_jax.checkpoints.load import load_clip
    from tclip_jax.cli.explain import compare_methods
    from tclip_jax.methods.tclip import TCLIP, Settings

    main = TCLIP(load_clip(fixtures_dir / "tiny_openai_clip.npz"), Settings(trim=0.1))
    built = dict(compare_methods(["tclip:scale_fractions=0.5", "similarity"], main))
    assert built["tclip:translations=1"].settings == main.settings.replace(translations=1)
    assert built["tclip:scale_fractions=0.5"].settings == Settings(trim=0.1, scale_fractions=(0.5,))  # 9 copies
    assert built["similarity"].settings.box_rule == main.settings.box_rule
    # Another class takes the run's host-step settings only, not a same-named setting that means something else
    # (a rollout's start_layer 3 is not HilaCAM's), and not one of a sibling class (Grad-ECLIP's single_head).
    clip = main.clip
    for run, other, settings in [("rollout", "hilacam", {"start_layer": 3, "box_rule": "contour"}),
                                 ("grad_eclip", "gradcam", {"single_head": False})]:
        main = METHODS[run](clip, METHODS[run].Settings.from_dict(settings))
        compared = dict(compare_methods([other], main))[other].settings
        assert compared == METHODS[other].Settings(box_rule=main.settings.box_rule)


def test_a_compare_method_equal_to_the_runs_or_an_earlier_one_is_left_out(fixtures_dir):
    """`--translations 1 --compare tclip:translations=1 --compare similarity --compare similarity` showed two "TCLIP
    K=1" panels and two "similarity" ones (notebook.compare of a K=1 explainer two "TCLIP K=1"): a method of the
    same class and settings as the run's or an earlier one is left out, said in one line each."""
    from tclip_jax.checkpoints.load import load_clip
    from tclip_jax.cli.explain import COMPARE_FLAG, compare_methods
    from tclip_jax.methods.similarity import Similarity
    from tclip_jax.methods.tclip import TCLIP, Settings

    main = TCLIP(load_clip(fixtures_dir / "tiny_openai_clip.npz"), Settings(translations=1))
    specs = ["tclip:translations=1", "similarity", "tclip:translations=25", "similarity:box_rule=contour",
             "similarity", "tclip:translations=25,trim=0.2", "tclip"]
    for flag in ("", COMPARE_FLAG):  # the API names a spec alone; the command line after its flag
        with pytest.warns(UserWarning) as said:
            built = compare_methods(specs, main, flag)
        assert [spec for spec, _ in built] == ["similarity", "tclip:translations=25", "similarity:box_rule=contour"]
        assert [type(m) for _, m in built] == [Similarity, TCLIP, Similarity]
        assert [str(w.message) for w in said] == [
            f"{flag}tclip:translations=1: the same method and settings as the run's method; shown once",
            f"{flag}similarity: the same method and settings as {flag}similarity; shown once",
            f"{flag}tclip:translations=25,trim=0.2: the same method and settings as {flag}tclip:translations=25; "
            "shown once",
            f"{flag}tclip: the same method and settings as the run's method; shown once"]


def test_tclip_k1_is_compared_unless_tclip_itself_at_k1_is_shown(tmp_path, fixtures_dir, monkeypatch):
    """The automatic TCLIP K=1 compare was left out where the run or a compare method was any TCLIP (`isinstance`)
    at K=1: a subclass that maps otherwise at K=1 stood in for it. It is left out only for TCLIP itself at K=1."""
    from tclip_jax.checkpoints.load import load_clip
    from tclip_jax.cli.explain import compare_methods
    from tclip_jax.methods import get
    from tclip_jax.methods.tclip import TCLIP, Settings

    (tmp_path / "k1_variant.py").write_text(
        "import dataclasses\n\nfrom tclip_jax.methods.tclip import TCLIP, Settings\n"
        "from tclip_jax.settings import setting\n\n\nclass Variant(TCLIP):\n    pass\n\n\n"
        "@dataclasses.dataclass(frozen=True)\nclass MoreSettings(Settings):\n"
        "    alpha: float = setting(0.5, 'its own')\n"
        "\n\nclass WithMore(TCLIP):\n    Settings = MoreSettings\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    clip = load_clip(fixtures_dir / "tiny_openai_clip.npz")
    built = compare_methods(["k1_variant:Variant:translations=1"], TCLIP(clip))
    assert [(spec, type(m).__name__, m.settings.translations) for spec, m in built] == [
        ("tclip:translations=1", "TCLIP", 1), ("k1_variant:Variant:translations=1", "Variant", 1)]
    variant = get("k1_variant:Variant")
    built = compare_methods([], variant(clip, Settings(translations=1)))
    assert [(spec, type(m), m.settings.translations) for spec, m in built] == [("tclip:translations=1", TCLIP, 1)]
    assert compare_methods(["similarity"], TCLIP(clip, Settings(translations=1)))[0][0] == "similarity"  # alone
    # TCLIP K=1 beside a subclass with settings of its own is TCLIP's settings alone, as TCLIP records them: it held
    # the subclass's settings object, and recorded and labelled alpha under "tclip".
    with_more = get("k1_variant:WithMore")
    (spec, k1), = compare_methods([], with_more(clip, with_more.Settings(alpha=0.9, sigma=3.0)))
    assert type(k1.settings) is Settings and k1.settings == Settings(translations=1, sigma=3.0)


# --------------------------------------------------------------------------------------------- in a browser
def open_page(driver, path: pathlib.Path, expect_prefix: str = "0:") -> None:
    driver.get(path.resolve().as_uri())
    browser.wait_for(lambda: browser.rendered(driver).startswith(expect_prefix), what="the first render")


def click_word(driver, key: str, kind: str = "heatmap", scale: str = "shared", view: str = "single",
               image: int = 0) -> None:
    driver.find_element("css selector", f'.tclip-word[data-key="{key}"]').click()
    expected = f"{image}:{key}:{kind}:{scale}:{view}"
    browser.wait_for(lambda: browser.rendered(driver) == expected, what=f"the render of {expected}")


def field(driver, name: str, card: int = 0) -> str:
    return driver.find_elements("css selector", f'.tclip-card [data-field="{name}"]')[card].text


def photo_rgb(driver) -> np.ndarray:
    """The pixels of the first card's photo as the browser decoded it, uint8 RGB at its natural size."""
    url = driver.execute_script("""const img = document.querySelector('.tclip-card .tclip-photo');
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth;
        canvas.height = img.naturalHeight;
        canvas.getContext('2d').drawImage(img, 0, 0);
        return canvas.toDataURL('image/png');""")
    return cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]


def test_browser_clicking_a_word_shows_its_map_box_and_tau(run, driver):
    from PIL import Image, ImageOps

    open_page(driver, run / "index.html")
    data = page_json(run / "index.html")
    entry = data["images"][0]
    record = json.loads((run / entry["name"] / "result.json").read_text())
    turbo = turbo_lut()
    # The photo is the input as displayed (its EXIF orientation applied: 320 x 240, not the stored 240 x 320), shown
    # at its aspect; WebP at quality 90 changes this noisy picture's pixels by some levels, far less than the
    # picture turned half round differs.
    displayed = np.asarray(ImageOps.exif_transpose(Image.open(record["image"]["path"])).convert("RGB"))
    height, width = displayed.shape[:2]
    assert record["image"]["size_hw"] == [height, width] == [240, 320]
    photo = photo_rgb(driver).astype(int)
    assert photo.shape == displayed.shape
    assert np.abs(photo - displayed).mean() < 12 < np.abs(photo - displayed[::-1, ::-1]).mean()
    photo_rect = driver.find_element("css selector", ".tclip-card .tclip-photo").rect
    assert photo_rect["width"] / photo_rect["height"] == pytest.approx(width / height, abs=0.01)
    driver.find_element("css selector", 'input[data-control="scale"][value="map"]').click()
    browser.wait_for(lambda: browser.rendered(driver).endswith(":map:single"), what="per-map scale")
    shown, boxed = {}, 0
    for w, word in enumerate(record["prompts"][0]["words"]):
        key = f"p0w{w}"
        click_word(driver, key, scale="map")
        canvas = browser.canvas_rgb(driver, ".tclip-card canvas.tclip-map")
        # Per-map scale: a pixel of value q is turbo[q], exactly; so the canvas is this word's map.
        q = decode_blob(entry["blobs"][entry["panels"][0]["maps"][key]["heatmap"]["blob"]])
        np.testing.assert_array_equal(canvas, turbo[q])
        shown[word["word"]] = canvas
        assert driver.find_element("css selector", ".tclip-card canvas.tclip-map").get_attribute(
            "data-map") == f"0:{key}:heatmap"
        # The numbers beside it are result.json's.
        assert float(field(driver, "tau")) == pytest.approx(word["tau"], abs=5e-5)
        assert [int(v) for v in field(driver, "box").split(" (")[0].split(", ")] == word["box_xyxy"]
        assert field(driver, "fallback") == (word["gmm_fallback"] or "none")
        # The box on screen is result.json's, in the photo's pixels (a whole-image box is drawn inset instead).
        x1, y1, x2, y2 = word["box_xyxy"]
        if not is_whole_image(word["box_xyxy"], (height, width)):
            boxed += 1
            on_screen, photo_at = driver.execute_script(
                "const r = (s) => document.querySelector(s).getBoundingClientRect();"
                "return [r('.tclip-card .tclip-box'), r('.tclip-card .tclip-photo')];")
            sx, sy = photo_at["width"] / width, photo_at["height"] / height
            expected = [photo_at["left"] + x1 * sx, photo_at["top"] + y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy]
            measured = [on_screen["left"], on_screen["top"], on_screen["width"], on_screen["height"]]
            np.testing.assert_allclose(measured, expected, atol=0.02)
    assert boxed  # some box to place
    assert not np.array_equal(shown["red"], shown["circle"])
    # The shared scale colours "circle" by its value on the range of every word's map: a value v at
    # round(255 (v - L) / (H - L)) of the turbo table (JavaScript's Math.round: half up).
    driver.find_element("css selector", 'input[data-control="scale"][value="shared"]').click()
    browser.wait_for(lambda: browser.rendered(driver).endswith(":shared:single"), what="shared scale")
    maps = entry["panels"][0]["maps"]
    low = min(m["heatmap"]["range"][0] for m in maps.values())
    high = max(m["heatmap"]["range"][1] for m in maps.values())
    circle = maps["p0w2"]["heatmap"]
    lo, hi = circle["range"]
    q = decode_blob(entry["blobs"][circle["blob"]]).astype(np.float64)
    at = np.clip(np.floor((lo + (q / 255) * (hi - lo) - low) / (high - low) * 255 + 0.5), 0, 255).astype(int)
    canvas = browser.canvas_rgb(driver, ".tclip-card canvas.tclip-map")
    np.testing.assert_array_equal(canvas, turbo[at])
    assert not np.array_equal(canvas, shown["circle"])  # a stop word is no longer as bright as "red"
    # The soft map, and the links.
    driver.find_element("css selector", 'input[data-control="kind"][value="soft"]').click()
    browser.wait_for(lambda: browser.rendered(driver).endswith(":soft:shared:single"), what="the soft map")
    assert field(driver, "shows").startswith("soft map of the word “circle”")
    hrefs = [a.get_attribute("href") for a in driver.find_elements("css selector", ".tclip-links a")]
    assert hrefs[0] == (run / entry["name"] / "result.json").resolve().as_uri()
    # The header names the model as given (its file), not the checkpoint's format ("openai"), once.
    assert driver.find_element("css selector", ".tclip-run span").text.startswith("model tiny_openai_clip.npz · ")
    assert driver.find_element("css selector", "h1").text == "TCLIP explorer · TCLIP K=25"
    assert driver.find_element("css selector", ".tclip-head").text.count("tiny_openai_clip.npz") == 1
    assert browser.console_problems(driver) == []


def test_browser_compare_view_keyboard_and_images(run, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    open_page(driver, run / "index.html")
    record = json.loads((run / "scene_224" / "result.json").read_text())
    body = driver.find_element("css selector", "body")
    body.send_keys(Keys.ARROW_RIGHT)  # a → red
    browser.wait_for(lambda: browser.rendered(driver) == "0:p0w1:heatmap:shared:single", what="the next word")
    body.send_keys(Keys.ARROW_DOWN)   # the next image, the same word (the images of a run share its prompts)
    browser.wait_for(lambda: browser.rendered(driver).startswith("1:p0w1:"), what="the second image")
    driver.find_element("css selector", 'input[data-control="view"][value="compare"]').click()
    browser.wait_for(lambda: browser.rendered(driver) == "1:p0w1:heatmap:shared:compare", what="the compare view")
    # A focused radio keeps its arrow keys: the keyboard's one way to the other choices of its group.
    ActionChains(driver).send_keys(Keys.ARROW_LEFT).perform()
    browser.wait_for(lambda: browser.rendered(driver) == "1:p0w1:heatmap:shared:single", what="a radio's arrow key")
    ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
    click_word(driver, "p0w1", view="compare", image=1)
    cards = driver.find_elements("css selector", ".tclip-card")
    assert [c.find_element("css selector", "h2").text for c in cards] == LABELS
    k1 = next(c for c in record["compare"] if c["label"] == "TCLIP K=1")
    assert float(field(driver, "tau", card=1)) == pytest.approx(k1["prompts"][0]["words"][1]["tau"], abs=5e-5)
    assert field(driver, "shows", card=2).startswith("the prompt “red” alone")
    assert field(driver, "tau", card=2).startswith("—")
    for _ in range(3):
        body.send_keys(Keys.ARROW_RIGHT)  # red → circle → whole prompt → cat
    browser.wait_for(lambda: browser.rendered(driver) == "1:p1w0:heatmap:shared:compare", what="the last word")
    assert browser.console_problems(driver) == []


def test_browser_the_page_and_the_figures_format_numbers_by_one_rule(tmp_path, driver):
    """figures.format_number said it was explorer.js's `fmt` and was not, from 10 up: 12345 was 1.234e+04 in a
    figure and 1.235e+4 on the page, 10.00005 was 10 and 10.00, 1234.5 was 1234 and 1235 (Python rounds a tie to
    even, JavaScript away from zero). Both now give the page's rule (JavaScript's toFixed(4) under 10,
    toPrecision(4) from 10 up) on a table of values: signs, 0, tiny, the edges at 10 and 1e4, exact binary ties."""
    import random

    from tclip_jax.visualize.figures import format_number

    page = tmp_path / "fmt.html"
    page.write_text(f"<!DOCTYPE html><meta charset=\"utf-8\"><script>{explorer._asset('explorer.js')}</script>",
                    encoding="utf-8")
    driver.get(page.as_uri())
    # Written out by the rule: ties are exact binary values (k/32, k + 0.5, 5 k for k odd), rounded away from zero.
    table = {0.0: "0.0000", -0.0: "0.0000", 1.2e-5: "0.0000", -1.2e-5: "-0.0000", 0.03125: "0.0313",
             -0.03125: "-0.0313", 0.3244: "0.3244", 9.99995: "10.0000", 9.99994: "9.9999", -9.5: "-9.5000",
             10.0: "10.00", 10.00005: "10.00", 99.996: "100.0", 1234.5: "1235", -1234.5: "-1235", 9999.4: "9999",
             9999.5: "1.000e+4", 1e4: "1.000e+4", 12345.0: "1.235e+4", -12345.0: "-1.235e+4", 99999.0: "1.000e+5",
             1e5: "1.000e+5", 123456789.0: "1.235e+8", 1e21: "1.000e+21"}
    rng = random.Random(0)
    values = [*table, -0.0, *(k / 32 for k in range(-330, 330)), *(k + 0.5 for k in range(995, 1010)),
              *(5.0 * k for k in range(2001, 2020, 2)),
              *(rng.choice((-1, 1)) * 10 ** rng.uniform(-7, 9) for _ in range(500))]
    shown = driver.execute_script("return arguments[0].map(TCLIPExplorer.fmt);", values)
    assert {v: s for v, s in zip(values, shown) if v in table} == table  # the page's rule, as written out
    assert [format_number(v) for v in values] == shown
    assert format_number(None) == driver.execute_script("return TCLIPExplorer.fmt(null);") == "—"
    assert browser.console_problems(driver) == []


def pointer_readout(driver, card: int = 0):
    """The pointer readout of a card as (x, y, value, what), or None where it reads "—": x and y are the photo
    pixels it names, each as (first, last) (one pixel: first == last), `what` what it says before the value: "" for
    a pixel's, "mean" or "weighted mean" for a block's (after "part not seen (cut off by the crop); " and before
    " with its fill" where the crop cut off some of the block)."""
    text = field(driver, "pointer", card)
    if text == "—":
        return None
    match = re.fullmatch(r"(\d+)(?:–(\d+))?, (\d+)(?:–(\d+))?: (?:(\D+) )?≈ (-?\d+\.\d+)", text)
    assert match, text
    return ((int(match[1]), int(match[2] or match[1])), (int(match[3]), int(match[4] or match[3])),
            float(match[6]), match[5] or "")


def area_weights(size: int, cells: int) -> np.ndarray:
    """[size, cells]: the weight of each of `size` pixels in each cell of an axis INTER_AREA shrinks to `cells` (the
    cells of a one-hot row of each pixel, as cv2.resize makes them)."""
    return cv2.resize(np.eye(size, dtype=np.float64), (cells, size), interpolation=cv2.INTER_AREA)


def value_under(driver, entry: dict, key: str, client_xy, npz_map=None, card: int = 0):
    """What the readout should say with the pointer at `client_xy` (window pixels), from where the viewer is now, as
    (x, y, value, what, pixel), or None off the image. The page's map there is its 8-bit PNG's cell at the
    pointer's place, on its exact range; where the map is stored at the photo's size, the readout names the photo
    pixel under the pointer (`pixel`, x and y each (p, p)), and where it is stored shrunk, the block of photo pixels
    that cell covers (INTER_AREA's weights, from cv2), as a "mean", or a "weighted mean" where they weigh
    unequally. `npz_map`: the full map the page was made from, whose mean over that block (an explicit loop over
    the block's pixels and their weights) the page's value must be."""
    left, top, width, height = driver.execute_script(
        "const r = document.querySelectorAll('.tclip-card .tclip-viewer')[arguments[0]].getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height];", card)
    fx, fy = (client_xy[0] - left) / width, (client_xy[1] - top) / height
    if not (0 <= fx < 1 and 0 <= fy < 1):
        return None
    shown = entry["panels"][card]["maps"][key]["heatmap"]
    q = decode_blob(entry["blobs"][shown["blob"]])
    row, column = min(q.shape[0] - 1, int(fy * q.shape[0])), min(q.shape[1] - 1, int(fx * q.shape[1]))
    lo, hi = shown["range"]
    value = lo + q[row, column] / 255 * (hi - lo)
    height_px, width_px = entry["size_hw"]
    pixel = int(fx * width_px), int(fy * height_px)
    if q.shape == (height_px, width_px):
        x, y, what = (pixel[0],) * 2, (pixel[1],) * 2, ""
        weights_x, weights_y = np.eye(width_px)[:, column], np.eye(height_px)[:, row]
    else:
        weights_x = area_weights(width_px, q.shape[1])[:, column]
        weights_y = area_weights(height_px, q.shape[0])[:, row]
        in_x, in_y = np.flatnonzero(weights_x), np.flatnonzero(weights_y)
        x, y = (in_x[0], in_x[-1]), (in_y[0], in_y[-1])
        assert x[0] <= pixel[0] <= x[1] and y[0] <= pixel[1] <= y[1]  # the pointer's pixel is in its cell's block
        even = all(np.allclose(w[w > 0], 1 / np.count_nonzero(w)) for w in (weights_x, weights_y))
        what = "mean" if even else "weighted mean"
    if npz_map is not None:
        mean = sum(weights_y[i] * weights_x[j] * float(npz_map[i, j])
                   for i in np.flatnonzero(weights_y) for j in np.flatnonzero(weights_x))
        assert value == pytest.approx(mean, abs=(hi - lo) / 510 + 1e-6)
    return tuple(map(int, x)), tuple(map(int, y)), value, what, pixel


def test_browser_the_pointer_readout_follows_a_scroll_a_resize_and_a_render_under_a_still_pointer(run, driver):
    """The readout changed on mousemove alone: after a scroll, a window resize or a word change under a pointer that
    stayed put it named the pixel the pointer had been over (or "—" after a word change). It names the pixel under
    the pointer now and the shown map's value there, and "—" once the image is no longer under it. A map stored
    shrunk (the 320 x 240 image's, at 256 x 192) named a photo pixel beside a value that is its cell's, the mean
    over the block of pixels the cell covers (up to 4 % of the range away from the pixel's on a large image): the
    readout names the block and says "mean"; the 224 x 224 image's maps, stored whole, name the pixel."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.keys import Keys

    def image(index):
        entry = page_json(run / "index.html")["images"][index]
        record = json.loads((run / entry["name"] / "result.json").read_text())
        with np.load(run / entry["name"] / "maps.npz") as npz:
            return entry, {f"p0w{w}": npz[f"p0_w{w}_{word['word']}/heatmap"]
                           for w, word in enumerate(record["prompts"][0]["words"])}

    entry, maps = image(0)
    assert entry["size_hw"] == [240, 320]  # stored at 192 x 256
    size = driver.get_window_size()
    try:
        open_page(driver, run / "index.html")
        click_word(driver, "p0w1")
        driver.set_window_size(1000, 600)  # the page scrolls
        actions = ActionBuilder(driver)

        def point_into_viewer(fx, fy):
            """The viewer scrolled to 120 px from the window's top, the pointer at (fx, fy) of it: where, in the
            window."""
            driver.execute_script("window.scrollBy(0, document.querySelector('.tclip-viewer')"
                                  ".getBoundingClientRect().top - 120);")
            left, top, width, height = driver.execute_script(
                "const r = document.querySelector('.tclip-viewer').getBoundingClientRect();"
                "return [r.left, r.top, r.width, r.height];")
            actions.pointer_action.move_to_location(int(left + fx * width), int(top + fy * height))
            actions.perform()
            return int(left + fx * width), int(top + fy * height)

        at = point_into_viewer(0.3, 0.3)

        def check(key, what, said="weighted mean"):
            expected = value_under(driver, entry, key, at, maps[key])
            def place(readout):
                return None if readout is None else (*readout[:2], readout[3])

            with contextlib.suppress(AssertionError):  # said below, with what was read
                browser.wait_for(lambda: place(pointer_readout(driver)) == place(expected), timeout=5)
            shown = pointer_readout(driver)
            if expected is None:
                assert shown is None, what
            else:
                assert shown is not None and place(shown) == place(expected), (what, shown, expected)
                assert shown[3] == said, what  # a ratio of 1.25: each cell weighs two pixels unequally
                assert shown[2] == pytest.approx(expected[2], abs=5e-5), what  # printed to 4 decimals
            return shown

        first = check("p0w1", "the readout under the pointer")
        driver.execute_script("window.scrollBy(0, 50);")
        assert check("p0w1", "the readout after a scroll")[1] > first[1]  # the image moved up under the pointer
        driver.find_element("css selector", "body").send_keys(Keys.ARROW_RIGHT)  # red → circle
        browser.wait_for(lambda: browser.rendered(driver) == "0:p0w2:heatmap:shared:single", what="the next word")
        check("p0w2", "the readout after a word change")
        driver.set_window_size(1000, 500)  # the viewer is at most 75 % of the window's height: it shrinks
        resized = check("p0w2", "the readout after a resize")
        assert resized[:2] != first[:2]
        driver.execute_script("window.scrollBy(0, -400);")  # the image below the pointer
        assert check("p0w2", "the readout once the image left the pointer") is None
        # The next image's maps are stored at its size: the readout names the pixel under the pointer.
        driver.find_element("css selector", "body").send_keys(Keys.ARROW_DOWN)
        browser.wait_for(lambda: browser.rendered(driver) == "1:p0w2:heatmap:shared:single", what="the next image")
        entry, maps = image(1)
        assert entry["size_hw"] == [224, 224] and decode_blob(entry["blobs"][0]).shape == (224, 224)
        at = point_into_viewer(0.6, 0.4)
        pixel = check("p0w2", "the readout of a map stored whole", said="")
        assert pixel[0][0] == pixel[0][1] and pixel[1][0] == pixel[1][1]
        assert browser.console_problems(driver) == []
    finally:
        driver.set_window_size(size["width"], size["height"])


@pytest.mark.parametrize("size_wh, said", [((512, 384), "mean"), ((333, 197), "weighted mean")],
                         ids=["cells_end_on_the_crops_edges", "a_cell_across_each_edge"])
def test_browser_pixels_a_centre_crop_cut_off_read_out_as_not_seen(tmp_path, fixtures_dir, driver, size_wh, said):
    """Under center_crop the strips the crop cut off hold the map's minimum as a fill, and the readout gave it as the
    value there. The page holds the part of the image the model saw (the central square of a wide image, whose
    shorter side the crop keeps whole) and reads out "not seen" outside it; inside, the map's value as before: the
    map is stored shrunk, so the mean over the block of pixels its cell covers (512 x 384: 2 x 2 pixels, the cells
    ending on the crop's edges). A cell across an edge (333 x 197, stored at 256 x 151: the cells of pixels 67–68
    and 264–265 are 28 % fill) read as the map's value, a mean of it and the fill: the readout says its block was
    partly not seen and the mean counts the fill. The pointer goes to each cell at and beside the crop's edges, at
    a client position chosen by the readout's own arithmetic."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    from tclip_jax.image.io import load_image
    from tclip_jax.methods.tclip import TCLIP

    explainer = TCLIP.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"), translations=1,
                                      input_protocol="center_crop")
    width_px, height_px = size_wh
    image = cv2.resize(load_image(fixtures_dir / "scene_wide_320x240.png"), size_wh, interpolation=cv2.INTER_CUBIC)
    result = explainer.explain(image, "a red circle")
    entry = explorer.image_entry("x", [explorer.View(result)])
    covered = entry["panels"][0]["covered"]
    rows, columns = result.geometry.covered
    assert covered == [columns.start, rows.start, columns.stop, rows.stop]
    centre = [(width_px - height_px) / 2, 0, (width_px + height_px) / 2, height_px]
    assert np.abs(np.subtract(covered, centre)).max() <= 1  # the central square, to a pixel
    page = tmp_path / "crop.html"
    page.write_text(explorer.page_html(explorer.page_data([entry], "crop", result.run)), encoding="utf-8")
    open_page(driver, page)
    click_word(driver, "p0w1")
    left, top, width, height = driver.execute_script(
        "const r = document.querySelector('.tclip-viewer').getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height];")
    cells = decode_blob(entry["blobs"][entry["panels"][0]["maps"]["p0w1"]["heatmap"]["blob"]]).shape[1]
    assert cells == 256
    blocks = [np.flatnonzero(weights)[[0, -1]] for weights in area_weights(width_px, cells).T]  # each cell's pixels

    def place(client_x):  # the pointer's photo pixel and map cell there (the page's arithmetic), and what they are
        fx = (client_x - left) / width
        pixel, cell = int(fx * width_px), min(cells - 1, int(fx * cells))
        if not covered[0] <= pixel < covered[2]:
            return "not seen", cell
        return ("across" if blocks[cell][0] < covered[0] or blocks[cell][1] >= covered[2] else "seen"), cell

    places = {}  # (what, cell) -> the client xs where the pointer is on that cell, its pixel so
    for client_x in range(int(np.ceil(left)), int(np.ceil(left + width))):
        places.setdefault(place(client_x), []).append(client_x)
    edges = [cell for cell, (first, last) in enumerate(blocks) if first <= covered[0] <= last or
             first <= covered[2] - 1 <= last]  # the cells holding the first or the last pixel seen
    near = {0, cells // 2, cells - 1} | {cell + step for cell in edges for step in (-1, 0, 1)}
    across = sorted(cell for what, cell in places if what == "across")
    assert across == ([] if said == "mean" else [52, 203])  # and no cell read as across but these
    checked = []
    for (what, cell), xs in sorted(places.items(), key=lambda item: item[1][0]):
        if cell not in near:
            continue
        at = (xs[len(xs) // 2], int(top + 0.5 * height))
        actions = ActionBuilder(driver)
        actions.pointer_action.move_to_location(*at)
        actions.perform()
        *expected, (x, y) = value_under(driver, entry, "p0w1", at, result.prompts[0].word_maps[1].heatmap)
        checked.append((what, cell))
        if what == "not seen":
            assert field(driver, "pointer") == f"{x}, {y}: not seen (cut off by the crop)"
            continue
        shown = pointer_readout(driver)
        assert expected[3] == said
        if size_wh == (512, 384):
            assert expected[0][1] - expected[0][0] == expected[1][1] - expected[1][0] == 1  # 2 x 2 pixels
        if what == "across":  # the block runs over the crop's edge: the value mixes in the fill
            assert shown[3] == f"part not seen (cut off by the crop); {said} with its fill", (cell, shown)
        else:
            assert shown[3] == said, (cell, shown)
        assert shown[:2] == tuple(expected[:2]) and shown[2] == pytest.approx(expected[2], abs=5e-5), cell
    whats = [what for what, cell in checked]
    assert whats[0] == whats[-1] == "not seen" and "seen" in whats  # the left strip, inside, the right strip
    assert [cell for what, cell in checked if what == "across"] == across  # each edge's cell across it
    assert browser.console_problems(driver) == []


def test_browser_offers_the_soft_map_and_the_compare_view_only_where_the_page_has_them(run, tmp_path, fixtures_dir,
                                                                                     driver):
    """A baseline has no soft map, and one method alone nothing to compare: its page offered both (the soft map
    showed the same map with a note). Offered: what the page's data holds, a soft map of some view or two views."""
    pages = [run / "index.html"]
    for name, method in [("similarity", ["--method", "similarity"]),
                         ("two_baselines", ["--method", "similarity", "--compare", "attention"])]:
        assert explain(tmp_path / name, fixtures_dir, *method, images=("scene_224.png",)) == 0
        pages.append(tmp_path / name / "index.html")
    cases = []
    for page in pages:
        panels = page_json(page)["images"][0]["panels"]
        has_soft = any(m["soft"] is not None for panel in panels for m in panel["maps"].values())
        cases.append((has_soft, len(panels)))
        open_page(driver, page)
        offered = {control: driver.find_element("css selector", f'input[data-control="{control}"][value="{value}"]')
                   .is_displayed() for control, value in [("kind", "soft"), ("view", "compare")]}
        assert offered == {"kind": has_soft, "view": len(panels) > 1}, page
        assert browser.rendered(driver).endswith(":heatmap:shared:single")
    # The attention baseline takes the image center-cropped, unlike the run's method: its card says so, the run's
    # input protocol being the header's.
    record = json.loads((tmp_path / "two_baselines" / "scene_224" / "result.json").read_text())
    protocols = [record["run"]["input_protocol"], record["compare"][0]["run"]["input_protocol"]]
    assert protocols == ["whole", "center_crop"]
    driver.find_element("css selector", 'input[data-control="view"][value="compare"]').click()
    browser.wait_for(lambda: browser.rendered(driver).endswith(":compare"), what="the compare view")
    assert driver.find_element("css selector", ".tclip-run span").text.endswith("input whole ·")
    assert [[p.text for p in card.find_elements("css selector", ".tclip-input")]
            for card in driver.find_elements("css selector", ".tclip-card")] == [[], ["input center_crop"]]
    assert cases == [(True, 3), (False, 1), (False, 2)]  # TCLIP's GMM soft maps; the baselines' none
    assert browser.console_problems(driver) == []


def test_browser_large_runs_link_each_images_data(tmp_path, fixtures_dir, driver, monkeypatch):
    monkeypatch.setattr(explorer, "INLINE_LIMIT_BYTES", 0)
    out = tmp_path / "out"
    assert explain(out, fixtures_dir, "--compare", "none", "--translations", "1") == 0
    data = page_json(out / "index.html")
    assert data["images"] == [{"name": n, "title": str(fixtures_dir / f"{n}.png"), "script": f"{n}/explorer.js"}
                              for n in ("scene_wide_320x240", "scene_224")]
    assert (out / "index.html").stat().st_size < 100_000
    open_page(driver, out / "index.html")
    driver.find_element("css selector", ".tclip-images select option[value='1']").click()
    browser.wait_for(lambda: browser.rendered(driver).startswith("1:p0w0:"), what="the linked second image")
    record = json.loads((out / "scene_224" / "result.json").read_text())
    assert float(field(driver, "tau")) == pytest.approx(record["prompts"][0]["words"][0]["tau"], abs=5e-5)
    assert browser.console_problems(driver) == []
    # An image whose data cannot be loaded shows the error and nothing of the image shown before it.
    (out / "scene_224" / "explorer.js").rename(out / "scene_224" / "moved.js")
    open_page(driver, out / "index.html")
    driver.find_element("css selector", ".tclip-images select option[value='1']").click()
    browser.wait_for(lambda: driver.find_elements("css selector", ".tclip-error"), what="the load error")
    for stale in (".tclip-word", ".tclip-links a", ".tclip-card", ".tclip-tab"):
        assert driver.find_elements("css selector", stale) == []
    assert browser.rendered(driver) == ""
    # A data script cut short in copying loads but registers nothing: an error, not "Loading…" for ever.
    script = (out / "scene_224" / "moved.js").read_text(encoding="utf-8")
    (out / "scene_224" / "explorer.js").write_text(script[: len(script) // 2], encoding="utf-8")
    open_page(driver, out / "index.html")
    driver.find_element("css selector", ".tclip-images select option[value='1']").click()
    error = browser.wait_for(lambda: driver.find_elements("css selector", ".tclip-error"), what="the damaged data")
    assert error[0].text == "scene_224/explorer.js is damaged: it holds no image data"
    driver.get_log("browser")  # the failed loads are logged, as they should be


OVERFLOW = "return [...arguments].map((s) => { const e = document.querySelector(s); return e.scrollWidth - e.clientWidth; });"


def test_browser_a_prompt_cut_inside_a_long_word_wraps_in_the_prompt_list(tmp_path, fixtures_dir, driver):
    """A prompt cut to fit the context inside a word longer than the context showed the cut-off rest of the word
    (struck through, no button) on one line: the prompt list scrolled sideways. It wraps."""
    from tclip_jax.methods.similarity import Similarity

    word = "pneumonoultramicroscopicsilicovolcanoconiosis" * 12  # 540 letters, far over 75 pieces
    with pytest.warns(UserWarning, match="keeping the first 75 pieces"):
        result = Similarity.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"), truncate=True).explain(
            str(fixtures_dir / "scene_224.png"), word)
    page = tmp_path / "cut.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'></head><body>"
                    f"{result._repr_html_()}</body></html>", encoding="utf-8")
    open_page(driver, page)
    cut = driver.find_element("css selector", ".tclip-cut s").text.replace("\n", "")
    assert 100 < len(cut) and word.endswith(cut)  # cut inside the word
    assert driver.execute_script(OVERFLOW, "html", ".tclip-prompts", ".tclip-prompt") == [0, 0, 0]
    assert browser.console_problems(driver) == []


def test_browser_the_image_row_wraps_in_a_narrow_window(run, driver):
    """In a window 500 pixels wide the row of image buttons, image list and count was wider than the page (the list
    is up to 60 characters wide): it wraps, the list no wider than the row."""
    size = driver.get_window_size()
    try:
        driver.set_window_size(500, 800)
        open_page(driver, run / "index.html")
        assert driver.execute_script("return document.documentElement.clientWidth;") < 500
        assert driver.execute_script(OVERFLOW, "html", ".tclip-images") == [0, 0]
        row, *parts = driver.execute_script(
            "return [document.querySelector('.tclip-images'), ...document.querySelectorAll('.tclip-images > *')]"
            ".map((e) => e.getBoundingClientRect().right);")
        assert len(parts) == 4 and max(parts) <= row
        assert browser.console_problems(driver) == []
    finally:
        driver.set_window_size(size["width"], size["height"])


def test_browser_words_are_cut_at_code_points_and_tall_images_fit_the_window(tmp_path, fixtures_dir, driver):
    """Also: a word of 135 letters wraps (it made a button 1240 px wide and the page scroll sideways), a
    right-to-left prompt reads right to left, and stepping through the words scrolls the prompt list (capped in
    height) to the word stepped to, and not the page."""
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    from tclip_jax.methods.tclip import TCLIP

    explainer = TCLIP.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"), translations=1)
    tall = np.asarray(Image.open(fixtures_dir / "scene_224.png").convert("RGB").resize((64, 448)))
    prompt = "a 🐶 red café 𝒶 circle"  # characters beyond 16 bits before the words
    long_word = "pneumonoultramicroscopicsilicovolcanoconiosis" * 3
    hebrew = "ריבוע אדום גדול"  # "a big red square"
    shapes = ("a blue square", "a green circle", "a red triangle", "a big star", "a small heart", "a cross", "a dot")
    result = explainer.explain(tall, [prompt, hebrew, f"a {long_word} square", *shapes])
    page = tmp_path / "fragment.html"
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'></head>"
                    f"<body>{result._repr_html_()}</body></html>", encoding="utf-8")
    open_page(driver, page)
    lines = driver.find_elements("css selector", ".tclip-prompt")
    buttons = lines[0].find_elements("css selector", ".tclip-word:not(.tclip-phrase)")
    assert [b.text for b in buttons] == [prompt[w.start:w.end] for w in result.prompts[0].words]
    assert "".join(lines[0].text.split("whole prompt")[0].split()) == "prompt1" + "".join(prompt.split())
    viewer = driver.find_element("css selector", ".tclip-viewer").rect
    window_height = driver.execute_script("return window.innerHeight;")
    assert viewer["height"] <= 0.75 * window_height + 1  # the 1:7 image is narrowed to fit, not stretched
    assert viewer["width"] == pytest.approx(viewer["height"] * 64 / 448, abs=2)
    # The Hebrew prompt's first word is rightmost.
    xs = [b.rect["x"] for b in lines[1].find_elements("css selector", ".tclip-word:not(.tclip-phrase)")]
    assert len(xs) == 3 and xs == sorted(xs, reverse=True)
    # The long word, as a button and in the card's "shows" line, wraps inside the page.
    click_word(driver, "p2w1")
    assert len(driver.find_element("css selector", '.tclip-word[data-key="p2w1"]').text.replace("\n", "")) == 135
    overflow = driver.execute_script(
        "const width = (e) => e.scrollWidth - e.clientWidth;"
        "return [document.documentElement, document.querySelector('.tclip-prompts'),"
        "        document.querySelector('[data-field=\"shows\"]')].map(width);")
    assert overflow == [0, 0, 0]
    # Stepping to a word scrolled out of the prompt list brings it into the list's view; the page stays put.
    click_word(driver, "p0w0")
    # The pointer off the list, where the words scrolling under it would preview them.
    ActionChains(driver).move_to_element(driver.find_element("css selector", "h1")).perform()
    scrolled = driver.execute_script("const list = document.querySelector('.tclip-prompts');"
                                     "list.scrollTop = list.scrollHeight; return [list.scrollTop, window.scrollY];")
    assert scrolled[0] > 60  # the first line, and its words, out of the list's view
    ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
    browser.wait_for(lambda: browser.rendered(driver) == "0:p0w1:heatmap:shared:single", what="the next word")
    shown, in_list, page_at = driver.execute_script(
        "const r = (s) => document.querySelector(s).getBoundingClientRect();"
        "return [r('.tclip-word.tclip-on'), r('.tclip-prompts'), window.scrollY];")
    assert in_list["top"] <= shown["top"] and shown["bottom"] <= in_list["bottom"]
    assert page_at == scrolled[1]
    assert driver.switch_to.active_element.get_attribute("data-key") == "p0w1"
    assert browser.console_problems(driver) == []


def test_browser_notebook_fragment(tmp_path, fixtures_dir, driver):
    from tclip_jax.methods.tclip import TCLIP

    explainer = TCLIP.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"), translations=1)
    result = explainer.explain(str(fixtures_dir / "scene_224.png"), "a red circle")
    fragment = result._repr_html_()
    assert "tclip-static" in fragment  # what a viewer without JavaScript shows
    page = tmp_path / "notebook.html"
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'></head>"
                    f"<body><p>a notebook cell</p>{fragment}{result._repr_html_()}</body></html>", encoding="utf-8")
    open_page(driver, page)
    roots = driver.find_elements("css selector", ".tclip-x")
    assert len(roots) == 2  # two outputs on one page keep to themselves
    browser.wait_for(lambda: all(r.get_attribute("data-rendered") for r in roots), what="both fragments")
    roots[1].find_element("css selector", '.tclip-word[data-key="p0w1"]').click()
    browser.wait_for(lambda: roots[1].get_attribute("data-rendered").startswith("0:p0w1:"), what="a click")
    assert roots[0].get_attribute("data-rendered").startswith("0:p0w0:")
    tau = roots[1].find_element("css selector", 'td[data-field="tau"]').text
    assert float(tau) == pytest.approx(result.prompts[0].word_maps[1].tau, abs=5e-5)
    # The only model information a notebook output has: the model's name, as given.
    assert roots[1].find_element("css selector", ".tclip-run span").text.startswith("model tiny_openai_clip.npz · ")
    assert browser.console_problems(driver) == []


# ---------------------------------------------------------------------------------------------- static figures
def test_figure_wraps_names_the_method_and_shows_tau(fixtures_dir):
    from tclip_jax.methods.tclip import TCLIP

    explainer = TCLIP.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"), translations=1)
    result = explainer.explain(str(fixtures_dir / "scene_224.png"), "a small red circle left of a blue square")
    figure = result.figure()
    shown = [a for a in figure.axes if a.images]
    assert len(shown) == 1 + 9 + 1  # the image, nine words, the whole prompt
    columns = {round((a.get_position().x0 + a.get_position().x1) / 2, 3) for a in figure.axes}
    assert len(columns) == 5  # wrapped at five panels a row
    assert "TCLIP K=1" in figure._suptitle.get_text() and "tiny_openai_clip.npz" in figure._suptitle.get_text()
    word = result.prompts[0].word_maps[1]
    assert shown[2].get_title() == f"small\nτ={word.tau:.4f}"
    # The default figure draws each word's map (its soft map only when asked for), at the image's size.
    first = result.prompts[0].word_maps[0]
    np.testing.assert_array_equal(shown[1].images[0].get_array(), overlay(result.image, first.heatmap, first.box))
    assert figure._repr_png_().startswith(b"\x89PNG")  # a notebook shows it without pyplot
    soft = result.figure(kind="soft")
    assert "TCLIP K=1 soft maps" in soft._suptitle.get_text()
    with pytest.raises(ValueError):
        result.figure(kind="raw")
    for bad in (0, 6, 2.0, True):  # refused, as kind is, not clamped to 1..5
        with pytest.raises(ValueError, match=rf"^columns must be an integer from 1 to 5, got {bad!r}$"):
            result.figure(columns=bad)
    with pytest.raises(ValueError, match=r"^prompt must be the index of one of the result's prompts \(an integer\), "
                                         r"got True$"):  # not read as prompt 1
        result.figure(prompt=True)
    assert len([a for a in result.figure(columns=np.int64(2)).axes if a.images]) == 11


def test_a_soft_figure_of_a_method_without_soft_maps_says_it_shows_the_maps(fixtures_dir):
    from tclip_jax.methods.similarity import Similarity

    result = Similarity.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz")).explain(
        str(fixtures_dir / "scene_224.png"), "a red circle")
    assert result.prompts[0].phrase.soft is None  # a baseline: no soft map to draw
    title = " ".join(result.figure(kind="soft")._suptitle.get_text().split())  # as one line, not wrapped
    assert title.startswith("similarity maps (no soft maps for this method: its maps are shown) · ")
    assert "soft maps ·" not in title


def test_a_prompt_with_dollar_signs_is_drawn_as_written_not_as_mathtext(fixtures_dir, tmp_path):
    """Matplotlib reads text between two "$" as mathtext: "a $100 bill and a $5 bill" was titled "a 100billanda5
    bill", and "a $\\frac$ dog" raised on drawing (`tclip explain` wrote nothing). Every text of a figure is drawn
    as it is written: matplotlib's own reading of it (`Text._preprocess_math`) finds no math, and it draws."""
    from tclip_jax.methods.tclip import TCLIP
    from tclip_jax.visualize.figures import Panel, grid_figure, save_figure

    prompts = ["a $100 bill and a $5 bill", "a $\\frac$ dog"]
    explainer = TCLIP.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"), translations=1)
    result = explainer.explain(str(fixtures_dir / "scene_224.png"), prompts)
    figures = {f'"{prompt}"': result.figure(p) for p, prompt in enumerate(prompts)}
    caption = Panel("$\\frac$", np.zeros((8, 8), np.float32), tau=0.5)  # a panel's caption is drawn so too
    figures["$x^2$"] = grid_figure(np.zeros((8, 8, 3), np.uint8), [caption], "$x^2$")
    for k, (title, figure) in enumerate(figures.items()):
        save_figure(figure, tmp_path / f"{k}.png")  # "\\frac" raised here
        assert figure._suptitle.get_text().split("\n")[-1] == title
        for text in [figure._suptitle, *(axis.title for axis in figure.axes if axis.images)]:
            assert text._preprocess_math(text.get_text()) == (text.get_text(), False), text.get_text()
    assert figures["$x^2$"].axes[1].get_title() == "$\\frac$\nτ=0.5000"


def test_characters_the_figure_font_lacks_are_said_once_not_per_glyph_and_figure(fixtures_dir, tmp_path,
                                                                                 monkeypatch):
    import warnings

    import tclip_jax.visualize.figures as figures
    from tclip_jax.methods.tclip import TCLIP

    monkeypatch.setattr(figures, "_GLYPHS_NOTED", set())
    explainer = TCLIP.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"), translations=1)
    result = explainer.explain(str(fixtures_dir / "scene_224.png"), "東京 red")  # Tokyo in kanji
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            figures.save_figure(result.figure(), tmp_path / "grid.png")
    assert [str(w.message) for w in caught] == ["the figures' font lacks some characters of the prompts "
                                                "(京 東): they show as boxes in the grid figures; the "
                                                "explorer page shows them"]
    # Every way of drawing the figure stays quiet: the figure's own savefig (which printed matplotlib's "Glyph N
    # missing from font(s)" once per character), in other formats, cropped tight, and the notebook's PNG.
    result = explainer.explain(str(fixtures_dir / "scene_224.png"), "一只红色的猫")  # a red cat
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = result.figure()
        figure.savefig(tmp_path / "grid.png")
        figure.savefig(tmp_path / "grid.svg")
        figure.savefig(tmp_path / "tight.png", bbox_inches="tight")
        figure._repr_png_()
    assert [str(w.message) for w in caught] == ["the figures' font lacks some characters of the prompts "
                                                "(一 只 猫 的 红 色): they show as boxes in the grid figures; the "
                                                "explorer page shows them"]


def test_a_large_photo_is_drawn_in_the_grid_at_a_bounded_size_with_its_box_where_it_was():
    from tclip_jax.visualize.figures import GRID_MAX_SIDE, Panel, _resized, grid_figure

    height, width = 3000, 4000
    heatmap = np.zeros((height, width), np.float32)
    heatmap[1000:2000, 2000:3000] = 1.0
    image = np.full((height, width, 3), 128, np.uint8)
    box = (2000, 1000, 3000, 2000)
    figure = grid_figure(image, [Panel("word", heatmap, box)], "large")
    drawn = [a.images[0].get_array() for a in figure.axes if a.images]
    assert [d.shape for d in drawn] == [(768, GRID_MAX_SIDE, 3)] * 2
    scale = GRID_MAX_SIDE / width  # 0.256: the hot square and its box at the same place of the smaller picture
    hot = np.zeros((768, 1024), np.float32)
    hot[256:512, 512:768] = 1.0  # its edges fall on whole pixels there
    expected = overlay(np.full((768, 1024, 3), 128, np.uint8), hot, tuple(v * scale for v in box))
    assert np.abs(drawn[1].astype(int) - expected).max() <= 1
    small = grid_figure(image[:300, :400], [Panel("word", heatmap[:300, :400])], "small")  # drawn as it is
    np.testing.assert_array_equal([a for a in small.axes if a.images][0].images[0].get_array(), image[:300, :400])
    # The longer side is bounded, be it the height: a 2048x1536 portrait is drawn 1024x768.
    tall = grid_figure(np.full((2048, 1536, 3), 128, np.uint8), [Panel("word", np.zeros((2048, 1536), np.float32))],
                       "tall")
    assert [a.images[0].get_array().shape for a in tall.axes if a.images] == [(GRID_MAX_SIDE, 768, 3)] * 2
    # A whole-image box is drawn as the whole drawn picture's (inset): 1100 rows are drawn as 682.67, so 683, and
    # the box's end was cut to 682, not the whole picture, so not inset.
    whole = grid_figure(image[:1100, :1650], [Panel("word", heatmap[:1100, :1650], (0, 0, 1650, 1100))], "whole")
    panel = [a.images[0].get_array() for a in whole.axes if a.images][1]
    np.testing.assert_array_equal(panel, overlay(_resized(image[:1100, :1650], GRID_MAX_SIDE / 1650),
                                                 _resized(heatmap[:1100, :1650], GRID_MAX_SIDE / 1650),
                                                 (0, 0, GRID_MAX_SIDE, 683)))


_SETTINGS_TITLE = ('TCLIP K=1 (trim=0.1, input_protocol=center_crop, token_weighting=mean) maps · model '
                   'default_model (bfloat16 matmuls)\n"red"')


@pytest.mark.parametrize("shape_hw, words, fallback, title", [
    ((200, 200), ["red"], None, _SETTINGS_TITLE),  # a short prompt: two panels, a long title
    ((211, 37), ["a", "red", "square"], "no_root_between_means", _SETTINGS_TITLE),  # tall, long captions
    ((40, 800), ["a", "red", "square"], None, _SETTINGS_TITLE),  # very wide
    ((200, 200), ["red"], None, "model " + "x" * 300 + '\n"red"'),  # a word wider than the figure
    ((200, 200), ["red"], None, "model " + "x" * 3000 + '\n"red"'),  # one that took minutes to wrap
    ((200, 200), ["see", "y" * 250, "here"], None, _SETTINGS_TITLE),  # a caption wider than a panel can be
])
def test_grid_figure_titles_lie_inside_the_figure_and_apart(shape_hw, words, fallback, title):
    """The title was clipped at both ends (it was as wide as it was long), and captions overlapped on tall images:
    every text's drawn extent lies inside the figure, and no two intersect."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tclip_jax.visualize.figures import Panel, grid_figure

    heatmap = np.random.default_rng(0).random(shape_hw).astype(np.float32)
    panels = [Panel(word, heatmap, tau=0.25, fallback=fallback) for word in [*words, "whole prompt"]]
    figure = grid_figure(np.full((*shape_hw, 3), 128, np.uint8), panels, title)
    renderer = FigureCanvasAgg(figure).get_renderer()
    texts = [figure._suptitle, *(axis.title for axis in figure.axes if axis.images)]
    extents = [text.get_window_extent(renderer) for text in texts]
    for text, extent in zip(texts, extents):
        assert 0 <= extent.x0 and extent.x1 <= figure.bbox.x1 and 0 <= extent.y0 and extent.y1 <= figure.bbox.y1, (
            text.get_text(), extent, figure.bbox)
    for i, extent in enumerate(extents):
        assert not any(extent.overlaps(other) for other in extents[i + 1:]), texts[i].get_text()
    for text, caption in zip(texts, [title, "image", *(panel.caption() for panel in panels)], strict=True):
        assert "".join(text.get_text().split()) == "".join(caption.split())  # wrapped, every character kept


def test_a_long_word_in_a_caption_is_wrapped_not_widening_every_panel():
    """A caption of one 250-letter word made every panel as wide as it (a figure 9,300 pixels wide, pictures
    tiny): a panel is at most MAX_PANEL_ASPECT times as wide as tall, its caption wrapped to that."""
    from tclip_jax.visualize.figures import MAX_PANEL_ASPECT, Panel, grid_figure

    def width(word):
        panels = [Panel(text, np.zeros((200, 200), np.float32)) for text in ("see", word, "here", "whole prompt")]
        return grid_figure(np.zeros((200, 200, 3), np.uint8), panels, "title").get_figwidth()

    assert width("y" * 250) <= MAX_PANEL_ASPECT * width("y")


def test_a_word_too_long_for_a_line_is_broken_into_the_longest_pieces_that_fit():
    """Measured one prefix at a time, the pieces a word is broken into are each the longest that fits."""
    from tclip_jax.visualize.figures import _text_inches, _wrapped

    word, inches = "WiMx" * 60, 1.5
    lines = _wrapped(word, 10, inches).split("\n")
    assert "".join(lines) == word and len(lines) > 1
    for line, rest in zip(lines, lines[1:]):
        assert _text_inches(line, 10) <= inches < _text_inches(line + rest[0], 10)
    assert _text_inches(lines[-1], 10) <= inches


def test_a_grid_figure_is_no_wider_for_an_image_wider_than_two_to_one():
    """A 10:1 strip made a figure as wide as 5 panels of 10 heights each (7,700 pixels as saved)."""
    from tclip_jax.visualize.figures import MAX_PANEL_ASPECT, Panel, grid_figure

    def width(shape_hw):
        panels = [Panel(word, np.zeros(shape_hw, np.float32)) for word in ("a", "red", "square", "whole prompt")]
        return grid_figure(np.zeros((*shape_hw, 3), np.uint8), panels, "title").get_figwidth()

    assert MAX_PANEL_ASPECT == 2
    assert width((40, 400)) == width((40, 800)) == width((40, 80)) < 2 * width((40, 40))


def test_a_grid_shows_the_image_then_its_panels_at_most_five_a_row_in_as_few_rows_as_that_takes():
    """The image and n panels fill min(n + 1, columns, 5) columns and as many rows as they need: no empty row or
    column (1 + 4 panels are one row of 5, 1 + 9 two)."""
    from tclip_jax.visualize.figures import Panel, grid_figure

    for panels, columns, (rows, shown_columns) in [(1, 5, (1, 2)), (2, 5, (1, 3)), (4, 5, (1, 5)), (5, 5, (2, 5)),
                                                   (9, 5, (2, 5)), (10, 5, (3, 5)), (4, 9, (1, 5)), (3, 2, (2, 2))]:
        figure = grid_figure(np.zeros((20, 30, 3), np.uint8),
                             [Panel(str(i), np.zeros((20, 30), np.float32)) for i in range(panels)], "t", columns)
        drawn = [axis for axis in figure.axes if axis.images]
        assert len(drawn) == 1 + panels
        assert drawn[0].get_subplotspec().get_gridspec().get_geometry() == (rows, shown_columns), (panels, columns)
        assert len(figure.axes) == rows * shown_columns


def test_a_panel_whose_tau_came_from_a_gmm_fallback_has_its_caption_in_red():
    from matplotlib.colors import to_rgb

    from tclip_jax.visualize.figures import Panel, grid_figure

    heatmap = np.zeros((20, 30), np.float32)
    figure = grid_figure(np.zeros((20, 30, 3), np.uint8), [
        Panel("red", heatmap, tau=0.25), Panel("square", heatmap, tau=0.5, fallback="no_root_between_means")], "t")
    image, plain, fallback = (to_rgb(axis.title.get_color()) for axis in figure.axes if axis.images)
    assert image == plain == (0.0, 0.0, 0.0)
    assert fallback[0] > 0.5 and max(fallback[1:]) < 0.3  # a red


@pytest.mark.parametrize("thickness", range(2, 8))
def test_a_box_is_drawn_inside_itself_and_a_whole_image_box_inset(thickness):
    """An inner stroke: what is drawn reaches the box's edges and no further (an odd width drew a pixel outside),
    its black edge around the white line; a whole-image box is drawn a stroke width further in, off the frame."""
    def drawn(box):  # the extents (x1, y1, x2, y2, ends exclusive) of the pixels drawn and of the white ones
        picture = draw_box(np.full((100, 120, 3), 77, np.uint8), box, thickness=thickness)
        assert (picture[50, 60] == 77).all()  # a line, not a filled box

        def extent(mask):
            ys, xs = np.nonzero(mask)
            return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1

        return extent((picture != 77).any(axis=-1)), extent((picture == 255).all(axis=-1))

    assert drawn((10, 20, 110, 90)) == ((10, 20, 110, 90), (11, 21, 109, 89))
    t = thickness
    assert drawn((0, 0, 120, 100)) == ((t, t, 120 - t, 100 - t), (t + 1, t + 1, 119 - t, 99 - t))


def test_a_box_with_a_nan_or_missing_coordinate_is_refused_by_name():
    for box in [(np.nan, 0, 10, 10), (0, 0, 10, float("nan")), (0, 0, 10)]:
        with pytest.raises(ValueError, match="box must be 4 numbers x1, y1, x2, y2, none NaN"):
            draw_box(np.zeros((20, 20, 3), np.uint8), box)


def test_a_whole_image_box_is_one_that_covers_the_image():
    assert is_whole_image((0, 0, 120, 100), (100, 120))
    assert not is_whole_image((0, 0, 110, 100), (100, 120)) and not is_whole_image((0, 0, 120, 90), (100, 120))


def test_a_box_is_stroked_a_160th_of_the_images_longer_side_wide_and_at_least_2_pixels():
    """800 / 160 = 5 on an 800x600 photo either way up; 120 / 160 rounds to 1, so 2. A picture's boxes are drawn at
    that width unless told another."""
    from tclip_jax.visualize.figures import box_thickness

    for size_hw, width in [((600, 800), 5), ((800, 600), 5), ((1600, 480), 10), ((100, 120), 2), ((30, 40), 2)]:
        assert box_thickness(size_hw) == width, size_hw
    image, box = np.full((600, 800, 3), 77, np.uint8), (100, 100, 500, 400)
    np.testing.assert_array_equal(draw_box(image.copy(), box), draw_box(image.copy(), box, thickness=5))
    assert not np.array_equal(draw_box(image.copy(), box, thickness=4), draw_box(image.copy(), box, thickness=5))


def test_an_overlay_is_the_image_blended_with_the_turbo_colours_of_the_min_max_map():
    """overlay(image, h, α) = round((1 - α) image + α turbo[round(255 (h - min h) / (max h - min h))]), turbo
    being Google's Turbo table in RGB: its first colour (48, 18, 59), its last (122, 4, 3)."""
    lut = turbo_lut()
    assert lut.shape == (256, 3) and lut[0].tolist() == [48, 18, 59] and lut[255].tolist() == [122, 4, 3]
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)
    heatmap = np.linspace(3.0, 7.0, 24 * 40, dtype=np.float32).reshape(24, 40)  # a ramp off zero: min-max matters
    colours = lut[np.round(255 * (heatmap.astype(np.float64) - 3.0) / 4.0).astype(int)]
    for alpha in (0.5, 0.25):  # weights exact in binary: a blend ending in .5 is one, rounded to even either way
        np.testing.assert_array_equal(overlay(image, heatmap, alpha=alpha),
                                      np.round((1 - alpha) * image + alpha * colours))


def test_an_overlay_reads_its_image_as_load_image_does_and_refuses_a_heatmap_it_cannot_draw():
    """A float image in [0, 1] was blended as it was with colours of 0..255 (a float64 picture), RGBA or a heatmap of
    another size failed inside OpenCV, and NaN drew colour 0 with numpy's cast warning. The image is read as
    `load_image` reads it (the blend's closed form on what it returns); a heatmap it cannot draw is refused."""
    from tclip_jax.image import load_image

    lut = turbo_lut()
    rgb = np.random.default_rng(1).integers(0, 256, (24, 40, 3), np.uint8)
    heatmap = np.linspace(3.0, 7.0, 24 * 40, dtype=np.float32).reshape(24, 40)
    colours = lut[np.round(255 * (heatmap.astype(np.float64) - 3.0) / 4.0).astype(int)]
    for image in (rgb / 255.0, np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)]), rgb[..., 0],
                  rgb.astype(np.uint16) * 257):
        drawn = overlay(image, heatmap)
        assert drawn.dtype == np.uint8 and drawn.shape == rgb.shape
        np.testing.assert_array_equal(drawn, np.round(0.5 * load_image(image) + 0.5 * colours))
    for other in (heatmap[:, :-1], heatmap.T, heatmap[None]):
        with pytest.raises(ValueError, match=rf"^heatmap of shape \({other.shape[0]}, .* is not the image's size "
                                             r"\(24, 40\) \(height, width\)$"):
            overlay(rgb, other)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="^heatmap holds NaN or infinite values$"):
            overlay(rgb, np.where(heatmap > 5, bad, heatmap))
    with pytest.raises(ValueError, match=r"float image values must lie in \[0, 1\]"):
        overlay(rgb.astype(np.float32), heatmap)


def test_the_whole_prompt_map_says_how_its_query_was_made(fixtures_dir):
    """TCLIP's whole-prompt query is the mean of its words' queries, or with a token weighting the mean of its words'
    pieces weighted by the end-of-text token's attention (methods/tclip/token_weights.py); one word keeps its mean."""
    from tclip_jax.methods.tclip import TCLIP

    image = str(fixtures_dir / "scene_224.png")
    said = {}
    for weighting in ("none", "last", "mean", "rollout"):
        explainer = TCLIP.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz"), translations=1,
                                          token_weighting=weighting)
        maps = explorer.image_entry("x", [explorer.View(explainer.explain(image, ["a red circle.", "cat"]))])
        said[weighting] = maps["panels"][0]["maps"]["p0"]["shows"]
        assert maps["panels"][0]["maps"]["p1"]["shows"] == "the whole prompt “cat” (the mean of its words' queries)"
    assert said["none"] == "the whole prompt “a red circle.” (the mean of its words' queries)"
    for weighting, attention in [("last", "attention in the text tower's last block"),
                                 ("mean", "attention averaged over the text tower's blocks"),
                                 ("rollout", "attention rollout over the text tower")]:
        assert said[weighting] == ("the whole prompt “a red circle.” (the mean of its words' pieces weighted by the "
                                   f"end-of-text token's {attention})")


def test_a_views_own_label_names_it_on_the_page_and_in_result_json(fixtures_dir):
    """View.label, where given, is the name a view goes by; else the method and its non-default settings."""
    from tclip_jax.methods.similarity import Similarity

    result = Similarity.from_pretrained(str(fixtures_dir / "tiny_openai_clip.npz")).explain(
        str(fixtures_dir / "scene_224.png"), "a red circle")
    views = [explorer.View(result, label="mine"), explorer.View(result), explorer.View(result, label="theirs")]
    assert [p["label"] for p in explorer.image_entry("x", views)["panels"]] == ["mine", "similarity", "theirs"]
    assert [c["label"] for c in explorer.views_record(views)["compare"]] == ["similarity", "theirs"]


PLUGIN = '''
import dataclasses

from tclip_jax.methods.similarity import Similarity
from tclip_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class PoweredSettings(Similarity.Settings):
    power: float = setting(1.0, "a setting of a method from outside the package")


class Powered(Similarity):
    name = "powered"
    Settings = PoweredSettings
'''


def test_labels_name_the_settings_of_a_method_from_outside_the_package(tmp_path, fixtures_dir, monkeypatch):
    """A method given as "package.module:Class" is in no registry; its labels (page, result.json, figures, sweep
    reports) still name the settings that differ from its own Settings' defaults."""
    from tclip_jax.sweep.report import run_name
    from tclip_jax.visualize import method_label

    (tmp_path / "label_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "red", "--method", "label_plugin:Powered",
                  "--option", "power=2", "--compare", "label_plugin:Powered:power=3",
                  "--compare", "label_plugin:Powered:power=1", "--model", str(fixtures_dir / "tiny_openai_clip.npz"),
                  "--out", str(out)]) == 0
    labels = ["powered (power=2.0)", "powered (power=3.0)", "powered"]
    assert [p["label"] for p in page_json(out / "index.html")["images"][0]["panels"]] == labels
    record = json.loads((out / "scene_224" / "result.json").read_text())
    assert [c["label"] for c in record["compare"]] == labels[1:]
    run = {**record["run"], "model": {"origin": "m.npz"}}
    assert method_label(run) == labels[0] and run_name(run) == f"{labels[0]} (m.npz)"


def test_a_model_named_as_the_current_or_parent_folder_is_labelled_by_that_folders_name(tmp_path, fixtures_dir,
                                                                                          monkeypatch):
    """A model loaded as "./" was labelled "" (the repr's "on :", the figure's "model ", the page's "model ?"), and
    "." or ".." as written: each is labelled by the name of the folder it names. result.json keeps the origin as
    typed, as the command line took it."""
    from tclip_jax.methods.tclip import TCLIP
    from tclip_jax.visualize import model_label, result_figure

    folder = tmp_path / "my_model"
    assert tclip(["convert", str(fixtures_dir / "tiny_openai_clip.npz"), "--out", str(folder)]) == 0
    (folder / "sub").mkdir()
    monkeypatch.chdir(folder)
    for origin in ("./", ".", "./sub/.."):
        assert model_label({"model": {"origin": origin}}) == "my_model", origin
    monkeypatch.chdir(folder / "sub")
    for origin in ("..", "../", "../sub/.."):
        assert model_label({"model": {"origin": origin}}) == "my_model", origin
    assert model_label({"model": {"origin": "/"}}) == "/"  # the root has no name: as written
    result = TCLIP.from_pretrained("..", translations=1).explain(str(fixtures_dir / "scene_224.png"), "red")
    assert repr(result).startswith("<ImageResult TCLIP K=1 on my_model: ")
    assert "· model my_model\n" in result_figure(result)._suptitle.get_text()
    out = tmp_path / "out"
    assert tclip(["explain", str(fixtures_dir / "scene_224.png"), "--prompt", "red", "--model", "../",
                  "--translations", "1", "--out", str(out)]) == 0
    assert page_json(out / "index.html")["model"] == "my_model"
    assert json.loads((out / "scene_224" / "result.json").read_text())["run"]["model"]["origin"] == "../"


def test_a_label_names_each_changed_setting_as_an_option_that_reads_back():
    """A label lists the changed settings as "k=v, k=v"; a tuple's values are joined by "," as --option and --compare
    take them (scale_fractions=0.25,0.5), so the list reads back into those settings."""
    from tclip_jax.methods.tclip import TCLIP
    from tclip_jax.visualize import method_label

    settings = TCLIP.Settings(translations=17, scale_fractions=(0.25, 0.5), trim=0.1)
    label = method_label({"method": "tclip", "settings": json.loads(json.dumps(settings.to_dict()))})
    head = "TCLIP K=17 ("
    assert label.startswith(head) and label.endswith(")")
    assert TCLIP.Settings.parse_assignments(label[len(head):-1].split(", ")) == {
        "scale_fractions": (0.25, 0.5), "trim": 0.1}


def test_a_tclip_subclass_labels_name_its_translations():
    """Labels dropped `translations` for every method but wrote "K=" for the one named "tclip" alone: a TCLIP subclass
    at K=1 and at K=25 had one label (figures, explorer, sweep reports). Its label names translations as any setting
    that differs from its defaults, and reads back into those settings."""
    from tclip_jax.methods.tclip import TCLIP
    from tclip_jax.visualize import method_label

    class Variant(TCLIP):
        name = "tclip_label_variant"

    def label(**values):
        settings = Variant.Settings(**values).to_dict()
        return method_label({"method": Variant.name, "settings": json.loads(json.dumps(settings))})

    assert label() == label(translations=25) == Variant.name
    head = f"{Variant.name} ("
    assert label(translations=1).startswith(head) and label(translations=1).endswith(")")
    assert Variant.Settings.parse_assignments(label(translations=1)[len(head):-1].split(", ")) == {"translations": 1}
    assert method_label({"method": "tclip", "settings": TCLIP.Settings(translations=1).to_dict()}) == "TCLIP K=1"


def test_browser_a_prompt_cut_to_the_context_shows_what_was_cut(tmp_path, fixtures_dir, driver):
    """With truncate, a prompt is mapped up to its last whole word that fits the context: the page marks the rest
    as cut off, and the whole-prompt map says how much of the prompt it is of."""
    from tclip_jax.methods.similarity import Similarity
    from tclip_jax.methods.tclip import TCLIP

    model, image = str(fixtures_dir / "tiny_openai_clip.npz"), str(fixtures_dir / "scene_224.png")
    long = " ".join(["red"] * 80)  # one piece a word: 75 fit the context of 77 beside SOT and EOT
    mapped = len(" ".join(["red"] * 75))
    with pytest.warns(UserWarning, match="keeping the first 75 pieces"):
        # "a red circle ": its trailing space is no cut-off part
        per_word = TCLIP.from_pretrained(model, translations=1, truncate=True).explain(image, [long, "a red circle "])
    with pytest.warns(UserWarning, match="keeping the first 75 pieces"):
        per_prompt = Similarity.from_pretrained(model, truncate=True).explain(image, long)
    page = tmp_path / "cut.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'></head><body>"
                    f"{per_word._repr_html_()}{per_prompt._repr_html_()}</body></html>", encoding="utf-8")
    open_page(driver, page)
    roots = driver.find_elements("css selector", ".tclip-x")
    browser.wait_for(lambda: all(r.get_attribute("data-rendered") for r in roots), what="both fragments")
    first, second = roots[0].find_elements("css selector", ".tclip-prompt")
    assert len(first.find_elements("css selector", ".tclip-word:not(.tclip-phrase)")) == 75
    assert first.find_element("css selector", ".tclip-cut s").text == long[mapped:].strip()
    assert "cut off: not mapped" in first.find_element("css selector", ".tclip-cut").text
    assert second.find_elements("css selector", ".tclip-cut") == []  # a prompt that fits is not marked
    roots[0].find_element("css selector", '.tclip-word[data-key="p0"]').click()
    browser.wait_for(lambda: roots[0].get_attribute("data-rendered").startswith("0:p0:"), what="the whole prompt")
    shows = roots[0].find_element("css selector", '[data-field="shows"]').text
    assert shows.startswith(f"the whole prompt “{long[:mapped]} …”")
    assert shows.endswith(f"(cut to fit the model's context: its last {len(long) - mapped} characters were not mapped)")
    # A prompt-level method: the whole-prompt button holds the mapped part only, the rest is marked.
    assert roots[1].find_element("css selector", '.tclip-word[data-key="p0"]').text == long[:mapped]
    assert roots[1].find_element("css selector", ".tclip-cut s").text == long[mapped:].strip()
    assert browser.console_problems(driver) == []


def test_browser_a_prompt_cut_inside_each_template_text_marks_what_some_templates_mapped(tmp_path, cut_results,
                                                                                         driver):
    """CLIP Surgery's prompt list strikes through what no template text kept and marks what some kept."""
    surgery, _ = cut_results
    fewest, most = surgery.prompts[0].mapped_ends
    page = tmp_path / "cut.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'></head><body>"
                    f"{surgery._repr_html_()}</body></html>", encoding="utf-8")
    open_page(driver, page)
    line = driver.find_element("css selector", ".tclip-prompt")
    assert line.find_element("css selector", '.tclip-word[data-key="p0"]').text == CUT[:fewest]
    assert line.find_element("css selector", ".tclip-partly u").text == CUT[fewest:most].strip()
    assert "cut off in some templates" in line.find_element("css selector", ".tclip-partly").text
    assert line.find_element("css selector", ".tclip-cut:not(.tclip-partly) s").text == CUT[most:].strip()
    assert browser.console_problems(driver) == []
