"""CLIP BPE tokenizer with OpenAI `clip.tokenize` conventions and a word <-> BPE-piece mapping.

Text is cleaned exactly like OpenAI's simple tokenizer (ftfy, HTML unescape twice, whitespace collapse,
lowercase); the byte-level BPE itself runs in Hugging Face `tokenizers`, which also reports each piece's
character span. Rows are SOT, pieces, EOT, then zero padding (OpenAI pads with 0, Hugging Face with EOT).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import gzip
import html
import html.entities
import itertools
import json
import os
import pathlib
import re
import tempfile
import unicodedata
import warnings
from collections.abc import Iterable

import ftfy
import numpy as np
import tokenizers
import tokenizers.decoders
import tokenizers.models
import tokenizers.pre_tokenizers

from tclip_jax.files import loads_json

DATA_DIR = pathlib.Path(__file__).resolve().parents[1] / "data" / "clip_tokenizer"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
WORD_END = "</w>"
PAD_ID = 0
CONTEXT_LENGTH = 77
# How many texts' ids a tokenizer keeps (`ClipTokenizer._ids_that_fit`; ~650 bytes each, 85 MB full): CLIP Surgery's
# label set of ImageNet-S919 is 78,115 template texts.
FITTING_IDS_CACHE_SIZE = 131072
# A tokenizer folder's files (Hugging Face layout): `tokenizer.json`, or `vocab.json` + `merges.txt` (`_load_backend`).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

# OpenAI simple_tokenizer's split into SOT and EOT, contractions, words, numbers digit by digit, and runs of other
# symbols. OpenAI compiles it with IGNORECASE: "'ſ" is the contraction 's (ſ folds to s), and U+0345, a mark that folds
# to the letter ι, is in neither class (not a letter itself; a case variant is one), so it is dropped. Onig's (?i)
# would make U+0345 a letter, so only the SOT, EOT and contraction alternatives are case-insensitive. \p{L} and \p{N}
# are the `tokenizers` library's Unicode tables: a character assigned in a later Unicode version (1,518 below U+30000,
# e.g. U+208F and CJK Extension I) is punctuation here but a letter to OpenAI's code under a newer `regex` module
# (2026.12.2), whose split therefore depends on the version installed.
_OPENAI_SPLIT = (r"""(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|"""
                 r"""[^\s\p{L}\p{N}\x{345}]+""")
_OPENAI_PRE_TOKENIZER = tokenizers.pre_tokenizers.Split(tokenizers.Regex(_OPENAI_SPLIT), behavior="removed",
                                                        invert=True)
# The BPE's: OpenAI's split, then each chunk's bytes as GPT-2 symbols. ByteLevel's own (GPT-2) split is off: it has
# no IGNORECASE and would cut OpenAI's chunk "'ſ" in two.
_BPE_PRE_TOKENIZER = tokenizers.pre_tokenizers.Sequence([
    _OPENAI_PRE_TOKENIZER, tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


class PromptCutWarning(UserWarning):
    """A prompt longer than the context was cut (``truncate=True``): one who tokenizes a prompt again can ignore
    the repeat of a warning already given."""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table; its value order is the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    # The remaining bytes (controls, space, soft hyphen...) get code points from 256 upwards, in byte order.
    for offset, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + offset)
    return table


def clean_text(text: str) -> str:
    """OpenAI CLIP's text cleaning: ftfy, HTML unescape (twice), whitespace collapse, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


@dataclasses.dataclass(frozen=True)
class Word:
    """One word of a prompt: a run of letters, digits and combining marks (contractions included) or a
    punctuation/symbol run, or an SOT or EOT typed in the prompt (`_group_words`)."""

    text: str  # as written in the original prompt: prompt[start:end]
    start: int
    end: int
    # positions of its BPE pieces in the token row, SOT at 0: piece p is `TokenizedPrompt.pieces[p - 1]` and row p - 1
    # of its prompt's similarity S (one row a piece; result.json's "piece_indices" are these p - 1)
    piece_positions: tuple[int, ...]
    is_punctuation: bool  # not explained: no letter or digit (e.g. ".", "!", "-", "&", emoji, "#️⃣"), or SOT/EOT


@dataclasses.dataclass(frozen=True)
class _Pieces:
    """The BPE pieces of a cleaned prompt, without the row's SOT and EOT: ids, piece strings, [start, end) in the
    cleaned prompt, and the pre-tokenizer chunk (word or symbol run) each belongs to."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]
    chunks: tuple[int, ...]

    def first(self, n: int) -> _Pieces:
        return _Pieces(self.ids[:n], self.tokens[:n], self.offsets[:n], self.chunks[:n])


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedPrompt:
    """A prompt's token row together with its BPE pieces and words."""

    text: str
    token_ids: np.ndarray  # int32 [context_length]: SOT, pieces, EOT, zeros (read-only)
    pieces: tuple[str, ...]  # BPE piece strings, e.g. ("hippopot", "amus</w>")
    piece_positions: tuple[int, ...]  # position of each piece in token_ids (1, 2, ...)
    words: tuple[Word, ...]

    @property
    def eot_position(self) -> int:
        return len(self.pieces) + 1


class ClipTokenizer:
    """CLIP tokenizer loaded from the packaged OpenAI vocabulary or from a Hugging Face tokenizer folder."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self._backend = _load_packaged_backend() if folder is None else _load_backend(pathlib.Path(folder))
        self.sot_id = self._backend.token_to_id(SOT_TOKEN)
        self.eot_id = self._backend.token_to_id(EOT_TOKEN)
        self._byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
        # Cleaning (ftfy) and BPE cost 0.03-0.2 ms a text, and CLIP Surgery's label set, 85 template texts a class, is
        # tokenized at each call (every batch of a sweep): the ids of texts that fit are kept, per tokenizer.
        self._ids_that_fit = functools.lru_cache(maxsize=FITTING_IDS_CACHE_SIZE)(self._uncached_ids_that_fit)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: str | Iterable[str], context_length: int = CONTEXT_LENGTH,
               truncate: bool = False) -> np.ndarray:
        """int32 [n, context_length] token rows, like OpenAI `clip.tokenize(texts, context_length, truncate)`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self._token_row(self._row_ids(text, context_length, truncate), context_length) for text in texts]
        return np.stack(rows) if rows else np.zeros((0, context_length), dtype=np.int32)

    def tokenize_words(self, text: str, context_length: int = CONTEXT_LENGTH,
                       truncate: bool = False) -> TokenizedPrompt:
        """Token row of one prompt plus its pieces and words, each word mapped to a span of `text`."""
        pieces, cleaned = self._prompt_pieces(text, context_length, truncate)
        token_ids = self._token_row(pieces.ids, context_length)
        token_ids.setflags(write=False)
        positions = tuple(range(1, len(pieces.ids) + 1))
        return TokenizedPrompt(
            text=text,
            token_ids=token_ids,
            pieces=pieces.tokens,
            piece_positions=positions,
            words=_group_words(text, cleaned, pieces, positions),
        )

    def fits(self, text: str, context_length: int = CONTEXT_LENGTH) -> bool:
        """Whether `text`'s row holds all its pieces (`encode` would neither refuse nor cut it)."""
        return self._ids_that_fit(text, context_length) is not None

    def decode_piece(self, token_id: int) -> str:
        """Text of one token as OpenAI's `decode([id])` gives it (bytes as UTF-8, `</w>` as space), stripped."""
        token = self._backend.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of size {self.vocab_size}")
        raw = bytes(self._byte_of_char[c] for c in token)
        return raw.decode("utf-8", errors="replace").replace(WORD_END, " ").strip()

    def _token_row(self, ids: tuple[int, ...], context_length: int) -> np.ndarray:
        """SOT, the pieces' ids, EOT, then zero padding (OpenAI's padding, not Hugging Face's EOT padding)."""
        row = np.full(context_length, PAD_ID, dtype=np.int32)
        row[: len(ids) + 2] = [self.sot_id, *ids, self.eot_id]
        return row

    def _row_ids(self, text: str, context_length: int, truncate: bool) -> tuple[int, ...]:
        """The ids of a text's pieces in its token row: kept for a text that fits (`_ids_that_fit`); one that does
        not is refused or cut, and said, at each call."""
        ids = self._ids_that_fit(text, context_length) if isinstance(text, str) else None
        return self._prompt_pieces(text, context_length, truncate)[0].ids if ids is None else ids

    def _uncached_ids_that_fit(self, text: str, context_length: int) -> tuple[int, ...] | None:
        pieces = self._checked_pieces(text, context_length)[0]
        return pieces.ids if len(pieces.ids) <= context_length - 2 else None

    def _pieces(self, cleaned: str) -> _Pieces:
        """BPE pieces of a cleaned prompt, SOT and EOT written in it included where OpenAI's split finds them:
        its runs of symbols are taken first, so ",<|endoftext|>" is ",<|", "endoftext", "|>", pieces as any text
        (Hugging Face's added tokens would be matched anywhere, so they are none: `_load_backend`)."""
        specials = [(span, chunk) for chunk, span, special in _openai_chunks(cleaned) if special]
        blanked = list(cleaned)  # the BPE sees the rest of the text, each character where it was
        for (start, end), _ in specials:
            blanked[start:end] = " " * (end - start)
        encoding = self._backend.encode("".join(blanked), add_special_tokens=False)
        special_id = {SOT_TOKEN: self.sot_id, EOT_TOKEN: self.eot_id}
        pieces = [*zip(encoding.offsets, encoding.ids, encoding.tokens, encoding.word_ids),
                  *((span, special_id[chunk], chunk, -1 - k) for k, (span, chunk) in enumerate(specials))]
        pieces.sort(key=lambda piece: piece[0][0])  # stable: the byte pieces of one character keep their order
        offsets, ids, tokens, chunks = (tuple(column) for column in zip(*pieces)) if pieces else ((),) * 4
        return _Pieces(ids, tokens, offsets, chunks)

    def _prompt_pieces(self, text: str, context_length: int, truncate: bool) -> tuple[_Pieces, str]:
        """(BPE pieces of the cleaned prompt (no SOT/EOT), checked or truncated to fit the context; the cleaned
        prompt)."""
        pieces, cleaned = self._checked_pieces(text, context_length)
        capacity = context_length - 2
        if len(pieces.ids) > capacity:
            shown = text if len(text) <= 60 else f"{text[:57]}..."  # a long prompt is named, not repeated
            message = (f"prompt {shown!r} has {len(pieces.ids) + 2} tokens (SOT + {len(pieces.ids)} BPE pieces "
                       f"+ EOT), more than the context length {context_length}")
            if not truncate:
                raise ValueError(message + "; shorten it or truncate it (truncate=True, --truncate)")
            # Cut between words, not inside one ("hippo" of "hippopotamus" would be explained as a word); a
            # first word longer than the context is cut.
            words = _group_words(text, cleaned, pieces, tuple(range(1, len(pieces.ids) + 1)))
            kept = max((w.piece_positions[-1] for w in words if w.piece_positions[-1] <= capacity), default=capacity)
            whole = " (up to the last whole word)" if kept < capacity else ""
            warnings.warn(message + f"; keeping the first {kept} pieces{whole}", PromptCutWarning, stacklevel=3)
            pieces = pieces.first(kept)
        return pieces, cleaned

    def _checked_pieces(self, text: str, context_length: int) -> tuple[_Pieces, str]:
        """(BPE pieces of the cleaned prompt, all of them; the cleaned prompt), of a text that is valid text."""
        if not isinstance(text, str):
            raise TypeError(f"prompts must be str, got {type(text).__name__}: {text!r}")
        if context_length < 2:
            raise ValueError(f"context_length must leave room for SOT and EOT, got {context_length}")
        surrogates = [c for c in text if "\ud800" <= c <= "\udfff"]
        if surrogates:  # bytes that were not UTF-8 (a shell argument in Latin-1): BPE would read them as U+FFFD
            raise ValueError(f"prompt {text!r} is not valid text: it holds {''.join(surrogates)!r}, bytes that are "
                             "not UTF-8 (give prompts as UTF-8)")
        cleaned = clean_text(text)
        return self._pieces(cleaned), cleaned


