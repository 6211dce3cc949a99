"""CLIP tokenizer: ids against the official tokenizers' outputs stored in the fixtures, and word <-> piece mapping."""
import gzip
import json
import socket

import numpy as np
import pytest

from tclip_jax.methods.templates import CLIP_SURGERY_TEMPLATES
from tclip_jax.model.tokenizer import DATA_DIR, EOT_TOKEN, SOT_TOKEN, ClipTokenizer, bytes_to_unicode
from tclip_jax.model.make_tokenizer_files import N_MERGES, build_vocab
from references import BYTE_SYMBOL, author_kept_positions, openai_simple_tokenizer_ids

SOT, EOT = 49406, 49407


def _refuse_network(*args, **kwargs):
    raise AssertionError("the tokenizer tried to open a network connection")


@pytest.fixture(scope="module")
def tokenizer():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", _refuse_network)
        yield ClipTokenizer()


@pytest.fixture(scope="module")
def packaged_files():
    vocab = json.loads(gzip.decompress((DATA_DIR / "vocab.json.gz").read_bytes()))
    lines = gzip.decompress((DATA_DIR / "merges.txt.gz").read_bytes()).decode("utf-8").splitlines()
    return vocab, lines


@pytest.fixture(scope="module")
def clip_surgery(fixture_npz):
    return {k: v for k, v in fixture_npz("clip_surgery/clip_surgery_tiny.npz").items()
            if k.startswith("tokens/") or k == "labels"}


# --- packaged vocabulary -------------------------------------------------------------------------------------


def test_byte_alphabet_is_gpt2_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!" and table[ord("ÿ")] == "ÿ"
    assert table[ord(" ")] == "Ġ" and table[0] == "Ā"  # unprintable bytes move to U+0100 onwards


def test_packaged_vocabulary_follows_openai_construction(packaged_files, tokenizer):
    vocab, lines = packaged_files
    merges = [tuple(line.split()) for line in lines[1:]]
    assert lines[0] == "#version: 0.2" and len(merges) == N_MERGES == 48894
    assert len(vocab) == tokenizer.vocab_size == 49408
    symbols = list(bytes_to_unicode().values())
    assert [vocab[s] for s in symbols] == list(range(256))
    assert [vocab[s + "</w>"] for s in symbols] == list(range(256, 512))
    assert all(vocab[a + b] == 512 + k for k, (a, b) in enumerate(merges))
    assert vocab[SOT_TOKEN] == tokenizer.sot_id == SOT and vocab[EOT_TOKEN] == tokenizer.eot_id == EOT
    assert build_vocab(merges) == vocab


def test_hugging_face_folder_loads(tmp_path, clip_surgery):
    for path in DATA_DIR.iterdir():
        target = tmp_path / path.name.removesuffix(".gz")
        target.write_bytes(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
    tokens = ClipTokenizer(tmp_path).encode(list(clip_surgery["labels"]))
    np.testing.assert_array_equal(tokens, clip_surgery["tokens/labels_single"])


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipTokenizer(tmp_path / "nowhere")


def _tokenizer_folder(tmp_path, vocab: bytes, merges: bytes, extra: dict | None = None):
    (tmp_path / "vocab.json").write_bytes(vocab)
    (tmp_path / "merges.txt").write_bytes(merges)
    for name, text in (extra or {}).items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("vocab,merges,message", [
    (b"{not json", b"#version: 0.2\na b\n", "vocab.json is not valid JSON"),
    (b'{"a": ' * 100_000 + b"0" + b"}" * 100_000, b"", "vocab.json is not valid JSON: .* nested too deeply"),
    (b"\xff\xfe{}", b"", "vocab.json is not UTF-8 text"),
    (b'["a", "b"]', b"", "vocab.json must map token strings to integer ids"),
    (b'{"a": 0, "b": 1, "ab": 2}', b"#version: 0.2\na b c\n", "merge 1 is not two symbols"),
    (b'{"a": 0, "b": 1, "ab": 2}', b"\xff\xfe", "merges.txt is not UTF-8 text"),
])
def test_malformed_tokenizer_files_are_named(tmp_path, vocab, merges, message):
    with pytest.raises(ValueError, match=message):
        ClipTokenizer(_tokenizer_folder(tmp_path, vocab, merges))


def test_a_vocabulary_without_clips_start_and_end_tokens_is_refused(tmp_path, packaged_files):
    import tokenizers
    import tokenizers.models

    bert = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3, "red": 4},
                                                            unk_token="[UNK]"))
    (tmp_path / "bert").mkdir()
    bert.save(str(tmp_path / "bert" / "tokenizer.json"))
    with pytest.raises(ValueError, match=f"has no {_re(SOT_TOKEN)} / {_re(EOT_TOKEN)}: not a CLIP tokenizer"):
        ClipTokenizer(tmp_path / "bert")
    vocab, lines = packaged_files
    (tmp_path / "no_eot").mkdir()
    folder = _tokenizer_folder(tmp_path / "no_eot", json.dumps({k: v for k, v in vocab.items() if k != EOT_TOKEN})
                               .encode(), "\n".join(lines).encode())
    with pytest.raises(ValueError, match=f"has no {_re(EOT_TOKEN)}: not a CLIP tokenizer"):
        ClipTokenizer(folder)


def _re(token: str) -> str:
    import re

    return re.escape(token)


def test_a_folder_saved_by_transformers_clip_tokenizer_loads(tmp_path, packaged_files):
    """Hugging Face's CLIP tokenizer files hold SOT and EOT in the vocabulary (and as added tokens): the same ids."""
    import transformers

    vocab, lines = packaged_files
    _tokenizer_folder(tmp_path, json.dumps(vocab).encode(), "\n".join(lines).encode())
    reference = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    reference.save_pretrained(tmp_path / "saved")
    texts = ["a red circle next to a blue square", "hippopotamus"]
    ours = ClipTokenizer(tmp_path / "saved").encode(texts, 16)
    for row, text in zip(ours, texts):
        expected = reference(text)["input_ids"]
        assert row[:len(expected)].tolist() == expected and not row[len(expected):].any()
    # SOT and EOT written in text: where OpenAI's split finds them (Hugging Face's own tokenizer matches them anywhere)
    # and where Hugging Face's tokenizer.json differs from OpenAI's: its normalizer (NFC after lowercasing reorders the
    # marks of "İ\uff9e") and its split without IGNORECASE ("'ſ", U+0345)
    for text in ["a cat,<|endoftext|> dog<|endoftext|>", "İ\uff9e", "İ\u3099", "the cat'ſ toy", "a\u0345b"]:
        expected = [SOT, *openai_simple_tokenizer_ids(text, vocab, lines[1:]), EOT]
        assert ClipTokenizer(tmp_path / "saved").encode(text)[0][:len(expected)].tolist() == expected, repr(text)


