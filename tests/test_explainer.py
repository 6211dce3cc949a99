"""The TCLIP explainer end to end on the tiny OpenAI-format CLIP: the author's similarity, result structure,
one image pass for many prompts, and bad input."""
import contextlib
import os
import pathlib
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tclip_jax.methods.tclip.method as tclip_module
from tclip_jax.checkpoints.load import load_clip
from tclip_jax.methods import METHODS
from tclip_jax.methods.base import Query
from tclip_jax.methods.tclip import TCLIP, Settings
from tclip_jax.methods.tclip.relevance import aggregate_maps, token_embeddings, translated_patch_embeddings
from tclip_jax.methods.tclip.token_weights import eot_weights, token_embeddings_and_attention
from tclip_jax.methods.tclip.translations import translation_offsets
from tclip_jax.postprocess import gmm_threshold, heatmap_box
from tclip_jax.image import points_to_model, to_original
from references import author_kept_positions

PROMPTS = ("a red circle next to a blue square", "a photo of a cat")


@pytest.fixture(scope="module")
def tiny_clip(fixtures_dir):
    return load_clip(fixtures_dir / "tiny_openai_clip.npz")


@pytest.fixture(scope="module")
def author(fixture_npz):
    return fixture_npz("tclip_author/author_similarity_tiny.npz")


