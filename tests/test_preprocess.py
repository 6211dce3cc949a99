"""Image decoding, CLIP input protocols, geometry and map resampling, checked against the reference code."""
import io
import struct
import warnings
import zlib

import jax
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from tclip_jax.image import (
    CLIP_MEAN,
    CLIP_STD,
    Geometry,
    box_to_model,
    box_to_original,
    center_crop,
    load_image,
    points_to_model,
    points_to_original,
    resize_rgb,
    to_original,
    upsample_bilinear,
    whole_image,
)
from tclip_jax.methods.common import minmax
from tclip_jax.model import PRESETS

IMAGE_NAMES = ["scene_224", "scene_wide_320x240", "noise_224"]
VIT_B32 = PRESETS["ViT-B/32"]  # 224-pixel input, 32-pixel patches


@pytest.fixture(scope="module")
def hilacam(fixture_npz):
    return fixture_npz("hilacam/hilacam_tiny.npz")


@pytest.fixture(scope="module")
def clip_surgery(fixture_npz):
    return fixture_npz("clip_surgery/clip_surgery_tiny.npz")


@pytest.fixture(scope="module")
def decomposition(fixture_npz):
    return fixture_npz("decomposition/decomposition_tiny.npz")


def _nchw(pixel_values):
    return pixel_values.transpose(2, 0, 1)


def _normalized(rgb):
    return (rgb.astype(np.float64) / 255.0 - CLIP_MEAN) / CLIP_STD


