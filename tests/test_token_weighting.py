"""Attention-weighted token relevance: multi-word queries against weights computed by explicit loops from the text
tower's attention probabilities (themselves checked against transformers in test_model_parity)."""
import numpy as np
import pytest

from tclip_jax.checkpoints.load import load_clip
from tclip_jax.methods.base import Query
from tclip_jax.methods.tclip import TCLIP, Settings
from tclip_jax.model import l2_normalize

PROMPT = "a red circle above a blue square"
GLUED = "a photo of a golden retriever's toy."  # a two-piece word, a class name inside it, punctuation


@pytest.fixture(scope="module")
def tiny_clip(fixtures_dir):
    return load_clip(fixtures_dir / "tiny_openai_clip.npz")


def reference_weights(attention: list[np.ndarray], eot: int, weighting: str) -> list[float]:
    """Weights of positions 0..eot from per-block head-averaged attention [L, L], by explicit loops."""
    n = eot + 1
    if weighting == "last":
        return [float(attention[-1][eot, j]) for j in range(n)]
    if weighting == "mean":
        return [sum(float(a[eot, j]) for a in attention) / len(attention) for j in range(n)]
    rollout = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    for block in attention:
        mixed = [[0.5 * float(block[i, j]) + (0.5 if i == j else 0.0) for j in range(n)] for i in range(n)]
        mixed = [[v / sum(row) for v in row] for row in mixed]
        rollout = [[sum(mixed[i][k] * rollout[k][j] for k in range(n)) for j in range(n)] for i in range(n)]
    return rollout[eot]


@pytest.mark.parametrize("weighting", ["last", "mean", "rollout"])
def test_multi_word_queries_are_the_attention_weighted_mean_of_their_pieces(tiny_clip, weighting, highest_precision):
    method = TCLIP(tiny_clip, Settings(translations=1, token_weighting=weighting))
    tokens = method.tokenize([PROMPT])[0]
    out = tiny_clip.model.apply({"params": tiny_clip.params}, tokens.token_ids[None], True, method="encode_text")
    embeds = np.asarray(l2_normalize(out.tokens[0]), np.float64)
    attention = [np.asarray(p[0], np.float64).mean(axis=0) for p in out.attention_probs]
    weights = reference_weights(attention, tokens.eot_position, weighting)
    words = [w for w in tokens.words if not w.is_punctuation]
    spans = {"whole prompt": None, "phrase": (words[1].start, words[2].end)}  # "red circle"
    for what, span in spans.items():
        pieces = [p for w in words if span is None or (w.start >= span[0] and w.end <= span[1])
                  for p in w.piece_positions]
        expected = sum(weights[p] * embeds[p] for p in pieces) / sum(weights[p] for p in pieces)
        (query,) = method.encode([Query(PROMPT, span)]).per_query
        np.testing.assert_allclose(query, expected, atol=1e-5, err_msg=what)
    # A single word keeps the paper's mean of its pieces, whatever the weighting.
    plain = TCLIP(tiny_clip, Settings(translations=1))
    one_word = Query(PROMPT, (words[2].start, words[2].end))
    np.testing.assert_array_equal(method.encode([one_word]).per_query, plain.encode([one_word]).per_query)


def _unit_token_embeddings(clip, tokens) -> np.ndarray:
    out = clip.model.apply({"params": clip.params}, tokens.token_ids[None], method="encode_text")
    return np.asarray(l2_normalize(out.tokens[0]), np.float64)


@pytest.mark.parametrize("prompt", [PROMPT, GLUED])
def test_none_is_the_plain_mean_of_words(tiny_clip, prompt, highest_precision):
    """The whole prompt's query: the mean over its words (punctuation is none) of each word's mean piece."""
    method = TCLIP(tiny_clip, Settings(translations=1))
    tokens = method.tokenize([prompt])[0]
    embeds = _unit_token_embeddings(tiny_clip, tokens)
    words = [w for w in tokens.words if any(c.isalnum() for c in prompt[w.start:w.end])]
    assert len(words) == len(prompt.split())
    expected = np.mean([embeds[list(w.piece_positions)].mean(axis=0) for w in words], axis=0)
    np.testing.assert_allclose(method.encode([Query(prompt)]).per_query[0], expected, atol=1e-5)


@pytest.mark.parametrize("weighting", ["none", "last"])
def test_a_span_inside_a_word_takes_the_whole_word(tiny_clip, weighting, highest_precision):
    """Overlap, not inclusion: "retriever" inside "retriever's" explains that word, the plain mean of its two
    pieces whatever the weighting (a single word)."""
    method = TCLIP(tiny_clip, Settings(translations=1, token_weighting=weighting))
    tokens = method.tokenize([GLUED])[0]
    embeds = _unit_token_embeddings(tiny_clip, tokens)
    (word,) = [w for w in tokens.words if GLUED[w.start:w.end] == "retriever's"]
    assert len(word.piece_positions) == 2
    start = GLUED.index("retriever")
    (query,) = method.encode([Query(GLUED, (start, start + len("retriever")))]).per_query
    np.testing.assert_allclose(query, embeds[list(word.piece_positions)].mean(axis=0), atol=1e-5)


def test_token_weighting_is_a_setting_and_a_flag():
    with pytest.raises(ValueError, match="token_weighting must be one of"):
        Settings(token_weighting="max")
    assert Settings.from_dict({**Settings().to_dict(), "token_weighting": "rollout"}).token_weighting == "rollout"