@pytest.fixture
def vit_calls(monkeypatch):
    """Counts the image-tower passes the explainer makes (each pass covers all translated copies)."""
    calls = []
    original = tclip_module.translated_patch_embeddings

    def counting(*args, **kwargs):
        calls.append(args[2].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(tclip_module, "translated_patch_embeddings", counting)
    return calls


@pytest.mark.parametrize("translations", [1, None], ids=["1", "default"])
def test_similarity_equals_the_author_token_patch_similarity(tiny_clip, author, fixture_images, translations,
                                                              highest_precision):
    # The author's preprocessing is CLIP's resize + centre crop; its similarity has no translation: with the default
    # translated copies, S is still the untranslated copy's (with one copy, any copy would be).
    tclip = TCLIP(tiny_clip, Settings(translations=translations, input_protocol="center_crop"))
    result = tclip.explain(fixture_images["scene_224"], list(author["texts"]))
    for t, prompt in enumerate(result.prompts):
        np.testing.assert_array_equal(prompt.tokens.token_ids, author["token_ids"][t])
        kept = author_kept_positions(tiny_clip.tokenizer, prompt.tokens.token_ids)
        np.testing.assert_array_equal(kept, author[f"text{t}_kept_positions"])
        rows = [prompt.tokens.piece_positions.index(p) for p in kept]
        np.testing.assert_allclose(prompt.similarity[rows], author[f"text{t}_S"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("protocol", ["whole", "center_crop"])
def test_result_structure_on_a_non_square_image(tiny_clip, fixture_images, protocol):
    image = fixture_images["scene_wide_320x240"]
    height, width = image.shape[:2]
    prompt = "A red circle, next to a hippopotamus."
    result = TCLIP(tiny_clip, Settings(translations=1, input_protocol=protocol)).explain(image, prompt)

    assert result.image.shape == image.shape and result.geometry.original_hw == (height, width)
    assert result.grid == (7, 7) and len(result.prompts) == 1
    explained = result.prompts[0]
    assert explained.prompt == prompt
    assert [w.text for w in explained.words] == ["A", "red", "circle", "next", "to", "a", "hippopotamus"]
    assert all(prompt[w.start:w.end] == w.text for w in explained.words)
    # Each word's pieces are consecutive positions of the token row; punctuation pieces belong to no word.
    pieces = explained.tokens.pieces
    assert "".join(pieces[p - 1] for p in explained.words[-1].piece_positions).replace("</w>", "") == "hippopotamus"
    assert len(explained.words[-1].piece_positions) > 1
    assert explained.similarity.shape == (len(pieces), 49)
    assert np.all(np.abs(explained.similarity) <= 1 + 1e-6)  # cosines

    maps = list(explained.word_maps) + [explained.phrase]
    assert [m.text for m in explained.word_maps] == [w.text for w in explained.words]
    for m in maps:
        assert m.heatmap.shape == m.soft.shape == (height, width)
        assert np.isfinite(m.heatmap).all() and np.isfinite(m.soft).all()
        assert m.heatmap.min() <= m.tau <= m.heatmap.max()
        assert 0 <= m.box.x1 < m.box.x2 <= width and 0 <= m.box.y1 < m.box.y2 <= height
    # Original pixels whose centre the model did not see (cut off by the centre crop) read as each map's minimum.
    xs, ys = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    model_xy = points_to_model(np.stack([xs, ys], axis=-1), result.geometry)
    seen = np.all((model_xy >= 0) & (model_xy <= 224), axis=-1)
    assert seen.all() == (protocol == "whole")
    for m in maps:
        np.testing.assert_array_equal(m.heatmap[~seen], m.heatmap.min())
    # Without translation every step is linear in the query, and the phrase query is the mean of the words'.
    words_mean = np.mean([m.heatmap for m in explained.word_maps], axis=0)
    np.testing.assert_allclose(explained.phrase.heatmap[seen], words_mean[seen], atol=1e-5)


def test_a_non_square_inputs_map_is_its_aggregated_patch_grid_on_the_original(tiny_clip, fixture_images):
    """patch_multiple gives a 320 x 240 image a 256 x 320 input, an 8 x 10 patch grid: the map is aggregate_maps'
    on that grid (rows by columns), resampled to the original image."""
    method = TCLIP(tiny_clip, Settings(translations=1, input_protocol="patch_multiple"))
    image = fixture_images["scene_wide_320x240"]
    heatmap = method.explain(image, "red circle").prompts[0].phrase.heatmap
    _, pixels, geometry = method.preprocess(image)
    height, width = pixels.shape[:2]
    patch = tiny_clip.config.patch_size
    assert (height // patch, width // patch) == (8, 10)
    embeds = translated_patch_embeddings(tiny_clip.model, tiny_clip.params, pixels[None], method.offsets)[0]
    query = method.encode([Query("red circle")]).per_query
    reference = aggregate_maps(embeds, query, method.offsets, (8, 10), (height, width), method.settings.trim)
    np.testing.assert_allclose(heatmap, to_original(np.asarray(reference), geometry)[0], atol=1e-6, rtol=0)


def test_one_image_pass_serves_many_prompts(tiny_clip, fixture_images, vit_calls):
    tclip = TCLIP(tiny_clip, Settings(translations=25))
    tclip.jitted_maps.clear_cache()  # an equal method's program compiled by an earlier test would be reused untraced
    image = fixture_images["scene_wide_320x240"]
    together = tclip.explain(image, list(PROMPTS))
    # Every trace of the image tower sees one image (its 25 copies made inside), never one per prompt; the
    # per-image loop traces its body twice (for its output shapes, then the loop).
    assert 1 <= len(vit_calls) <= 2 and set(vit_calls) == {(1, 224, 224, 3)}
    for prompt, joint in zip(PROMPTS, together.prompts):
        alone = tclip.explain(image, prompt).prompts[0]
        assert alone.prompt == joint.prompt == prompt
        for a, b in zip(list(alone.word_maps) + [alone.phrase], list(joint.word_maps) + [joint.phrase]):
            np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-6, rtol=0)
            assert a.box == b.box and abs(a.tau - b.tau) < 1e-6
        np.testing.assert_allclose(alone.similarity, joint.similarity, atol=1e-6, rtol=0)


def test_equal_queries_are_mapped_once_and_give_every_query_its_map(tiny_clip, fixture_images):
    # The text tower is causal: "dog" opening both prompts has one embedding, and a one-word prompt's phrase
    # is its word. Five queries, three distinct.
    tclip = TCLIP(tiny_clip, Settings(translations=25))
    image = fixture_images["scene_wide_320x240"]
    encoded = tclip.encode_prompts(["dog", "dog runs"])
    assert len(encoded.rows) == 5 and len(encoded.queries) == 3
    result = tclip.explain(image, encoded)
    one, two = result.prompts
    maps = [one.word_maps[0], two.word_maps[0], two.word_maps[1], one.phrase, two.phrase]
    assert maps[0].heatmap is maps[1].heatmap is maps[3].heatmap  # computed once
    _, pixels, geometry = tclip.preprocess(image)
    every_query = to_original(np.asarray(tclip.maps(tclip.params, pixels[None], encoded.queries.take(encoded.rows),
                                                    np.arange(5)[None]).maps[0]), geometry)
    for query, (map_result, reference) in enumerate(zip(maps, every_query)):
        np.testing.assert_allclose(map_result.heatmap, reference, atol=1e-6, rtol=0, err_msg=f"query {query}")
        assert map_result.box == heatmap_box(reference) and abs(map_result.tau - gmm_threshold(reference).tau) < 1e-6
    assert [m.text for m in maps] == ["dog", "dog", "runs", "dog", "dog runs"]
    # `image_maps`: the same device and resize steps for any queries, with the image's extras (TCLIP's S).
    heatmaps, extras = tclip.image_maps(image, encoded.queries.take(encoded.rows))
    np.testing.assert_allclose(heatmaps, every_query, atol=1e-6, rtol=0)
    np.testing.assert_allclose(tclip.prompt_similarity(encoded, 1, extras), two.similarity, atol=1e-6, rtol=0)


def held_bytes(array: np.ndarray) -> int:
    """The bytes of the array whose memory `array` keeps alive (itself, or the array it is a view of)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    assert array.base is None, f"memory held by a {type(array.base).__name__}"
    return array.nbytes


@pytest.mark.parametrize("name", ["scene_224", "scene_wide_320x240"])  # soft maps blurred exactly / by the pyramid
def test_each_map_of_a_result_holds_only_its_own_memory(tiny_clip, fixture_images, name):
    """Equal queries (a one-word prompt's word and phrase, a repeated prompt, a word opening two prompts) share one
    map; every map and soft map is an [H, W] array of its own: a map kept over many images keeps H*W values, not the
    image's Q maps nor a padded blur buffer."""
    image = fixture_images[name]
    height, width = image.shape[:2]
    result = TCLIP(tiny_clip, Settings(translations=1)).explain(image, ["red", "red", "red circle", "red square"])
    one, again, circle, square = result.prompts
    assert one.phrase.heatmap is one.word_maps[0].heatmap is again.phrase.heatmap is circle.word_maps[0].heatmap
    assert one.phrase.soft is again.phrase.soft is square.word_maps[0].soft
    maps = [m for p in result.prompts for m in (*p.word_maps, p.phrase)]
    distinct = {id(a): a for m in maps for a in (m.heatmap, m.soft)}.values()
    assert len(distinct) == 2 * 5  # red, circle, square, "red circle", "red square"
    for array in distinct:
        assert array.shape == (height, width) and held_bytes(array) == height * width * array.itemsize


def test_result_arrays_are_read_only_so_no_edit_reaches_a_result_sharing_them(tiny_clip, fixture_images):
    """Equal queries share one array (a one-word prompt's word and phrase, a repeated prompt, a word opening two
    prompts): an edit in place would change every result holding it, so none can be made; a copy is editable."""
    image = fixture_images["scene_wide_320x240"]
    result = TCLIP(tiny_clip, Settings(translations=1)).explain(image, ["red", "red", "red circle"])
    one, again, circle = result.prompts
    assert one.phrase.heatmap is again.phrase.heatmap is circle.word_maps[0].heatmap
    before = circle.word_maps[0].heatmap.copy()
    arrays = [a for p in result.prompts for m in (*p.word_maps, p.phrase) for a in (m.heatmap, m.soft)]
    for array in [*arrays, result.image, *(p.similarity for p in result.prompts)]:
        assert not array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0] = 0
        with pytest.raises(ValueError, match="read-only"):
            array *= 2
    np.testing.assert_array_equal(circle.word_maps[0].heatmap, before)
    edited = one.phrase.heatmap.copy()  # a copy is the user's to edit
    edited[:] = 0
    np.testing.assert_array_equal(again.phrase.heatmap, before)


@pytest.fixture(scope="module")
def no_translation(tiny_clip):
    return TCLIP(tiny_clip, Settings(translations=1))


def test_a_results_text_is_short_and_names_what_it_holds(no_translation, tiny_clip):
    """A notebook keeps a cell's value as text beside the explorer: an ImageResult's was the dataclass's, every array
    of it, 20 kB for one prompt. Its text, and its prompts' and maps', name what they hold in a line that does not
    grow with the image."""
    from tclip_jax.methods.base import REPR_PROMPTS
    from tclip_jax.methods.similarity import Similarity

    image = np.zeros((240, 320, 3), np.uint8)
    result = no_translation.explain(image, ["a red circle.", "cat"])
    assert repr(result) == ("<ImageResult TCLIP K=1 on tiny_openai_clip.npz: image size_hw (240, 320), 2 prompts: "
                            "'a red circle.' (words a, red, circle); 'cat' (words cat)>")
    prompt = result.prompts[0]
    assert repr(prompt) == "<PromptResult 'a red circle.' (words a, red, circle)>"
    red = prompt.word_maps[1]
    x1, y1, x2, y2 = (int(v) for v in red.box)
    fallback = "" if red.gmm.fallback is None else f" (GMM fallback: {red.gmm.fallback})"
    assert repr(red) == (f"<MapResult 'red': map 240x320 in [{red.heatmap.min():.4g}, {red.heatmap.max():.4g}], "
                         f"τ {red.tau:.4g}{fallback}, box ({x1}, {y1}, {x2}, {y2}), soft map>")
    many = [f"prompt {i}" for i in range(REPR_PROMPTS + 3)]
    baseline = Similarity(tiny_clip).explain(np.zeros((2000, 3000, 3), np.uint8), many)
    text = repr(baseline)
    assert len(text) < 500 and "array" not in text
    assert text.endswith(f"'prompt {REPR_PROMPTS - 1}' (no per-word maps); ... (3 more)>")
    assert repr(baseline.prompts[0].phrase).startswith("<MapResult 'prompt 0': map 2000x3000 in [")


def test_a_class_name_glued_to_template_letters_takes_the_word_it_is_part_of(no_translation):
    """"a {}'s photo" makes "golden retriever's": the class query is the mean of "golden" and "retriever's", each
    word's own query as explain maps it (a word running past the name's span was dropped, or, alone, refused)."""
    from tclip_jax.methods.base import Query
    from tclip_jax.sweep.runner import class_queries

    def word(prompt, text):  # a word's own query: the span of that word
        start = prompt.index(text)
        return no_translation.encode([Query(prompt, (start, start + len(text)))]).per_query[0]

    golden, dog = class_queries(["golden retriever", "dog"], "a {}'s photo")
    expected = (word(golden.prompt, "golden") + word(golden.prompt, "retriever's")) / 2
    np.testing.assert_allclose(no_translation.encode([golden]).per_query[0], expected, atol=1e-6)
    np.testing.assert_allclose(no_translation.encode([dog]).per_query[0], word(dog.prompt, "dog's"), atol=1e-6)
    # Overlap, not touching: a span that ends where the next word begins ("dog," then "cat") does not take it.
    touching = no_translation.encode([Query("dog,cat", (0, 4)), Query("dog,cat", (0, 3))]).per_query
    np.testing.assert_array_equal(touching[0], touching[1])


@pytest.mark.parametrize("span", [(5, 2), (-1, 3), (0, 13), (100, 200), (1.0, 2), (True, 2), (1,), 5, "ab"])
def test_a_span_that_is_not_characters_of_its_prompt_is_refused_in_one_line(span):
    with pytest.raises(ValueError, match=r"^span .+ of prompt 'a red circle' is not characters \[start, end\) of it: "
                                         r"two integers, 0 <= start <= end <= 12$"):
        Query("a red circle", span)


def test_a_span_maps_the_words_that_overlap_it_and_says_so_when_there_are_none(no_translation):
    query = Query("a red circle", (np.int64(3), np.int64(4)))  # "e" of "red": the word it is part of, whole
    assert query.span == (3, 4) and all(type(v) is int for v in query.span)
    red, part, whole = no_translation.encode([Query("a red circle", (2, 5)), query, Query("a red circle", (0, 12))]
                                             ).per_query
    np.testing.assert_array_equal(part, red)
    assert np.abs(whole - red).max() > 1e-3  # (the phrase's query: another)
    for span in ((1, 2), (5, 5), (12, 12)):  # a space, nothing, the end
        with pytest.raises(ValueError, match=r"^prompt 'a red circle' has no words to explain that overlap characters "
                                             rf"\[{span[0]}, {span[1]}\)$"):
            no_translation.encode([Query("a red circle", span)])


@pytest.mark.parametrize("prompts,message", [
    ("", "has no words"),
    ("?! ... --", "has no words"),
    (["a cat", "."], "has no words"),
    ([], "no prompts"),
])
def test_prompts_without_words_are_rejected_before_the_image_pass(no_translation, fixture_images, vit_calls,
                                                                   prompts, message):
    with pytest.raises(ValueError, match=message):
        no_translation.explain(fixture_images["scene_224"], prompts)
    assert not vit_calls


@pytest.mark.parametrize("prompts,message", [
    (b"cat", r"^prompts must be str, got bytes b'cat': decode them first, e.g. prompt.decode\('utf-8'\)$"),
    (["a dog", b"cat"], r"^prompts must be str, got bytes b'cat': decode them first, e.g. prompt.decode\('utf-8'\)$"),
    (None, r"^prompts are required: give a str or a list of str \(got None\)$"),
    (3, r"^prompts must be a str or a list of str, got int$"),
])
def test_prompts_that_are_not_text_are_refused_in_one_line_that_says_what_to_give(no_translation, fixture_images,
                                                                                 vit_calls, prompts, message):
    """bytes were iterated as their values ('got int: 99'), None and a number failed as 'not iterable'."""
    with pytest.raises(TypeError, match=message):
        no_translation.explain(fixture_images["scene_224"], prompts)
    assert not vit_calls


def test_prompt_longer_than_the_context(tiny_clip, fixture_images, vit_calls):
    long_prompt = " ".join(["cat"] * 100)  # 100 pieces: SOT + 100 + EOT > 77
    small_image = fixture_images["scene_224"][::4, ::4]  # 75 maps: a small original keeps post-processing quick
    with pytest.raises(ValueError, match="context length 77"):
        TCLIP(tiny_clip, Settings(translations=1)).explain(small_image, long_prompt)
    assert not vit_calls
    truncating = TCLIP(tiny_clip, Settings(translations=1, truncate=True))
    with pytest.warns(UserWarning, match="keeping the first 75 pieces"):
        result = truncating.explain(small_image, long_prompt)
    explained = result.prompts[0]
    assert len(explained.tokens.pieces) == len(explained.words) == 75
    assert explained.tokens.token_ids[76] == tiny_clip.tokenizer.eot_id
    # every word past the cut: the prompt has words, none within the context ("has no words" alone read as untrue)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"has no words to explain within the model's "
                                                                   r"context \(truncate cut off every word\)$"):
        truncating.explain(small_image, "! " * 80 + "dog")


def test_unreadable_files_are_named_in_the_error(no_translation, tmp_path):
    not_an_image = tmp_path / "notes_not_an_image.png"
    not_an_image.write_text("this is text, not a PNG")
    with pytest.raises(ValueError, match="notes_not_an_image.png"):
        no_translation.explain(not_an_image, "a cat")
    with pytest.raises(FileNotFoundError, match="missing_picture.jpg"):
        no_translation.explain(tmp_path / "missing_picture.jpg", "a cat")


def test_one_pixel_image(no_translation):
    result = no_translation.explain(np.array([[[200, 10, 10]]], np.uint8), "a red dot")
    assert result.geometry.original_hw == (1, 1)
    for m in result.prompts[0].word_maps:
        # A single value: the mixture fit falls back to 'constant' and the box is the whole (1 x 1) image.
        assert m.heatmap.shape == m.soft.shape == (1, 1)
        assert m.gmm.fallback == "constant" and m.tau == pytest.approx(float(m.heatmap[0, 0]))
        assert tuple(m.box) == (0, 0, 1, 1)


@pytest.mark.parametrize("translations", [1, 25])
def test_constant_image(tiny_clip, translations):
    image = np.full((90, 130, 3), 128, np.uint8)
    result = TCLIP(tiny_clip, Settings(translations=translations)).explain(image, "a grey wall")
    for m in list(result.prompts[0].word_maps) + [result.prompts[0].phrase]:
        # The model still sees position (positional embeddings, and the padding of shifted copies), so the maps
        # need not be flat; they must be finite, with tau in their range and a box inside the image.
        assert m.heatmap.shape == (90, 130) and np.isfinite(m.heatmap).all() and np.isfinite(m.soft).all()
        assert m.heatmap.min() <= m.tau <= m.heatmap.max()
        assert 0 <= m.box.x1 < m.box.x2 <= 130 and 0 <= m.box.y1 < m.box.y2 <= 90


def test_settings_name_a_bad_protocol_or_box_rule():
    with pytest.raises(ValueError, match="input_protocol must be one of"):
        Settings(input_protocol="stretch")
    with pytest.raises(ValueError, match=r"box_rule must be one of \('component', 'contour'\)"):
        Settings(box_rule="biggest")


@pytest.mark.parametrize("values,message", [
    ({"translations": 17}, r"translations must be 1 \(off\) or 25"),
    ({"translations": 2.0}, "translations must be an integer"),
    ({"scale_fractions": (0.5,), "translations": 25}, r"translations must be 1 \(off\) or 9"),
    ({"scale_fractions": (0.0,)}, r"scale_fractions must lie in \(0, 1\]"),
    ({"scale_fractions": [0.25, 0.25]}, "scale_fractions must differ, got 0.25,0.25$"),  # was refused once built
    ({"trim": 0.5}, r"trim must lie in \[0, 0.5\)"),
    ({"sigma": float("nan")}, "sigma must be a finite number"),
    ({"sigma": -1.0}, r"sigma must lie in \[0, 1000\] \(pixels\), got -1$"),
    ({"sigma": 1e308}, r"sigma must lie in \[0, 1000\] \(pixels\), got 1e\+308$"),  # overflowed in the blur
    ({"sigma": 1e9}, r"sigma must lie in \[0, 1000\] \(pixels\), got 1e\+09$"),    # ran out of memory
    ({"sigma": 1000.5}, r"sigma must lie in \[0, 1000\]"),
    ({"colour": "red"}, "unknown setting 'colour'; known settings: box_rule, truncate, translations"),
])
def test_settings_refuse_bad_values_when_made(values, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_dict(values)


def test_settings_keep_every_sigma_from_0_to_its_limit():
    for sigma in (None, 0, 0.5, 4.48, 100, 999.99, 1000):
        assert Settings(sigma=sigma).sigma == sigma


def test_settings_round_trip_and_follow_the_scale_fractions():
    assert Settings().translations == 25
    two_scales = Settings(scale_fractions=(0.25, 0.5))
    assert two_scales.translations == 17
    assert len(translation_offsets(32, two_scales.scale_fractions, two_scales.translations)) == 17
    assert Settings.from_dict(two_scales.to_dict()) == two_scales
    # Replacing the fractions brings their full set (the 25 was never asked for); off stays off.
    assert Settings().replace(scale_fractions=(0.5,)).translations == 9
    assert two_scales.replace(scale_fractions=(0.25, 0.5, 0.75)).translations == 25
    assert Settings(translations=1).replace(scale_fractions=(0.5,)).translations == 1
    with pytest.raises(ValueError, match=r"translations must be 1 \(off\) or 9"):
        Settings().replace(scale_fractions=(0.5,), translations=25)  # named together, they must agree
    assert Settings.parse_assignments(["trim=0.1", "sigma=none", "scale-fractions=0.5"]) == \
        {"trim": 0.1, "sigma": None, "scale_fractions": (0.5,)}
    with pytest.raises(ValueError, match="option trim is given twice"):  # not the last one silently
        Settings.parse_assignments(["trim=0.1", "trim=0.3"])


@pytest.mark.parametrize("overlap, order", [
    (True, ["device", "device", "host", "host", "device", "host", "host", "host"]),
    (False, ["device", "host", "host", "device", "host", "host", "device", "host"]),
])
def test_explain_batch_overlaps_on_request_and_equals_explain(no_translation, fixture_images, monkeypatch,
                                                              overlap, order):
    """With overlap (the default), batch i+1 is dispatched to the device before batch i's host step; without,
    after it. Results equal one image at a time either way."""
    images = [list(fixture_images.values())[i % len(fixture_images)] for i in range(5)]
    alone = [no_translation.explain(image, PROMPTS) for image in images]
    events = []
    method = TCLIP(no_translation.clip, no_translation.settings)
    jitted, host_step = method.jitted_maps, method._image_result
    monkeypatch.setattr(method, "jitted_maps", lambda *a: events.append("device") or jitted(*a), raising=False)
    monkeypatch.setattr(method, "_image_result", lambda *a: events.append("host") or host_step(*a))
    options = {} if overlap else {"overlap": False}
    batched = list(method.explain_batch(images, PROMPTS, batch_size=2, **options))
    assert events == order
    for one, many in zip(alone, batched, strict=True):
        for p, q in zip(one.prompts, many.prompts, strict=True):
            for a, b in zip(p.word_maps + (p.phrase,), q.word_maps + (q.phrase,), strict=True):
                np.testing.assert_allclose(b.heatmap, a.heatmap, atol=1e-6)
                assert b.box == a.box


def test_explain_batch_gives_a_batchs_results_before_the_next_batch_is_done(no_translation, fixture_images,
                                                                           monkeypatch):
    """An accelerator runs its work in the order it was dispatched, and XLA:CPU runs one thread's dispatches so.
    Here the second batch's device work cannot finish until the first image's result has reached the caller: the
    host step of the first batch must not queue anything behind the second (a wait on it would time out and
    fail). XLA:CPU does not always run a program asynchronously (a small one whose inputs are ready, or one it
    starts at once, runs while the caller still dispatches it, whose wait would then hold the caller itself):
    such a try holds nothing and is tried again, and a test where no try was held fails. On several devices
    (`test_explain_batch_splits_its_batches_over_the_local_devices` runs it on two) one share of the second batch
    is held."""
    images = [list(fixture_images.values())[i % len(fixture_images)] for i in range(4)]
    method = TCLIP(no_translation.clip, no_translation.settings)
    jitted, state = method.jitted_maps, {}

    def gate(maps):
        if state["dispatching"].is_set():  # run within the dispatch: holding it would hold the caller
            return maps
        state["held"] = True
        if not state["first_result"].wait(timeout=60):
            raise RuntimeError("the first result waited for the second batch")
        return maps

    def held_maps(*args):
        out = method.maps_per_image(*args)
        return out.replace(maps=jax.pure_callback(gate, jax.ShapeDtypeStruct(out.maps.shape, out.maps.dtype),
                                                  out.maps))

    held = jax.jit(held_maps)

    shares = min(jax.local_device_count(), 2)  # dispatches per batch of 2 (one per device it is split over)
    lock = threading.Lock()

    def maps(*args):
        with lock:  # several devices: each share is dispatched from a thread of its own
            state["dispatched"] += 1
            first_of_second_batch = state["dispatched"] == shares + 1
        if not first_of_second_batch:
            return jitted(*args)
        state["dispatching"].set()
        try:
            return held(*args)
        finally:
            state["dispatching"].clear()

    monkeypatch.setattr(method, "jitted_maps", maps, raising=False)
    for _ in range(8):
        state.update(first_result=threading.Event(), dispatching=threading.Event(), dispatched=0, held=False)
        results = method.explain_batch(images, PROMPTS, batch_size=2)
        next(results)
        assert state["dispatched"] == 2 * shares  # the first result came while the second batch was dispatched
        state["first_result"].set()
        assert len(list(results)) == 3
        if state["held"]:
            break
    assert state["held"], "XLA:CPU ran the second batch within its dispatch in all 8 tries: nothing was held"


def test_the_parameters_are_put_on_a_device_once_and_again_when_a_leaf_is_replaced(no_translation):
    """explain_batch's maps take the parameters on their device (`LoadedClip.params_on`): put there by the first
    call and kept, for every method of the model (loaded parameters are numpy, which each jitted call copied to the
    device again), put again where the tree has changed."""
    import dataclasses

    params = jax.tree_util.tree_map(lambda a: a, no_translation.clip.params)  # a tree of its own, the same leaves
    method = TCLIP(dataclasses.replace(no_translation.clip, params=params), no_translation.settings)
    device = jax.local_devices()[0]
    first = method.params_on(device)
    assert method.params_on(device) is first and first["text"]["projection"].devices() == {device}
    assert METHODS["similarity"](method.clip).params_on(device) is first
    np.testing.assert_array_equal(first["text"]["projection"], params["text"]["projection"])
    params["text"]["projection"] = params["text"]["projection"] * 2
    again = method.params_on(device)
    assert again is not first
    np.testing.assert_array_equal(again["text"]["projection"], params["text"]["projection"])


def test_eclip_takes_its_projections_to_a_device_once_and_shares_the_models_weights(no_translation, fixture_images,
                                                                                     monkeypatch):
    """ECLIP's `params` are a tree of its own (the model's and the projections): it was put on the device once per
    explain_batch call, sweep, explain and text chunk, then (this session) kept whole, a second copy of CLIP's
    weights on each device. The projections are put there once for two explain_batch calls of three batches each,
    their prompts' encoding and an explain, and the model's weights are the model's own copy there, with the numpy
    parameters' values."""
    with pytest.warns(UserWarning, match="no trained projections"):
        method = METHODS["eclip"](no_translation.clip)
    put, transfers = jax.device_put, []
    monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: (transfers.append(x) if isinstance(x, dict)
                                                               and set(x) == {"image", "text"} else None)
                        or put(x, *a, **k))
    images = [list(fixture_images.values())[i % len(fixture_images)] for i in range(5)]
    for _ in range(2):
        assert len(list(method.explain_batch(images, PROMPTS, batch_size=2))) == 5  # three batches
    method.explain(images[0], PROMPTS)
    device = jax.local_devices()[0]
    on_device = method.params_on(device)
    assert len(transfers) == 1 and on_device["clip"] is method.clip.params_on(device)
    kept = jax.tree_util.tree_leaves(on_device)
    assert len(kept) == len(jax.tree_util.tree_leaves(method.params))
    for on_device, leaf in zip(kept, jax.tree_util.tree_leaves(method.params)):
        np.testing.assert_array_equal(on_device, leaf, strict=True)


@pytest.mark.parametrize("listed", [True, False])
def test_a_dispatching_thread_runs_under_the_callers_x64_mode_and_matmul_precision(monkeypatch, listed):
    """JAX keeps x64 mode and the matmul precision per thread and a new thread starts with the global values (read
    here in a plain thread); `thread_config` gives another thread the caller's, from JAX's list of settings or, in a
    JAX without one (`config_states` removed here), the two read through the public API."""
    from jax._src import config
    from tclip_jax.methods.devices import thread_config

    if not listed:
        monkeypatch.delattr(config, "config_states")

    def in_thread(context) -> dict:
        seen = {}

        def read():
            with context():
                seen.update(x64=jax.config.jax_enable_x64, precision=jax.config.jax_default_matmul_precision)

        thread = threading.Thread(target=read)
        thread.start(), thread.join()
        return seen

    with jax.enable_x64(True), jax.default_matmul_precision("highest"):
        carried = thread_config()
        plain = in_thread(contextlib.nullcontext)
    assert plain == {"x64": jax.config.jax_enable_x64, "precision": jax.config.jax_default_matmul_precision}
    assert plain["x64"] is False and in_thread(carried) == {"x64": True, "precision": "highest"}
    if listed:  # a thread guard is its thread's: carried, the other thread's call raised in JAX
        with jax.thread_guard(True), jax.enable_x64(True):
            carried = thread_config()
            assert in_thread(carried)["x64"] is True


ONE_DEVICE_RESULTS = "TCLIP_TEST_ONE_DEVICE_RESULTS"  # set in the two-device process the test below starts


def _result_arrays(results) -> dict[str, np.ndarray]:
    """Every array of the results, and each map's τ and box as arrays, by name."""
    arrays = {}
    for i, result in enumerate(results):
        for p, prompt in enumerate(result.prompts):
            arrays[f"{i}/{p}/similarity"] = prompt.similarity
            for m, found in enumerate(prompt.word_maps + (prompt.phrase,)):
                arrays[f"{i}/{p}/{m}/heatmap"], arrays[f"{i}/{p}/{m}/soft"] = found.heatmap, found.soft
                arrays[f"{i}/{p}/{m}/tau"], arrays[f"{i}/{p}/{m}/box"] = np.array(found.tau), np.array(found.box or ())
    return arrays


def test_explain_batch_splits_its_batches_over_the_local_devices(no_translation, fixture_images, monkeypatch,
                                                                 tmp_path, fixtures_dir):
    """On one device this test explains 3 images in one batch of 3, then runs itself, and the test above that holds
    a second batch on the device, in a process with two host devices. There the batch is split 2 + 1 over both
    devices, dispatched from a thread each at the caller's matmul precision, and every map, soft map, τ, box and
    similarity S (from the per-image extras) is bit for bit the one-device process's, and so are those of a float64
    model explained inside `jax.enable_x64` (the threads run in x64 mode too: without it they ran float32 matmuls
    recorded as float64); a one-image explain runs on
    the first device from the calling thread (no thread pool), a `jax.default_device` context keeps a batch on its
    device (one where explain_batch is called: its results read outside the context ran on all devices), and no
    dispatching thread outlives a call ended early."""
    from tclip_jax.methods.base import matmul_precision

    images = [list(fixture_images.values())[i % len(fixture_images)] for i in range(3)]
    method = TCLIP(no_translation.clip, no_translation.settings)
    jitted, dispatched = method.jitted_maps, []

    def noting(*args):
        dispatched.append((len(args[1]), {d.id for d in args[1].devices()}, matmul_precision(),
                           threading.current_thread() is threading.main_thread()))
        return jitted(*args)

    monkeypatch.setattr(method, "jitted_maps", noting, raising=False)
    with jax.default_matmul_precision("float32"):  # "highest" by another name: the threads must run at it too
        results = list(method.explain_batch(images, PROMPTS, batch_size=3))
    assert all(result.run["model"]["matmul_precision"] == "highest" for result in results)
    with jax.enable_x64(True):
        x64 = TCLIP(load_clip(fixtures_dir / "tiny_openai_clip.npz", dtype=jnp.float64), no_translation.settings)
        x64_results = list(x64.explain_batch(images, PROMPTS, batch_size=3))
    assert all(result.run["model"]["matmul_dtype"] == "float64" for result in x64_results)
    arrays = {**_result_arrays(results), **{f"x64/{k}": v for k, v in _result_arrays(x64_results).items()}}
    reference = os.environ.get(ONE_DEVICE_RESULTS)
    if reference is None:
        assert jax.local_device_count() == 1 and dispatched == [(3, {0}, "highest", True)]
        np.savez(tmp_path / "one_device.npz", **arrays)
        env = {**os.environ, ONE_DEVICE_RESULTS: str(tmp_path / "one_device.npz"),
               "XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"}  # conftest's too
        tests = pathlib.Path(__file__)
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), "-k",
                              "splits_its_batches_over_the_local_devices or batchs_results_before_the_next_batch"],
                             cwd=tests.parents[1], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
        return
    assert jax.local_device_count() == 2
    # Images 0 and 1 on device 0; image 2 and a padded copy of it on device 1.
    assert sorted(dispatched, key=str) == [(2, {0}, "highest", False), (2, {1}, "highest", False)]
    with np.load(reference) as one_device:
        assert sorted(arrays) == sorted(one_device.files)
        for name, array in arrays.items():
            np.testing.assert_array_equal(array, one_device[name], err_msg=name, strict=True)
    dispatched.clear()
    method.explain(images[0], PROMPTS)
    assert dispatched == [(1, {0}, None, True)]  # JAX's default precision, out of the context
    dispatched.clear()
    with jax.default_device(jax.local_devices()[1]):  # as for any JAX call: that device alone
        assert len(list(method.explain_batch(images, PROMPTS, batch_size=3))) == 3
        made_inside = method.explain_batch(images, PROMPTS, batch_size=3)
    assert len(list(made_inside)) == 3  # read outside the context: the devices of the call's
    assert dispatched == [(3, {1}, None, True)] * 2
    early = method.explain_batch(images, PROMPTS, batch_size=2)
    next(early)
    early.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("tclip-dispatch")]