def _group_words(text: str, cleaned: str, pieces: _Pieces, positions: tuple[int, ...]) -> tuple[Word, ...]:
    """Merge the BPE pre-tokenizer's chunks into words and map them back onto the original text.

    A chunk with a letter or digit is a word (contractions included); adjacent word chunks are one word (CLIP
    splits "don't", "cat's", "123" and "नमस्ते" into several). The pre-tokenizer also splits a combining mark (a
    Devanagari vowel sign, an Arabic diacritic, the dot "İ" lowercases to) from its letter, into a chunk with
    whatever punctuation follows it: where that chunk directly follows a word chunk, its leading pieces of marks
    only belong to the word, the rest is punctuation. A chunk of neither (punctuation, symbols, emoji with their
    variation selectors, a keycap "#️⃣", a symbol with a mark "≂̸", a mark after a space) is punctuation, and so is an
    SOT or EOT typed in the prompt (a chunk < 0 of `_Pieces`): the TCLIP author drops every SOT and EOT id, and it
    joins no word beside it. Chunks that one character of the prompt became ("ŉ", a letter, is "'n", a symbol and a
    letter) are one word (a word if either is): no two words share a character of the prompt. Pieces whose
    characters as written are letters, digits and marks are a word's whatever cleaning made of them ("ʼ", a letter,
    is "'"; mojibake "Ëœ" is "˜"): a chunk is cut between its pieces where the characters as written stop or start
    being so ("Ëœ!" is "Ëœ" and "!"). A piece that holds a symbol as written as well stays punctuation ("aʼ," is
    "a" and "ʼ,": OpenAI's split puts the "'" cleaning made of "ʼ" and the "," in one chunk, one piece "',", which no
    word can have alone; " Â°" is "Â°", the "°" that mojibake's deleted "Â" joins: `_deleted_join`)."""
    starts, ends = _original_spans(text, cleaned)

    def written(start: int, end: int) -> str:  # the characters of the prompt that cleaned[start:end] comes from
        return text[starts[start]:ends[end - 1]]

    chunks = []  # (start, end, piece positions, is_punctuation) in cleaned-text coordinates
    for chunk, members in itertools.groupby(zip(pieces.chunks, pieces.offsets, positions), key=lambda piece: piece[0]):
        members = [(start, end, position) for _, (start, end), position in members]
        if chunk >= 0 and _has_letter_or_digit(cleaned[members[0][0]:members[-1][1]]):
            chunks.append((members[0][0], members[-1][1], tuple(p for _, _, p in members), False))
            continue
        split, marks_end = 0, members[0][0]
        if chunk >= 0 and chunks and not chunks[-1][3] and chunks[-1][1] == members[0][0]:
            while marks_end < members[-1][1] and _is_mark(cleaned[marks_end]):
                marks_end += 1
            while split < len(members) and members[split][0] < marks_end:  # a mark's byte pieces join its word
                split += 1
        if split:
            chunks.append((members[0][0], min(members[split - 1][1], marks_end),
                           tuple(p for _, _, p in members[:split]), False))
        # Letters as typed that cleaning made a symbol are a word's, as written: "aʼb" is one word, "Ëœ!" "Ëœ" and "!".
        rest, in_word = members[split:], []
        as_letters = [chunk >= 0 and all(c.isalnum() or _is_mark(c) for c in written(a, b)) for a, b, _ in rest]
        for letters, run in itertools.groupby(zip(rest, as_letters), key=lambda member: member[1]):
            run = [member for member, _ in run]
            in_word += [letters and _has_letter_or_digit(written(run[0][0], run[-1][1]))] * len(run)
        for word, part in itertools.groupby(zip(rest, in_word), key=lambda member: member[1]):
            part = [member for member, _ in part]
            chunks.append((part[0][0], part[-1][1], tuple(p for _, _, p in part), not word))
    merged = []  # (start, end, piece positions, is_punctuation)
    for start, end, piece_positions, punctuation in chunks:
        merged.append((start, end, piece_positions, punctuation, punctuation))
        # Adjacent word chunks are one word, and so are any two chunks one character of the prompt became ("ŉ" is
        # "'n", a symbol and a letter): that word is a word if either is. A merge can make a word touch the one
        # before; it joins it where its first chunk is a word's (the last field): "cat-ŉ" is "cat" and "-ŉ".
        while len(merged) > 1 and (not merged[-2][3] and not merged[-1][4] and merged[-2][1] >= merged[-1][0]
                                   or ends[merged[-2][1] - 1] > starts[merged[-1][0]]):
            (start, _, first, punctuation, leads), (_, end, second, also_punctuation, _) = merged[-2:]
            merged[-2:] = [(start, end, first + second, punctuation and also_punctuation, leads)]
    return tuple(Word(text[starts[start]:ends[end - 1]], starts[start], ends[end - 1], piece_positions, punctuation)
                 for start, end, piece_positions, punctuation, _ in merged)


