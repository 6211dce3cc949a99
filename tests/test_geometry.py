"""Geometry of the translation aggregate: shifted copies realign, and a peak comes back to its pixel.

The ViT is replaced by a stand-in encoder whose token for patch (r, c) of a copy is that patch's mean
colour, so a token carries exactly the content the shift moved into its patch. The library's own copy
shifting, shift-back operators, aggregation and `to_original` are what is tested.
"""
import numpy as np
import pytest

from tclip_jax.methods.tclip.relevance import aggregate_maps
from tclip_jax.methods.tclip.translations import shift_back_operators, translated_copies, translation_offsets
from tclip_jax.image import center_crop, points_to_original, to_original, whole_image

PATCH = 32
OFFSETS = translation_offsets(PATCH)  # shifts up to 24 px
RED = np.array([[1.0, 0.0, 0.0]], np.float32)  # query reading the first channel of the stand-in tokens


def stand_in_patch_embeddings(pixels: np.ndarray, offsets) -> np.ndarray:
    """[K, gh*gw, 3]: the mean colour of every patch of every translated copy of `pixels` [h, w, 3]."""
    copies = np.asarray(translated_copies(pixels, offsets))
    count, height, width, channels = copies.shape
    cells = copies.reshape(count, height // PATCH, PATCH, width // PATCH, PATCH, channels).mean(axis=(2, 4))
    return cells.reshape(count, -1, channels)


def ramp(height: int, width: int) -> np.ndarray:
    """f(y, x) at pixel centres, a linear function: bilinear upsampling of its patch means gives it back."""
    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    return (0.01 * ys - 0.02 * xs + 1.0).astype(np.float32)


@pytest.mark.parametrize("size_hw", [(224, 224), (192, 288), (288, 192)])
def test_every_translated_copy_realigns_to_the_same_map(size_hw):
    height, width = size_hw
    grid_hw = (height // PATCH, width // PATCH)
    truth = ramp(height, width)
    pixels = np.stack([truth, np.zeros_like(truth), np.zeros_like(truth)], axis=-1)
    grids = (stand_in_patch_embeddings(pixels, OFFSETS) @ RED.T)[..., 0].reshape(len(OFFSETS), *grid_hw)
    rows, cols, valid = shift_back_operators(OFFSETS, grid_hw, size_hw)
    # A copy's map equals f where its upsampling is not clamped at the frame edge (half a patch) and its
    # patches hold no padding (one patch, as shifts are below a patch): 48 px inside the copy, and the
    # back shift moves that by at most 24 px.
    interior = np.zeros(size_hw, bool)
    interior[72:height - 72, 72:width - 72] = True
    assert interior.any()
    for k, (dy, dx) in enumerate(OFFSETS):
        back = rows[k] @ grids[k] @ cols[k].T
        assert valid[k, interior].all()
        np.testing.assert_allclose(back[interior], truth[interior], atol=1e-5, err_msg=f"copy shifted by {dy, dx}")
        # Where the copy has no partner pixel it must be excluded: the partner lies outside the copy.
        ys, xs = np.nonzero(~valid[k])
        assert np.all((ys + dy < 0) | (ys + dy >= height) | (xs + dx < 0) | (xs + dx >= width))
    aggregated = np.asarray(aggregate_maps(stand_in_patch_embeddings(pixels, OFFSETS), RED, OFFSETS, grid_hw,
                                           size_hw, 0.2))[0]
    np.testing.assert_allclose(aggregated[interior], truth[interior], atol=1e-5)


def blob_image(shape_hw: tuple[int, int], peak_yx: tuple[int, int], sigma: float) -> np.ndarray:
    """uint8 image of CLIP's mean colour (normalized to about 0, like the shift padding) with a red Gaussian
    blob centred on pixel `peak_yx`."""
    ys, xs = np.meshgrid(np.arange(shape_hw[0]), np.arange(shape_hw[1]), indexing="ij")
    blob = np.exp(-((ys - peak_yx[0]) ** 2 + (xs - peak_yx[1]) ** 2) / (2 * sigma**2))
    image = np.empty((*shape_hw, 3), np.float64)
    image[...] = [123, 117, 104]
    image[..., 0] += 130 * blob
    return np.round(image).astype(np.uint8)


@pytest.mark.parametrize("translations", [1, 25])
@pytest.mark.parametrize("protocol", [whole_image, center_crop])
@pytest.mark.parametrize("shape_hw,peak_yx", [((224, 224), (90, 130)), ((240, 320), (70, 200)),
                                              ((320, 240), (210, 100)), ((450, 600), (300, 260))])
def test_peak_comes_back_to_its_pixel_at_the_original_resolution(protocol, translations, shape_hw, peak_yx):
    geometry = protocol(np.zeros((*shape_hw, 3), np.uint8), 224)[1]
    scale_yx = np.array(shape_hw) / np.array(geometry.resized_hw)  # original pixels per model pixel
    pixels, _ = protocol(blob_image(shape_hw, peak_yx, 24 * scale_yx.mean()), 224)
    offsets = translation_offsets(PATCH, count=translations)
    embeds = stand_in_patch_embeddings(pixels, offsets)
    model_map = np.asarray(aggregate_maps(embeds, RED, offsets, (7, 7), (224, 224), 0.2))
    original_map = to_original(model_map, geometry)[0]
    assert original_map.shape == shape_hw
    found = np.unravel_index(np.argmax(original_map), shape_hw)
    # One copy samples the blob at patch centres, and the maximum of its bilinear map is the centre nearest the
    # blob: within half a patch (16 model pixels). The 25 copies sample every 8 pixels; allow a quarter patch.
    tolerance = (16 if translations == 1 else 8) * scale_yx + 1
    assert np.all(np.abs(np.array(found) - peak_yx) <= tolerance), (found, peak_yx)
    # The model-frame peak maps to the same original pixel as the point mapping of the geometry says.
    model_peak = np.unravel_index(np.argmax(model_map[0]), (224, 224))
    expected = points_to_original(np.array([model_peak[1] + 0.5, model_peak[0] + 0.5]), geometry)
    assert np.all(np.abs(np.array(found)[::-1] + 0.5 - expected) <= scale_yx[::-1] + 1)