def test_explain_compiles_nothing_for_images_of_another_size_and_its_maps_are_the_sweeps(
        no_translation, compiled_programs):
    """explain resizes each image's maps to the image on the host, in numpy, as a sweep's host step does: once the
    first image has compiled its programs, images of other sizes (one model input: the whole protocol) compile
    nothing. Resized on the device, each size compiled a resample and a slice and kept them (100 photo sizes: 209
    programs, 681 MB). Each map is `to_original` of the maps the device gave, bit for bit: one computation with the
    sweep's, which resizes its fetched maps so (`sweep.runner._evaluate`)."""
    rng = np.random.default_rng(0)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in [(40, 30), (41, 57), (64, 33), (29, 90)]]
    encoded = no_translation.encode_prompts(PROMPTS)
    next(no_translation.explain_batch(images[:1], encoded))
    compiled_programs.clear()
    results = list(no_translation.explain_batch(images[1:], encoded, batch_size=1))
    assert compiled_programs == []
    slots, rows = no_translation.query_slots(encoded.queries)
    for image, result in zip(images[1:], results, strict=True):
        _, pixels, geometry = no_translation.preprocess(image)
        device_maps = np.asarray(no_translation.jitted_maps(no_translation.params, pixels[None], slots,
                                                            rows[None]).maps)
        expected = to_original(device_maps[0, :len(encoded.queries)], geometry)
        assert expected.shape[1:] == image.shape[:2]
        maps = [m for p in result.prompts for m in p.word_maps] + [p.phrase for p in result.prompts]
        assert len(maps) == len(encoded.rows)  # words, then phrases: the rows' order
        for m, row in zip(maps, encoded.rows):
            np.testing.assert_array_equal(m.heatmap, expected[row])


