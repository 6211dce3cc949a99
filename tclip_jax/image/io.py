"""Decoding: any path, encoded bytes (bytes, bytearray, memoryview), PIL image or array (numpy, or a jax.Array,
fetched) becomes an RGB uint8 array [H, W, 3].

Conventions:
- Files and bytes are opened in every format PIL has but `NOT_OPENED_FORMATS`: no outside program runs on them (PIL
  renders PostScript with Ghostscript), as image and dataset files come from anywhere.
- Alpha is dropped (not composited), as CLIP's own ``_convert_image_to_rgb`` (PIL ``convert("RGB")``) does;
  CLIP converts after resizing, we before (`tclip_jax.image.protocols`).
- 16-bit values v become round(v / 257), so 8-bit values stored as v * 257 round-trip exactly. 16-bit data whose
  values are all <= 255 (likely 8-bit values, nearly black once read) is read the same way with a warning, whether
  a uint16 array or a PIL image of mode I or I;16. 16-bit RGB(A) files (PNG, TIFF) are read as PIL, and so CLIP's
  own preprocessing, reads them: PIL keeps each value's high byte, v >> 8, up to 1 below round(v / 257).
- Float arrays must lie in [0, 1] and become round(255 * x).
- EXIF orientation is applied (``ImageOps.exif_transpose``) to files, bytes and PIL images, unless ``exif=False``
  (a PIL image turned by hand keeps its tag and is turned again; ``exif_transpose`` drops it):
  dataset annotations are drawn on the stored pixel grid (as pycocotools, gScoreCAM's ``Image.open`` and the
  ImageNet-S evaluator read images), so datasets decode images as stored.
- Files and bytes with more than ``max_pixels()`` pixels are refused before they are decoded, a guard against
  decompression bombs (a small file that decodes to gigabytes). The limit is PIL's, 89,478,485 pixels (about
  9459 x 9459); ``set_max_pixels`` (``--max-pixels`` on the command line) raises it for the process.
- A file PIL cannot open or decode raises ValueError naming it (`read_raster`, which dataset label files go
  through too): PIL's open wraps its plugins' errors in UnidentifiedImageError, but its decoding lets them out as
  they are (`DECODE_ERRORS`), and a sweep records a ValueError as its sample's error where another type stopped it.
"""
from __future__ import annotations

import io
import os
import pathlib
import re
import struct
import sys
import warnings
from collections.abc import Callable
from typing import IO, TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError

ImageLike = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray  # or a jax.Array
T = TypeVar("T")

_UINT16_MAX = 65535
# PIL warns between its limit and twice it; the check below refuses such images instead, with a message that
# says how to allow them.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# The formats PIL has that are never opened: EPS, which PIL renders by running the program Ghostscript (gs) on the
# file; IPTC, whose payload PIL opens again with every format allowed, EPS included; and BUFR, GRIB, HDF5, MPEG and
# WMF, which PIL only identifies (or has Windows draw). An image or label file is never handed to an outside program.
# Every other format is opened, those of plugins a user registered (HEIC with pillow-heif, say) included.
NOT_OPENED_FORMATS = ("EPS", "IPTC", "BUFR", "GRIB", "HDF5", "MPEG", "WMF")
# What PIL raises where a file's data is damaged past its header. `Image.open` turns its plugins' errors into
# UnidentifiedImageError, but decoding (`load`, the first read of the pixels) lets them out as they are: OSError (data
# cut short, a decoder's error), SyntaxError (PIL's word for malformed data: "broken PNG file", a bad chunk checksum),
# EOFError and struct.error (data that ends inside a record).
DECODE_ERRORS = (OSError, SyntaxError, EOFError, struct.error)


def open_raster(source: str | os.PathLike | IO[bytes]) -> Image.Image:
    """`Image.open(source)` that tries every format PIL has but `NOT_OPENED_FORMATS`: PostScript and the others
    raise `UnidentifiedImageError`."""
    Image.init()  # registers every plugin PIL has, so that the list below holds them
    return Image.open(source, formats=[name for name in Image.OPEN if name not in NOT_OPENED_FORMATS])


