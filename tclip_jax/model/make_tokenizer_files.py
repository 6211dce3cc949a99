"""Derive the Hugging Face CLIP tokenizer files from OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

The vocabulary is built the way OpenAI's `simple_tokenizer.SimpleTokenizer` builds it: the 256 byte symbols
(in `bytes_to_unicode` order), the same symbols with `</w>`, one entry per merge for the first
49152 - 256 - 2 merges, then `<|startoftext|>` and `<|endoftext|>` (49408 entries).

Usage: python -m tclip_jax.model.make_tokenizer_files path/to/bpe_simple_vocab_16e6.txt.gz [--out DIR]
"""
from __future__ import annotations

import argparse
import gzip
import json
import pathlib
from collections.abc import Sequence

from tclip_jax.model.tokenizer import DATA_DIR, EOT_TOKEN, SOT_TOKEN, WORD_END, bytes_to_unicode

N_MERGES = 49152 - 256 - 2
MERGES_HEADER = "#version: 0.2"
TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "bos_token": SOT_TOKEN,
    "eos_token": EOT_TOKEN,
    "unk_token": EOT_TOKEN,
    "pad_token": EOT_TOKEN,
    "do_lower_case": True,
    "errors": "replace",
    "add_prefix_space": False,
}
SPECIAL_TOKENS_MAP = {key: TOKENIZER_CONFIG[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}


def read_merges(bpe_gz: pathlib.Path) -> list[tuple[str, str]]:
    """The merges OpenAI's tokenizer uses: lines 1..N_MERGES of the file (line 0 is a version header)."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    if MERGES_HEADER not in lines[0] or len(lines) <= N_MERGES:
        raise ValueError(f"{bpe_gz} does not look like bpe_simple_vocab_16e6.txt.gz (header {lines[0][:40]!r})")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    malformed = [m for m in merges if len(m) != 2]
    if malformed:
        raise ValueError(f"{bpe_gz}: merge lines must hold two symbols, got {malformed[:3]}")
    return merges


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token string -> id, in SimpleTokenizer's order."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + WORD_END for s in symbols] + [a + b for a, b in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("derived vocabulary has duplicate tokens; the merges file is not the CLIP one")
    return vocab


def _write_gzip(path: pathlib.Path, text: str) -> None:
    # mtime=0 keeps the compressed bytes reproducible.
    path.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))


def write_tokenizer_files(merges: Sequence[tuple[str, str]], out_dir: pathlib.Path) -> None:
    """Write vocab.json.gz, merges.txt.gz, tokenizer_config.json and special_tokens_map.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(merges)
    _write_gzip(out_dir / "vocab.json.gz", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
    _write_gzip(out_dir / "merges.txt.gz", "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=pathlib.Path, help="bpe_simple_vocab_16e6.txt.gz from a CLIP release")
    parser.add_argument("--out", type=pathlib.Path, default=DATA_DIR, help="output folder (default: package data)")
    args = parser.parse_args(argv)
    write_tokenizer_files(read_merges(args.bpe_gz), args.out)


if __name__ == "__main__":
    main()