def has_word(text: str) -> bool:
    """Whether `text` has a word to explain once cleaned (`clean_text`): a letter or digit, which makes a run of
    text a word rather than punctuation (`Word`), outside an SOT or EOT typed in it."""
    return any(_has_letter_or_digit(chunk) for chunk, _, special in _openai_chunks(clean_text(text)) if not special)


def _openai_chunks(cleaned: str) -> list[tuple[str, tuple[int, int], bool]]:
    """OpenAI's split of a cleaned prompt: (chunk, its span, whether it is an SOT or EOT typed in the prompt)."""
    return [(chunk, span, chunk in (SOT_TOKEN, EOT_TOKEN)) for chunk, span in
            _OPENAI_PRE_TOKENIZER.pre_tokenize_str(cleaned)]


def _has_letter_or_digit(text: str) -> bool:
    return any(unicodedata.category(c)[0] in "LN" for c in text)


def _is_mark(character: str) -> bool:
    """A combining mark that belongs to a letter; variation selectors (an emoji's U+FE0F) are not."""
    code = ord(character)
    return unicodedata.category(character)[0] == "M" and not (0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF)


def _original_spans(original: str, cleaned: str) -> tuple[list[int], list[int]]:
    """For each character of `cleaned`, the [start, end) span of `original` it comes from.

    Cleaning is followed step by step: what ftfy makes of each control or space character (it deletes a vertical
    tab and turns NEL into an ellipsis) and of runs of other characters (mojibake repaired, ligatures split:
    `_ftfy_followed`), HTML entities (each unescaped character maps to what html.unescape replaced: "&quot" of
    "&quotred"), the whitespace collapse (a run of spaces, tabs or newlines is the one space it became) and
    lowercasing (a character that lowercases to two is both). What cannot be followed so (ftfy's fix of a run
    differs alone and in context) is aligned by `difflib`: a block rewritten to as many characters aligns character
    by character, each character of a block rewritten to another length maps to the whole source block, and a
    deleted block joins a character beside it, as a part of a run ftfy deleted does (`_deleted_join`: a mark
    NFC moved before another joins the character before it, up to a space). Only a run of
    more than `_LONGEST_RUN` characters that ftfy rewrites across every cut `_long_run_followed` may make is aligned
    so; difflib's alignment may then miss by a character or a word (the words' spans, not their pieces, which are
    exact). (`difflib` over the whole text matched "red\nred red" against a later repeat of itself and gave words
    empty or shifted spans.)"""
    followed = _cleaning_followed(original)
    if "".join(c for c, _, _ in followed) == cleaned:
        return [a for _, a, _ in followed], [b for _, _, b in followed]
    matcher = difflib.SequenceMatcher(None, [c for c, _, _ in followed], cleaned, autojunk=False)
    starts, ends, deleted = [0] * len(cleaned), [0] * len(cleaned), []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        one_to_one = tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1)
        if i2 > i1:
            block = (followed[i1][1], followed[i2 - 1][2])
        else:  # inserted: an empty span where it was inserted
            block = (followed[i1 - 1][2],) * 2 if i1 else (0, 0)
        for j in range(j1, j2):
            starts[j], ends[j] = followed[i1 + j - j1][1:] if one_to_one else block
        if tag == "delete":  # e.g. a mark NFC moved before another
            deleted.append((j1, *block))
    for j, deleted_start, deleted_end in deleted:  # after the loop: a later block sets the start of the one after
        joined = _deleted_join(original[deleted_start:deleted_end], deleted_start, cleaned[j - 1] if j else None,
                               cleaned[j] if j < len(cleaned) else None)
        if joined and joined[0]:
            ends[j - 1] = max(ends[j - 1], joined[1])
        elif joined:
            starts[j] = min(starts[j], joined[1])
    return starts, ends