def max_pixels() -> int | None:
    """The largest number of pixels an image file may decode to (PIL's `Image.MAX_IMAGE_PIXELS`; None, as a
    program may set it to turn PIL's check off: no limit)."""
    return Image.MAX_IMAGE_PIXELS


def set_max_pixels(limit: int) -> None:
    """Raises (or lowers) the decoded-size limit of image files for this process."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"the pixel limit must be a positive integer, got {limit!r}")
    Image.MAX_IMAGE_PIXELS = limit


def load_image(image: ImageLike, exif: bool = True, file: str | os.PathLike | None = None) -> np.ndarray:
    """Return ``image`` as a C-contiguous RGB uint8 array [H, W, 3] (a new array, never a view of the input). `file`:
    the file encoded bytes were read from, which errors name (a caller that reads a file's bytes itself, to hash
    what it decodes)."""
    if isinstance(image, (str, os.PathLike)):
        return _decode(_image_path(image), exif)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image), exif, file)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, exif)
    if _is_jax_array(image):
        image = np.asarray(image)  # fetched from its device
    if isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image)
        if image.dtype == np.uint16:
            _warn_if_8_bit(image, "a uint16 image array", "pass them as uint8 (array.astype(np.uint8))")
        return rgb
    raise TypeError(f"expected a path, encoded bytes, a PIL image or a numpy or jax array, got {type(image).__name__}")


def _is_jax_array(value) -> bool:
    """Whether `value` is a jax.Array (jax is not imported to tell: no jax array exists without it)."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.Array)


def image_size(path: str | os.PathLike, exif: bool = True) -> tuple[int, int]:
    """(height, width) of the image file `load_image` would decode, from its header and metadata without decoding
    its pixels (but an animated PNG's, `_exif_undecoded`), after the checks `load_image` makes before decoding (a
    file, an image, not too many pixels): a run can check every image up front. Data damaged past the header is
    found only by decoding."""
    def size(img: Image.Image) -> tuple[int, int]:
        tiff = _tiff_orientation(img)
        if tiff != 1:  # the header's size is already the turned one
            turned = not exif and tiff in _QUARTER_TURNS
        else:
            turned = exif and _exif_undecoded(img).get(_EXIF_ORIENTATION, 1) in _QUARTER_TURNS
        return (img.width, img.height) if turned else (img.height, img.width)

    return read_raster(_image_path(path), size)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _image_path(image: str | os.PathLike) -> pathlib.Path:
    """The path of an image file; an empty string and a URL (which would be read as a relative path, its "//"
    collapsed; one with spaces before it too) are refused."""
    text = os.fspath(image)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise ValueError("an image path is an empty string")
    if _URL.match(text.lstrip()) and not os.path.lexists(text):  # (a space before it: still no file name)
        raise ValueError(f"{_shown(text)} is a URL: images are not fetched; download the image and pass its file "
                         "(in Python, tclip_jax.notebook.fetch_image(url) fetches an http(s) URL)")
    return pathlib.Path(image)


