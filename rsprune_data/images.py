"""Decode one image (JPEG, PNG, TIFF/GeoTIFF, ``.npy`` array) and measure what Stage I needs:
entropy, no-data share and, when asked, a cloud/haze score (:func:`cloud_score`).

Failures stay at the image: whatever a codec raises (Pillow, tifffile, libjpeg, imagecodecs' LZW,
deflate, zstd, packbits, lzma, webp, JPEG ... errors, ``MemoryError``) becomes one
:class:`~rsprune_data.errors.CorruptImageError` with a reason, never an exception that ends a run.

Bounded memory: before any pixel is decoded the header's size (height x width x bands x bytes per
sample) is compared with ``max_decoded_bytes`` (default :data:`DEFAULT_DECODE_BUDGET`). Beyond it
the image is decoded at reduced resolution where the codec offers one (JPEG DCT scaling by 1/2,
1/4 or 1/8 through libjpeg-turbo or Pillow's ``draft``; the largest TIFF overview, SubIFD pyramid
level or reduced-resolution page that fits), and refused as ``too_large`` when none fits. A
reduced decode measures entropy and no-data on the smaller image, which is close to but not equal
to the full-resolution values (resampling smooths the histogram).

Decoders are picked from the leading bytes, not the file name (the extension is only checked against
:data:`IMAGE_EXTS`): JPEG through simplejpeg (libjpeg-turbo; bit-identical to Pillow's RGB decode on
all Harvey and UC Merced files), falling back to Pillow for what simplejpeg rejects or converts
differently (CMYK/YCCK, recoverable stream warnings); PNG through Pillow; TIFF through tifffile (any
dtype and band count, GDAL_NODATA tag 42113), falling back to Pillow for compressions that tifffile
cannot decode without ``imagecodecs`` (LZW, JPEG) and for photometric layouts other than
grey/RGB/palette. ``.npy`` members (fMoW-style shards) are read with ``numpy.load(allow_pickle=False)``:
an ``HxW`` or ``HxWxC`` array of any numeric dtype, then the band and dtype rules below. A member
whose name is not an image extension (``--image-key img_content``) is decoded by sniffing its bytes
(``ext=None``).

Bands (alpha, when present, is split off first: PNG ``LA``/``RGBA``/transparent palettes, TIFF
extra samples marked alpha):

- 1 band: grey; luma is the band itself and the RGB image repeats it three times; ``rgb_bands`` is ignored.
- 2 bands without alpha: rejected (``bad_shape``).
- 3 or more bands: R, G, B are the bands ``rgb_bands`` (default the first three; NAIP RGBN keeps RGB;
  pass ``(3, 2, 1)`` for Sentinel-2 L1C-style band order). Entropy and no-data both use these bands
  only: they describe the image the model will see.
- 8 bit: used as is. uint16: scaled by the full dtype range, ``round(v * 255 / 65535)`` (so a 12-bit
  sensor stored in uint16 comes out dark and with low entropy: compare entropies within one corpus
  of one dtype). Every other dtype (float, int16, int32, ...): stretched linearly from the smallest to
  the largest finite, non-no-data value of the selected bands to 0..255; non-finite values go to 0.
  Pillow returns 16-bit colour PNGs as 8 bit already; for 16-bit grey PNGs the entropy therefore
  differs from ``convert("L")``, which clips at 255 instead of scaling.

Entropy is the Shannon entropy (bits) of the 256-bin histogram of the 8-bit luma of every pixel
(:mod:`rsprune_data.entropy`, identical to Pillow's ``convert("L")``), including transparent and
no-data pixels: transparency is reported through ``nodata``, and entropy stays equal to a plain
``Image.open(f).convert("L")`` computation.

No-data share: the share of pixels whose selected bands all lie within ``tolerance`` of the no-data
value, or whose alpha is 0. The value is ``nodata_value`` when given, else the file's GDAL_NODATA
tag, else 0. ``tolerance`` is in 8-bit levels: used as is for 8-bit data, times 257 for uint16,
ignored (exact match) for other dtypes, where NaN/inf samples also count as no-data.
:data:`NODATA_TOLERANCE` was measured on the Harvey crops (see there).

``fast_gray=True`` decodes JPEGs straight to libjpeg's Y channel (no chroma decoding or
upsampling; analyze() runs about 2x faster). Y is not Pillow's ``convert("L")``
of the RGB decode: the entropy differs by up to 0.31 bits over all 21,953 Harvey crops (mean 0.0006
on damage/no_damage, 0.046 on bad_images) and by up to 0.087 bits on the 2,100 UC Merced images
(mean 0.0018), so it is opt-in and the default path matches Pillow exactly. In that mode no-data is
"Y within tolerance", a necessary condition of "all of R, G, B within tolerance" (luma is a convex
combination of them), so it can only over-count: by at most 0.006 on Harvey, but by up to 0.28
(mean 0.004) on UC Merced, whose dark, coloured shadows have Y <= 8.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import simplejpeg
from numpy.typing import NDArray

from .entropy import entropy_from_hist
from .errors import ConfigError, CorruptImageError

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "tif", "tiff")
ARRAY_EXTS: tuple[str, ...] = ("npy",)
#: Member extensions :func:`pick_image_member` recognises without an explicit image key.
MEMBER_EXTS: tuple[str, ...] = IMAGE_EXTS + ARRAY_EXTS

CLOUD_BLOCK = 8
CLOUD_DARK = 0.35
CLOUD_CHROMA = 0.2
CLOUD_TEXTURE = 0.02
CLOUD_VERSION = "1"
"""Cloud/haze score parameters (:func:`cloud_score`), measured with ``benchmarks/quality.py --cloud``."""

NODATA_TOLERANCE = 8
"""Default no-data tolerance in 8-bit levels.