def test_a_folder_asking_for_remote_code_runs_none(tmp_path, packaged_files):
    """The tokenizer is built from data files; a tokenizer_config.json naming custom code is never acted on."""
    vocab, lines = packaged_files
    marker = tmp_path / "ran"
    config = json.dumps({"tokenizer_class": "Evil", "auto_map": {"AutoTokenizer": ["evil.Evil", None]}})
    folder = _tokenizer_folder(tmp_path, json.dumps(vocab).encode(), "\n".join(lines).encode(),
                               {"tokenizer_config.json": config,
                                "evil.py": f"open({str(marker)!r}, 'w').write('x')\nclass Evil: pass\n"})
    ClipTokenizer(folder).encode("a cat")
    assert not marker.exists()


def test_special_tokens_in_text_are_matched_as_openai_does(tokenizer):
    ids = tokenizer.encode("a<|endoftext|>b")[0]
    assert list(ids[:5]) == [SOT, tokenizer.encode("a")[0][1], EOT, tokenizer.encode("b")[0][1], EOT]


def test_special_tokens_in_text_are_ids_where_openais_split_finds_them(tokenizer, packaged_files):
    """SOT and EOT written in a prompt are their ids only where OpenAI's split finds them: after other symbols its
    run of symbols takes "<|" first (",<|endoftext|>" is ",<|", "endoftext", "|>"); Hugging Face's added tokens
    were matched anywhere, which put an EOT, where CLIP reads the text embedding, in the middle of the prompt."""
    vocab, lines = packaged_files
    atoms = [SOT_TOKEN, EOT_TOKEN, "<|ENDOFTEXT|>", "&lt;|endoftext|&gt;", "<|endoftext", "a", "cat", " ", ",", ".",
             "<", "|", ">", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'ſ", "ſ", "\u0345", "\u200b", "é", "😀", "-",
             "3", "&amp;"]
    rng = np.random.default_rng(0)
    texts = ["a cat,<|endoftext|> dog", "a<|endoftext|>b", "x\u200b<|startoftext|>"]
    texts += ["".join(rng.choice(atoms, rng.integers(1, 8))) for _ in range(400)]
    for text in texts:
        expected = [SOT, *openai_simple_tokenizer_ids(text, vocab, lines[1:]), EOT]
        assert tokenizer.encode(text)[0][:len(expected)].tolist() == expected, repr(text)


def test_contractions_and_marks_split_as_openais_case_insensitive_split(tokenizer, packaged_files):
    """OpenAI compiles its split with IGNORECASE: "'ſ" is the contraction 's (ſ folds to s; lowercasing keeps it), and
    U+0345, a mark that folds to the letter ι, is neither a letter nor another symbol, so it is dropped."""
    vocab, lines = packaged_files
    texts = ["the cat'ſ toy", "’ſ", "x'ſ'ſt", "<|ſtartoftext|>", "<|\ufb06artoftext|>", "a\u0345b", "\u0345",
             "'\u0345s", "ᾳ", "α\u0345", "ΑΙ\u0345 ι"]
    for text in texts:
        expected = [SOT, *openai_simple_tokenizer_ids(text, vocab, lines[1:]), EOT]
        assert tokenizer.encode(text)[0][:len(expected)].tolist() == expected, repr(text)
    assert [w.text for w in tokenizer.tokenize_words("the cat'ſ toy").words] == ["the", "cat'ſ", "toy"]


# --- ids against the official tokenizers -----------------------------------------------------------------------


def test_labels_match_clip_surgery(tokenizer, clip_surgery):
    tokens = tokenizer.encode(clip_surgery["labels"])
    assert tokens.dtype == np.int32 and tokens.shape == (5, 77)
    np.testing.assert_array_equal(tokens, clip_surgery["tokens/labels_single"])
    np.testing.assert_array_equal(tokenizer.encode("a red circle"), clip_surgery["tokens/red_circle_single"])


@pytest.mark.parametrize("key", ["labels_ensemble", "empty_ensemble", "red_circle_ensemble"])
def test_template_ensembles_match_clip_surgery(tokenizer, clip_surgery, key):
    texts = {"labels_ensemble": list(clip_surgery["labels"]), "empty_ensemble": [""],
             "red_circle_ensemble": ["a red circle"]}[key]
    assert len(CLIP_SURGERY_TEMPLATES) == 85
    tokens = np.stack([tokenizer.encode([t.format(text) for t in CLIP_SURGERY_TEMPLATES]) for text in texts])
    np.testing.assert_array_equal(tokens, clip_surgery[f"tokens/{key}"])


@pytest.mark.parametrize("fixture", ["tclip_author/author_similarity_tiny.npz", "hilacam/hilacam_tiny.npz"])
def test_token_ids_match_openai_clip(tokenizer, fixture_npz, fixture):
    reference = fixture_npz(fixture)
    np.testing.assert_array_equal(tokenizer.encode(reference["texts"]), reference["token_ids"])


def test_uppercase_and_extra_whitespace_are_normalized(tokenizer, clip_surgery):
    tokens = tokenizer.encode(["  A RED\tCircle \n"])
    np.testing.assert_array_equal(tokens, clip_surgery["tokens/red_circle_single"])


def test_html_entities_are_unescaped_like_openai(tokenizer):
    np.testing.assert_array_equal(tokenizer.encode("fish &amp;amp; chips"), tokenizer.encode("fish & chips"))


