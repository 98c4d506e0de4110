"""Decoding, band handling, entropy and no-data share on real encoded bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from conftest import SAMPLE_DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from rsprune_data.entropy import entropy_from_hist, gray_entropy, luma_u8
from rsprune_data.errors import ConfigError, CorruptImageError
from rsprune_data.images import (
    IMAGE_EXTS,
    NODATA_TOLERANCE,
    ImageStats,
    analyze,
    decode_rgb,
    pick_image_member,
)

SHIPPED = sorted(p for p in SAMPLE_DATA.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
RNG = np.random.default_rng(0)


def pil_entropy(data: bytes) -> float:
    return float(entropy_from_hist(np.array(Image.open(io.BytesIO(data)).convert("L").histogram())))


def encode(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def tiff(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def noise(h: int = 32, w: int = 32, c: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, c), dtype=np.uint8)


# entropy -------------------------------------------------------------------------------------------


def test_shipped_sample_is_there() -> None:
    assert len(SHIPPED) == 405


def test_entropy_matches_pil_on_shipped_jpegs() -> None:
    for path in SHIPPED:
        data = path.read_bytes()
        stats = analyze(data, path.suffix)
        assert abs(stats.entropy - pil_entropy(data)) < 1e-4, path
        assert 0.0 <= stats.nodata <= 1.0


def test_rgb_matches_pil_decode_on_shipped_jpegs() -> None:
    for path in SHIPPED[::10]:
        data = path.read_bytes()
        rgb = analyze(data, "jpg", want_rgb=True).rgb
        assert rgb is not None and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
        np.testing.assert_array_equal(rgb, np.asarray(Image.open(path).convert("RGB")))
        np.testing.assert_array_equal(decode_rgb(data, "jpg"), rgb)


def test_fast_gray_is_close_but_opt_in() -> None:
    devs = []
    for path in SHIPPED[::4]:
        data = path.read_bytes()
        fast = analyze(data, "jpeg", fast_gray=True)
        devs.append(abs(fast.entropy - pil_entropy(data)))
        assert fast.nodata >= analyze(data, "jpeg").nodata - 1e-3  # Y test is a necessary condition
    assert max(devs) < 0.35
    assert max(devs) > 1e-4  # the reason it is not the default


def test_fast_gray_exact_for_grayscale_jpeg() -> None:
    data = encode(np.asarray(Image.open(SHIPPED[0]).convert("L")), "JPEG")
    assert analyze(data, "jpg", fast_gray=True).entropy == pytest.approx(
        pil_entropy(data), abs=1e-12
    )
    assert analyze(data, "jpg").entropy == pytest.approx(pil_entropy(data), abs=1e-12)


def test_constant_image_has_zero_entropy() -> None:
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("TIFF", "tif")):
        stats = analyze(encode(np.full((16, 16, 3), 77, np.uint8), fmt), ext)
        assert stats.entropy == 0.0
        assert stats.nodata == 0.0


def test_two_level_half_half_is_one_bit() -> None:
    img = np.zeros((8, 8), np.uint8)
    img[:, 4:] = 200
    stats = analyze(encode(img, "PNG"), "png")
    assert stats.entropy == pytest.approx(1.0, abs=1e-12)
    assert stats.nodata == pytest.approx(0.5)


# bands ---------------------------------------------------------------------------------------------


def test_one_band_grey_is_its_own_luma_and_replicated() -> None:
    grey = noise(c=1)[..., 0]
    stats = analyze(encode(grey, "PNG"), "png", want_rgb=True, rgb_bands=(5, 6, 7))  # ignored
    assert stats.entropy == pytest.approx(gray_entropy(grey), abs=1e-12)
    assert stats.rgb is not None and stats.rgb.shape == (32, 32, 3)
    for b in range(3):
        np.testing.assert_array_equal(stats.rgb[..., b], grey)


def test_one_band_tiff() -> None:
    grey = noise(c=1)[..., 0]
    assert analyze(tiff(grey), "tif").entropy == pytest.approx(gray_entropy(grey), abs=1e-12)


def test_three_band_tiff_matches_pil_luma() -> None:
    rgb = noise()
    stats = analyze(tiff(rgb, photometric="rgb"), "tiff", want_rgb=True)
    assert stats.entropy == pytest.approx(gray_entropy(luma_u8(rgb)), abs=1e-12)
    np.testing.assert_array_equal(stats.rgb, rgb)


def test_four_band_rgbn_uses_first_three_unless_told() -> None:
    rgbn = noise(c=4)
    data = tiff(rgbn, photometric="rgb", extrasamples=["unspecified"])
    stats = analyze(data, "tif", want_rgb=True)
    np.testing.assert_array_equal(stats.rgb, rgbn[..., :3])
    assert stats.entropy == pytest.approx(gray_entropy(luma_u8(rgbn[..., :3])), abs=1e-12)
    false_colour = decode_rgb(data, "tif", rgb_bands=(3, 0, 1))
    np.testing.assert_array_equal(false_colour, rgbn[..., [3, 0, 1]])
    # planar (band-sequential) layout gives the same image
    planar = tiff(np.moveaxis(rgbn, 2, 0), photometric="minisblack", planarconfig="separate")
    np.testing.assert_array_equal(decode_rgb(planar, "tif"), rgbn[..., :3])


def test_rgb_bands_beyond_band_count_is_bad_shape() -> None:
    with pytest.raises(CorruptImageError) as err:
        analyze(tiff(noise(), photometric="rgb"), "tif", rgb_bands=(3, 2, 1))
    assert err.value.reason == "bad_shape"


def test_two_bands_without_alpha_is_bad_shape() -> None:
    data = tiff(noise(c=2), photometric="minisblack", planarconfig="contig")
    with pytest.raises(CorruptImageError) as err:
        analyze(data, "tif")
    assert err.value.reason == "bad_shape"


def test_uint16_scaled_by_full_range() -> None:
    v = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    rgb = decode_rgb(tiff(np.stack([v, v, v], -1), photometric="rgb"), "tif")
    expected = np.floor(v.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    stats = analyze(tiff(v), "tif")
    assert stats.entropy == pytest.approx(gray_entropy(expected), abs=1e-12)


def test_uint16_tolerance_is_in_8bit_levels() -> None:
    v = np.full((4, 4), 30000, np.uint16)
    v[0] = 8 * 257  # within 8 levels of 0 after scaling
    v[1] = 8 * 257 + 1
    assert analyze(tiff(v), "tif", tolerance=8).nodata == pytest.approx(0.25)


def test_uint16_png() -> None:
    v = (np.arange(32 * 32, dtype=np.uint16) * 60).reshape(32, 32)
    rgb = decode_rgb(encode(v, "PNG"), "png")
    np.testing.assert_array_equal(
        rgb[..., 0], ((v.astype(np.uint32) + 128) // 257).astype(np.uint8)
    )


def test_float_stretched_by_finite_min_max() -> None:
    x = np.linspace(-1.0, 3.0, 256, dtype=np.float32).reshape(16, 16)
    x[0, 0] = np.nan
    x[0, 1] = np.inf
    rgb = decode_rgb(tiff(x), "tif")[..., 0]
    assert rgb[0, 0] == 0 and rgb[0, 1] == 0  # NaN, inf
    lo, hi = float(x[0, 2]), float(x[-1, -1])  # finite min and max
    expected = np.rint((x[1:].astype(np.float64) - lo) * 255 / (hi - lo)).astype(np.uint8)
    np.testing.assert_array_equal(rgb[1:], expected)
    stats = analyze(tiff(x), "tif", tolerance=0)
    assert stats.nodata == pytest.approx(2 / 256)  # non-finite samples count as no-data


def test_rgba_alpha_zero_is_nodata_and_entropy_is_pil() -> None:
    rgba = noise(c=4)
    rgba[..., 3] = 255
    rgba[:8, :, 3] = 0  # a quarter transparent
    rgba[:8, :, :3] = np.maximum(rgba[:8, :, :3], 100)  # with colour under it: alpha decides
    data = encode(rgba, "PNG")
    stats = analyze(data, "png", want_rgb=True)
    assert stats.nodata == pytest.approx(0.25)
    assert stats.entropy == pytest.approx(pil_entropy(data), abs=1e-12)
    np.testing.assert_array_equal(stats.rgb, rgba[..., :3])


def test_grey_alpha_png() -> None:
    la = np.stack([noise(c=1)[..., 0] | 64, np.full((32, 32), 255, np.uint8)], -1)
    la[:, :16, 1] = 0
    data = encode(la, "PNG")
    stats = analyze(data, "png")
    assert stats.nodata == pytest.approx(0.5)
    assert stats.entropy == pytest.approx(pil_entropy(data), abs=1e-12)


def test_palette_png_with_transparency() -> None:
    im = Image.fromarray(noise(16, 16)).quantize(16)
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0)
    data = buf.getvalue()
    stats = analyze(data, "png")
    assert stats.entropy == pytest.approx(pil_entropy(data), abs=1e-12)
    assert stats.nodata == pytest.approx((np.asarray(im) == 0).mean())


def test_palette_tiff_matches_pil() -> None:
    idx = RNG.integers(0, 4, (16, 16), dtype=np.uint8)
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :4] = np.array([[0, 65535, 0, 30000], [0, 0, 65535, 30000], [0, 0, 0, 65535]])
    data = tiff(idx, photometric="palette", colormap=cmap)
    np.testing.assert_array_equal(
        decode_rgb(data, "tif"), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    )


def test_cmyk_and_progressive_jpeg_match_pil() -> None:
    rgb = np.asarray(Image.open(SHIPPED[0]).convert("RGB"))
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    for data in (cmyk.getvalue(), encode(rgb, "JPEG", progressive=True, quality=90)):
        assert analyze(data, "jpg").entropy == pytest.approx(pil_entropy(data), abs=1e-12)
        np.testing.assert_array_equal(
            decode_rgb(data, "jpg"), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        )


def test_lzw_tiff_decodes_through_pillow_fallback() -> None:
    rgb = noise()
    data = encode(rgb, "TIFF", compression="tiff_lzw")
    np.testing.assert_array_equal(decode_rgb(data, "tif"), rgb)


# no-data -------------------------------------------------------------------------------------------


def test_half_black_jpeg_is_half_nodata() -> None:
    rgb = np.asarray(
        Image.open(
            SAMPLE_DATA
            / "harvey"
            / "no_damage"
            / sorted(p.name for p in (SAMPLE_DATA / "harvey" / "no_damage").iterdir())[0]
        ).convert("RGB")
    ).copy()
    rgb[:, : rgb.shape[1] // 2] = 0
    data = encode(rgb, "JPEG", quality=90)
    assert analyze(data, "jpg").nodata == pytest.approx(0.5, abs=0.01)
    assert analyze(data, "jpg", tolerance=0).nodata < analyze(data, "jpg").nodata  # JPEG ringing


def test_geotiff_nodata_tag_and_override() -> None:
    x = RNG.uniform(0, 1, (20, 20)).astype(np.float32)
    x[:5] = -9999.0
    data = tiff(x, extratags=[(42113, "s", 0, "-9999", True)])
    stats = analyze(data, "tif")
    assert stats.nodata == pytest.approx(0.25)
    rgb = decode_rgb(data, "tif")  # the stretch skips no-data: real values still span 0..255
    assert rgb[5:].min() == 0 and rgb[5:].max() == 255
    assert analyze(data, "tif", nodata_value=12345.0).nodata == 0.0


def test_geotiff_nodata_tag_on_uint8() -> None:
    rgb = np.full((10, 10, 3), 40, np.uint8)
    rgb[:3] = 255
    data = tiff(rgb, photometric="rgb", extratags=[(42113, "s", 0, "255", True)])
    assert analyze(data, "tif").nodata == pytest.approx(0.3)
    assert analyze(data, "tif", nodata_value=0).nodata == 0.0


def test_nodata_needs_all_bands() -> None:
    rgb = np.full((4, 4, 3), 120, np.uint8)
    rgb[0] = (0, 0, 60)  # luma 7 <= tolerance but blue is far from 0
    rgb[1] = (0, 3, 8)
    assert analyze(encode(rgb, "PNG"), "png").nodata == pytest.approx(0.25)


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    arr=arrays(
        np.uint8,
        st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3)),
        elements=st.sampled_from([0, 1, 3, 7, 8, 9, 12, 60, 128, 250, 255]),
    ),
    value=st.sampled_from([0, 5, 128, 255]),
    tol=st.integers(0, 12),
)
def test_nodata_matches_brute_force(arr: np.ndarray, value: int, tol: int) -> None:
    stats = analyze(encode(arr, "PNG"), "png", nodata_value=value, tolerance=tol)
    expected = (np.abs(arr.astype(int) - value) <= tol).all(axis=2).mean()
    assert stats.nodata == pytest.approx(expected, abs=1e-12)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    arr=arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from([1, 3])))
)
def test_entropy_equals_pil_and_is_bounded(arr: np.ndarray) -> None:
    data = encode(arr[..., 0] if arr.shape[2] == 1 else arr, "PNG")
    stats = analyze(data, "png")
    assert 0.0 <= stats.entropy <= 8.0
    assert stats.entropy == pytest.approx(pil_entropy(data), abs=1e-9)
    assert stats.entropy == pytest.approx(
        gray_entropy(luma_u8(np.repeat(arr, 3 // arr.shape[2], 2))), abs=1e-9
    )


# errors --------------------------------------------------------------------------------------------


def reason(data: bytes, ext: str = "jpg", **kw: object) -> str:
    with pytest.raises(CorruptImageError) as err:
        analyze(data, ext, **kw)  # type: ignore[arg-type]
    return err.value.reason


def test_error_reasons() -> None:
    jpeg = SHIPPED[0].read_bytes()
    png = encode(noise(), "PNG")
    tif = tiff(noise(64, 64), photometric="rgb")
    assert reason(b"") == "empty"
    assert reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert reason(png[: len(png) // 2], "png") == "truncated"
    assert reason(tif[: len(tif) // 2], "tif") == "truncated"
    assert reason(b"\x00garbage" * 10) == "decode_error"
    assert reason(b"\xff\xd8" + b"\x00" * 100) == "decode_error"
    assert reason(encode(noise(), "GIF"), "png") == "unsupported_format"
    assert reason(jpeg, "webp") == "unsupported_format"


def test_extension_forms() -> None:
    jpeg = SHIPPED[0].read_bytes()
    a = analyze(jpeg, "jpg")
    for ext in ("JPG", ".jpeg", "rgb.jpg", "png"):  # decoder chosen by content, ext only checked
        assert analyze(jpeg, ext).entropy == a.entropy


def test_bad_arguments_raise_config_error() -> None:
    jpeg = SHIPPED[0].read_bytes()
    with pytest.raises(ConfigError, match="rgb_bands"):
        analyze(jpeg, "jpg", rgb_bands=(0, 1))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tolerance"):
        analyze(jpeg, "jpg", tolerance=-1)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damaged TIFF tags
@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    which=st.sampled_from(["jpg", "png", "tif"]),
    cuts=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=6),
    truncate=st.integers(0, 5000),
)
def test_damaged_bytes_raise_only_corrupt_image_error(
    which: str, cuts: list[tuple[int, int]], truncate: int
) -> None:
    base = {
        "jpg": SHIPPED[0].read_bytes()[:4000],
        "png": encode(noise(24, 24), "PNG"),
        "tif": tiff(noise(24, 24), photometric="rgb"),
    }[which]
    data = bytearray(base)
    for pos, val in cuts:
        data[pos % len(data)] = val
    try:
        stats = analyze(bytes(data[: max(truncate, 4)]), which)
    except CorruptImageError as err:
        assert err.reason in (
            "empty",
            "truncated",
            "decode_error",
            "unsupported_format",
            "bad_shape",
            "too_large",
        )
    else:
        assert isinstance(stats, ImageStats) and 0.0 <= stats.entropy <= 8.0


# members -------------------------------------------------------------------------------------------


def test_pick_image_member() -> None:
    assert pick_image_member({"__key__": "k", "cls.txt": b"a", "json": b"{}"}) is None
    assert pick_image_member({"__key__": "k", "cls.txt": b"a", "TIF": b"1", "png": b"2"}) == (
        "TIF",
        b"1",
    )
    assert pick_image_member({"__url__": "x.jpg", "rgb.jpeg": b"3"}) == ("rgb.jpeg", b"3")
    assert set(IMAGE_EXTS) == {"jpg", "jpeg", "png", "tif", "tiff"}
    assert isinstance(NODATA_TOLERANCE, int)


def test_decoded_arrays_are_writable_for_every_format():
    import io as _io

    from PIL import Image as _Image

    from rsprune_data.images import decode_rgb

    rgb = np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("TIFF", "tif")):
        buf = _io.BytesIO()
        _Image.fromarray(rgb).save(buf, format=fmt)
        assert decode_rgb(buf.getvalue(), ext).flags.writeable, fmt