# --- preprocessing protocols against the reference pipelines -------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_center_crop_matches_hilacam(name, fixture_images, hilacam):
    pixel_values, _ = center_crop(fixture_images[name])
    assert pixel_values.dtype == np.float32 and pixel_values.shape == (224, 224, 3)
    np.testing.assert_allclose(_nchw(pixel_values), hilacam[f"{name}/pixel_values"][0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_center_crop_matches_decomposition(name, fixture_images, decomposition):
    index = list(decomposition["image_names"]).index(name)
    pixel_values, _ = center_crop(fixture_images[name])
    np.testing.assert_allclose(_nchw(pixel_values), decomposition["pixel_values"][index], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_whole_image_matches_clip_surgery(name, fixture_images, clip_surgery):
    index = list(clip_surgery["image_names"]).index(name)
    pixel_values, geometry = whole_image(fixture_images[name])
    np.testing.assert_allclose(_nchw(pixel_values), clip_surgery["pixel_values"][index], rtol=0, atol=1e-6)
    assert geometry.original_hw == tuple(clip_surgery["image_sizes_hw"][index])


def test_center_crop_geometry_of_wide_and_tall_images():
    # The READMEs: 320x240 (W x H) is resized to 298x224 and cropped at x = 37..260.
    wide = np.zeros((240, 320, 3), np.uint8)
    assert center_crop(wide)[1] == Geometry((240, 320), (224, 224), (224, 298), (0, 37))
    tall = np.zeros((320, 240, 3), np.uint8)
    assert center_crop(tall)[1] == Geometry((320, 240), (224, 224), (298, 224), (37, 0))


@pytest.mark.parametrize("shape_hw", [(240, 244), (244, 240)])
def test_center_crop_offset_rounds_as_torchvision(shape_hw):
    # The long side resizes to int(224 * 244 / 240) = 227; torchvision's CenterCrop starts at
    # int(round((227 - 224) / 2.0)) = 2, not (227 - 224) // 2 = 1.
    image = np.random.default_rng(5).integers(0, 256, (*shape_hw, 3), dtype=np.uint8)
    pixel_values, geometry = center_crop(image)
    resized_hw = (227, 224) if shape_hw[0] > shape_hw[1] else (224, 227)
    offset_yx = (2, 0) if shape_hw[0] > shape_hw[1] else (0, 2)
    assert geometry == Geometry(shape_hw, (224, 224), resized_hw, offset_yx)
    resized = np.asarray(Image.fromarray(image).resize(resized_hw[::-1], Image.Resampling.BICUBIC))
    crop = resized[offset_yx[0] : offset_yx[0] + 224, offset_yx[1] : offset_yx[1] + 224]
    np.testing.assert_allclose(pixel_values, _normalized(crop), rtol=0, atol=1e-6)


@pytest.mark.parametrize("protocol", [center_crop, whole_image])
def test_protocols_take_decoded_images_only(protocol):
    """An image is decoded once (load_image); protocols refuse anything but the decoded uint8 array."""
    with pytest.raises(ValueError, match="decoded uint8 RGB"):
        protocol(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="decoded uint8 RGB"):
        protocol("image.png")


@pytest.mark.parametrize("shape_hw", [(240, 320), (320, 240), (37, 100), (1, 1)])
@pytest.mark.parametrize("protocol", [center_crop, whole_image])
def test_constant_non_square_images_give_constant_inputs(protocol, shape_hw):
    colour = np.array([200, 30, 90], np.uint8)
    pixel_values, geometry = protocol(np.broadcast_to(colour, (*shape_hw, 3)).copy())
    assert pixel_values.shape == (224, 224, 3) and geometry.original_hw == shape_hw
    np.testing.assert_allclose(pixel_values, np.broadcast_to(_normalized(colour), (224, 224, 3)), atol=1e-6)


def test_whole_image_non_square_input_size():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 61, 3), dtype=np.uint8)
    # Resizing to the image's own size is the identity, so the orientation of (h, w) is checked exactly.
    pixel_values, geometry = whole_image(image, size=(37, 61))
    np.testing.assert_allclose(pixel_values, _normalized(image), atol=1e-6)
    assert geometry == Geometry((37, 61), (37, 61), (37, 61), (0, 0))
    assert whole_image(image, size=(160, 256))[0].shape == (160, 256, 3)


def test_resize_rgb_is_pils_filter_and_refuses_what_it_does_not_resize():
    """resize_rgb (public) took anything: 'nearest' gave a bare KeyError, a 2-D gray image came back 2-D, float32
    gave PIL's "Cannot handle this data type". It resizes a decoded RGB image with PIL's filter, and refuses the
    rest in one line."""
    image = np.random.default_rng(0).integers(0, 256, (37, 61, 3), dtype=np.uint8)
    for resample, pil_filter in [("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)]:
        np.testing.assert_array_equal(resize_rgb(image, (20, 30), resample),
                                      np.asarray(Image.fromarray(image).resize((30, 20), pil_filter)))
    with pytest.raises(ValueError) as raised:
        resize_rgb(image, (20, 30), "nearest")
    assert str(raised.value) == "resample must be one of bicubic, bilinear, got 'nearest'"
    for bad in (image[..., 0], image.astype(np.float32), image[..., :2], np.dstack([image, image[..., :1]])):
        with pytest.raises(ValueError, match=r"^expected a decoded uint8 RGB array \[H, W, 3\]"):
            resize_rgb(bad, (20, 30))


@pytest.mark.parametrize("bad_size", [0, -3, (224,), (224, 0), 2.5])
def test_protocols_reject_bad_sizes(bad_size):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="size"):
        whole_image(image, size=bad_size)
    if not isinstance(bad_size, tuple):
        with pytest.raises(ValueError, match="size"):
            center_crop(image, size=bad_size)


# --- resampling ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(224, 224), (240, 320), (5, 3)])
def test_upsample_bilinear_matches_torch_interpolate(size):
    maps = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 7, 7)).astype(np.float32))
    expected = torch.nn.functional.interpolate(maps, size, mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(np.asarray(upsample_bilinear(maps.numpy(), size)), expected, rtol=0, atol=1e-6)
    nested = jax.jit(lambda m: upsample_bilinear(m, size))(maps.numpy()[0, 0])
    np.testing.assert_allclose(np.asarray(nested), expected[0, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid, size", [(24, 200), (7, 333), (7, 5)])
def test_upsample_bilinear_taps_are_torchs_weights_exactly(grid, size):
    # torch upsampling an identity matrix along its rows gives its weight matrix: w0 * 1 + w1 * 0 is w0 exactly.
    from tclip_jax.image.resample import bilinear_taps

    expected = torch.nn.functional.interpolate(torch.eye(grid)[None, None], (size, grid), mode="bilinear",
                                               align_corners=False).numpy()[0, 0]
    index0, index1, weight0, weight1 = bilinear_taps(size, grid, np.float32(grid) / np.float32(size), 0.0)
    weights = np.zeros((size, grid), np.float32)
    weights[np.arange(size), index0] += weight0
    weights[np.arange(size), index1] += weight1  # the same index at the clamped edge, summed as torch does
    np.testing.assert_array_equal(weights, expected)


@pytest.mark.parametrize("name", IMAGE_NAMES)
@pytest.mark.parametrize("method", ["plain/similarity_single", "cs/similarity"])
def test_similarity_maps_match_clip_surgery(name, method, fixture_images, clip_surgery):
    index = list(clip_surgery["image_names"]).index(name)
    height, width = fixture_images[name].shape[:2]
    patch_maps = minmax(clip_surgery[method][index, 1:], axis=0).T.reshape(-1, 7, 7)
    map_key = {"plain/similarity_single": "plain/map_single", "cs/similarity": "cs/map"}[method]
    expected = clip_surgery[f"{map_key}/{name}"][0].transpose(2, 0, 1)
    np.testing.assert_allclose(np.asarray(upsample_bilinear(patch_maps, (height, width))), expected, atol=1e-5)
    # The grid covers the whole model input, so mapping it to the original is the same upsampling.
    geometry = whole_image(fixture_images[name])[1]
    np.testing.assert_allclose(to_original(patch_maps, geometry), expected, atol=1e-5)


@pytest.mark.parametrize("name", IMAGE_NAMES)
@pytest.mark.parametrize("variant", ["last_layer", "all_layers"])
def test_relevance_maps_match_hilacam(name, variant, hilacam):
    relevance = hilacam[f"{name}/{variant}/image_relevance"].reshape(-1, 7, 7)
    maps = minmax(upsample_bilinear(relevance, (224, 224)))
    np.testing.assert_allclose(np.asarray(maps), hilacam[f"{name}/{variant}/image_relevance_map_224"], atol=1e-5)


def test_minmax_scales_each_slice_and_zeroes_constant_ones():
    maps = np.stack([np.random.default_rng(2).standard_normal((5, 6)), np.full((5, 6), 3.0)]).astype(np.float32)
    scaled = np.asarray(minmax(maps))
    assert scaled[0].min() == 0.0 and scaled[0].max() == 1.0
    np.testing.assert_allclose(scaled[0], (maps[0] - maps[0].min()) / np.ptp(maps[0]), atol=1e-6)
    np.testing.assert_array_equal(scaled[1], 0.0)
    per_column = np.asarray(minmax(maps[0], axis=0))
    np.testing.assert_array_equal(per_column.min(axis=0), 0.0)
    np.testing.assert_allclose(per_column.max(axis=0), 1.0, atol=1e-6)


@pytest.mark.parametrize("size", [7, 224])
def test_minmax_of_a_slice_with_a_nan_or_an_infinite_value_is_all_nan(size):
    """As numpy's formula gives for a NaN (its min and max propagate it), so the host step refuses the map: a NaN
    spread made the slice all zeros, a blank map scored with a whole-image box; and XLA's min and max of a 224 x 224
    slice with NaNs in it came out finite on CPU. An infinite value alone (all +inf: a NaN spread) was all zeros too.
    The other slices are scaled as they were."""
    rng = np.random.default_rng(3)
    maps = rng.standard_normal((6, size, size)).astype(np.float32)
    maps[0, 0, 0] = maps[1, size // 2, size // 3] = maps[2, -1, -1] = np.nan
    maps[3, :size // 4] = np.nan
    maps[4] = np.inf
    scaled = np.asarray(minmax(maps))
    for i in range(4):
        assert np.isnan((maps[i] - maps[i].min()) / np.ptp(maps[i])).all() and np.isnan(scaled[i]).all(), i
    assert np.isnan(scaled[4]).all()
    np.testing.assert_allclose(scaled[5], (maps[5] - maps[5].min()) / np.ptp(maps[5]), atol=1e-6)


def test_minmax_of_an_integer_map_is_the_formula():
    """An integer map (a count, a mask) is normalized as floats: it was refused (float32's limits were asked of
    int32) once minmax read its dtype's smallest normal number."""
    counts = np.arange(12, dtype=np.int32).reshape(1, 3, 4) * 7 - 20
    expected = (counts - counts.min()) / (counts.max() - counts.min())
    np.testing.assert_allclose(np.asarray(minmax(counts)), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("jit", [False, True])
def test_minmax_of_a_finite_slice_with_a_huge_spread_is_the_formula_in_float64(jit):
    """A spread past 2^126 (float32's 1 / smallest normal) made the slice all zeros on CPU (XLA divides by the
    spread's reciprocal, flushed to zero), and one that overflows float32 (±3e38) partly NaN, refused by the host step
    as if the map held NaN or infinite values. Each slice against the formula computed in float64."""
    rng = np.random.default_rng(4)
    maps = rng.uniform(-1, 1, (5, 7, 7)) * np.array([1.0, 1e37, 1e38, 1.7e38, 3.4e38])[:, None, None]
    maps[4, 0, 0], maps[4, -1, -1] = -3.4e38, 3.4e38  # a spread of 6.8e38: inf in float32
    maps = maps.astype(np.float32)
    scaled = np.asarray((jax.jit(minmax) if jit else minmax)(maps))
    wide = maps.astype(np.float64)
    low, high = wide.min(axis=(1, 2), keepdims=True), wide.max(axis=(1, 2), keepdims=True)
    with np.errstate(over="ignore"):  # the overflow is the case
        assert np.isinf(maps[4].max() - maps[4].min())
    np.testing.assert_allclose(scaled, (wide - low) / (high - low), rtol=0, atol=1e-6)


# --- geometry -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_hw", [(240, 320), (320, 240), (37, 100), (224, 224)])
@pytest.mark.parametrize("protocol", [center_crop, whole_image])
def test_points_and_boxes_round_trip(protocol, shape_hw):
    geometry = protocol(np.zeros((*shape_hw, 3), np.uint8))[1]
    rng = np.random.default_rng(3)
    points = rng.uniform(0, 1, (10, 2)) * shape_hw[::-1]
    np.testing.assert_allclose(points_to_original(points_to_model(points, geometry), geometry), points, atol=1e-9)
    boxes = np.sort(rng.uniform(0, 224, (4, 2, 2)), axis=1).reshape(4, 4)
    np.testing.assert_allclose(box_to_model(box_to_original(boxes, geometry), geometry), boxes, atol=1e-9)


def test_model_frame_maps_to_the_region_the_model_saw():
    wide = np.zeros((240, 320, 3), np.uint8)
    frame = [0, 0, 224, 224]
    np.testing.assert_allclose(box_to_original(frame, whole_image(wide)[1]), [0, 0, 320, 240])
    # Crop columns 37..261 of the 298-wide resized image, scaled back by 320 / 298.
    expected = [37 * 320 / 298, 0, 261 * 320 / 298, 240]
    np.testing.assert_allclose(box_to_original(frame, center_crop(wide)[1]), expected)


@pytest.mark.parametrize("shape_hw", [(240, 320), (320, 240), (37, 100)])
@pytest.mark.parametrize("protocol", [center_crop, whole_image])
def test_to_original_agrees_with_point_mapping(protocol, shape_hw):
    geometry = protocol(np.zeros((*shape_hw, 3), np.uint8))[1]
    height, width = shape_hw
    # A map whose value is the x (resp. y) model coordinate of each of its cells' centres, at the model's
    # resolution and at a patch grid's (7 cells of 32 px): bilinear resampling of a linear function is exact, so
    # each original pixel must read the model coordinate of its own centre. The two maps have different minima,
    # each map's own fill.
    grid_x, grid_y = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    model_xy = points_to_model(np.stack([grid_x, grid_y], axis=-1), geometry)
    inside = np.all((model_xy >= 0) & (model_xy <= 224), axis=-1)
    shifts = (100.0, 300.0)
    for cells in (224, 7):
        centres = (np.arange(cells) + 0.5) * 224 / cells
        ramps = np.stack([np.tile(centres, (cells, 1)) - shifts[0], np.tile(centres[:, None], (1, cells)) - shifts[1]])
        resampled = to_original(ramps, geometry)
        assert resampled.shape == (2, height, width) and resampled.dtype == np.float32
        assert resampled.flags.writeable  # with or without a crop the caller owns the maps
        # away from the clamped edge half-cells
        interior = np.all((model_xy >= centres[0]) & (model_xy <= centres[-1]), axis=-1)
        for axis in range(2):
            np.testing.assert_allclose(resampled[axis][interior], model_xy[..., axis][interior] - shifts[axis],
                                       atol=1e-4)
            np.testing.assert_array_equal(resampled[axis][~inside], ramps[axis].min())
    with_nan = to_original(ramps, geometry, fill=np.nan)
    np.testing.assert_array_equal(np.isnan(with_nan[0]), ~inside)
    assert inside.all() == (protocol is whole_image)
    covered = np.zeros(shape_hw, bool)
    covered[geometry.covered] = True
    np.testing.assert_array_equal(covered, inside)


@pytest.mark.parametrize("shape_hw", [(100, 225), (425, 400), (222, 333), (50, 5), (240, 320), (7, 61), (224, 2240)])
def test_covered_is_every_pixel_whose_centre_lies_in_the_crop_edges_included(shape_hw):
    # Exact rational centres: a centre exactly on the crop's edge (column 162 of a 100x225 image maps to 224.0,
    # row 0 of a 222x333 one to 0.0) is covered, and to_original samples it rather than filling it.
    from fractions import Fraction

    geometry = center_crop(np.zeros((*shape_hw, 3), np.uint8))[1]
    for axis in range(2):
        original, resized = geometry.original_hw[axis], geometry.resized_hw[axis]
        offset, model = geometry.crop_offset_yx[axis], geometry.input_hw[axis]
        exact = [i for i in range(original) if 0 <= Fraction(resized, original) * Fraction(2 * i + 1, 2) - offset <= model]
        assert geometry.covered[axis] == slice(exact[0], exact[-1] + 1)
    filled = np.isnan(to_original(np.ones((7, 7), np.float32), geometry, fill=np.nan))
    assert not filled[geometry.covered].any() and filled.sum() == filled.size - filled[geometry.covered].size


def test_to_original_marks_the_cropped_columns():
    geometry = center_crop(np.zeros((240, 320, 3), np.uint8))[1]
    resampled = to_original(np.ones((7, 7), np.float32), geometry, fill=np.nan)
    # Column x is kept iff its centre (x + 0.5) * 298 / 320 lies in the crop [37, 261]: x = 40..279.
    kept = ~np.isnan(resampled)
    np.testing.assert_array_equal(np.flatnonzero(kept.all(axis=0)), np.arange(40, 280))
    np.testing.assert_array_equal(np.flatnonzero(kept.any(axis=0)), np.arange(40, 280))  # rows are never cut
    np.testing.assert_array_equal(resampled[kept], 1.0)


def test_maps_are_resampled_on_the_host_and_compile_nothing(compiled_programs):
    """A sweep's host step and explain resample each image's maps, of its own size and unit count: in jax, each new
    shape compiled a program (0.45 s, kept for ever). Maps, numpy or jax, are resampled in numpy, as torch resamples
    them (the crop's fill: test_to_original_agrees_with_point_mapping)."""
    rng = np.random.default_rng(0)
    for units, height, width in [(1, 40, 31), (3, 17, 64), (2, 5, 3)]:
        maps = rng.standard_normal((units, 7, 7)).astype(np.float32)
        on_device = jax.device_put(maps)
        geometry = whole_image(np.zeros((height, width, 3), np.uint8))[1]  # the grid spans the model input
        compiled_programs.clear()
        resampled = to_original(maps, geometry)
        assert type(resampled) is np.ndarray and resampled.dtype == np.float32
        expected = torch.nn.functional.interpolate(torch.from_numpy(maps)[None], (height, width), mode="bilinear",
                                                   align_corners=False).numpy()[0]
        np.testing.assert_allclose(resampled, expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(to_original(on_device, geometry), resampled)  # fetched, then the same
        assert compiled_programs == []


def test_to_original_treats_each_map_of_a_stack_alone():
    """A stack with several leading axes is resampled map by map (the numpy path loops over maps) and a centre
    crop's fill is each map's own minimum: against torch per map and the crop's covered span."""
    geometry = center_crop(np.zeros((30, 50, 3), np.uint8))[1]
    maps = np.random.default_rng(3).standard_normal((2, 3, 7, 7)).astype(np.float32)
    resampled = to_original(maps, geometry)
    assert resampled.shape == (2, 3, 30, 50)
    rows, cols = geometry.covered
    outside = np.ones((30, 50), bool)
    outside[rows, cols] = False
    for index in np.ndindex(2, 3):
        alone = to_original(maps[index], geometry)
        np.testing.assert_array_equal(resampled[index], alone)
        np.testing.assert_array_equal(alone[outside], maps[index].min())
    whole = whole_image(np.zeros((30, 50, 3), np.uint8))[1]
    expected = torch.nn.functional.interpolate(torch.from_numpy(maps.reshape(6, 7, 7))[None], (30, 50),
                                               mode="bilinear", align_corners=False).numpy()[0]
    np.testing.assert_allclose(to_original(maps, whole).reshape(6, 30, 50), expected, rtol=0, atol=1e-6)
    assert to_original(np.zeros((0, 7, 7), np.float32), whole).shape == (0, 30, 50)


def test_to_original_rejects_bad_fill():
    geometry = whole_image(np.zeros((4, 4, 3), np.uint8))[1]
    with pytest.raises(ValueError, match="fill"):
        to_original(np.zeros((7, 7)), geometry, fill="max")


def test_geometry_rejects_a_crop_outside_the_resized_image():
    with pytest.raises(ValueError, match="outside"):
        Geometry((240, 320), (224, 224), (224, 298), (0, 80))


@pytest.mark.parametrize("field", [0, 1, 2])
def test_geometry_rejects_a_zero_size(field):
    sizes = [(5, 5), (5, 5), (5, 5)]
    sizes[field] = (0, 5)
    with pytest.raises(ValueError, match=r"must be positive, got \(0, 5\)"):
        Geometry(*sizes, (0, 0))


# --- image loading ------------------------------------------------------------------------------------------


@pytest.fixture()
def rgb():
    return np.random.default_rng(4).integers(0, 256, (12, 17, 3), dtype=np.uint8)


def _blocky(shape_hw=(32, 48)):
    """Flat 16x16 colour blocks: survive JPEG (quality 95, no chroma subsampling) almost unchanged."""
    colours = np.random.default_rng(5).integers(40, 216, (shape_hw[0] // 16, shape_hw[1] // 16, 3), dtype=np.uint8)
    return np.repeat(np.repeat(colours, 16, axis=0), 16, axis=1)


def test_load_rgb_array_returns_an_equal_copy(rgb):
    loaded = load_image(rgb)
    np.testing.assert_array_equal(loaded, rgb)
    assert loaded.dtype == np.uint8 and loaded.flags.c_contiguous and not np.shares_memory(loaded, rgb)


def test_load_array_layouts(rgb):
    gray = rgb[..., 0]
    np.testing.assert_array_equal(load_image(gray), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(load_image(gray[..., None]), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(load_image(np.dstack([rgb, rgb[..., :1]])), rgb)  # alpha dropped
    np.testing.assert_array_equal(load_image(rgb / 255.0), rgb)
    np.testing.assert_array_equal(load_image(rgb.astype(np.float32) / 255), rgb)
    np.testing.assert_array_equal(load_image(rgb.astype(np.uint16) * 257), rgb)
    np.testing.assert_array_equal(load_image(np.full((1, 1, 3), 7, np.uint8)), np.full((1, 1, 3), 7))


def test_a_jax_array_and_bytes_likes_load_as_the_numpy_array_and_bytes_they_hold(tmp_path, rgb):
    import jax.numpy as jnp

    for array in (rgb, rgb / 255.0, rgb[..., 0]):
        np.testing.assert_array_equal(load_image(jnp.asarray(array)), load_image(array))
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    encoded = (tmp_path / "rgb.png").read_bytes()
    for held in (bytearray(encoded), memoryview(encoded)):
        np.testing.assert_array_equal(load_image(held), rgb)


def test_load_grayscale_png_and_jpeg(tmp_path, rgb):
    gray = rgb[..., 1]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, axis=2))
    block = _blocky()[..., 0]
    Image.fromarray(block).save(tmp_path / "gray.jpg", quality=95, subsampling=0)
    loaded = load_image(str(tmp_path / "gray.jpg"))
    assert loaded.shape == (*block.shape, 3)
    assert np.all(loaded[..., 0] == loaded[..., 2])
    assert np.abs(loaded[..., 0].astype(int) - block).max() <= 8


def test_load_rgba_png_drops_alpha(tmp_path, rgb):
    alpha = np.random.default_rng(6).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgb)


def test_load_16_bit_png_scales_to_8_bit(tmp_path, rgb):
    values = rgb[..., 0].astype(np.uint16) * 257 + np.uint16(100)  # within +-128 of v * 257: rounds back to v
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_array_equal(load_image(tmp_path / "deep.png"), np.repeat(rgb[..., :1], 3, axis=2))


@pytest.mark.parametrize("kind", ["PIL mode I", "PIL mode I;16", "uint16 array", "uint16 RGB array"])
def test_8_bit_values_in_a_16_bit_mode_are_read_as_16_bit_with_a_warning(rgb, kind):
    values = rgb if kind == "uint16 RGB array" else rgb[..., :1]
    image = {"PIL mode I": lambda: Image.fromarray(values[..., 0].astype(np.int32)),  # what fromarray makes of int32
             "PIL mode I;16": lambda: Image.fromarray(values[..., 0].astype(np.uint16)),
             "uint16 array": lambda: values[..., 0].astype(np.uint16),
             "uint16 RGB array": lambda: values.astype(np.uint16)}[kind]()
    if kind.startswith("PIL"):
        assert image.mode == kind.split()[-1]
    with pytest.warns(UserWarning, match="values are all <= 255 is read as 16-bit"):
        decoded = load_image(image)
    np.testing.assert_array_equal(decoded, np.broadcast_to(np.round(values / 257.0).astype(np.uint8), rgb.shape))


def test_16_bit_arrays_with_values_above_255_or_all_zero_decode_without_a_warning(rgb):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for values in (rgb.astype(np.uint16) * 257, np.zeros((3, 4), np.uint16)):
            decoded = load_image(values)
            expected = np.round(values / 257.0).astype(np.uint8)
            np.testing.assert_array_equal(decoded, expected if expected.ndim == 3 else np.stack([expected] * 3, -1))


@pytest.mark.parametrize("transparent", [False, True])
def test_load_palette_png(tmp_path, transparent):
    palette = np.random.default_rng(7).integers(0, 256, (256, 3), dtype=np.uint8)
    indices = np.random.default_rng(8).integers(0, 256, (9, 11), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.tobytes())
    image.save(tmp_path / "palette.png", **({"transparency": 3} if transparent else {}))
    assert Image.open(tmp_path / "palette.png").mode == "P"
    np.testing.assert_array_equal(load_image(tmp_path / "palette.png"), palette[indices])


def test_load_cmyk_tiff_and_jpeg(tmp_path):
    block = _blocky()
    cmyk = Image.fromarray(block).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.tiff")
    np.testing.assert_array_equal(load_image(tmp_path / "cmyk.tiff"), block)
    cmyk.save(tmp_path / "cmyk.jpg", quality=95, subsampling=0)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert np.abs(load_image(tmp_path / "cmyk.jpg").astype(int) - block).max() <= 8


def test_load_rgb_jpeg(tmp_path):
    block = _blocky()
    Image.fromarray(block).save(tmp_path / "rgb.jpg", quality=95, subsampling=0)
    loaded = load_image(tmp_path / "rgb.jpg")
    assert loaded.shape == block.shape and np.abs(loaded.astype(int) - block).max() <= 8


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_load_applies_exif_orientation(tmp_path, suffix):
    block = _blocky((32, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored row 0 is the visual right side: display rotates 90 degrees clockwise
    options = {"quality": 95, "subsampling": 0} if suffix == "jpg" else {}
    Image.fromarray(block).save(tmp_path / f"rotated.{suffix}", exif=exif, **options)
    loaded = load_image(tmp_path / f"rotated.{suffix}")
    assert loaded.shape == (48, 32, 3)
    assert np.abs(loaded.astype(int) - np.rot90(block, k=-1)).max() <= 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_orientation_is_applied_once_and_exif_false_gives_the_stored_grid(tmp_path, orientation):
    """PIL turns a TIFF itself when it loads it (and reports the turned size); a PNG with the same orientation
    in its EXIF is the reference for the displayed image."""
    from tclip_jax.image import image_size

    block = _blocky((32, 48))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(block).save(tmp_path / "a.tif", tiffinfo={0x0112: orientation})
    Image.fromarray(block).save(tmp_path / "a.png", exif=exif)
    displayed = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.tif"), displayed)
    np.testing.assert_array_equal(load_image(tmp_path / "a.tif", exif=False), block)
    with Image.open(tmp_path / "a.tif") as opened:  # a PIL image as opened, not loaded yet: the same
        np.testing.assert_array_equal(load_image(opened, exif=False), block)
    with Image.open(tmp_path / "a.tif") as opened:
        np.testing.assert_array_equal(load_image(opened), displayed)
    assert image_size(tmp_path / "a.tif") == displayed.shape[:2]
    assert image_size(tmp_path / "a.tif", exif=False) == block.shape[:2]


# What each turning orientation shows of the stored grid [H, W, ...] (TIFF 6.0, tag 274).
_DISPLAYED = {5: lambda a: a.swapaxes(0, 1),  # row 0 is the left side, column 0 the top: transposed
              6: lambda a: a.swapaxes(0, 1)[:, ::-1],  # row 0 is the right side, column 0 the top: clockwise
              7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],  # row 0 is the right side, column 0 the bottom
              8: lambda a: a.swapaxes(0, 1)[::-1]}  # row 0 is the left side, column 0 the bottom: counterclockwise


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
@pytest.mark.parametrize("mode, shape_hw", [("L", (13, 29)), ("P", (13, 29)), ("RGBA", (13, 29)), ("CMYK", (13, 29)),
                                            ("I;16", (13, 29)), ("L", (300, 530))])
def test_an_uncompressed_turned_tiff_reads_the_same_from_its_path_bytes_and_pil_image(tmp_path, orientation, mode,
                                                                                        shape_hw):
    """PIL memory-maps an uncompressed file opened by name (modes L, P, RGBA, CMYK, I;16; its strips read as one
    tile, whatever the size) at the turned size, which scrambled the stored pixels."""
    from tclip_jax.image import image_size

    rng = np.random.default_rng(orientation)
    gray = rng.integers(0, 256, shape_hw, dtype=np.uint8)  # noise: any mix-up of pixels shows
    rgb = rng.integers(0, 256, (*shape_hw, 3), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    if mode == "L":
        image, stored = Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=2)
    elif mode == "P":
        image = Image.fromarray(gray, "L").convert("P")  # indices: the gray levels; then a palette of its own
        image.putpalette(palette.tobytes())
        stored = palette[gray]
    elif mode == "RGBA":
        image, stored = Image.fromarray(np.dstack([rgb, gray]), "RGBA"), rgb  # alpha dropped
    elif mode == "CMYK":
        image, stored = Image.fromarray(rgb).convert("CMYK"), rgb  # PIL's RGB -> CMYK -> RGB is exact
    else:
        image, stored = Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, axis=2)
    assert image.mode == mode
    path = tmp_path / "turned.tif"
    image.save(path, tiffinfo={0x0112: orientation})
    displayed = _DISPLAYED[orientation](stored)
    np.testing.assert_array_equal(load_image(path), displayed)
    np.testing.assert_array_equal(load_image(path.read_bytes()), displayed)
    np.testing.assert_array_equal(load_image(path, exif=False), stored)  # as datasets read images
    np.testing.assert_array_equal(load_image(path.read_bytes(), exif=False), stored)
    with Image.open(path) as opened:
        np.testing.assert_array_equal(load_image(opened), displayed)
    assert image_size(path) == displayed.shape[:2] and image_size(path, exif=False) == stored.shape[:2]


def test_a_program_that_turns_pils_pixel_limit_off_loads_images(tmp_path, monkeypatch):
    """`Image.MAX_IMAGE_PIXELS = None` is PIL's own way to turn its check off (a library may do it)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    Image.fromarray(_blocky((32, 48))).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").shape == (32, 48, 3)


def test_a_value_error_while_decoding_names_the_file(tmp_path):
    Image.fromarray(np.full((4, 4), 300.0, np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"^cannot read image file .*f.tif: float image values must lie in \[0, 1\]"):
        load_image(tmp_path / "f.tif")


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_image_size_reads_the_header_as_load_image_decodes(tmp_path, orientation):
    from tclip_jax.image import image_size

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_blocky((32, 48))).save(tmp_path / "a.jpg", exif=exif)
    assert image_size(tmp_path / "a.jpg") == load_image(tmp_path / "a.jpg").shape[:2]
    assert image_size(tmp_path / "a.jpg", exif=False) == load_image(tmp_path / "a.jpg", exif=False).shape[:2]
    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.jpg", exif=exif)
    truncated = tmp_path / "truncated.jpg"  # its header is whole: the size is there, the pixels are not
    truncated.write_bytes((tmp_path / "noise.jpg").read_bytes()[:-4000])
    assert image_size(truncated) == load_image(tmp_path / "noise.jpg").shape[:2]
    with pytest.raises(ValueError, match="cannot read image file"):
        load_image(truncated)
    for bad, error, message in [(tmp_path / "none.png", FileNotFoundError, "image file not found"),
                                (tmp_path, ValueError, "is a folder, not an image file")]:
        with pytest.raises(error, match=message):
            image_size(bad)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image file .*text.png"):
        image_size(tmp_path / "text.png")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk (PNG spec 5.3: length, type, data, CRC-32 of type and data)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("orientation", [1, 6, 8])
@pytest.mark.parametrize("where", ["eXIf before IDAT", "eXIf", "tEXt", "zTXt", "iTXt XMP", "none"])
def test_image_size_reads_a_pngs_orientation_without_decoding_it(tmp_path, monkeypatch, where, orientation):
    """PIL's getexif of a PNG without an eXIf chunk before its image data decodes the image (to read the chunks
    after it), so image_size decoded every such PNG, twice the decoding `tclip explain` needs (0.55 s of a
    4000x3000 PNG). The orientation is read from the chunks wherever they are, as PIL reads them once it has
    decoded: load_image (decoding, then exif_transpose) and the displayed grid (_DISPLAYED) are the reference."""
    from tclip_jax.image import image_size

    block = _blocky((32, 48))
    exif = Image.Exif()
    exif[0x0112] = orientation
    profile = exif.tobytes()  # "Exif\0\0" and the TIFF-structured profile
    hex_profile = f"\nexif\n{len(profile):8d}\n{profile.hex()}\n"  # ImageMagick's raw profile, as PIL reads it
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
           '</rdf:RDF></x:xmpmeta>')
    late = {"eXIf": _png_chunk(b"eXIf", profile[6:]),
            "tEXt": _png_chunk(b"tEXt", b"Raw profile type exif\0" + hex_profile.encode()),
            "zTXt": _png_chunk(b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(hex_profile.encode())),
            "iTXt XMP": _png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp.encode())}
    encoded = io.BytesIO()
    Image.fromarray(block).save(encoded, "PNG", **({"exif": exif} if where == "eXIf before IDAT" else {}))
    png = encoded.getvalue()
    assert png[-12:] == _png_chunk(b"IEND", b"")
    path = tmp_path / "a.png"
    path.write_bytes(png[:-12] + late.get(where, b"") + png[-12:])  # a chunk after the image data
    displayed = _DISPLAYED.get(orientation if where != "none" else 1, lambda a: a)(block)
    np.testing.assert_array_equal(load_image(path), displayed)
    np.testing.assert_array_equal(load_image(path, exif=False), block)

    def decode(self):
        raise AssertionError("image_size decoded the image")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", decode)
    assert image_size(path) == displayed.shape[:2] and image_size(path, exif=False) == block.shape[:2]


@pytest.mark.parametrize("late", ["iTXt XMP", "eXIf", "tEXt", "iTXt XMP, animated"])
def test_image_size_reads_the_chunks_after_the_image_data_of_a_png_with_an_early_exif(tmp_path, late):
    """A PNG with an eXIf chunk (no orientation) before its image data: image_size took that chunk as all there was,
    but PIL's decoding reads the chunks after the image data too (a later XMP orientation counts, a later eXIf
    replaces the first; a raw profile does not, an eXIf being there), so a turned image was measured unturned. An
    animated PNG (its late chunk before the next frame) was not decoded either. PIL's decoding and exif_transpose,
    and load_image, are the reference."""
    from PIL import ImageOps

    from tclip_jax.image import image_size

    early, exif = Image.Exif(), Image.Exif()
    early[0x010F] = "Camera"  # Make
    exif[0x0112] = 6
    profile = exif.tobytes()
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    chunk = {"iTXt XMP": _png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp.encode()),
             "eXIf": _png_chunk(b"eXIf", profile[6:]),
             "tEXt": _png_chunk(b"tEXt", b"Raw profile type exif\0"
                                + f"\nexif\n{len(profile):8d}\n{profile.hex()}\n".encode())}[late.split(",")[0]]
    frames = [Image.fromarray(_blocky((32, 48))), Image.fromarray(_blocky((32, 48))[::-1])]
    encoded = io.BytesIO()
    frames[0].save(encoded, "PNG", exif=early, **({"save_all": True, "append_images": frames[1:]}
                                                   if "animated" in late else {}))
    png = encoded.getvalue()
    start = png.index(b"IDAT") - 4
    end = start + 12 + struct.unpack(">I", png[start:start + 4])[0]  # past the first IDAT chunk
    path = tmp_path / "a.png"
    path.write_bytes(png[:end] + chunk + png[end:])
    with Image.open(path) as opened:
        opened.load()
        expected = ImageOps.exif_transpose(opened).size[::-1]
    assert expected == ((32, 48) if late == "tEXt" else (48, 32))
    assert image_size(path) == load_image(path).shape[:2] == expected
    assert image_size(path, exif=False) == (32, 48)


def test_an_image_damaged_past_its_header_is_a_value_error_naming_it(tmp_path):
    """PIL's decoding raises SyntaxError on a broken PNG chunk, not OSError: it stopped a sweep as a bug ("internal
    error (SyntaxError)") where a truncated image is its sample's error."""
    from conftest import png_broken_past_its_header

    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(noise).save(encoded, "PNG")
    broken = png_broken_past_its_header(encoded.getvalue())
    (tmp_path / "bad.png").write_bytes(broken)
    with pytest.raises(ValueError, match=rf"^cannot read image file {tmp_path / 'bad.png'}: broken PNG file"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"^cannot read image bytes: broken PNG file"):
        load_image(broken)


def test_a_pil_images_exif_orientation_is_applied_as_a_files(tmp_path):
    """As the README says: a PIL image is turned by its EXIF orientation as its file is; exif_transpose drops the tag
    (not turned twice), a transpose by hand keeps it (turned again)."""
    from PIL import ImageOps

    block = _blocky((32, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    Image.fromarray(block).save(tmp_path / "rotated.png", exif=exif)
    upright = np.rot90(block, k=-1)
    np.testing.assert_array_equal(load_image(tmp_path / "rotated.png"), upright)
    np.testing.assert_array_equal(load_image((tmp_path / "rotated.png").read_bytes()), upright)
    with Image.open(tmp_path / "rotated.png") as opened:
        np.testing.assert_array_equal(load_image(opened), upright)
        np.testing.assert_array_equal(load_image(ImageOps.exif_transpose(opened)), upright)
        by_hand = opened.transpose(Image.Transpose.ROTATE_270)  # what exif_transpose does for 6, tag kept
        np.testing.assert_array_equal(load_image(by_hand), np.rot90(upright, k=-1))
        np.testing.assert_array_equal(load_image(np.asarray(by_hand)), upright)
        np.testing.assert_array_equal(load_image(opened, exif=False), block)


def test_load_pil_images(rgb):
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb)), rgb)
    gray_alpha = Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA")
    np.testing.assert_array_equal(load_image(gray_alpha), np.repeat(rgb[..., :1], 3, axis=2))


def test_load_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.png"
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        load_image(missing)


def test_load_text_file_named_png_is_rejected(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="fake.png"):
        load_image(fake)


@pytest.mark.parametrize("source, message", [
    ("https://example.com/cat.jpg", r"^'https://example.com/cat.jpg' is a URL: images are not fetched; download the "
                                    r"image and pass its file \(in Python, tclip_jax\.notebook\.fetch_image\(url\) "
                                    r"fetches an http\(s\) URL\)$"),
    (" https://example.com/cat.jpg", r"^' https://example.com/cat.jpg' is a URL: images are not fetched"),
    ("s3://bucket/cat.png", r"^'s3://bucket/cat.png' is a URL: images are not fetched"),
    ("", r"^an image path is an empty string$"),
    ("a" * 5000, r"^cannot read image file 'a{120}'\.\.\. \(5,000 characters\): [^\n]+$"),
    (b"these bytes are no image", r"^cannot read image bytes: the bytes are not an image PIL can decode$"),
])
def test_paths_and_bytes_that_are_no_image_file_say_so_in_one_line(source, message):
    """A URL is not fetched (it was read as a path, its // collapsed: "image file not found: https:/..."); an empty
    string is not the current folder; a name too long for the file system is one line, not an OSError quoting the
    whole name; PIL's message for bytes named an io.BytesIO object by its address."""
    from tclip_jax.image import image_size

    with pytest.raises(ValueError, match=message):
        load_image(source)
    if isinstance(source, str):
        with pytest.raises(ValueError, match=message):
            image_size(source)


def test_a_postscript_file_is_no_image_and_ghostscript_never_runs(tmp_path, fake_ghostscript):
    """PIL renders EPS by running the program gs on the file, whatever its name; an image is read by PIL alone."""
    from conftest import EPS_BYTES
    from tclip_jax.image import image_size

    (tmp_path / "photo.jpg").write_bytes(EPS_BYTES)
    for read in (load_image, image_size):
        with pytest.raises(ValueError) as raised:
            read(tmp_path / "photo.jpg")
        # The path once: PIL's own message ("cannot identify image file '.../photo.jpg'") named it again.
        assert str(raised.value) == (f"cannot read image file {tmp_path / 'photo.jpg'}: the file is not an image PIL "
                                     "can decode")
    with pytest.raises(ValueError, match="^cannot read image bytes: the bytes are not an image PIL can decode$"):
        load_image(EPS_BYTES)
    assert not fake_ghostscript.exists()


def test_a_format_a_plugin_registers_is_read(tmp_path, monkeypatch):
    """Formats of plugins a user registers (HEIC with pillow-heif) are read as PIL reads them: a list of allowed
    formats refused them. Here a plugin of a made-up format: a 4-byte signature, then 2x3 RGB pixels."""
    from PIL import ImageFile

    class TinyRGB(ImageFile.ImageFile):
        format, format_description = "TINYRGB", "a test plugin's format"

        def _open(self):
            if self.fp.read(4) != b"TRGB":
                raise SyntaxError("not a TINYRGB file")
            self._mode, self._size = "RGB", (3, 2)
            self.tile = [ImageFile._Tile("raw", (0, 0, 3, 2), 4, ("RGB", 0, 1))]

    monkeypatch.setattr(Image, "OPEN", dict(Image.OPEN))
    monkeypatch.setattr(Image, "ID", list(Image.ID))
    Image.register_open(TinyRGB.format, TinyRGB, lambda prefix: prefix[:4] == b"TRGB")
    pixels = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    (tmp_path / "photo.trgb").write_bytes(b"TRGB" + pixels.tobytes())
    np.testing.assert_array_equal(load_image(tmp_path / "photo.trgb"), pixels)


def test_load_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        load_image(tmp_path)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((5, 0), np.uint8), "empty"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.full((4, 4), 1.5), r"\[0, 1\]"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros(5, np.uint8), "shape"),
    ],
)
def test_load_bad_arrays_are_rejected(array, message):
    with pytest.raises(ValueError, match=message):
        load_image(array)


def test_load_rejects_unsupported_types():
    with pytest.raises(TypeError, match="dtype"):
        load_image(np.zeros((4, 4), bool))
    with pytest.raises(TypeError, match="list"):
        load_image([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))


# --- bad images: one clear error each ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["whole", "center_crop"])
@pytest.mark.parametrize("shape_hw", [(50, 4000), (224, 1), (4000, 50)])
def test_square_protocols_refuse_strips(protocol, shape_hw):
    from tclip_jax.image import prepare

    with pytest.raises(ValueError, match="more than 10:1.*crop or tile it first"):
        prepare(np.zeros((*shape_hw, 3), np.uint8), protocol, VIT_B32)
    prepare(np.zeros((40, 400, 3), np.uint8), protocol, VIT_B32)  # 10:1 is still taken


@pytest.mark.parametrize("protocol", ["whole", "center_crop"])
def test_a_strip_is_pointed_to_patch_multiple_only_where_that_protocol_takes_it(protocol):
    """A side of at least half a patch rounds to one patch or more: patch_multiple takes the strip. A 1-pixel side
    does not (the command the hint named was refused too)."""
    from tclip_jax.image import prepare

    hint = "TCLIP can also take it as it is: --input-protocol patch_multiple"
    for shape_hw, taken in (((1, 2000), False), ((15, 2000), False), ((16, 2000), True), ((2000, 16), True)):
        with pytest.raises(ValueError, match="more than 10:1") as refused:
            prepare(np.zeros((*shape_hw, 3), np.uint8), protocol, VIT_B32)
        assert (hint in str(refused.value)) == taken, shape_hw
        if taken:  # the hint's command runs
            prepare(np.zeros((*shape_hw, 3), np.uint8), "patch_multiple", VIT_B32)
        else:
            assert str(refused.value).endswith("crop or tile it first")
            with pytest.raises(ValueError, match="less than half a 32-pixel patch"):
                prepare(np.zeros((*shape_hw, 3), np.uint8), "patch_multiple", VIT_B32)


def test_patch_multiple_keeps_strips_but_needs_half_a_patch():
    from tclip_jax.image import prepare

    pixels, geometry = prepare(np.zeros((50, 4000, 3), np.uint8), "patch_multiple", VIT_B32)
    assert pixels.shape == (64, 4000, 3) and geometry.original_hw == (50, 4000)
    with pytest.raises(ValueError, match="less than half a 32-pixel patch"):
        prepare(np.zeros((10, 400, 3), np.uint8), "patch_multiple", VIT_B32)
    # int(side / 32 + 0.5) patches: a 16-pixel side (half a patch) rounds to one patch, 300 to 9; 15 to none
    assert prepare(np.zeros((16, 300, 3), np.uint8), "patch_multiple", VIT_B32)[0].shape == (32, 288, 3)
    with pytest.raises(ValueError, match="less than half a 32-pixel patch"):
        prepare(np.zeros((300, 15, 3), np.uint8), "patch_multiple", VIT_B32)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, before our refusal
def test_images_beyond_the_pixel_limit_are_refused_before_decoding(tmp_path):
    from tclip_jax.image import io

    Image.new("RGB", (300, 10)).save(tmp_path / "big.png")
    limit = io.max_pixels()
    try:
        for allowed, message in ((2000, "has 3,000 pixels"), (1000, "has 3,000 pixels")):  # below and beyond 2x
            io.set_max_pixels(allowed)
            with pytest.raises(ValueError, match=message + ".*--max-pixels"):
                load_image(tmp_path / "big.png")
            with pytest.raises(ValueError, match="more than the limit"):
                load_image((tmp_path / "big.png").read_bytes())
        io.set_max_pixels(3000)
        assert load_image(tmp_path / "big.png").shape == (10, 300, 3)
        with pytest.raises(ValueError, match="positive integer"):
            io.set_max_pixels(0)
    finally:
        io.set_max_pixels(limit)


def test_a_folder_or_a_fifo_is_not_an_image(tmp_path):
    import os

    with pytest.raises(ValueError, match="is a folder, not an image file"):
        load_image("/")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would block until a writer comes
    with pytest.raises(ValueError, match="is not a regular file"):
        load_image(tmp_path / "pipe.png")