JPEG ringing lifts the black (0) no-data wedges of lossy tiles to a few levels above 0 near their
edges. Measured on all Harvey crops with "all of R, G, B <= t": the mean no-data share of
bad_images grows 0.119 (t=0), 0.139 (4), 0.142 (8), 0.143 (16), i.e. it stops growing at t = 8,
while the share of damage/no_damage crops with more than 1% no-data stays 0.1% for every t <= 16
(2.6% and 4.4% at t = 32, where dark shadows and water start to count). On UC Merced
(lossless-sourced JPEG q95, 1 ft resolution with deep shadows) 8.8% of images have more than 1%
of pixels at t = 8, 2.0% more than 5%. Pass ``tolerance=0`` for exact matching.
"""

MAX_PIXELS = 1 << 28
"""Largest image (pixels) decoded; larger headers are refused as ``too_large`` before allocating."""

DEFAULT_DECODE_BUDGET = 256 << 20
"""Default ``max_decoded_bytes``: 256 MiB of decoded raster per image.

Measured peak RSS of one ``analyze(want_rgb=True)`` at the budget (``benchmarks/decode_memory.py
--at-budget``): 3.8x the decoded raster for float32 data (an 8192 x 8192 TIFF: +965 MiB), 2.7x for
an RGB JPEG; so a worker stays near 1 GiB and 8 workers near 8 GB, well inside a 32 GB node with
an encoder beside them. Larger images are decoded at reduced resolution or refused (module
docstring); a 16000 x 16000 float32 TIFF without overviews costs +2.4 MiB instead of +3.7 GiB.
"""

_NPY_MAGIC = b"\x93NUMPY"
_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_OTHER_IMAGE_MAGICS = (b"GIF8", b"RIFF", b"BM", b"\x00\x00\x00\x0cjP", b"\xff\x0a", b"8BPS")
_SIMPLEJPEG_SPACES = (
    "YCbCr",
    "Gray",
)  # CMYK/YCCK go to Pillow: its colour conversion is the reference
_TIFF_PHOTOMETRIC = (1, 2, 3)  # MINISBLACK, RGB, PALETTE
_TIFF_ALPHA = (1, 2)  # EXTRASAMPLE ASSOCALPHA, UNASSALPHA
_GDAL_NODATA = 42113
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
)
# tifffile trips over corrupt tag values with these as well (found by fuzzing, see tests)
_TIFF_ERRORS: tuple[type[BaseException], ...] = (
    *_PIL_ERRORS,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
)


@dataclass(frozen=True, eq=False, slots=True)
class ImageStats:
    """Stage I measurements of one image.

    Attributes:
        entropy: Shannon entropy in bits of the 8-bit luma histogram, in [0, 8].
        nodata: share of no-data pixels in [0, 1] (see the module docstring).
        rgb: the ``HxWx3`` uint8 image when asked for with ``want_rgb``, else None.
        cloud: :func:`cloud_score` when asked for with ``want_cloud``, else NaN.
    """

    entropy: float
    nodata: float
    rgb: NDArray[np.uint8] | None = None
    cloud: float = math.nan


class _Raster(NamedTuple):
    bands: NDArray[Any]  # H x W x C, native dtype, alpha removed
    transparent: NDArray[np.bool_] | None  # H x W, True where alpha == 0
    nodata: float | None  # the file's own no-data value (GeoTIFF tag)


def analyze(
    data: bytes,
    ext: str | None,
    *,
    want_rgb: bool = False,
    want_cloud: bool = False,
    rgb_bands: tuple[int, int, int] = (0, 1, 2),
    nodata_value: float | None = None,
    tolerance: int = NODATA_TOLERANCE,
    fast_gray: bool = False,
    max_decoded_bytes: int | None = DEFAULT_DECODE_BUDGET,
) -> ImageStats:
    """Decode ``data`` and measure entropy and no-data share (module docstring: band rules).

    Args:
        data: encoded image bytes.
        ext: the file or webdataset member extension (``"jpg"``, ``".TIF"``, ``"rgb.png"``,
            ``"npy"``...), or None to pick the format from the bytes alone.
        want_rgb: also return the ``HxWx3`` uint8 image (for an encoder).
        want_cloud: also compute :func:`cloud_score` (NaN with ``fast_gray``: it needs colour).
        rgb_bands: band indices used as R, G, B for images with 3 or more bands.
        nodata_value: no-data value in the file's units; None = the GeoTIFF tag, else 0.
        tolerance: no-data tolerance in 8-bit levels (see :data:`NODATA_TOLERANCE`).
        fast_gray: decode JPEGs to libjpeg's Y channel (approximate, ignored with ``want_rgb``).
        max_decoded_bytes: decode budget in bytes of decoded raster (module docstring); ``None``
            for no limit.

    Returns:
        :class:`ImageStats`.

    Raises:
        CorruptImageError: with ``reason`` one of ``empty``, ``truncated``, ``decode_error``,
            ``unsupported_format``, ``bad_shape``, ``too_large``.
        ConfigError: ``rgb_bands`` or ``tolerance`` is malformed.

    Example:
        >>> import io
        >>> from PIL import Image
        >>> buf = io.BytesIO()
        >>> Image.new("L", (8, 8), 7).save(buf, "PNG")
        >>> analyze(buf.getvalue(), "png").entropy
        0.0
    """
    _check_args(rgb_bands, tolerance, max_decoded_bytes)
    gray = fast_gray and not want_rgb
    raster = _decode(data, ext, gray=gray, budget=max_decoded_bytes)
    bands = _select(raster.bands, rgb_bands)
    value = _nodata_value(nodata_value, raster.nodata)
    if bands.dtype == np.uint8:
        img8, mask = bands, None
    else:
        mask = _near(bands, value, _native_tolerance(bands.dtype, tolerance))
        img8 = _to_u8(bands, mask)
    hist, gray_im = _luma_hist(img8)
    if mask is None:
        nodata = _nodata_u8(img8, gray_im, hist, value, tolerance, raster.transparent)
    else:
        if raster.transparent is not None:
            mask |= raster.transparent
        nodata = float(mask.mean())
    rgb = _as_rgb(img8) if want_rgb else None
    cloud = _cloud_u8(img8, np.asarray(gray_im)) if want_cloud and not gray else math.nan
    return ImageStats(float(entropy_from_hist(hist)), nodata, rgb, cloud)


def cloud_score(rgb: NDArray[np.uint8]) -> float:
    """Share of the image covered by cloud or haze, in [0, 1]: the share of 8x8 blocks that are
    bright, colourless and flat.

    A block counts when three tests hold (values on a 0..1 scale):

    - its dark channel (the minimum over the block's pixels of min(R, G, B)) exceeds
      :data:`CLOUD_DARK` = 0.35. The dark channel prior (He, Sun and Tang, "Single Image Haze
      Removal Using Dark Channel Prior", CVPR 2009) observes that in haze-free outdoor patches some
      pixel has a channel near 0; haze and cloud add airlight and lift every channel;
    - its mean chroma max(R, G, B) - min(R, G, B) is below :data:`CLOUD_CHROMA` = 0.2 (cloud and
      haze are white to grey: the low-saturation test of simple RGB cloud masks);
    - the standard deviation of its luma is below :data:`CLOUD_TEXTURE` = 0.02 (about 5 grey
      levels: cloud tops and thick haze carry no texture, bright roofs and concrete do).

    The thresholds were chosen on Harvey and UC Merced tiles (128 and 256 px) and their measured
    trade-off is in the README (``benchmarks/quality.py --cloud``). Images smaller than a block use
    one block of their own size. A grey image has zero chroma, so only brightness and flatness
    decide.

    Example:
        >>> cloud_score(np.full((16, 16, 3), 230, np.uint8))
        1.0
        >>> cloud_score(np.zeros((16, 16, 3), np.uint8))
        0.0
    """
    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[2] not in (1, 3) or img.dtype != np.uint8 or 0 in img.shape:
        raise ConfigError(
            f"cloud_score needs an HxWx3 (or HxWx1) uint8 image, got {img.dtype} {img.shape}"
        )
    if img.shape[2] == 1:
        luma = img[..., 0]
    else:
        luma = (img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) + 0.5).astype(
            np.uint8
        )
    return _cloud_u8(img, luma)


def _cloud_u8(img8: NDArray[np.uint8], luma: NDArray[np.uint8]) -> float:
    # Cheap first: most tiles have no bright block at all, which the dark channel alone shows, so
    # the chroma and texture passes run only when some block passed (measured in
    # benchmarks/indexer_throughput.py --cloud-only).
    h, w = img8.shape[:2]
    b = max(1, min(CLOUD_BLOCK, h, w))
    hb, wb = h // b, w // b

    def blocks(a: NDArray[Any]) -> NDArray[Any]:  # H x W -> hb x b x wb x b (a view)
        return a[: hb * b, : wb * b].reshape(hb, b, wb, b)

    if img8.shape[2] == 1:
        lo = hi = img8[..., 0]
    else:
        r, g, bl = img8[..., 0], img8[..., 1], img8[..., 2]
        lo = np.minimum(np.minimum(r, g), bl)
        hi = None
    hit = blocks(lo).min(axis=(1, 3)) > CLOUD_DARK * 255
    if not hit.any():
        return 0.0
    if hi is None:
        hi = np.maximum(np.maximum(r, g), bl)
        chroma = blocks(hi - lo).sum(axis=(1, 3), dtype=np.uint32)
        hit &= chroma < CLOUD_CHROMA * 255 * b * b
    if hit.any():
        y = blocks(luma).astype(np.float32)
        hit &= y.std(axis=(1, 3)) < CLOUD_TEXTURE * 255
    return float(hit.mean())


def decode_rgb(
    data: bytes,
    ext: str | None,
    *,
    rgb_bands: tuple[int, int, int] = (0, 1, 2),
    nodata_value: float | None = None,
    max_decoded_bytes: int | None = DEFAULT_DECODE_BUDGET,
) -> NDArray[np.uint8]:
    """Decode ``data`` to an ``HxWx3`` uint8 RGB image (alpha dropped, grey repeated).

    ``nodata_value`` only matters for float/int data, whose min..max stretch skips no-data pixels.
    ``max_decoded_bytes`` bounds the decoded raster as in :func:`analyze` (larger images come back
    at reduced resolution where the codec allows it).

    Raises:
        CorruptImageError: as :func:`analyze`.
    """
    _check_args(rgb_bands, 0, max_decoded_bytes)
    raster = _decode(data, ext, gray=False, budget=max_decoded_bytes)
    bands = _select(raster.bands, rgb_bands)
    if bands.dtype != np.uint8:
        value = _nodata_value(nodata_value, raster.nodata)
        bands = _to_u8(bands, _near(bands, value, 0))
    return _as_rgb(bands)


def pick_image_member(
    sample: Mapping[str, Any], image_key: str | None = None
) -> tuple[str, bytes] | None:
    """The image member of a webdataset sample: ``image_key`` if given, else the first member
    whose extension is in :data:`MEMBER_EXTS`.

    Without ``image_key`` the last dot-separated part of the member name decides (``"jpg"``,
    ``"rgb.TIF"``, ``"npy"``); members starting with ``_`` (``__key__``, ``__url__``) are skipped.
    With it, the member of exactly that name (``"img_content"`` in RS5M's shards), whatever its
    extension: decode it with ``ext=None`` (format from the bytes). None when there is none.

    Example:
        >>> pick_image_member({"__key__": "a", "cls.txt": b"x", "jpg": b"..."})
        ('jpg', b'...')
        >>> pick_image_member({"__key__": "a", "img_content": b"..."}, "img_content")
        ('img_content', b'...')
    """
    if image_key is not None:
        value = sample.get(image_key)
        return None if value is None else (image_key, value)
    for name, value in sample.items():
        if not name.startswith("_") and name.rsplit(".", 1)[-1].lower() in MEMBER_EXTS:
            return name, value
    return None


def sniff_image_member(sample: Mapping[str, Any]) -> tuple[str, bytes] | None:
    """:func:`pick_image_member`, else the first member whose leading bytes are a JPEG, PNG, TIFF
    or ``.npy`` (shards with a custom image member such as ``img_content``). Decode the second
    case with ``ext=None``.

    Example:
        >>> sniff_image_member({"__key__": "a", "img_content": b"\\x89PNG..."})
        ('img_content', b'\\x89PNG...')
    """
    picked = pick_image_member(sample)
    if picked is not None:
        return picked
    for name, value in sample.items():
        if name.startswith("_") or not isinstance(value, bytes | bytearray | memoryview):
            continue
        head = bytes(value[:6])
        if head.startswith((_JPEG_MAGIC, _PNG_MAGIC, _NPY_MAGIC, *_TIFF_MAGICS)):
            return name, bytes(value)
    return None


# decoding: bytes -> _Raster ----------------------------------------------------------------------


def _decode(data: bytes, ext: str | None, *, gray: bool, budget: int | None) -> _Raster:
    kind = "image" if ext is None else ext.rsplit(".", 1)[-1].lower()
    if kind not in MEMBER_EXTS and ext is not None:
        raise CorruptImageError(
            f"extension {ext!r} is not an image extension; expected one of {MEMBER_EXTS} "
            "(or name the member with an image key)",
            reason="unsupported_format",
        )
    try:
        return _decode_any(data, kind, gray, budget)
    except CorruptImageError:
        raise
    except MemoryError as exc:
        raise CorruptImageError(
            f"decoding the .{kind} image ran out of memory; lower the "
            "decode budget (max_decoded_bytes)",
            reason="too_large",
        ) from exc
    except Exception as exc:  # the image boundary (module docstring)
        # Codecs raise their own classes (imagecodecs.LzwError is a RuntimeError, Pillow plugins
        # raise what they like); one damaged tile must be an invalid sample, not a dead worker.
        raise CorruptImageError(
            f"cannot decode .{kind} image ({type(exc).__name__}: {exc})", reason="decode_error"
        ) from exc


def _decode_any(data: bytes, kind: str, gray: bool, budget: int | None) -> _Raster:
    if not data:
        raise CorruptImageError(f"empty .{kind} image (0 bytes)", reason="empty")
    head = bytes(data[:4])
    if bytes(data[:6]) == _NPY_MAGIC:
        raster = _decode_npy(data, budget)
    elif kind == "npy":
        raise CorruptImageError(f".npy data does not start with the NumPy magic ({head!r})")
    elif head.startswith(_JPEG_MAGIC):
        raster = _decode_jpeg(data, gray, budget)
    elif head == _PNG_MAGIC:
        raster = _decode_pil(data, budget)
    elif head in _TIFF_MAGICS:
        raster = _decode_tiff(data, budget)
    elif head.startswith(_OTHER_IMAGE_MAGICS):
        raise CorruptImageError(
            f".{kind} data is an image format other than JPEG/PNG/TIFF (starts with {head!r})",
            reason="unsupported_format",
        )
    else:
        raise CorruptImageError(f".{kind} data is not a JPEG, PNG or TIFF (starts with {head!r})")
    shape = raster.bands.shape
    if len(shape) != 3 or 0 in shape:
        raise CorruptImageError(
            f"decoded image has shape {shape}, expected H x W x bands", reason="bad_shape"
        )
    return raster


def _decode_npy(data: bytes, budget: int | None) -> _Raster:
    fmt: Any = np.lib.format  # untyped module
    f = io.BytesIO(data)
    try:  # the header first: refuse a huge array before allocating it
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if dtype.kind not in "biuf" or len(shape) not in (2, 3):
            raise CorruptImageError(
                f".npy array has dtype {dtype} and shape {shape}; expected a "
                "numeric HxW or HxWxC array",
                reason="bad_shape",
            )
        _check_pixels(math.prod(shape))
        if budget is not None and math.prod(shape) * dtype.itemsize > budget:
            raise CorruptImageError(
                f".npy array of shape {shape} and dtype {dtype} needs "
                f"{math.prod(shape) * dtype.itemsize:,} bytes, over the decode budget of "
                f"{budget:,} (max_decoded_bytes / --decode-budget)",
                reason="too_large",
            )
        f.seek(0)
        arr = np.load(f, allow_pickle=False)
    except CorruptImageError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        text = str(exc)
        reason = (
            "truncated" if "EOF" in text or "reshape" in text or "read" in text else "decode_error"
        )
        raise CorruptImageError(f"cannot read .npy array: {text}", reason=reason) from exc
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return _Raster(arr[..., None] if arr.ndim == 2 else arr, None, None)


def _decode_jpeg(data: bytes, gray: bool, budget: int | None) -> _Raster:
    try:
        h, w, space, _ = simplejpeg.decode_jpeg_header(data)
        if space in _SIMPLEJPEG_SPACES:
            _check_pixels(h * w)
            out = "GRAY" if gray or space == "Gray" else "RGB"
            factor = _jpeg_factor(h, w, 1 if out == "GRAY" else 3, budget)
            # min_height/min_width pick libjpeg-turbo's 1/factor DCT scaling (factor 1: full size)
            arr = simplejpeg.decode_jpeg(
                data, colorspace=out, min_height=-(-h // factor), min_width=-(-w // factor)
            )
            return _Raster(arr, None, None)
    except ValueError:
        pass  # strict libjpeg warning or damage: Pillow is the reference, let it decide
    return _decode_pil(data, budget)


def _jpeg_factor(h: int, w: int, bands: int, budget: int | None) -> int:
    """The smallest DCT scale-down (1, 2, 4 or 8) whose decoded size fits ``budget``."""
    for f in (1, 2, 4, 8):
        if budget is None or -(-h // f) * -(-w // f) * bands <= budget:
            return f
    raise _too_large(h * w * bands, budget, "even at 1/8 scale")


def _too_large(need: int, budget: int | None, how: str = "") -> CorruptImageError:
    return CorruptImageError(
        f"image needs {need:,} decoded bytes{' ' + how if how else ''}, more than the decode "
        f"budget max_decoded_bytes={budget:,}: raise the budget (`--decode-budget`) or tile the "
        "image",
        reason="too_large",
    )


def _pil_bytes(im: Any) -> int:
    """Decoded bytes of a Pillow image after the conversions of :func:`_decode_pil`."""
    from PIL import Image

    bands = 4 if im.mode in ("P", "PA", "CMYK") else int(Image.getmodebands(im.mode))
    bits = 32 if im.mode in ("I", "F") else 16 if im.mode.startswith("I;16") else 8
    return int(im.width * im.height * bands * bits // 8)


def _decode_pil(data: bytes, budget: int | None = None) -> _Raster:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_pixels(im.width * im.height)
            if budget is not None and _pil_bytes(im) > budget:
                if im.format != "JPEG":
                    raise _too_large(_pil_bytes(im), budget)
                f = _jpeg_factor(
                    im.height, im.width, _pil_bytes(im) // (im.width * im.height), budget
                )
                im.draft(im.mode, (-(-im.width // f), -(-im.height // f)))  # DCT scaling
                if _pil_bytes(im) > budget:
                    raise _too_large(_pil_bytes(im), budget, "after DCT scaling")
            im.load()
            mode = im.mode
            if mode in ("P", "PA"):
                mode = "RGBA" if mode == "PA" or "transparency" in im.info else "RGB"
                arr = np.array(im.convert(mode))
            elif mode in ("CMYK", "YCbCr"):
                mode, arr = "RGB", np.array(im.convert("RGB"))
            elif mode in ("1", "L", "LA", "RGB", "RGBA", "I", "F") or mode.startswith("I;16"):
                arr = np.array(im)  # writable, like simplejpeg's output
            else:
                raise CorruptImageError(
                    f"unsupported image mode {mode!r}", reason="unsupported_format"
                )
            tags = getattr(im, "tag_v2", None)
            nodata = _parse_nodata(tags.get(_GDAL_NODATA)) if tags is not None else None
    except CorruptImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise CorruptImageError(str(exc), reason="too_large") from exc
    except _PIL_ERRORS as exc:
        text = str(exc)
        reason = (
            "truncated"
            if isinstance(exc, EOFError) or "truncat" in text.lower()
            else "decode_error"
        )
        raise CorruptImageError(f"cannot decode image: {text}", reason=reason) from exc
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.ndim == 2:
        arr = arr[..., None]
    transparent = None
    if mode in ("LA", "RGBA"):
        transparent, arr = arr[..., -1] == 0, arr[..., :-1]
    return _Raster(arr, transparent, nodata)


def _tiff_page(tif: Any, budget: int | None) -> Any:
    """The first page, or, when it exceeds ``budget``, the largest overview that fits it."""
    page = tif.pages.first
    need = math.prod(page.shape) * page.dtype.itemsize * (3 if int(page.photometric) == 3 else 1)
    if budget is None or need <= budget:
        return page
    overviews = [lvl.keyframe for lvl in tif.series[0].levels[1:]] if tif.series else []
    overviews += [p for p in tif.pages[1:] if getattr(p, "is_reduced", False)]
    fits = [p for p in overviews if math.prod(p.shape) * p.dtype.itemsize <= budget]
    if not fits:
        raise _too_large(
            need,
            budget,
            f"({len(overviews)} overview(s) that fit none)"
            if overviews
            else "(no overview to decode instead)",
        )
    return max(fits, key=lambda p: math.prod(p.shape))


def _decode_tiff(data: bytes, budget: int | None = None) -> _Raster:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            first = tif.pages.first
            if int(first.photometric) not in _TIFF_PHOTOMETRIC:
                return _decode_pil(data, budget)
            _check_pixels(math.prod(first.shape))
            page = _tiff_page(tif, budget)
            arr = page.asarray()
            axes, photometric = page.axes, int(page.photometric)
            colormap, extras = page.colormap, tuple(int(e) for e in page.extrasamples)
            tag = first.tags.get(_GDAL_NODATA)
            nodata = _parse_nodata(tag.value) if tag is not None else None
    except CorruptImageError:
        raise
    except _TIFF_ERRORS as exc:
        if "imagecodecs" not in str(exc):
            reason = "truncated" if "failed to read" in str(exc) else "decode_error"
            raise CorruptImageError(f"cannot decode TIFF: {exc}", reason=reason) from exc
        try:
            return _decode_pil(data, budget)
        except CorruptImageError as pil_exc:
            raise CorruptImageError(
                f"TIFF needs a codec tifffile lacks ({exc}) and Pillow failed too ({pil_exc}); "
                "`pip install imagecodecs`",
                reason="unsupported_format",
            ) from exc
    if axes == "SYX":
        arr = np.moveaxis(arr, 0, -1)
    elif axes == "YX":
        arr = arr[..., None]
    elif axes != "YXS":
        raise CorruptImageError(
            f"TIFF first page has axes {axes!r}, expected YX/YXS/SYX", reason="bad_shape"
        )
    if photometric == 3 and colormap is not None:  # palette: 16-bit colormap, 8-bit like Pillow
        arr = (np.moveaxis(colormap[:, arr[..., 0]], 0, -1) >> 8).astype(np.uint8)
    transparent = None
    if extras and extras[-1] in _TIFF_ALPHA:
        transparent, arr = arr[..., -1] == 0, arr[..., :-1]
    return _Raster(arr, transparent, nodata)


def _check_pixels(n: int) -> None:
    if n > MAX_PIXELS:
        raise CorruptImageError(
            f"image has {n} pixels, more than MAX_PIXELS={MAX_PIXELS}", reason="too_large"
        )


def _parse_nodata(value: object) -> float | None:
    try:
        return float(str(value).strip("\x00 "))
    except ValueError:
        return None


# bands -> 8-bit image and no-data share -----------------------------------------------------------


def _check_args(rgb_bands: tuple[int, int, int], tolerance: int, budget: int | None = None) -> None:
    if len(rgb_bands) != 3 or min(rgb_bands) < 0:
        raise ConfigError(f"rgb_bands must be 3 non-negative band indices, got {rgb_bands!r}")
    if tolerance < 0:
        raise ConfigError(f"tolerance must be >= 0 (8-bit levels), got {tolerance!r}")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 1
    ):
        raise ConfigError(f"max_decoded_bytes must be a positive integer or None, got {budget!r}")


def _select(bands: NDArray[Any], rgb_bands: tuple[int, int, int]) -> NDArray[Any]:
    n = bands.shape[2]
    if n == 1:
        return bands
    if n < 3 or max(rgb_bands) >= n:
        raise CorruptImageError(
            f"image has {n} bands; rgb_bands={rgb_bands} needs {max(max(rgb_bands) + 1, 3)}",
            reason="bad_shape",
        )
    if n == 3 and tuple(rgb_bands) == (0, 1, 2):
        return bands
    return bands[..., list(rgb_bands)]


def _nodata_value(given: float | None, from_file: float | None) -> float:
    if given is not None:
        return float(given)
    return 0.0 if from_file is None else from_file


def _native_tolerance(dtype: np.dtype[Any], tolerance: int) -> int:
    if dtype == np.uint16:
        return tolerance * 257
    return tolerance if dtype in (np.uint8, np.bool_) else 0


def _near(bands: NDArray[Any], value: float, tol: int) -> NDArray[np.bool_]:
    """H x W mask: every band within ``tol`` of ``value`` (non-finite float samples count as near)."""
    masks = []
    for b in range(bands.shape[-1]):
        x = bands[..., b]
        d = x.astype(np.float64)  # in place from here: one float64 temporary, not three
        d -= value
        np.abs(d, out=d)
        near = d <= tol
        del d
        if x.dtype.kind == "f":
            near |= ~np.isfinite(x)
        masks.append(near)
    both: NDArray[np.bool_] = np.logical_and.reduce(masks)
    return both


def _luma_hist(img8: NDArray[np.uint8]) -> tuple[NDArray[np.int64], Any]:
    """256-bin luma histogram and the luma as a Pillow ``L`` image.

    Pillow's ``convert("L")`` is the definition :func:`rsprune_data.entropy.luma_u8` reproduces; it
    is used here because it runs in C without the 64 KiB uint32 temporaries of the numpy version,
    which cost page faults on every call once the heap is busy (measured on 128x128 Harvey crops
    in a loop over bytes held in memory: 160 vs 33 us for the numpy luma, 8,000 vs 3,500 images/s
    for decode + luma + histogram).
    """
    from PIL import Image

    h, w, c = img8.shape
    mode = "L" if c == 1 else "RGB"
    im = Image.frombuffer(mode, (w, h), np.ascontiguousarray(img8), "raw", mode, 0, 1)
    if c != 1:
        im = im.convert("L")
    return np.asarray(im.histogram(), dtype=np.int64), im


def _nodata_u8(
    img8: NDArray[np.uint8],
    gray_im: Any,
    hist: NDArray[np.int64],
    value: float,
    tol: int,
    transparent: NDArray[np.bool_] | None,
) -> float:
    """No-data share of 8-bit bands, reading the luma histogram first (the hot path).

    If R, G and B all lie in the integer range [lo, hi] so does the luma (a rounded convex
    combination), so only pixels whose luma is in [lo, hi] need the per-band test, and a clean tile
    (no such pixel) costs nothing beyond the histogram already built for the entropy.
    """
    pixels = img8.shape[0] * img8.shape[1]
    lo, hi = (
        (0, -1)
        if math.isnan(value)
        else (max(math.ceil(value - tol), 0), min(math.floor(value + tol), 255))
    )
    if transparent is None:
        if lo > hi:
            return 0.0
        candidates = int(hist[lo : hi + 1].sum())
        if candidates == 0 or img8.shape[2] == 1:
            return float(candidates / pixels)
        gray = np.asarray(gray_im).ravel()
        px = img8.reshape(-1, 3)[(gray >= lo) & (gray <= hi)]
        return float(_near(px[None], value, tol).sum()) / float(pixels)
    mask = _near(img8, value, tol) if lo <= hi else np.zeros(transparent.shape, np.bool_)
    return float((mask | transparent).mean())


def _to_u8(bands: NDArray[Any], nodata_mask: NDArray[np.bool_]) -> NDArray[np.uint8]:
    if bands.dtype == np.uint8:
        return bands
    if bands.dtype == np.bool_:
        return bands.astype(np.uint8) * np.uint8(255)
    if (
        bands.dtype == np.uint16
    ):  # round(v * 255 / 65535) = round(v / 257); v / 257 never ends in .5
        return ((bands.astype(np.uint32) + 128) // 257).astype(np.uint8)
    # In place on one float64 copy (same arithmetic as the plain expression, bit for bit): the
    # temporaries of `np.clip(np.rint((x - lo) * k), ...)` doubled the peak memory of big rasters.
    x = bands.astype(np.float64)
    finite = np.isfinite(x)
    valid = finite & ~nodata_mask[..., None]
    if not valid.any():
        return np.zeros(bands.shape, np.uint8)
    lo = float(np.min(x, where=valid, initial=np.inf))
    hi = float(np.max(x, where=valid, initial=-np.inf))
    del valid
    np.copyto(x, lo, where=~finite)  # NaN/inf -> 0
    del finite
    x -= lo
    x *= 255.0 / (hi - lo) if hi > lo else 0.0
    np.rint(x, out=x)
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def _as_rgb(img8: NDArray[np.uint8]) -> NDArray[np.uint8]:
    if img8.shape[2] == 1:
        return np.repeat(img8, 3, axis=2)
    return np.ascontiguousarray(img8)
