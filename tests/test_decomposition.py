"""Direct-contribution decomposition against clip_text_span's outputs, mean ablation and TextSpan invariants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tclip_jax.methods import common
from tclip_jax.methods import METHODS
from tclip_jax.checkpoints.load import load_clip
from tclip_jax.methods.base import Query, postprocess_maps
from tclip_jax.methods.decomposition import (
    decompose,
    decomposition_map,
    mean_ablate,
    residual_terms,
    text_span,
    text_span_heads,
)
from tclip_jax.model import l2_normalize

from references import assert_close

pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.fixture(scope="module")
def reference(fixture_npz):
    return fixture_npz("decomposition/decomposition_tiny.npz")


@pytest.fixture(scope="module")
def heatmap_output(tiny_model, reference):
    model, params = tiny_model
    with jax.default_matmul_precision("highest"):
        images = np.ascontiguousarray(reference["pixel_values"].transpose(0, 2, 3, 1))
        return decomposition_map(model, params, images, reference["text_tokens"])


def test_residual_terms_match_the_prs_logger(tiny_model, reference):
    model, params = tiny_model
    images = np.ascontiguousarray(reference["pixel_values"].transpose(0, 2, 3, 1))
    terms = jax.jit(residual_terms, static_argnums=0)(model, params, images)
    assert_close(terms.attentions, reference["attentions_raw"], "attention terms")
    assert_close(terms.mlps, reference["mlps_raw"], "ln_pre and MLP terms")
    assert_close(terms.ln_mean[:, None], reference["ln_post_mean"], "ln_post mean")
    assert_close(terms.ln_std[:, None], reference["ln_post_std"], "ln_post std")
    assert_close(terms.norm, np.linalg.norm(reference["representation"], axis=-1), "embedding norm")


def test_decomposition_matches_reference_and_sums_to_the_embedding(heatmap_output, reference):
    decomposition = heatmap_output.decomposition
    assert_close(decomposition.attentions, reference["attentions"], "attention contributions")
    assert_close(decomposition.mlps, reference["mlps"], "ln_pre and MLP contributions")
    assert_close(decomposition.embedding, reference["image_embedding_normalized"], "sum of contributions")


def test_contributions_sum_to_the_embedding_on_a_non_square_grid(tiny_model):
    model, params = tiny_model
    config = model.config
    images = np.random.default_rng(0).standard_normal((2, 64, 96, 3)).astype(np.float32)
    decomposition = decompose(model, params, images)
    assert decomposition.attentions.shape == (2, config.vision_layers, 1 + 2 * 3, config.vision_heads,
                                              config.embed_dim)
    embeds = jax.jit(common.encode_image, static_argnums=0)(model, params, images).embeds
    assert_close(decomposition.embedding, np.asarray(l2_normalize(embeds)), "sum of contributions")


def test_decomposition_heatmap_matches_reference(heatmap_output, reference):
    to_tokens_last = lambda maps: np.asarray(maps).reshape(*maps.shape[:2], -1).transpose(0, 2, 1)
    assert_close(to_tokens_last(heatmap_output.raw), reference["class_heatmap_raw"], "raw heatmaps")
    assert_close(to_tokens_last(heatmap_output.maps), reference["heatmaps"], "heatmaps minus the text mean")
    image, text = int(reference["seg_image_index"]), int(reference["seg_text_index"])
    grid = heatmap_output.maps[image, text]
    assert_close(grid, reference["seg_heatmap_grid"], "segmentation grid")
    assert_close(postprocess_maps(grid, (224, 224), METHODS["decomposition"].heatmap),
                 reference["seg_normalized"], "upsampled, clipped, normalized heatmap")


def test_mean_ablation(heatmap_output):
    decomposition = heatmap_output.decomposition
    layers, heads = decomposition.heads.shape[1:3]
    none = jnp.zeros((layers, heads), bool)
    assert_close(mean_ablate(decomposition, decomposition, none), np.asarray(decomposition.embedding),
                 "ablating nothing")
    ablated_head = none.at[2, 1].set(True)
    expected = (decomposition.embedding - decomposition.heads[:, 2, 1]
                + decomposition.heads[:, 2, 1].mean(axis=0))
    assert_close(mean_ablate(decomposition, decomposition, ablated_head), np.asarray(expected), "one head")
    everything = mean_ablate(decomposition, decomposition, ~none, jnp.ones(layers + 1, bool))
    mean_embedding = np.broadcast_to(decomposition.embedding.mean(axis=0), everything.shape)
    assert_close(everything, mean_embedding, "ablating every term gives the reference mean")
    # The mean is over the reference batch, not over the images ablated: image 0 against the mean of all 3.
    first = jax.tree_util.tree_map(lambda a: a[:1], decomposition)
    ablated_mlp = jnp.zeros(layers + 1, bool).at[1].set(True)
    expected = (decomposition.embedding[:1] - decomposition.heads[:1, 2, 1] + decomposition.heads[:, 2, 1].mean(axis=0)
                - decomposition.mlps[:1, 1] + decomposition.mlps[:, 1].mean(axis=0))
    assert_close(mean_ablate(first, decomposition, ablated_head, ablated_mlp), np.asarray(expected),
                 "one head and one MLP of one image against a reference of three")
    with pytest.raises(ValueError, match="heads mask"):
        mean_ablate(decomposition, decomposition, jnp.zeros((layers, heads + 1), bool))
    # masks as Python lists are the boolean arrays they spell (they raised AttributeError on .shape)
    as_lists = mean_ablate(first, decomposition, np.asarray(ablated_head).tolist(), np.asarray(ablated_mlp).tolist())
    np.testing.assert_array_equal(np.asarray(as_lists), np.asarray(mean_ablate(first, decomposition, ablated_head,
                                                                                 ablated_mlp)))


def test_the_method_subtracts_the_label_sets_mean_from_each_prompts_map(fixtures_dir, reference):
    """compute_segmentations.py's map minus the mean over the text set, with the label set as that set, for a
    prompt outside the set as for one in it: the official raw heatmaps give the expected maps."""
    method = METHODS["decomposition"](load_clip(fixtures_dir / "tiny_openai_clip.npz"))
    texts = [str(text) for text in reference["texts"]]
    queries = method.encode([Query(texts[0]), Query(texts[1])], texts[1:])
    images = np.ascontiguousarray(reference["pixel_values"].transpose(0, 2, 3, 1))
    maps = np.asarray(jax.jit(method.grid_maps)(method.params, images, queries))
    raw = reference["class_heatmap_raw"]  # [B, N, T]
    expected = raw[:, :, :2] - raw[:, :, 1:].mean(axis=2, keepdims=True)
    assert_close(maps.reshape(*maps.shape[:2], -1).transpose(0, 2, 1), expected, "maps minus the label set's mean")


def planted_outputs(seed=0, n_images=64, dim=16, scales=(5.0, 3.0, 1.5)):
    """Head outputs: a constant offset plus orthonormal planted directions with decreasing spread, and a text
    pool holding those directions (shuffled) among random unit distractors. The SVD is of the uncentred
    outputs, so its span needs rank len(scales) + 1 (the offset)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0][: len(scales)]
    coefficients = rng.standard_normal((n_images, len(scales))) * np.asarray(scales)
    outputs = 0.7 + coefficients @ basis
    distractors = rng.standard_normal((20, dim))
    pool = np.concatenate([basis, distractors / np.linalg.norm(distractors, axis=1, keepdims=True)])
    order = rng.permutation(len(pool))
    planted_positions = np.argsort(order)[: len(scales)]   # where each planted direction ended up
    return outputs.astype(np.float32), pool[order].astype(np.float32), planted_positions