def _cleaning_followed(original: str) -> list[tuple[str, int, int]]:
    """`clean_text(original)` as far as it can be followed character by character: (character, start, end of
    its source in `original`) for each character."""
    followed = _ftfy_followed(original)
    for _ in range(2):  # html.unescape, twice, as clean_text
        text, unescaped, done = "".join(c for c, _, _ in followed), [], 0
        for match in _HTML_REFERENCE.finditer(text):
            if html.unescape(match.group()) != match.group():
                unescaped.extend(followed[done:match.start()])
                end = match.start() + _unescaped_length(match.group())  # what follows is text, kept one to one
                source = (followed[match.start()][1], followed[end - 1][2])
                unescaped.extend((c, *source) for c in html.unescape(text[match.start():end]))
                done = end
        followed = unescaped + followed[done:]
    collapsed = []
    runs = [(m.start(), m.end()) for m in re.finditer(r"\S+", "".join(c for c, _, _ in followed))]
    for k, (run_start, run_end) in enumerate(runs):
        if k:  # the whitespace run between two words: one space, from its first character
            collapsed.append((" ", *followed[runs[k - 1][1]][1:]))
        collapsed.extend((lowered, a, b) for c, a, b in followed[run_start:run_end] for lowered in c.lower())
    return collapsed