def _shown(text: str, limit: int = 120) -> str:
    """`text` quoted for a message, cut to `limit` characters (saying how long it is) if longer."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


_EXIF_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)
# The transpose that undoes what `ImageOps.exif_transpose` does for each orientation.
_UNDO_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                     4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
                     7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def _tiff_orientation(img: Image.Image) -> int:
    """The orientation of a TIFF, which PIL applies itself when it loads one (its header size already turned);
    1 for other formats."""
    return img.tag_v2.get(_EXIF_ORIENTATION, 1) if img.format == "TIFF" else 1


def _exif_undecoded(img: Image.Image) -> Image.Exif:
    """`img.getexif()` as it is once `img` is decoded (what `exif_transpose` reads after `load_image` decodes it),
    without decoding it. PIL's getexif of a PNG without an eXIf chunk before its image data decodes the image, to read
    the chunks after it: PIL takes an eXIf chunk, a "Raw profile type exif" text chunk or XMP wherever it is (the PNG
    extensions 1.5.0 allow eXIf anywhere but between IDAT chunks; PNG's third edition and browsers take it only
    before them). One with an eXIf chunk before is read after decoding too, and a later eXIf replaces it, a later
    XMP's orientation counts where it has none. Here the chunks after the image data of every PNG are read as PIL's
    `load_end` reads them once the image is decoded, by its own chunk reader, seeking over the image data instead;
    an animated PNG, whose frames PIL reads otherwise, is decoded (PIL's getexif does not where an eXIf chunk comes
    before its image data)."""
    if not isinstance(img, PngImagePlugin.PngImageFile):
        return img.getexif()
    if img.is_animated or img.png is None:  # (none once decoded: load_end has read the chunks)
        img.load()
        return Image.Image.getexif(img)
    png, fp = img.png, img.fp
    fp.seek(img.tile[0][2] - 8)  # the first IDAT chunk's header (a tile is a tuple before Pillow 11)
    while True:  # load_end's loop, less the image data the decoder has read
        try:
            cid, pos, length = png.read()
        except (struct.error, SyntaxError):
            break
        if cid == b"IEND":
            break
        if cid not in (b"IDAT", b"DDAT"):
            try:
                png.call(cid, pos, length)  # into img.info, as load_end
            except UnicodeDecodeError:
                break
            except (EOFError, AttributeError):  # image data after other chunks, chunks PIL does not read
                pass
        fp.seek(pos + length + 4)  # past the data, read or not, and its CRC
    return Image.Image.getexif(img)  # PIL's reading of img.info, without PngImageFile's decoding first


def _decode(source: pathlib.Path | bytes, exif: bool, file: str | os.PathLike | None = None) -> np.ndarray:
    return read_raster(source, lambda img: _pil_to_rgb(img, exif), file=file)


def read_raster(source: str | os.PathLike | bytes, read: Callable[[Image.Image], T], what: str = "image file",
                file: str | os.PathLike | None = None) -> T:
    """`read(image)` of the image PIL opens from `source`, a file (`what` it is: "image file", "VOC label") or
    encoded bytes (read from `file`, if given, which errors then name), after the checks on the file and on the
    header's size (`max_pixels`). A file that is not there
    raises FileNotFoundError; anything else that keeps it from being read (not a regular file, not an image, data PIL
    cannot decode: `DECODE_ERRORS`, too many pixels, a ValueError of `read`) a ValueError naming it."""
    if isinstance(source, bytes):
        name = "image bytes" if file is None else f"{what} {file}"
    else:
        source, name = pathlib.Path(source), f"{what} {source}"
        try:
            exists, is_dir, is_file = source.exists(), source.is_dir(), source.is_file()
        except OSError as err:  # e.g. a name too long for the file system
            raise ValueError(f"cannot read {what} {_shown(str(source))}: {err.strerror or err}") from None
        if not exists:
            raise FileNotFoundError(f"{what} not found: {source}")
        if is_dir:
            raise ValueError(f"{source} is a folder, not {'an' if what[0] in 'aeiouAEIOU' else 'a'} {what}")
        if not is_file:  # a FIFO or a device: opening it could block
            raise ValueError(f"{source} is not a regular file")
    try:
        with open_raster(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            _check_size(img.width * img.height, f"{name} ({img.width}x{img.height})")  # from the header
            try:
                return read(img)
            except ValueError as err:  # e.g. values a mode cannot hold: say which file
                raise ValueError(f"cannot read {name}: {err}") from None
    except Image.DecompressionBombError as err:  # PIL refuses beyond twice its limit, in open()
        _check_size(int(re.search(r"\((\d+) pixels\)", str(err)).group(1)), name)
        raise ValueError(f"cannot read {name}: {err}") from None
    except UnidentifiedImageError:  # PIL's message ("cannot identify image file ...") only names the file again,
        # or an io.BytesIO object by its address
        what_is_not = "the bytes are" if isinstance(source, bytes) and file is None else "the file is"
        raise ValueError(f"cannot read {name}: {what_is_not} not an image PIL can decode") from None
    except DECODE_ERRORS as err:  # damaged past the header: truncated, a broken PNG chunk
        raise ValueError(f"cannot read {name}: {str(err) or type(err).__name__}") from err


def _check_size(pixels: int, name: str) -> None:
    if max_pixels() is not None and pixels > max_pixels():
        raise ValueError(f"{name} has {pixels:,} pixels, more than the limit of {max_pixels():,} (a guard against "
                         "decompression bombs); pass --max-pixels N (tclip_jax.image.io.set_max_pixels) to allow it")


def _pil_to_rgb(img: Image.Image, exif: bool = True) -> np.ndarray:
    applied = _tiff_orientation(img)  # read before loading, which applies it and drops the tag
    _load_unmapped(img)
    if not exif and applied in _UNDO_ORIENTATION:  # back to the stored grid
        img = img.transpose(_UNDO_ORIENTATION[applied])
    if exif:
        img = ImageOps.exif_transpose(img)
    if img.width == 0 or img.height == 0:
        raise ValueError(f"image is empty: size {img.width}x{img.height} (W x H)")
    if img.mode.startswith("I"):  # "I" (int32) and "I;16*" (uint16): 16-bit data, PIL's convert would clip at 255
        values = np.asarray(img)
        if values.min() < 0 or values.max() > _UINT16_MAX:
            raise ValueError(f"PIL mode {img.mode} image has values outside the 16-bit range 0..{_UINT16_MAX}")
        # 8-bit values in a 16-bit mode (Image.fromarray of int32) decode nearly black
        _warn_if_8_bit(values, f"a PIL mode {img.mode} image", "convert it to mode L or pass a uint8 array")
        return _array_to_rgb(values.astype(np.uint16))
    if img.mode == "F":
        return _array_to_rgb(np.asarray(img))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL asks for palette transparency to go through RGBA
    try:
        return np.array(img.convert("RGB"))
    except ValueError as err:
        raise ValueError(f"cannot convert PIL mode {img.mode} image to RGB: {err}") from err


def _load_unmapped(img: Image.Image) -> None:
    """`img.load()`, reading the file rather than memory-mapping it. PIL maps an image opened by file name whose
    pixels are one uncompressed strip (a TIFF of mode L, P, RGBA, CMYK or I;16, of any size under PIL 13) at the
    image's size, which for a TIFF of orientation 5-8 is the turned size, not the stored one: the pixels would come
    out scrambled, in the stored shape. An image opened from a file object or bytes (no name) is always read."""
    if not (isinstance(img, ImageFile.ImageFile) and img.filename):
        img.load()
        return
    name, img.filename = img.filename, ""
    try:
        img.load()
    finally:
        img.filename = name


def _warn_if_8_bit(values: np.ndarray, what: str, advice: str) -> None:
    """Warns that 16-bit data whose values are all <= 255 (8-bit values, likely) decodes nearly black."""
    if 0 < values.max() <= 255:
        warnings.warn(f"{what} whose values are all <= 255 is read as 16-bit (v / 257: nearly black); if they are "
                      f"8-bit values, {advice}", stacklevel=3)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"expected an image array [H, W] or [H, W, 1|3|4], got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image is empty: shape {array.shape}")
    pixels = _to_uint8(array)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])  # a 4th channel is alpha: dropped


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.copy()
    if array.dtype == np.uint16:
        return np.round(array / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError("float image contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"float image values must lie in [0, 1], got range [{low}, {high}]; pass uint8 for 0..255")
        return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise TypeError(f"unsupported image dtype {array.dtype}; expected uint8, uint16 or float in [0, 1]")