def test_text_span_recovers_a_planted_basis():
    outputs, pool, planted = planted_outputs()
    span = text_span(outputs, pool, num_texts=3, rank=4)
    np.testing.assert_array_equal(np.asarray(span.indices), planted)
    assert_close(span.reconstruction, outputs, "three planted texts reconstruct the outputs", tol=1e-4)
    first = text_span(outputs, pool, num_texts=1, rank=4)
    assert int(first.indices[0]) == planted[0]
    residual = np.asarray(outputs - first.reconstruction)
    assert_close(residual @ pool[planted[0]], np.zeros(len(outputs), np.float32), "chosen text projected out")


def test_text_span_stops_adding_once_the_pool_is_exhausted():
    """A pool of two independent texts asked for four: the official code divides by the rounding residue left of a
    text already spanned (a spurious full-size component, repeated indices; NaN where it is exactly zero). The picks past the pool's span are -1 and add nothing; the reconstruction is the outputs' mean plus
    their projection on the span of the two texts (least squares, closed form)."""
    rng = np.random.default_rng(0)
    outputs = rng.standard_normal((40, 8)).astype(np.float32)
    distinct = rng.standard_normal((2, 8)).astype(np.float32)
    pool = np.repeat(distinct, 5, axis=0)                       # rows 0-4 one text, 5-9 the other
    span = text_span(outputs, pool, num_texts=4, rank=8)
    indices = np.asarray(span.indices)
    assert list(indices[2:]) == [-1, -1] and sorted(indices[:2] // 5) == [0, 1]
    mean = outputs.mean(axis=0, keepdims=True)
    coefficients = np.linalg.lstsq(distinct.T.astype(np.float64), (outputs - mean).T, rcond=None)[0]
    expected = mean + (distinct.T @ coefficients).T
    assert_close(span.reconstruction, expected.astype(np.float32), "mean + projection on the pool's span", tol=1e-4)


def test_text_span_heads_runs_every_head():
    outputs, pool, planted = planted_outputs()
    other, _, _ = planted_outputs(seed=1)
    heads = np.stack([np.stack([outputs, other], axis=1)] * 2, axis=1)    # [n, L=2, H=2, dim]
    spans = text_span_heads(heads, pool, num_texts=2, rank=4)
    assert spans.indices.shape == (2, 2, 2)
    np.testing.assert_array_equal(np.asarray(spans.indices[1, 0]), planted[:2])
    single = text_span(other, pool, num_texts=2, rank=4)
    np.testing.assert_array_equal(np.asarray(spans.indices[0, 1]), np.asarray(single.indices))
    assert_close(spans.reconstruction[0, 1], np.asarray(single.reconstruction), "per-head reconstruction")


def test_text_span_rejects_bad_sizes():
    outputs, pool, _ = planted_outputs()
    with pytest.raises(ValueError, match="num_texts"):
        text_span(outputs, pool, num_texts=4, rank=3)
    with pytest.raises(ValueError, match="rank"):
        text_span(outputs, pool, num_texts=1, rank=17)
    with pytest.raises(ValueError, match="num_texts must be an integer"):
        text_span(outputs, pool, num_texts=2.0, rank=4)
    # numpy's integers are integers (a loop over np.arange): the same picks as Python's
    np.testing.assert_array_equal(np.asarray(text_span(outputs, pool, num_texts=np.int64(2), rank=np.int64(4)).indices),
                                  np.asarray(text_span(outputs, pool, num_texts=2, rank=4).indices))
    with pytest.raises(ValueError, match="rank must be an integer"):
        text_span(outputs, pool, num_texts=1, rank=True)
    with pytest.raises(ValueError, match=r"of the same dim, got \(64, 16\) and \(23, 15\)"):
        text_span(outputs, pool[:, :15], num_texts=1, rank=4)
    with pytest.raises(ValueError, match="outputs \\[n_images, dim\\]"):
        text_span(outputs[None], pool, num_texts=1, rank=4)
    with pytest.raises(ValueError, match=r"heads \[n_images, L, heads, dim\] \(Decomposition.heads\), got \(64, 2, 16\)"):
        text_span_heads(np.stack([outputs, outputs], axis=1), pool, num_texts=1, rank=4)