def _ftfy_followed(original: str) -> list[tuple[str, int, int]]:
    """`ftfy.fix_text(original)` followed character by character, as `_cleaning_followed` gives it.

    ftfy rewrites a control or space character on its own (it deletes a vertical tab), and runs of non-ASCII
    characters in context: mojibake ("Ã©" is "é", and "â€ " with its space "†"), ligatures, full-width letters.
    Each word's run is taken as ftfy fixes it alone where that agrees with the whole text's fix; else each run
    between controls, '&' and ';' (spaces included) as the whole text's fix has it where the fixes of the text
    before and after it tell, else as it is. A run is followed part by part (`_run_followed`), a long one in parts of
    at most `_LONGEST_RUN` characters first (`_long_run_followed`)."""
    fixed_whole = ftfy.fix_text(original)
    if fixed_whole == original:
        return [(c, i, i + 1) for i, c in enumerate(original)]

    def followed(runs: re.Pattern, fix_run) -> list[tuple[str, int, int]]:
        characters = []
        for piece in runs.finditer(original):
            c, i, j = piece.group(), piece.start(), piece.end()
            if piece.group("run") and len(c) <= _LONGEST_RUN:
                characters.extend(_run_followed(c, i, fix_run(i, j)))
            elif piece.group("run"):
                characters.extend(_long_run_followed(c, i, fix_run(i, j)))
            else:
                fixed = _ftfy_alone(c) if c.isspace() or unicodedata.category(c)[0] == "C" else c
                characters.extend((f, i, j) for f in fixed)
        return characters

    alone = followed(_WORD_RUNS, lambda i, j: ftfy.fix_text(original[i:j]))
    if "".join(c for c, _, _ in alone) == fixed_whole:
        return alone
    return followed(_RUNS_WITH_SPACES, lambda i, j: _fixed_in_context(original, i, j, fixed_whole))