def test_empty_prompt_is_sot_eot(tokenizer):
    expected = np.zeros((1, 77), np.int32)
    expected[0, :2] = [SOT, EOT]
    np.testing.assert_array_equal(tokenizer.encode(""), expected)
    prompt = tokenizer.tokenize_words("")
    assert prompt.words == () and prompt.pieces == () and prompt.eot_position == 1


def test_batch_shapes(tokenizer):
    assert tokenizer.encode([]).shape == (0, 77)
    assert tokenizer.encode(["a", "b c"], context_length=10).shape == (2, 10)


# --- context length ------------------------------------------------------------------------------------------


def test_prompt_filling_the_context_fits(tokenizer):
    row = tokenizer.encode("cat " * 75)[0]
    cat = row[1]
    assert row[0] == SOT and row[76] == EOT and (row[1:76] == cat).all()


def test_too_long_prompt_names_prompt_and_count(tokenizer):
    with pytest.raises(ValueError, match=r"prompt '(cat ){14}c\.\.\.' has 78 tokens .* context length 77; shorten "
                                         r"it or truncate it \(truncate=True, --truncate\)$"):
        tokenizer.encode(["a cat", "cat " * 76])  # its first 57 characters are shown, not all 304


def test_truncation_keeps_the_first_whole_words_and_ends_with_eot(tokenizer):
    long_prompt = " ".join(f"cat{i}" for i in range(60))  # "cat" and a piece per digit: 2 pieces, then 3
    kept_words = max(k for k in range(61) if sum(1 + len(str(i)) for i in range(k)) <= 75)
    kept = sum(1 + len(str(i)) for i in range(kept_words))  # 74: "cat27" ends at 74, "cat28" would end at 77
    with pytest.warns(UserWarning, match=f"keeping the first {kept} pieces \\(up to the last whole word\\)"):
        row = tokenizer.encode(long_prompt, truncate=True)[0]
    full = tokenizer.encode(long_prompt, context_length=200)[0]
    np.testing.assert_array_equal(row[:kept + 1], full[:kept + 1])
    assert row[kept + 1] == EOT and not row[kept + 2:].any()
    with pytest.warns(UserWarning):
        prompt = tokenizer.tokenize_words(long_prompt, truncate=True)
    np.testing.assert_array_equal(prompt.token_ids, row)
    assert [w.text for w in prompt.words] == [f"cat{i}" for i in range(kept_words)]
    with pytest.warns(UserWarning, match="keeping the first 75 pieces$"):  # a last word ending at piece 75 is kept
        assert tokenizer.tokenize_words("cat " * 80, truncate=True).piece_positions[-1] == 75
    one_word = "pneumono" * 40  # a first word longer than the context is cut
    with pytest.warns(UserWarning, match="keeping the first 75 pieces$"):
        assert tokenizer.tokenize_words(one_word, truncate=True).piece_positions[-1] == 75


def test_a_text_that_fits_is_cleaned_and_split_once_and_one_cut_is_said_at_each_call(monkeypatch):
    """The ids of texts that fit are kept (CLIP Surgery's label set is 85 texts a class, tokenized at every call):
    the same rows as a fresh tokenizer's, and a text too long is still cut and said, or refused, at each call."""
    tokenizer = ClipTokenizer()
    split = []
    checked_pieces = tokenizer._checked_pieces
    monkeypatch.setattr(tokenizer, "_checked_pieces", lambda *args: split.append(args[0]) or checked_pieces(*args))
    texts = ["a photo of a cat.", "A  photo of a CAT.", "a photo of a cat."]  # the second cleans as the first
    rows = tokenizer.encode(texts)
    np.testing.assert_array_equal(tokenizer.encode(texts), rows)
    np.testing.assert_array_equal(rows, ClipTokenizer().encode(texts))
    assert split == texts[:2]  # each distinct text once
    np.testing.assert_array_equal(tokenizer.encode("a photo of a cat.", context_length=8),
                                  ClipTokenizer().encode("a photo of a cat.", context_length=8))  # its own context
    long_prompt = "cat " * 80
    for _ in range(2):
        with pytest.warns(UserWarning, match="keeping the first 75 pieces$"):
            np.testing.assert_array_equal(tokenizer.encode(long_prompt, truncate=True),
                                          ClipTokenizer().encode(long_prompt, truncate=True))
        with pytest.raises(ValueError, match="shorten it or truncate it"):
            tokenizer.encode(long_prompt)


