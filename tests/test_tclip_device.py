"""The jitted, vmapped TCLIP aggregate against a plain loop over the paper's definition."""
import jax
import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from tclip_jax.methods.tclip.relevance import aggregate_maps, token_embeddings, translated_patch_embeddings
from tclip_jax.methods.tclip.translations import translation_offsets, trimmed_mean


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model


def shifted(image, dy, dx):
    """The copy whose pixel (y, x) shows image[y - dy, x - dx], zero where that is outside."""
    height, width = image.shape[:2]
    out = np.zeros_like(image)
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    return out


def reference_maps(model, params, image, queries, offsets, trim):
    """Explicit loop: shift, encode, relevance, upsample (torch), shift back, trimmed mean of valid copies."""
    height, width = image.shape[:2]
    grid_h, grid_w = height // 32, width // 32
    # One compiled forward for the copies (run op by op, the 25 forwards were a third of this file's time).
    encode = jax.jit(lambda copy: model.apply({"params": params}, copy[None], method="encode_image").tokens[0, 1:])
    back = np.full((len(offsets), len(queries), height, width), np.nan)
    for k, (dy, dx) in enumerate(offsets):
        with jax.default_matmul_precision("highest"):
            tokens = np.asarray(encode(shifted(image, dy, dx)), np.float64)
        patches = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
        grids = (queries @ patches.T).reshape(len(queries), 1, grid_h, grid_w)
        up = F.interpolate(torch.from_numpy(grids), size=(height, width), mode="bilinear",
                           align_corners=False).numpy()[:, 0]
        for y in range(height):
            for x in range(width):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    back[k, :, y, x] = up[:, y + dy, x + dx]
    # Per pixel, the trimmed mean over the copies that saw it: scipy's, once per set of pixels seen by the same copies.
    values = back.reshape(len(offsets), len(queries), height * width)
    seen_by, pixel_set = np.unique(~np.isnan(values[:, 0]), axis=1, return_inverse=True)
    result = np.empty((len(queries), height * width))
    for i, copies in enumerate(seen_by.T):
        pixels = pixel_set == i
        result[:, pixels] = scipy.stats.trim_mean(values[copies][:, :, pixels], trim, axis=0)
    return result.reshape(len(queries), height, width)