# Runs of characters ftfy may rewrite together: at least one non-ASCII character, up to ASCII controls, spaces
# (or, the second, up to controls only), and the '&' and ';' of HTML references (unescaped later, by html).
_WORD_RUNS = re.compile(r"(?P<run>[^\x00-\x20\x7f&;]*[^\x00-\x7f][^\x00-\x20\x7f&;]*)|.", re.DOTALL)
_RUNS_WITH_SPACES = re.compile(r"(?P<run>[^\x00-\x1f\x7f&;]*[^\x00-\x7f][^\x00-\x1f\x7f&;]*)|.", re.DOTALL)
# Following a run costs two ftfy calls on it per character: a longer run is followed in parts (`_long_run_followed`).
_LONGEST_RUN = 100


def _long_run_followed(run: str, start: int, fixed: str) -> list[tuple[str, int, int]]:
    """`fixed`, what ftfy made of `run`, a run longer than `_LONGEST_RUN`, mapped onto it part by part: the run is cut
    before characters that are no mark nor conjoining Hangul vowel or final (NFC composes none with the character
    before it, nor reorders marks across it) into parts of at most `_LONGEST_RUN` characters, each followed as
    `_run_followed` follows a run, where the parts fixed alone make `fixed`. Else (ftfy fixed a sequence across a cut:
    mojibake, a half-width sound mark) the run is left as it is, for `difflib` to align (`_original_spans`)."""
    kept = [(c, k, k + 1) for k, c in enumerate(run, start)]
    cuts = [0]
    while cuts[-1] < len(run):
        last = min(cuts[-1] + _LONGEST_RUN, len(run))
        cut = next((k for k in range(last, cuts[-1], -1) if k == len(run) or _starts_a_part(run[k])), None)
        if cut is None:
            return kept
        cuts.append(cut)
    parts = [(a, run[a:b]) for a, b in zip(cuts, cuts[1:])]
    fixes = [ftfy.fix_text(part) for _, part in parts]
    if "".join(fixes) != fixed:
        return kept
    return [character for (a, part), fix in zip(parts, fixes) for character in _run_followed(part, start + a, fix)]


def _starts_a_part(character: str) -> bool:
    """Whether NFC leaves `character` apart from the one before it: no mark, no conjoining Hangul vowel or final."""
    return unicodedata.category(character)[0] != "M" and not ("\u1160" <= character <= "\u11ff"
                                                               or "\ud7b0" <= character <= "\ud7ff")


def _fixed_in_context(original: str, start: int, end: int, fixed_whole: str) -> str:
    """What `original[start:end]` became in `fixed_whole`, ftfy's fix of `original`, where fixing the text before
    and after it alone gives the start and end of `fixed_whole`; else the run as it is."""
    before, after = ftfy.fix_text(original[:start]), ftfy.fix_text(original[end:])
    if fixed_whole.startswith(before) and fixed_whole.endswith(after) and len(before) + len(after) <= len(fixed_whole):
        return fixed_whole[len(before):len(fixed_whole) - len(after)]
    return original[start:end]