@pytest.mark.parametrize("weighting", ["none", "last"])  # token_embeddings, token_embeddings_and_attention
def test_encoding_1_to_12_prompts_compiles_the_text_tower_once_and_gives_each_prompts_own_embeddings(
        tiny_clip, compiled_programs, weighting):
    """TCLIP runs the text tower on chunks of PROMPT_CHUNK token rows of one shape: prompts of one length compile it
    once however many there are (2-12 prompts compile nothing after 1; jitted on all the rows at once, each new prompt
    count compiled it again), and each prompt's embeddings and weights are those of the text tower on its row alone,
    bit for bit."""
    method = TCLIP(tiny_clip, Settings(translations=1, token_weighting=weighting))
    jitted = token_embeddings if weighting == "none" else token_embeddings_and_attention
    words = ["red", "blue", "green", "circle", "square", "star", "left", "right", "above", "below", "small", "large"]
    encoded = []
    for count in range(1, 13):
        tokens = method.tokenize([f"a {w} thing" for w in words[:count]])
        encoded.append((tokens, *method.embed_prompts(tokens)))
        if count == 1:  # (unless an earlier test compiled it) the one program of this row length
            compiled_programs.clear()
    assert [name for name in compiled_programs if jitted.__name__ in name] == []
    alone = {}
    for tokens, embeds, weights in encoded:
        length = embeds.shape[1]  # one row length: SOT, three pieces, EOT, cut to a multiple of 8
        for i, t in enumerate(tokens):
            if i not in alone:
                out = jax.device_get(jitted(method.clip.model, method.params, t.token_ids[None, :length]))
                alone[i] = (out, None if weights is None else eot_weights(out[1][0], t.eot_position, weighting))
            expected, expected_weights = alone[i]
            np.testing.assert_array_equal(embeds[i], expected[0] if weights is None else expected[0][0])
            if weights is not None:
                np.testing.assert_array_equal(weights[i], expected_weights)