# Small inputs keep the explicit per-pixel reference fast; the positional embedding is resized for them.
@pytest.mark.parametrize("size_hw,count,trim", [((96, 96), 25, 0.2), ((64, 128), 25, 0.1), ((96, 96), 1, 0.2)])
def test_aggregate_equals_explicit_loop(tiny, fixture_images, size_hw, count, trim):
    model, params = tiny
    rng = np.random.default_rng(0)
    image = rng.standard_normal((*size_hw, 3)).astype(np.float32)
    image[:size_hw[0] // 2] += 1.0  # structure, so that copies differ
    offsets = translation_offsets(32, count=count)
    queries = rng.standard_normal((3, 64))
    queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
    with jax.default_matmul_precision("highest"):
        patches = translated_patch_embeddings(model, params, image[None], offsets)[0]
        ours = aggregate_maps(patches, queries.astype(np.float32), offsets,
                              (size_hw[0] // 32, size_hw[1] // 32), size_hw, trim)
    expected = reference_maps(model, params, image, queries, offsets, trim)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_offsets_layout():
    offsets = translation_offsets(32)
    assert len(offsets) == 25 and offsets[0] == (0, 0) and len(set(offsets)) == 25
    assert sorted({max(abs(dy), abs(dx)) for dy, dx in offsets}) == [0, 8, 16, 24]
    assert translation_offsets(32, count=1) == ((0, 0),)
    # Shifts are the nearest whole pixels to fraction x patch size: 2.8, 6.3 and 9.8 pixels at patch 14.
    offsets = translation_offsets(14, (0.2, 0.45, 0.7), count=25)
    assert len(offsets) == 25 and offsets[0] == (0, 0)
    assert set(offsets) == {(dy * s, dx * s) for s in (3, 6, 10) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    with pytest.raises(ValueError, match="translations"):
        translation_offsets(32, count=9)


def test_trimmed_mean_matches_scipy_with_ragged_validity():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((25, 40))
    valid = rng.random((25, 40)) < 0.7
    valid[0] = True
    ours = np.asarray(trimmed_mean(values, valid, 0.2))
    expected = [scipy.stats.trim_mean(values[valid[:, i], i], 0.2) for i in range(40)]
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_trimmed_mean_derivatives_are_those_of_the_mean_of_the_kept_values():
    """Reverse and forward mode give 1 / (kept count) on each valid value whose rank (a stable sort's, among the
    valid values at its position) is kept, 0 elsewhere: an explicit loop. With ties the weights still sum to 1 at
    every position."""
    rng = np.random.default_rng(2)
    values = rng.standard_normal((25, 40)).astype(np.float32)
    valid = rng.random((25, 40)) < 0.7
    valid[0] = True
    expected = np.zeros_like(values)
    for i in range(40):
        rows = np.nonzero(valid[:, i])[0]
        cut = int(np.floor(0.2 * rows.size))
        order = rows[np.argsort(values[rows, i], kind="stable")]
        expected[order[cut:rows.size - cut], i] = 1.0 / (rows.size - 2 * cut)
    gradient = jax.grad(lambda v: trimmed_mean(v, valid, 0.2).sum())(values)
    np.testing.assert_allclose(gradient, expected, atol=1e-7)
    tangent = rng.standard_normal(values.shape).astype(np.float32)
    value, derivative = jax.jvp(lambda v: trimmed_mean(v, valid, 0.2), (values,), (tangent,))
    np.testing.assert_array_equal(value, trimmed_mean(values, valid, 0.2))
    np.testing.assert_allclose(derivative, (expected * tangent).sum(0), atol=1e-6)
    tied = np.round(values * 2) / 2  # many ties, at the cuts too
    weights = np.asarray(jax.jit(jax.grad(lambda v: trimmed_mean(v, valid, 0.2).sum()))(tied))
    np.testing.assert_allclose(weights.sum(0), 1.0, atol=1e-6)
    assert (weights[~valid] == 0).all()


def test_token_embeddings_are_unit_rows(tiny):
    model, params = tiny
    ids = np.zeros((2, 77), np.int32)
    ids[:, 0], ids[:, 1:4], ids[:, 4] = 49406, 320, 49407
    rows = np.asarray(token_embeddings(model, params, ids))
    np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1.0, atol=1e-5)


def test_a_prompts_token_embeddings_do_not_depend_on_the_prompts_encoded_with_it(tiny):
    """Rows run PROMPT_CHUNK at a time: a row gives the same bits alone, in any position, among any companions,
    and equals the model's own tokens for that row (within float tolerance)."""
    from tclip_jax.model import l2_normalize

    model, params = tiny
    rng = np.random.default_rng(0)
    ids = np.zeros((19, 8), np.int32)  # more than two chunks
    ids[:, 0], ids[:, 1:6], ids[:, 6] = 49406, rng.integers(300, 40000, (19, 5)), 49407
    together = np.asarray(token_embeddings(model, params, ids))
    for order in (np.arange(19)[::-1], rng.permutation(19)[:11], np.array([7])):
        np.testing.assert_array_equal(np.asarray(token_embeddings(model, params, ids[order])), together[order])
    direct = l2_normalize(model.apply({"params": params}, ids[3:4], method="encode_text").tokens[0])
    np.testing.assert_allclose(together[3], np.asarray(direct), atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 9, 17, 25, 33])
def test_sorting_network_sorts_every_input(n):
    """Exhaustive over 0/1 inputs (the 0-1 principle) for small n, random inputs for larger ones."""
    from tclip_jax.methods.tclip.translations import sorting_network

    rng = np.random.default_rng(n)
    inputs = (np.array(np.meshgrid(*[[0, 1]] * n)).reshape(n, -1).T if n <= 9
              else rng.standard_normal((2000, n)))
    for row in inputs:
        values = list(row)
        for low, high in sorting_network(n):
            values[low], values[high] = min(values[low], values[high]), max(values[low], values[high])
        assert values == sorted(row)
