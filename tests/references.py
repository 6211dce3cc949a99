"""Comparing arrays with the official implementations' outputs (the fixtures): one helper for every parity test."""
import functools

import numpy as np

TOL = 1e-4


def assert_close(ours, reference, what, tol=TOL, relative=False):
    """Same shape and max abs error below `tol`; `relative`: below tol * max(1, |reference|) elementwise (float32
    sums of large magnitude cannot be closer than a few ulps). Errors are taken in float64."""
    ours = np.asarray(ours, np.float64)
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} != {reference.shape}"
    err = np.abs(ours - reference)
    bound = tol * np.maximum(1, np.abs(reference)) if relative else tol
    assert (err < bound).all(), f"{what}: max abs error {err.max()}"


def first_fingerprint(clip) -> str:
    """A model's fingerprint as tclip_jax recorded it before 2026-12-06 (sweep.json, eclip_projections.json), written
    out again from its definition: SHA-256 over the SHA-256 of each part (the MLP activation; then the projections,
    positional embeddings and final layer norms, each its shape's repr and its float16 bytes), 16 hex digits."""
    import hashlib

    visual, text = clip.params["visual"], clip.params["text"]
    leaves = [visual["proj"], text["projection"], visual["positional_embedding"], text["positional_embedding"],
              visual["ln_post"]["bias"], visual["ln_post"]["scale"], text["ln_final"]["bias"], text["ln_final"]["scale"]]
    parts = [clip.config.activation.encode()] + [repr(np.shape(leaf)).encode() + np.asarray(leaf, np.float16).tobytes()
                                                 for leaf in leaves]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def author_kept_positions(tokenizer, token_ids) -> np.ndarray:
    """int32 positions of one token row that the TCLIP author's similarity code keeps: not SOT, EOT or padding, and
    not a piece that decodes to "", "!" or "." (its filter, written out)."""
    from tclip_jax.model.tokenizer import EOT_TOKEN, PAD_ID, SOT_TOKEN

    dropped = {"", SOT_TOKEN, EOT_TOKEN, "!", "."}
    token_ids = np.asarray(token_ids)
    assert token_ids.ndim == 1, f"one token row, got shape {token_ids.shape}"
    kept = [p for p, i in enumerate(token_ids.tolist())
            if i not in (tokenizer.sot_id, tokenizer.eot_id, PAD_ID) and tokenizer.decode_piece(i) not in dropped]
    return np.asarray(kept, dtype=np.int32)


# OpenAI's `bytes_to_unicode`, written out: each byte's symbol in the BPE's alphabet (printable bytes as themselves,
# the others as chr(256 + k) in byte order).
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
BYTE_SYMBOL = {**{b: chr(b) for b in _PRINTABLE},
               **{b: chr(256 + k) for k, b in enumerate(b for b in range(256) if b not in _PRINTABLE)}}


def openai_simple_tokenizer_ids(text: str, vocab: dict[str, int], merges: list[str]) -> list[int]:
    """The ids OpenAI's `SimpleTokenizer().encode(text)` gives (openai/CLIP clip/simple_tokenizer.py), written out
    from its steps for a vocabulary and merge list in its layout: ftfy, HTML unescape twice, whitespace collapse,
    lowercase; its split (the `regex` module's, with its pattern and IGNORECASE), in which a chunk that is SOT or EOT
    is that token; each other chunk's UTF-8 bytes as GPT-2 symbols, the last with `</w>`, merged pair by pair, the
    pair of lowest merge rank first, every occurrence left to right, until no pair has a rank."""
    import html

    import ftfy
    import regex

    symbol = BYTE_SYMBOL
    ranks = _merge_ranks(tuple(merges))
    special = ("<|startoftext|>", "<|endoftext|>")
    split = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                          r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    text = regex.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text))).strip()).strip().lower()
    ids = []
    for chunk in split.findall(text):
        if chunk in special:
            ids.append(vocab[chunk])
            continue
        symbols = [symbol[b] for b in chunk.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            merged, k = [], 0
            while k < len(symbols):
                if tuple(symbols[k:k + 2]) == pair:
                    merged.append(symbols[k] + symbols[k + 1])
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            symbols = merged
        ids.extend(vocab[s] for s in symbols)
    return ids


@functools.lru_cache(maxsize=4)
def _merge_ranks(merges: tuple[str, ...]) -> dict[tuple[str, ...], int]:
    """{merge pair: its rank (line number)}, as `SimpleTokenizer.__init__` builds `bpe_ranks`: built once per merge
    list, not for every text (400 texts took 10 s)."""
    return {tuple(line.split()): rank for rank, line in enumerate(merges)}