def test_explain_batch_puts_images_of_other_input_shapes_in_other_batches(tiny_clip, fixture_images, monkeypatch):
    """An input protocol that keeps the aspect ratio gives a 240 x 320 image another input than a 224 x 224 one:
    consecutive images of one shape share a batch, and the results are those of one image at a time."""
    method = TCLIP(tiny_clip, Settings(translations=1, input_protocol="patch_multiple"))
    square, wide = fixture_images["scene_224"], fixture_images["scene_wide_320x240"]
    images = [square, fixture_images["noise_224"], wide, wide, square]
    alone = [method.explain(image, PROMPTS) for image in images]
    jitted, batches = method.jitted_maps, []
    monkeypatch.setattr(method, "jitted_maps", lambda *a: batches.append(a[1].shape[:3]) or jitted(*a), raising=False)
    batched = list(method.explain_batch(images, PROMPTS, batch_size=3))
    assert [b[0] for b in batches] == [2, 2, 1] and batches[0][1:] == batches[2][1:] != batches[1][1:]
    for one, many in zip(alone, batched, strict=True):
        for p, q in zip(one.prompts, many.prompts, strict=True):
            for a, b in zip(p.word_maps + (p.phrase,), q.word_maps + (q.phrase,), strict=True):
                np.testing.assert_allclose(b.heatmap, a.heatmap, atol=1e-6)
                assert b.box == a.box


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("bad_at, expected", [(4, 4), (5, 5)])  # first of a batch; second, after a good one
def test_explain_batch_gives_every_image_before_one_it_cannot_read_then_names_it(no_translation, fixture_images,
                                                                                  overlap, bad_at, expected):
    images = [list(fixture_images.values())[i % len(fixture_images)] for i in range(6)]
    images[bad_at] = np.full((8, 8, 3), 5.0)  # floats beyond [0, 1]
    got = []
    with pytest.raises(ValueError, match=rf"^image {bad_at}: float image values must lie in \[0, 1\]"):
        for result in no_translation.explain_batch(images, PROMPTS, batch_size=2, overlap=overlap):
            got.append(result)
    assert len(got) == expected
    for result, image in zip(got, images):
        assert result.prompts[0].word_maps[0].heatmap.shape == image.shape[:2]
    with pytest.raises(ValueError, match=r"^float image values must lie"):  # one image: no place to name
        no_translation.explain(images[bad_at], PROMPTS)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("source", ["generator", "preprocess"])