def _run_followed(run: str, start: int, fixed: str) -> list[tuple[str, int, int]]:
    """`fixed`, what ftfy made of `run` (at `start` of the original), mapped onto it: the run is cut wherever
    fixing the part before (or after) the cut alone gives the start (end) of `fixed` ("Ã©â€œÃ©" is "Ã©", "â€œ",
    "Ã©": 'é"é'); each part's characters map one to one where it kept its length, else to the whole part ("â€ " is
    "†", its space a byte of the mojibake), and a part ftfy deleted ("Â" of "Âµm", a lead byte of mojibake) joins a
    character beside it, up to a space (`_deleted_join`).
    A part rewritten to whitespace alone ("Â " of "Â Â" is a non-breaking space) is in no word; a run with a part
    rewritten to whitespace and other text (words on both sides would share its span) is left as it is."""
    kept = [(c, k, k + 1) for k, c in enumerate(run, start)]
    if fixed == run:
        return kept
    cuts = {0: 0, len(run): len(fixed)}  # cut in the run -> where it falls in `fixed`
    for cut in range(1, len(run)):
        head, tail = ftfy.fix_text(run[:cut]), ftfy.fix_text(run[cut:])
        if fixed.startswith(head):
            cuts[cut] = len(head)
        elif fixed.endswith(tail):
            cuts[cut] = len(fixed) - len(tail)
    followed, deleted, (a, m) = [], [], (0, 0)
    for b, n in sorted(cuts.items())[1:]:
        if n < m:  # a cut out of order with those before it: left out
            continue
        part = fixed[m:n]
        if not part:  # deleted: joined to a character beside it once all are followed
            deleted.append((len(followed), start + a, start + b))
        elif len(part) == b - a:
            followed.extend((c, start + a + k, start + a + k + 1) for k, c in enumerate(part))
        elif any(c.isspace() for c in part) and not part.isspace():
            return kept
        else:
            followed.extend((c, start + a, start + b) for c in part)
        a, m = b, n
    for k, deleted_start, deleted_end in deleted:
        before, after = followed[k - 1] if k else None, followed[k] if k < len(followed) else None
        joined = _deleted_join(run[deleted_start - start:deleted_end - start], deleted_start, before and before[0],
                               after and after[0])
        if joined and joined[0]:
            followed[k - 1] = (before[0], before[1], max(before[2], joined[1]))
        elif joined:
            followed[k] = (after[0], min(after[1], joined[1]), after[2])
    return followed


def _deleted_join(block: str, start: int, before: str | None, after: str | None) -> tuple[bool, int] | None:
    """How `block`, characters at `start` of the prompt that cleaning deleted, joins a character of the cleaned text
    beside it (`before`, `after`; None: none there): (True, the end of its part that joins the one before) or
    (False, the start of its part that joins the one after); None where no part does. It joins the one before where
    that is a letter, digit or mark (a mark NFC moved before another stays with its letter: "a" + U+0327 + U+0301 is
    "á" + U+0327) or where a space or nothing follows; else the one after ("Â" of "(Âµm)", a lead byte of mojibake,
    is part of the word "Âµm"). Either way a deleted letter beside a letter stays in its word. The part is up to its
    first whitespace (from its last), as a space is in no word ("Â " of "Â abc", mojibake of a non-breaking space
    that cleaning strips, joins no word)."""
    joins_before = before is not None and (after is None or after.isspace()
                                           or unicodedata.category(before)[0] in "LNM")
    touching = len(re.match(r"\S*", block if joins_before else block[::-1]).group())
    if not touching or not joins_before and after is None:
        return None
    return (True, start + touching) if joins_before else (False, start + len(block) - touching)


@functools.lru_cache(maxsize=None)
def _ftfy_alone(character: str) -> str:
    return ftfy.fix_text(character)


# html.unescape's own pattern of a character reference (named, decimal or hexadecimal; the semicolon optional).
_HTML_REFERENCE = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


def _unescaped_length(reference: str) -> int:
    """How many leading characters of a character reference (an `_HTML_REFERENCE` match) html.unescape replaces:
    all, but of a name that is no entity ("&quotred" has no ';') only its longest prefix that is one ("&quot")."""
    name = reference[1:]
    if name.startswith("#") or name in html.entities.html5:
        return len(reference)
    return 1 + next((n for n in range(len(name) - 1, 1, -1) if name[:n] in html.entities.html5), len(name))