def test_bad_arguments(tokenizer):
    with pytest.raises(TypeError, match="prompts must be str"):
        tokenizer.encode(["a cat", 3])
    with pytest.raises(ValueError, match="context_length"):
        tokenizer.encode("a cat", context_length=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode_piece(49408)


# --- words and pieces ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["hippopotamus", "photobombing"])
def test_multi_piece_word_is_one_word(tokenizer, word):
    prompt = tokenizer.tokenize_words(f"a {word} here")
    assert [w.text for w in prompt.words] == ["a", word, "here"]
    positions = prompt.words[1].piece_positions
    assert len(positions) > 1 and positions == tuple(range(2, 2 + len(positions)))
    pieces = [prompt.pieces[prompt.piece_positions.index(p)] for p in positions]
    assert "".join(pieces) == word + "</w>"
    np.testing.assert_array_equal(prompt.token_ids, tokenizer.encode(f"a {word} here")[0])


def test_pieces_and_positions_cover_the_row(tokenizer):
    prompt = tokenizer.tokenize_words("A photo of a cat.")
    n = len(prompt.pieces)
    assert prompt.piece_positions == tuple(range(1, n + 1)) and prompt.eot_position == n + 1
    assert prompt.token_ids[0] == SOT and prompt.token_ids[n + 1] == EOT and not prompt.token_ids[n + 2:].any()
    assert sorted(p for w in prompt.words for p in w.piece_positions) == list(prompt.piece_positions)
    assert not prompt.token_ids.flags.writeable


def test_punctuation_is_its_own_flagged_word(tokenizer):
    text = "a red circle, next to a blue square!"
    prompt = tokenizer.tokenize_words(text)
    assert [w.text for w in prompt.words] == ["a", "red", "circle", ",", "next", "to", "a", "blue", "square", "!"]
    assert [w.is_punctuation for w in prompt.words] == [False] * 3 + [True] + [False] * 5 + [True]


def test_contractions_and_numbers_stay_whole(tokenizer):
    prompt = tokenizer.tokenize_words("the cat's 123 toys don't fit a t-shirt")
    assert [w.text for w in prompt.words] == ["the", "cat's", "123", "toys", "don't", "fit", "a", "t", "-", "shirt"]
    assert len(prompt.words[2].piece_positions) == 3  # CLIP encodes digits one by one


def test_words_map_back_to_original_text(tokenizer):
    text = "  A  Hippopotamus,\tNEXT to the   Café. "
    prompt = tokenizer.tokenize_words(text)
    assert [w.text for w in prompt.words] == ["A", "Hippopotamus", ",", "NEXT", "to", "the", "Café", "."]
    assert all(text[w.start:w.end] == w.text for w in prompt.words)
    np.testing.assert_array_equal(prompt.token_ids, tokenizer.encode(text.lower())[0])


def test_words_keep_their_own_spans_whatever_whitespace_separates_repeats(tokenizer):
    """Prompts of common words joined by random runs of spaces, tabs and newlines: each word is its own span and
    its own pieces (aligning the raw text by difflib matched "red\nred red" against a later repeat: empty words)."""
    import re

    rng = np.random.default_rng(0)
    vocabulary = ["red", "dog", "of", "on", "I", "is", "a", "the", "circle", "Red", "hippopotamus"]
    for _ in range(300):
        chosen = [vocabulary[k] for k in rng.integers(0, len(vocabulary), rng.integers(1, 7))]
        gaps = ["".join(rng.choice([" ", "  ", "\t", "\n", " \n "], 1)) for _ in chosen]
        text = "".join(gap + word for gap, word in zip(gaps, chosen)) + gaps[0]
        words = tokenizer.tokenize_words(text).words
        expected = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        assert [(w.text, w.start, w.end) for w in words] == expected, repr(text)
        pieces = [tokenizer.tokenize_words(word).words[0].piece_positions for word in chosen]
        offset = 0
        for word, own in zip(words, pieces):  # each word's pieces are its own, in order
            assert word.piece_positions == tuple(p + offset for p in own)
            offset += len(own)


@pytest.mark.parametrize("text, words", [
    ("Stop\x1fstop stop", [("Stop\x1fstop", 0, 9), ("stop", 10, 14)]),  # ftfy deletes the control character
    ("dog\x0bdog dog", [("dog\x0bdog", 0, 7), ("dog", 8, 11)]),          # ... and a vertical tab
    ("red&nbsp;red red", [("red", 0, 3), ("red", 9, 12), ("red", 13, 16)]),  # an entity that unescapes to a space
    ("Wait\x85 what", [("Wait", 0, 4), ("\x85", 4, 5), ("what", 6, 10)]),  # NEL, which ftfy makes an ellipsis
    ("Tom &amp;amp; Jerry\nTom", [("Tom", 0, 3), ("&amp;amp;", 4, 13), ("Jerry", 14, 19), ("Tom", 20, 23)]),
    ("a cafÃ© sign cafÃ©", [("a", 0, 1), ("cafÃ©", 2, 7), ("sign", 8, 12), ("cafÃ©", 13, 18)]),  # mojibake
])
def test_words_keep_their_spans_through_every_rewrite_cleaning_makes(tokenizer, text, words):
    prompt = tokenizer.tokenize_words(text)
    assert [(w.text, w.start, w.end) for w in prompt.words] == words
    assert [p for w in prompt.words for p in w.piece_positions] == list(prompt.piece_positions)


@pytest.mark.parametrize("text, words", [
    ("नमस्ते दुनिया", [("नमस्ते", False), ("दुनिया", False)]), ("สวัสดี", [("สวัสดี", False)]),
    ("مَرْحَبًا", [("مَرْحَبًا", False)]), ("İstanbul", [("İstanbul", False)]),
    # A mark and the punctuation after it are one pre-tokenizer chunk: the mark goes with its word, "." stays apart.
    ("KEDİ. KÖPEK", [("KEDİ", False), (".", True), ("KÖPEK", False)]),
    ("यह है।", [("यह", False), ("है", False), ("।", True)]),
    # An emoji's variation selector is no combining mark of a word.
    ("cats❤️ and", [("cats", False), ("❤️", True), ("and", False)]),
])
def test_combining_marks_belong_to_their_words(tokenizer, text, words):
    """CLIP's pre-tokenizer splits a vowel sign or diacritic from its letter; they stay one word with every piece."""
    prompt = tokenizer.tokenize_words(text)
    assert [(w.text, w.is_punctuation) for w in prompt.words] == words
    assert [p for w in prompt.words for p in w.piece_positions] == list(prompt.piece_positions)


@pytest.mark.parametrize("text, words", [
    ("a #️⃣ sign", [("a", False), ("#️⃣", True), ("sign", False)]),  # "#", U+FE0F, U+20E3 (an enclosing mark)
    ("*️⃣", [("*️⃣", True)]),
    ("cat 1️⃣", [("cat", False), ("1", False), ("️⃣", True)]),  # the keycap's digit is a word, its keycap not
    ("a \u0301 dog", [("a", False), ("\u0301", True), ("dog", False)]),  # a mark after a space: on no letter
    ("x&NotEqualTilde;y", [("x", False), ("&NotEqualTilde;", True), ("y", False)]),  # "≂" + U+0338 of no word
    ("dog.\u0301", [("dog", False), (".\u0301", True)]),  # the mark is on ".", not "dog"
])
def test_a_symbol_and_its_marks_are_punctuation_not_part_of_a_word(tokenizer, text, words):
    """A keycap emoji ("#️⃣", whose U+20E3 is a mark) or a symbol with a combining mark was a word of its own, or
    joined the word before it; a word's pieces are those of the word alone, whatever symbol is beside it."""
    from tclip_jax.model.tokenizer import has_word

    prompt = tokenizer.tokenize_words(text)
    assert [(w.text, w.is_punctuation) for w in prompt.words] == words
    assert [p for w in prompt.words for p in w.piece_positions] == list(prompt.piece_positions)
    for word in (w for w in prompt.words if not w.is_punctuation):
        alone = tokenizer.tokenize_words(word.text)
        assert [prompt.pieces[p - 1] for p in word.piece_positions] == list(alone.pieces)
    assert [has_word(w) for w, _ in words] == [not punctuation for _, punctuation in words]


@pytest.mark.parametrize("text, word", [("מֶלֶךְ: a king", "מֶלֶךְ"), ("ကူ: help", "ကူ"), ("नमस्ते! hi", "नमस्ते")])
def test_a_words_last_mark_keeps_every_byte_piece_of_it(tokenizer, text, word):
    """The BPE can make one piece of a mark's last byte and the symbol after it ("°:" of a final sheva, U+05B0, and
    ':'): that piece joined the punctuation, so the word kept half of its last character and the two spans overlapped.
    Every byte of the word is in its pieces (GPT-2's byte symbols read back), and no span overlaps the next."""
    byte_of = {symbol: byte for byte, symbol in BYTE_SYMBOL.items()}
    prompt = tokenizer.tokenize_words(text)
    first = prompt.words[0]
    assert first.text == word and not first.is_punctuation
    pieces = "".join(prompt.pieces[p - 1] for p in first.piece_positions).replace("</w>", "")
    assert bytes(byte_of[c] for c in pieces).startswith(word.encode())
    assert all(a.end <= b.start for a, b in zip(prompt.words, prompt.words[1:]))


@pytest.mark.parametrize("text, words", [
    ("a red <|endoftext|> heart", ["a", "red", "heart"]), ("a red heart<|endoftext|>", ["a", "red", "heart"]),
    ("<|startoftext|>dog", ["dog"]), ("<|ENDOFTEXT|>cat<|startoftext|>toy  <|endoftext|>", ["cat", "toy"]),
])
def test_an_sot_or_eot_typed_in_a_prompt_is_no_word_and_joins_none(tokenizer, text, words):
    """A typed EOT was a word ("<|endoftext|>") or joined the word before it ("heart" averaged with the EOT row).
    The TCLIP author's code drops every SOT, EOT and padding id: the words' pieces are the positions it keeps."""
    from tclip_jax.model.tokenizer import has_word

    prompt = tokenizer.tokenize_words(text)
    explained = [w for w in prompt.words if not w.is_punctuation]
    assert [w.text for w in explained] == words and all(text[w.start:w.end] == w.text for w in explained)
    kept = author_kept_positions(tokenizer, prompt.token_ids)
    assert [p for w in explained for p in w.piece_positions] == kept.tolist()
    assert {SOT, EOT} & set(prompt.token_ids[1:prompt.eot_position].tolist())  # typed, as OpenAI encodes them
    assert not has_word("<|endoftext|>") and not has_word(" <|STARTOFTEXT|><|endoftext|>")


def test_text_rewritten_by_cleaning_maps_to_its_source(tokenizer):
    text = "a cafÃ© sign"  # mojibake that ftfy repairs to "café"
    prompt = tokenizer.tokenize_words(text)
    assert [w.text for w in prompt.words] == ["a", "cafÃ©", "sign"]
    np.testing.assert_array_equal(prompt.token_ids, tokenizer.encode("a café sign")[0])
    # Rewritten to as many characters (full-width to ASCII), each word keeps its own characters, not the block's.
    wide = "ＲＥＤ　ＣＡＴ"
    prompt = tokenizer.tokenize_words(wide)
    assert [(w.start, w.end) for w in prompt.words] == [(0, 3), (4, 7)]
    np.testing.assert_array_equal(prompt.token_ids, tokenizer.encode("red cat")[0])


@pytest.mark.parametrize("text, written, words", [
    # html.unescape replaces only the longest entity name a reference without ';' starts with; the rest is text.
    ("a &quotred-car on grass", 'a "red-car on grass',
     [("a", 0, 1), ("&quot", 2, 7), ("red", 7, 10), ("-", 10, 11), ("car", 11, 14), ("on", 15, 17), ("grass", 18, 23)]),
    ("&ltcat&gtdog", "<cat>dog", [("&lt", 0, 3), ("cat", 3, 6), ("&gt", 6, 9), ("dog", 9, 12)]),
    ("a &notin set", "a ¬in set", [("a", 0, 1), ("&not", 2, 6), ("in", 6, 8), ("set", 9, 12)]),
    ("fish &ampamp chips", "fish & chips", [("fish", 0, 4), ("&ampamp", 5, 12), ("chips", 13, 18)]),  # twice
    # ftfy repairs each mojibake sequence, splits a ligature and narrows full-width letters in place.
    ("Ã©â€œÃ©", 'é"é', [("Ã©", 0, 2), ("â€œ", 2, 5), ("Ã©", 5, 7)]),
    ("Ã©â€ Ã©", "é†é", [("Ã©", 0, 2), ("â€ ", 2, 5), ("Ã©", 5, 7)]),  # the space is part of the mojibake
    ("ﬁâ€™e\u0301 ｆｕｌｌ", "fi'\u00e9 full", [("ﬁ", 0, 1), ("â€™", 1, 4), ("e\u0301", 4, 6), ("ｆｕｌｌ", 7, 11)]),
    # ... and in context where it fixes the run alone otherwise (alone, "ﬁâ€™Ã©Ã©" is 'މ۪̩̩').
    (" -ﬁâ€™Ã©Ã©&deg.â€", "-fi'éé°.â€",
     [("-", 1, 2), ("ﬁ", 2, 3), ("â€™", 3, 6), ("Ã©Ã©", 6, 10), ("&deg.", 10, 15), ("â", 15, 16), ("€", 16, 17)]),
])
def test_words_glued_to_rewritten_text_keep_their_own_spans(tokenizer, text, written, words):
    """Each character that cleaning rewrote maps to what it came from, not to the whole rewritten run ("red" and
    "car" of "&quotred-car" both had the span of "&quotred-car", and TCLIP explained them as one)."""
    prompt, reference = tokenizer.tokenize_words(text), tokenizer.tokenize_words(written)
    assert [(w.text, w.start, w.end) for w in prompt.words] == words
    assert all(text[start:end] == word for word, start, end in words)
    np.testing.assert_array_equal(prompt.token_ids, reference.token_ids)
    assert [w.piece_positions for w in prompt.words] == [w.piece_positions for w in reference.words]


def test_a_word_glued_to_an_entity_is_queried_alone(tokenizer):
    """The query TCLIP explains for a word's span is that word's mean piece embedding, as where '"' is written."""
    from tclip_jax.methods.tclip.method import _span_query

    glued = tokenizer.tokenize_words("a &quotred-car on grass")
    written = tokenizer.tokenize_words('a "red-car on grass')
    embeds = np.random.default_rng(0).normal(size=(77, 8))
    for glued_span, written_span in (((7, 10), (3, 6)), ((11, 14), (7, 10))):  # "red", "car"
        [word] = [w for w in written.words if (w.start, w.end) == written_span]
        np.testing.assert_allclose(_span_query(glued, embeds, None, glued_span),
                                   embeds[list(word.piece_positions)].mean(0))


def test_no_two_words_share_characters_of_the_prompt(tokenizer):
    """Seeded prompts of words glued to entities without ';', mojibake, ligatures, full-width letters, combining
    marks and controls: the words' spans are non-empty and apart."""
    atoms = ["red", "cat", "a", " ", "  ", "&quot", "&amp", "&lt", "&deg", "&not", "&eacute", "&#39", "&#x41", "&nbsp",
             "&nbsp;", "&ampx", "â€™", "â€œ", "â€", "Ã©", "Ã", "Â°", "Ã¼ber", "ﬁ", "ｆｕｌｌ", ";", ".", "-", "'", "3",
             "é", "e\u0301", "\u00ad", "\x0b", "İ", "ß", "ि", "न", "😀", "\ufe0f"]
    rng = np.random.default_rng(0)
    for _ in range(1500):
        text = "".join(rng.choice(atoms, rng.integers(1, 10)))
        words = [w for w in tokenizer.tokenize_words(text).words if not w.is_punctuation]
        assert all(w.start < w.end for w in words), repr(text)
        assert all(a.end <= b.start for a, b in zip(words, words[1:])), repr(text)


def _assert_spans_are_the_words(tokenizer, packaged_files, text, context_length=77, cleaned_alone=True,
                                mojibake_spaces=False):
    """The words of `text` against its characters and OpenAI's tokenizer: every letter, digit and mark of `text` lies
    in one word's span (with `mojibake_spaces`, but the "Â" of "Â ", mojibake of a non-breaking space, and a block
    ftfy fixes to whitespace, which is then in no word's span: `_fixed_to_whitespace`), spans are non-empty and apart,
    each span cleaned alone (`clean_text`: ftfy, so NFC) is the text of its word's pieces (GPT-2's byte symbols read
    back; a mark's last byte may share a piece with what follows), and the pieces, each in one word, are those of
    OpenAI's tokenizer. Not `cleaned_alone`: a word's span may be cleaned otherwise alone (ftfy repairs mojibake by
    its context: alone "œµ" is "ϵ", in "œµ°" it stays)."""
    import unicodedata

    from tclip_jax.model.tokenizer import clean_text

    vocab, lines = packaged_files
    byte_of = {symbol: byte for byte, symbol in BYTE_SYMBOL.items()}
    prompt = tokenizer.tokenize_words(text, context_length)
    words = prompt.words
    assert all(w.start < w.end for w in words) and all(a.end <= b.start for a, b in zip(words, words[1:])), repr(text)
    covered = {k for w in words for k in range(w.start, w.end)}
    spaces = _fixed_to_whitespace(text) if mojibake_spaces else set()
    nbsp = {k for k in range(len(text)) if mojibake_spaces and text[k:k + 2] == "Â "}  # ftfy may fix it in context
    assert [k for k, c in enumerate(text)
            if unicodedata.category(c)[0] in "LNM" and k not in covered | spaces | nbsp] == [], repr(text)
    assert [w for w in words if spaces.intersection(range(w.start, w.end))] == [], repr(text)
    for word in words if cleaned_alone else ():
        pieces = "".join(prompt.pieces[p - 1] for p in word.piece_positions).replace("</w>", "")
        read = bytes(byte_of[c] for c in pieces).decode("utf-8", errors="replace")
        assert read.startswith(clean_text(word.text).replace(" ", "")), (text, word)
    assert [p for w in words for p in w.piece_positions] == list(prompt.piece_positions)
    expected = [SOT, *openai_simple_tokenizer_ids(text, vocab, lines[1:]), EOT]
    assert prompt.token_ids[:len(expected)].tolist() == expected, repr(text)


def _fixed_to_whitespace(text):
    """The positions of `text` in a block that ftfy fixes to whitespace apart from the text around it: the block fixed
    alone is whitespace, and the text before and after it fixed alone make the rest of ftfy's fix of `text` ("Â " of
    "Â Ã™", mojibake of a non-breaking space, or a space ftfy keeps). Cleaning makes such a block a space or strips
    it, so it makes no piece; whitespace ftfy made part of a character ("â€ " is "†") is not in one."""
    import ftfy

    n = len(text)
    fixes = {(i, j): ftfy.fix_text(text[i:j]) for i in range(n + 1) for j in range(i, n + 1)}
    return {k for i in range(n) for j in range(i + 1, n + 1) for k in range(i, j)
            if fixes[i, j].isspace() and fixes[0, i] + fixes[i, j] + fixes[j, n] == fixes[0, n]}


@pytest.mark.parametrize("text, words", [
    # "ŉ" is one letter that cleaning makes "'n" (ftfy's ligature "ʼn", its quote uncurled), a symbol and a letter:
    # they were two words with one span. As written it is a letter, one word with the letters beside it.
    ("ŉ", [("ŉ", False)]), ("aŉb", [("aŉb", False)]), ("red ŉ cat", [("red", False), ("ŉ", False), ("cat", False)]),
    ("xŉ. ŉŉ", [("xŉ", False), (".", True), ("ŉŉ", False)]),
    # Other characters cleaning rewrites to more or fewer: ligatures, full-width letters, "Å" as one and as two code
    # points, conjoining Hangul jamo.
    ("a ﬁsh, ﬃ", [("a", False), ("ﬁsh", False), (",", True), ("ﬃ", False)]), ("aǆb ĳ", [("aǆb", False), ("ĳ", False)]),
    ("ＲＥＤ ＣＡＴ！", [("ＲＥＤ", False), ("ＣＡＴ", False), ("！", True)]),
    ("\u00c5 A\u030a", [("\u00c5", False), ("A\u030a", False)]),
    ("\u1100\u1161\u11a8 \uac01", [("\u1100\u1161\u11a8", False), ("\uac01", False)]),
    # The modifier apostrophe "ʼ" (U+02BC) is a letter that cleaning uncurls to the symbol "'": it was punctuation
    # between two words. Written beside a symbol, the chunk holds that symbol too and stays punctuation.
    ("aʼb", [("aʼb", False)]), ("a ʼ b", [("a", False), ("ʼ", False), ("b", False)]), ("ʼa", [("ʼa", False)]),
    ("ʼ!", [("ʼ!", True)]), ("aʼ,", [("a", False), ("ʼ,", True)]),
    # The chunks one character became are one word, which joins the word before it only where its first chunk is a
    # word's: "cat-ŉ" was one word, "cat" and a punctuation "-" glued to "ŉ".
    ("cat-ŉ dog", [("cat", False), ("-ŉ", False), ("dog", False)]), ("a,ŉ", [("a", False), (",ŉ", False)]),
])
def test_a_character_cleaning_rewrites_to_several_stays_one_word(tokenizer, packaged_files, text, words):
    prompt = tokenizer.tokenize_words(text)
    assert [(w.text, w.is_punctuation) for w in prompt.words] == words
    _assert_spans_are_the_words(tokenizer, packaged_files, text)


@pytest.mark.parametrize("text", [
    "x" * 101 + "a\u0327\u0301",  # a run longer than one followed alone; NFC puts the cedilla first and composes "á"
    "Ã©â€ Ã© " + "word " * 25 + "a\u0327\u0301 end",  # mojibake with a space: the whole prompt is one run
    "Ã©â€ Ã© " + "Vie\u0302\u0323t Nam " * 10 + "\u05e9\u05c1\u05bc\u05b8 ŉ",  # Vietnamese and Hebrew marks reordered
    "β" * 120 + "α\u0327\u0301",  # no ASCII character to cut the run at: aligned by difflib
])
def test_marks_nfc_reorders_in_a_long_run_stay_in_their_words(tokenizer, packaged_files, text):
    """NFC reorders a word's marks (and composes one): in a run of more characters than are followed alone (left as
    written, for difflib to align) the mark it moved was in no word's span."""
    _assert_spans_are_the_words(tokenizer, packaged_files, text, context_length=256)


def test_long_prompts_of_rewritten_text_keep_their_words(tokenizer, packaged_files):
    """Seeded long prompts of reordered marks, ligatures, full-width letters, decomposed letters and mojibake."""
    atoms = ["a\u0301\u0327", "a\u0327\u0301", "e\u0302\u0323", "\u01b0\u0309", "\u05d1\u05bc\u05b8",
             "\u05e9\u05c1\u05bc", "A\u030a", "\u1100\u1161", "ŉ", "ﬁ", "ǆ", "ｆｕｌｌ", "red", "-", ".", "'", "3", "Ã©"]
    rng = np.random.default_rng(0)
    for k in range(12):
        parts = rng.choice(atoms, rng.integers(30, 50))
        text = ["", " ", "Ã©â€ Ã© "][k % 3] + (" " if k % 3 else "").join(parts)
        _assert_spans_are_the_words(tokenizer, packaged_files, text, context_length=256)


@pytest.mark.parametrize("text, words", [
    # ftfy deletes the lead byte "Â" of mojibake ("Âµ" is "µ"): it was in no word ("µm" at 1-3).
    ("Âµm", [("Âµm", 0, 3, False)]), ("(Âµm)", [("(", 0, 1, True), ("Âµm", 1, 4, False), (")", 4, 5, True)]),
    ("a Â½ cup", [("a", 0, 1, False), ("Â½", 2, 4, False), ("cup", 5, 8, False)]),
    ("x-Âµm", [("x", 0, 1, False), ("-", 1, 2, True), ("Âµm", 2, 5, False)]),
    ("aÂ°", [("aÂ", 0, 2, False), ("°", 2, 3, True)]),  # beside a letter before it, it is that letter's word's
    # Letters that cleaning made a symbol ("Ëœ" is "˜", "Å½½" is U+07BD) followed by punctuation, a piece of its own,
    # were one punctuation word with it.
    ("Ëœ!", [("Ëœ", 0, 2, False), ("!", 2, 3, True)]), ("Å½½!", [("Å½½", 0, 3, False), ("!", 3, 4, True)]),
    ("3Å½½&", [("3Å½½", 0, 4, False), ("&", 4, 5, True)]),
    ("!Ëœ!", [("!", 0, 1, True), ("Ëœ", 1, 3, False), ("!", 3, 4, True)]),
])
def test_mojibake_letters_are_in_words_as_written(tokenizer, packaged_files, text, words):
    prompt = tokenizer.tokenize_words(text)
    assert [(w.text, w.start, w.end, w.is_punctuation) for w in prompt.words] == words
    _assert_spans_are_the_words(tokenizer, packaged_files, text, cleaned_alone=False)


def test_prompts_of_mojibake_keep_every_letter_in_a_word(tokenizer, packaged_files):
    """Seeded prompts of mojibake's letters and symbols (ftfy repairs some in context, deletes lead bytes) with
    letters, digits, punctuation and spaces."""
    atoms = ["Â", "Ã", "Ë", "œ", "Å", "½", "µ", "°", "£", "a", "m", "x", "3", " ", "!", "-", ".", "(", ","]
    rng = np.random.default_rng(0)
    for _ in range(300):
        text = "".join(rng.choice(atoms, rng.integers(1, 9)))
        _assert_spans_are_the_words(tokenizer, packaged_files, text, cleaned_alone=False, mojibake_spaces=True)


@pytest.mark.parametrize("text, words", [
    # "Â " is mojibake of a non-breaking space, which cleaning makes a space (or strips): a space is in no word, so
    # each word is the run of non-space characters that made its pieces. The word after the deleted "Â " took it, its
    # space included ("Â abc" was one word, "a Â b" "a" and "Â b"), and so did the word before " Â" ("red Â").
    ("Â abc", [("abc", 2, 5, False)]), ("Â  abc", [("abc", 3, 6, False)]),
    ("a Â b", [("a", 0, 1, False), ("b", 4, 5, False)]),
    ("red Â circle", [("red", 0, 3, False), ("circle", 6, 12, False)]),
    ("Â µm", [("µm", 2, 4, False)]), ("x Â Âµm", [("x", 0, 1, False), ("Âµm", 4, 7, False)]),
    # ftfy makes "aÂ b" "a\xa0b": its "Â " is the non-breaking space too, not the letter's (as "Â" of "aÂ°" is).
    ("aÂ b", [("a", 0, 1, False), ("b", 3, 4, False)]),
    # "Ã " is mojibake of "à" (its non-breaking space typed as a space): ftfy makes "Ã  " "à ", and the word after
    # took the space it dropped (" tout"), a part of a run `_run_followed` follows.
    ("voilÃ  tout", [("voilÃ", 0, 5, False), ("tout", 7, 11, False)]),
    ("Ã  la carte", [("Ã", 0, 1, False), ("la", 3, 5, False), ("carte", 6, 11, False)]),
    # ftfy makes "Â Â" "\xa0Â" (so "Â Â Â" "\xa0\xa0Â", "x Â Â" "x \xa0Â"): the word "â" is the last "Â", after the
    # non-breaking space that cleaning strips. Its span was the first "Â", or held the "Â " too.
    ("Â Â", [("Â", 2, 3, False)]), ("Â Â Â", [("Â", 4, 5, False)]), ("x Â Â", [("x", 0, 1, False), ("Â", 4, 5, False)]),
    # Beside a longer repair: "Â Ã !" is "\xa0à !", "Â Ã™" "\xa0Ù" ("Ã™" is "Ù"), "Â â€ " "\xa0†" ("â€ " is "†",
    # its last byte the space): the "Â " before it was in the word. A space ftfy makes part of a character is that
    # character's ("éÃÂ " is "éà").
    ("Â Ã !", [("Ã", 2, 3, False), ("!", 4, 5, True)]), ("Â Ã™", [("Ã™", 2, 4, False)]),
    ("Â â€ ", [("â€ ", 2, 5, True)]), ("éÃÂ ", [("éÃÂ ", 0, 4, False)]),
])
def test_mojibake_of_a_space_is_in_no_word(tokenizer, packaged_files, text, words):
    prompt = tokenizer.tokenize_words(text)
    assert [(w.text, w.start, w.end, w.is_punctuation) for w in prompt.words] == words
    _assert_spans_are_the_words(tokenizer, packaged_files, text, cleaned_alone=False, mojibake_spaces=True)


def test_prompts_of_mojibake_spaces_keep_spaces_out_of_words(tokenizer, packaged_files):
    """Seeded prompts of "Â " (mojibake of a non-breaking space) with mojibake's letters, letters, digits,
    punctuation and whitespace: no word's span holds a block that ftfy fixes to whitespace (`_fixed_to_whitespace`)."""
    atoms = ["Â ", "Âµ", "µ", "½", "°", "£", "Ã", "â€", "™", "a", "m", "x", "3", " ", "!", "-", ".", "(", ",", "\t"]
    rng = np.random.default_rng(0)
    for _ in range(300):
        text = "".join(rng.choice(atoms, rng.integers(1, 9)))
        _assert_spans_are_the_words(tokenizer, packaged_files, text, cleaned_alone=False, mojibake_spaces=True)


# --- the TCLIP author's kept positions -------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0, 1])
def test_author_kept_positions_match_fixture(tokenizer, fixture_npz, t):
    reference = fixture_npz("tclip_author/author_similarity_tiny.npz")
    kept = author_kept_positions(tokenizer, reference["token_ids"][t])
    assert kept.dtype == np.int32
    np.testing.assert_array_equal(kept, reference[f"text{t}_kept_positions"])
    np.testing.assert_array_equal(reference["token_ids"][t][kept], reference[f"text{t}_kept_token_ids"])
    assert [tokenizer.decode_piece(i) for i in reference[f"text{t}_kept_token_ids"]] == list(reference[f"text{t}_kept_tokens"])


def test_author_filter_drops_only_single_bang_and_period(tokenizer):
    # Pieces: a cat ! a dog . a , b wow !! -> the filter drops "!" and "." but keeps "," and "!!".
    prompt = tokenizer.tokenize_words("a cat! a dog. a, b wow!!")
    assert prompt.pieces[2] == "!</w>" and prompt.pieces[5] == ".</w>" and prompt.pieces[10] == "!!</w>"
    np.testing.assert_array_equal(author_kept_positions(tokenizer, prompt.token_ids), [1, 2, 4, 5, 7, 8, 9, 10, 11])


def test_decode_piece_reassembles_bytes(tokenizer):
    cat_face = tokenizer.tokenize_words("🐱")
    assert len(cat_face.pieces) == 1 and tokenizer.decode_piece(cat_face.token_ids[1]) == "🐱"
    assert tokenizer.decode_piece(SOT) == SOT_TOKEN


def test_a_prompt_with_bytes_that_were_not_utf8_is_refused(tokenizer):
    """A Latin-1 shell argument reaches Python as lone surrogates ('caf\\udce9'): BPE read the byte as U+FFFD (a
    piece of its own) and the figure font crashed on it after the model ran."""
    for call in (lambda: tokenizer.encode(["a caf\udce9 table"]), lambda: tokenizer.tokenize_words("a caf\udce9 table")):
        with pytest.raises(ValueError, match="is not valid text: it holds '\\\\udce9', bytes that are not UTF-8"):
            call()
    assert tokenizer.tokenize_words("a caf\u00e9 table").words[1].text == "caf\u00e9"