def test_explain_batch_gives_every_image_read_before_any_error_then_raises_it(no_translation, fixture_images,
                                                                             monkeypatch, source, overlap):
    """An error that is not a bad image's (a generator's own, or a RuntimeError while preprocessing) comes after
    the results of every image read before it, as a bad file's does: 6 images, then the error, with batches of 4
    (the last batch is partial when the error comes)."""
    images = [list(fixture_images.values())[i % len(fixture_images)].copy() for i in range(7)]

    class LoaderFailed(RuntimeError):
        pass

    def generator():
        for index, image in enumerate(images):
            if index == 6:
                raise LoaderFailed("the loader failed on image 6")
            yield image

    method = TCLIP(no_translation.clip, no_translation.settings)
    if source == "preprocess":
        preprocess = method.preprocess

        def failing(image):
            if image is images[6]:
                raise LoaderFailed("the loader failed on image 6")
            return preprocess(image)

        monkeypatch.setattr(method, "preprocess", failing)
    got = []
    with pytest.raises(LoaderFailed, match="^the loader failed on image 6$"):
        for result in method.explain_batch(generator() if source == "generator" else images, PROMPTS,
                                           batch_size=4, overlap=overlap):
            got.append(result)
    assert len(got) == 6
    for result, image in zip(got, images):
        np.testing.assert_array_equal(result.image, image)