def is_tokenizer_folder(folder: pathlib.Path) -> bool:
    """Whether `folder` holds what `_load_backend` reads. Part of a tokenizer (one of vocab.json and merges.txt
    without the other, or a tokenizer_config.json / special_tokens_map.json without either, and no tokenizer.json)
    is refused, naming what is missing, as transformers' CLIPTokenizer refuses it: read as no tokenizer, the packaged
    vocabulary would silently stand in for the folder's own."""
    if (folder / "tokenizer.json").is_file():
        return True
    present = [name for name in ("vocab.json", "merges.txt") if (folder / name).is_file()]
    if len(present) == 1:
        missing = "merges.txt" if present == ["vocab.json"] else "vocab.json"
        raise ValueError(f"tokenizer in {folder} has {present[0]} but no {missing} (a tokenizer is tokenizer.json, "
                         "or vocab.json + merges.txt)")
    described = [name for name in ("tokenizer_config.json", "special_tokens_map.json") if (folder / name).is_file()]
    if not present and described:
        raise ValueError(f"tokenizer in {folder} has {described[0]} but neither tokenizer.json nor vocab.json + "
                         "merges.txt")
    return len(present) == 2


def _load_backend(folder: pathlib.Path) -> tokenizers.Tokenizer:
    """The BPE of a CLIP tokenizer folder (Hugging Face layout), built from its data files alone.

    `tokenizer.json` when the folder has one, else `vocab.json` + `merges.txt` with `</w>` word ends. No code or
    class named by the folder is loaded. The normalizer is off: `clean_text` applies OpenAI's normalization, so the
    BPE sees exactly the text OpenAI's tokenizer sees; and it is split as OpenAI's `simple_tokenizer` splits it
    (`_BPE_PRE_TOKENIZER`; Hugging Face's tokenizer.json spells the split without OpenAI's IGNORECASE). SOT and EOT
    are vocabulary entries, not added tokens (which would be matched anywhere in text: `ClipTokenizer._pieces` puts
    them where OpenAI's split finds them); a vocabulary without them is not CLIP's and is refused.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            spec = loads_json(_read_text(path))
            spec["added_tokens"] = [token for token in spec.get("added_tokens") or []
                                    if token.get("content") not in (SOT_TOKEN, EOT_TOKEN)]
            backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
        except Exception as err:  # tokenizers raises plain Exceptions for malformed files
            raise ValueError(f"{path} is not a tokenizers file: {err}") from None
    else:
        backend = _bpe_from_files(folder / "vocab.json", folder / "merges.txt")
    backend.normalizer = None
    backend.pre_tokenizer = _BPE_PRE_TOKENIZER
    missing = [token for token in (SOT_TOKEN, EOT_TOKEN) if backend.token_to_id(token) is None]
    if missing:
        raise ValueError(f"tokenizer in {folder} has no {' / '.join(missing)}: not a CLIP tokenizer")
    backend.no_truncation()
    backend.no_padding()
    return backend


def _bpe_from_files(vocab_path: pathlib.Path, merges_path: pathlib.Path) -> tokenizers.Tokenizer:
    try:
        vocab = loads_json(_read_text(vocab_path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{vocab_path} is not valid JSON: {err}") from None
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              for k, v in vocab.items()):
        raise ValueError(f"{vocab_path} must map token strings to integer ids")
    lines = [line for line in _read_text(merges_path).splitlines() if line and not line.startswith("#version")]
    merges = [tuple(line.split(" ")) for line in lines]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        raise ValueError(f"{merges_path}: merge {bad + 1} is not two symbols separated by a space: {lines[bad]!r}")
    try:
        backend = tokenizers.Tokenizer(tokenizers.models.BPE(
            vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=WORD_END, fuse_unk=False,
            unk_token=EOT_TOKEN))
    except Exception as err:  # e.g. a merge whose symbols are not in the vocabulary
        raise ValueError(f"{vocab_path.parent}: vocab.json and merges.txt do not form a BPE: {err}") from None
    backend.decoder = tokenizers.decoders.ByteLevel()
    return backend


def _read_text(path: pathlib.Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None


def _load_packaged_backend() -> tokenizers.Tokenizer:
    """Load the packaged files; the large ones are stored gzipped, so they are unpacked to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in DATA_DIR.iterdir():
            if path.suffix == ".gz":
                (pathlib.Path(tmp) / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
        return _load_backend(pathlib.Path(tmp))


@functools.cache
def default_tokenizer() -> ClipTokenizer:
    """A shared tokenizer built from the packaged OpenAI CLIP vocabulary (loading takes about a second)."""
    return ClipTokenizer()