@pytest.mark.parametrize("kind", ["str", "path", "bytes", "array", "grey array", "jax array", "PIL"])
def test_explain_batch_refuses_one_image_instead_of_a_sequence(no_translation, fixture_images, tmp_path, kind):
    """Iterated, one image would be its characters (a path), its rows (an array) or its byte values: refused with
    what to call instead. A stack [N, H, W, C] is a sequence of images."""
    from PIL import Image

    image = fixture_images["scene_wide_320x240"]
    path = tmp_path / "one.png"
    Image.fromarray(image).save(path)
    one = {"str": str(path), "path": path, "bytes": path.read_bytes(), "array": image, "grey array": image[..., 0],
           "jax array": jax.numpy.asarray(image), "PIL": Image.fromarray(image)}[kind]
    with pytest.raises(TypeError, match=r"^explain_batch takes a sequence or iterable of images, got .*; explain "
                                        r"takes one image$"):
        next(no_translation.explain_batch(one, PROMPTS))
    stacked = list(no_translation.explain_batch(np.stack([image, image[::-1]]), PROMPTS))
    assert len(stacked) == 2
    np.testing.assert_array_equal(stacked[0].image, image)
    np.testing.assert_array_equal(stacked[1].image, image[::-1])


def test_explain_batch_takes_a_numpy_integer_batch_size(no_translation, fixture_images, monkeypatch):
    images = [list(fixture_images.values())[i % len(fixture_images)] for i in range(3)]
    method = TCLIP(no_translation.clip, no_translation.settings)
    jitted, batches = method.jitted_maps, []
    monkeypatch.setattr(method, "jitted_maps", lambda *a: batches.append(len(a[1])) or jitted(*a), raising=False)
    assert len(list(method.explain_batch(images, PROMPTS, batch_size=np.int64(2)))) == 3
    assert batches == [2, 1]


def test_explain_batchs_default_batch_gives_every_device_a_share_of_each_batch(no_translation, fixture_images,
                                                                               monkeypatch):
    """By default a batch is the smallest multiple of the device count that is at least 4 (`default_batch_size`):
    4 on one, two or four devices, 6 on three (max(4, devices) split 4 as 2 + 2, one device idle every batch), one
    per device on more (a TPU v2-8: 8, not 4 of its 8); each device takes an equal share, the last batch's padded."""
    import tclip_jax.methods.base as base

    method = TCLIP(no_translation.clip, no_translation.settings)
    images = [next(iter(fixture_images.values()))] * 7
    jitted, batches, sizes = method.jitted_maps, method._input_batches, []
    calls = []  # images per dispatched program
    monkeypatch.setattr(method, "jitted_maps", lambda *a: calls.append(len(a[1])) or jitted(*a), raising=False)
    monkeypatch.setattr(method, "_input_batches", lambda images, size: sizes.append(size) or batches(images, size))
    for devices, size, dispatched in [(1, 4, [4, 3]), (2, 4, [2, 2, 2, 2]), (3, 6, [2, 2, 2, 1]), (6, 6, [1] * 7)]:
        calls.clear(), sizes.clear()
        monkeypatch.setattr(base, "batch_devices", lambda: [jax.devices()[0]] * devices)
        assert len(list(method.explain_batch(images, PROMPTS))) == 7
        assert sizes == [size] and calls == dispatched, devices


@pytest.mark.parametrize("bad, message", [({"batch_size": 0}, "batch_size must be a positive integer"),
                                          ({"batch_size": np.int64(0)}, "batch_size must be a positive integer"),
                                          ({"batch_size": 2.0}, "batch_size must be a positive integer"),
                                          ({"batch_size": True}, "batch_size must be a positive integer"),
                                          ({"overlap": "yes"}, "overlap must be True or False")])
def test_explain_batch_rejects_bad_options(no_translation, fixture_images, bad, message):
    with pytest.raises(ValueError, match=message):
        next(no_translation.explain_batch(list(fixture_images.values())[:1], PROMPTS, **bad))


@pytest.mark.parametrize("name", ["tclip", "rollout"])
def test_a_centre_crops_cut_off_pixels_move_no_threshold_and_no_box(tiny_clip, fixture_images, name):
    # The maps fill the pixels the crop cut off (columns 0-39 and 280-319 of this 320x240 image) with their
    # minimum; tau, Otsu's threshold and the box are those of the part the model saw, as if the image were cut.
    from test_postprocess import _reference_box
    from tclip_jax.methods import METHODS

    method = METHODS[name](tiny_clip, METHODS[name].Settings.from_dict(
        {"translations": 1, "input_protocol": "center_crop"} if name == "tclip" else {}))
    result = method.explain(fixture_images["scene_wide_320x240"], ["a red circle next to a blue square"])
    assert result.geometry.covered == (slice(0, 240), slice(40, 280))
    maps = [*result.prompts[0].word_maps, result.prompts[0].phrase]
    moved = 0
    for m in maps:
        region = m.heatmap[:, 40:280]
        x1, y1, x2, y2 = _reference_box(region)
        assert m.box == (x1 + 40, y1, x2 + 40, y2)
        moved += m.box != heatmap_box(m.heatmap)
        if name == "tclip":
            assert m.gmm.tau == pytest.approx(gmm_threshold(region).tau, rel=1e-9)
            moved += m.gmm.tau != pytest.approx(gmm_threshold(m.heatmap).tau, rel=1e-3)
            np.testing.assert_allclose(m.soft[:, :12], region.min(), rtol=0, atol=1e-6)  # beyond the blur's 4 sigma
    assert moved > 0  # the whole frame's threshold differs: the check above tells the two apart
