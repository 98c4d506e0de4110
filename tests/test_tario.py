"""tario: header walk, streaming, range reads and damage, checked against webdataset itself."""

from __future__ import annotations

import io
import random
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from webdataset.tariterators import base_plus_ext

from rsprune_data.errors import ConfigError, ShardError
from rsprune_data.tario import (
    iter_tar_samples,
    parse_sample,
    read_ranges,
    scan_tar,
    scan_tar_partial,
    split_key_ext,
)

Sample = dict[str, Any]


def jpeg(rng: np.random.Generator, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_samples(n: int, seed: int = 0) -> list[Sample]:
    """Samples with a JPEG, a class and a JSON member; directory keys; one key > 100 chars."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        key = f"region{i % 3}/tile-{i:05d}"
        if i == 2:
            key = "very/" + "long" * 30 + f"/tile-{i:05d}"  # > 100 bytes: pax or GNU long name
        out.append(
            {"__key__": key, "jpg": jpeg(rng), "cls": str(i % 7).encode(), "json": b'{"i": %d}' % i}
        )
    return out


def write_wds(path: Path, samples: list[Sample]) -> Path:
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)
    return path


def write_tarfile(path: Path, samples: list[Sample], fmt: int) -> Path:
    """Like TarWriter (members in sorted extension order) but with a chosen tar format.

    webdataset's TarWriter ignores its ``format`` argument and always writes pax, so GNU long
    names (``L`` headers) and ustar prefixes need tarfile directly.
    """
    with tarfile.open(path, "w", format=fmt) as t:
        for s in samples:
            for ext in sorted(k for k in s if not k.startswith("__")):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(s[ext])
                t.addfile(info, io.BytesIO(s[ext]))
    return path


def wds_reference(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """What webdataset.WebDataset yields for a shard: (key, {ext: bytes}) in order."""
    ds = wds.WebDataset(str(path), shardshuffle=False)
    return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in ds]


def via_ranges(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    samples = scan_tar(path)
    blobs = read_ranges(path, [(s.offset, s.length) for s in samples])
    return [parse_sample(b, s.offset) for s, b in zip(samples, blobs, strict=True)]


def check_all_readers(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """scan_tar (+ members), iter_tar_samples and ranges + parse_sample all equal webdataset."""
    ref = wds_reference(path)
    scanned = scan_tar(path)
    data = path.read_bytes()
    assert [s.key for s in scanned] == [k for k, _ in ref]
    for s, (_, members) in zip(scanned, ref, strict=True):
        assert {e: data[o : o + n] for e, (o, n) in s.members.items()} == members
    streamed = list(iter_tar_samples(path))
    assert [s for s, _ in streamed] == scanned
    assert [(s.key, m) for s, m in streamed] == ref
    assert via_ranges(path) == ref
    return ref


def test_tarwriter_shard_matches_webdataset(tmp_path: Path) -> None:
    ref = check_all_readers(write_wds(tmp_path / "a.tar", make_samples(20)))
    assert len(ref) == 20 and len(ref[2][0]) > 100 and set(ref[0][1]) == {"jpg", "cls", "json"}


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_tar_formats_match_webdataset(tmp_path: Path, fmt: int) -> None:
    path = write_tarfile(tmp_path / "a.tar", make_samples(12), fmt)
    raw = path.read_bytes()
    types = {
        raw[i + 156 : i + 157]
        for i in range(0, len(raw), 512)
        if raw[i + 257 : i + 262] == b"ustar"
    }
    expected = {tarfile.GNU_FORMAT: b"L", tarfile.PAX_FORMAT: b"x", tarfile.USTAR_FORMAT: b"0"}[fmt]
    assert expected in types  # the long name really took the intended route
    check_all_readers(path)


def test_skipped_members_directories_and_meta(tmp_path: Path) -> None:
    """Directories, symlinks, __meta__ files and extension-less names are skipped as webdataset
    skips them."""
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:

        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            if kind == tarfile.SYMTYPE:
                info.linkname = "target" * 30  # long link name -> GNU 'K' header
            t.addfile(info, io.BytesIO(data) if data else None)

        add("a.jpg", b"A")
        add("adir", kind=tarfile.DIRTYPE)
        add("a.cls", b"1")  # same sample despite the directory in between
        add("__meta__", b"m")
        add("__meta__/x.json", b"m")
        add("noext", b"n")
        add("link.jpg", kind=tarfile.SYMTYPE)
        add("b.JPG", b"B")  # extensions are lower-cased
        add("b.seg.png", b"S")
        add("a.jpg", b"A2")  # a key that comes back later makes a new sample
    ref = check_all_readers(path)
    assert ref == [
        ("a", {"jpg": b"A", "cls": b"1"}),
        ("b", {"jpg": b"B", "seg.png": b"S"}),
        ("a", {"jpg": b"A2"}),
    ]


def test_base256_size_and_signed_checksum(tmp_path: Path) -> None:
    """GNU base-256 numbers and old signed-char checksums are read as tarfile reads them."""
    path = write_tarfile(tmp_path / "a.tar", make_samples(3), tarfile.GNU_FORMAT)
    raw = bytearray(path.read_bytes())
    s = scan_tar(path)[1]
    hdr = s.members["cls"][0] - 512
    size = s.members["cls"][1]
    raw[hdr + 124 : hdr + 136] = b"\x80" + size.to_bytes(11, "big")  # base-256 size
    raw[hdr + 148 : hdr + 156] = b" " * 8
    raw[hdr + 500 : hdr + 501] = b"\xff"  # a high (unused) byte: signed != unsigned sum
    signed = 256 + sum(
        b - 256 if b > 127 else b for i, b in enumerate(raw[hdr : hdr + 512]) if not 148 <= i < 156
    )
    raw[hdr + 148 : hdr + 156] = b"%06o\0 " % signed
    path.write_bytes(bytes(raw))
    check_all_readers(path)


def test_split_key_ext_matches_webdataset() -> None:
    skip = re.compile(r"__[^/]*__($|/)")
    rng = random.Random(0)
    for _ in range(20000):
        name = "".join(rng.choice("ab_./X") for _ in range(rng.randint(0, 9)))
        meta = ("/" not in name and name.startswith("__") and name.endswith("__")) or skip.match(
            name
        )
        key, ext = base_plus_ext(name)
        want = None if meta or key is None else (key, ext.lower())
        assert split_key_ext(name) == want, name


def test_read_ranges_exact_and_coalesced(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    ranges = [(1000, 10), (5, 3), (1015, 20), (200_000, 50_000), (0, 0), (1000, 10), (299_990, 10)]
    want = [data[o : o + n] for o, n in ranges]
    for gap in (0, 10, 1 << 20):
        for block in (16, 1 << 30):
            assert list(read_ranges(path, ranges, max_gap=gap, max_block=block)) == want
    assert list(read_ranges(path, [])) == []


def test_read_ranges_coalesces_into_few_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rsprune_data.tario as tario

    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 100)
    calls: list[tuple[int, int]] = []
    real = tario.pread_exact

    def spy(fd: int, n: int, offset: int) -> bytes:
        calls.append((offset, n))
        return real(fd, n, offset)

    monkeypatch.setattr(tario, "pread_exact", spy)
    ranges = [(100, 10), (0, 10), (120, 10), (20_000, 5)]
    assert list(read_ranges(path, ranges, max_gap=100)) == [
        (bytes(range(256)) * 100)[o : o + n] for o, n in ranges
    ]
    assert calls == [(0, 130), (20_000, 5)]


def test_read_ranges_errors(tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(b"x" * 100)
    with pytest.raises(ShardError, match=r"small\.bin is truncated at byte 100"):
        list(read_ranges(path, [(90, 20)]))
    with pytest.raises(ConfigError, match="offset >= 0"):
        list(read_ranges(path, [(-1, 2)]))
    with pytest.raises(ConfigError, match="max_gap"):
        list(read_ranges(path, [(0, 2)], max_gap=-1))


def streamed(source: Any) -> tuple[list[Any], ShardError | None]:
    got = []
    try:
        for s, _ in iter_tar_samples(source):
            got.append(s)
    except ShardError as exc:
        return got, exc
    return got, None


@pytest.mark.parametrize("where", ["data", "header", "between", "no_end"])
def test_truncated_shard(tmp_path: Path, where: str) -> None:
    good = write_wds(tmp_path / "good.tar", make_samples(10))
    samples = scan_tar(good)
    s = samples[6]
    cut = {
        "data": s.members["jpg"][0] + 7,
        "header": s.offset + 100,
        "between": s.offset,
        "no_end": samples[-1].offset + samples[-1].length,
    }[where]
    bad = tmp_path / "shard-bad.tar"
    bad.write_bytes(good.read_bytes()[:cut])
    with pytest.raises(ShardError, match=rf"shard .*shard-bad\.tar is truncated at byte {cut}"):
        scan_tar(bad)
    got, err = scan_tar_partial(bad)
    assert err is not None and "re-create it or exclude it" in str(err)
    # Only samples complete before the damage; the one in progress is dropped.
    keep = {"data": 6, "header": 5, "between": 5, "no_end": 9}[where]
    assert got == samples[:keep]
    got_streamed, err_streamed = streamed(bad)
    assert got_streamed == got and str(err_streamed) == str(err)


def test_garbage_and_empty_shards(tmp_path: Path) -> None:
    good = write_wds(tmp_path / "good.tar", make_samples(5))
    samples = scan_tar(good)
    raw = bytearray(good.read_bytes())
    raw[samples[3].offset : samples[3].offset + 512] = b"\x07" * 512
    cases = {
        "garbage-header.tar": (bytes(raw), rf"corrupt at byte {samples[3].offset}", 2),
        "random.tar": (bytes(range(256)) * 8, "corrupt at byte 0", 0),
        "empty.tar": (b"", "is empty", 0),
        "zipped.tar": (b"\x1f\x8b\x08" + bytes(600), "gzip-compressed", 0),
    }
    for name, (blob, msg, keep) in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(ShardError, match=re.escape(name) + ".*" + msg):
            scan_tar(path)
        got, err = scan_tar_partial(path)
        assert got == samples[:keep] and err is not None
        assert [s.key for s in streamed(path)[0]] == [s.key for s in got]


def test_duplicate_extension_is_an_error(tmp_path: Path) -> None:
    path = write_tarfile(
        tmp_path / "dup.tar", [{"__key__": "a", "jpg": b"1"}], tarfile.USTAR_FORMAT
    )
    with tarfile.open(path, "a") as t:
        info = tarfile.TarInfo("a.JPG")
        info.size = 1
        t.addfile(info, io.BytesIO(b"2"))
    with pytest.raises(ShardError, match="repeats extension 'jpg'"):
        scan_tar(path)
    with pytest.raises(ValueError):  # webdataset refuses it too
        wds_reference(path)


def test_iter_tar_samples_on_a_stream(tmp_path: Path) -> None:
    path = write_wds(tmp_path / "a.tar", make_samples(6))

    class Trickle(io.BufferedIOBase):  # a pipe-like stream that returns short reads
        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0

        def readable(self) -> bool:
            return True

        def read(self, n: int | None = -1, /) -> bytes:
            n = len(self.data) if n is None or n < 0 else n
            chunk = self.data[self.pos : self.pos + min(n, 777)]
            self.pos += len(chunk)
            return chunk

    got = list(iter_tar_samples(Trickle(path.read_bytes()), name="http://x/a.tar"))
    assert [(s.key, m) for s, m in got] == wds_reference(path)
    assert [s for s, _ in got] == scan_tar(path)
    with pytest.raises(ShardError, match=r"http://x/a\.tar is truncated"):
        list(iter_tar_samples(Trickle(path.read_bytes()[:3000]), name="http://x/a.tar"))


def test_parse_sample_refuses_wrong_ranges(tmp_path: Path) -> None:
    path = write_wds(tmp_path / "a.tar", make_samples(3))
    s0, s1, _ = scan_tar(path)
    raw = path.read_bytes()
    with pytest.raises(ShardError, match="more than one sample"):
        parse_sample(raw[s0.offset : s1.offset + s1.length], shard="a.tar")
    with pytest.raises(ShardError, match=r"a\.tar .*truncated"):
        parse_sample(raw[s1.offset : s1.offset + s1.length - 600], s1.offset, shard="a.tar")
    with pytest.raises(ShardError, match="no sample"):
        parse_sample(b"")


_names = st.text(alphabet="abcXYZ019-_/é", min_size=1, max_size=140).filter(
    lambda k: "." not in k and not k.startswith("/") and "//" not in k and not k.endswith("/")
)
_exts = st.sampled_from(["jpg", "png", "cls", "json", "seg.png", "tif"])
_members = st.dictionaries(_exts, st.binary(max_size=1500), min_size=1, max_size=3)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(samples=st.lists(st.tuples(_names, _members), min_size=1, max_size=8))
def test_property_ranges_reproduce_webdataset(
    tmp_path: Path, samples: list[tuple[str, dict[str, bytes]]]
) -> None:
    path = tmp_path / "prop.tar"
    write_wds(path, [{"__key__": k, **m} for k, m in samples])
    try:
        ref = wds_reference(path)
    except ValueError:  # the same key twice in a row repeats an extension: both refuse it
        with pytest.raises(ShardError, match="repeats extension"):
            scan_tar(path)
        return
    assert via_ranges(path) == ref
    assert [(s.key, m) for s, m in iter_tar_samples(path)] == ref


def test_parse_sample_names_the_damaged_byte_of_the_shard(tmp_path: Path) -> None:
    """A damaged header inside a sample's range is reported at its byte in the shard (the range
    starts at ``base_offset``), not at its byte in the range."""
    path = write_tarfile(tmp_path / "s.tar", make_samples(6), tarfile.USTAR_FORMAT)
    s = scan_tar(path)[4]
    raw = bytearray(path.read_bytes()[s.offset : s.offset + s.length])
    second = min(a for a, _ in s.members.values() if a > min(a for a, _ in s.members.values()))
    header = second - 512 - s.offset  # the second member's header, in the range
    raw[header + 148] ^= 0x01  # its checksum field
    with pytest.raises(ShardError, match=rf"corrupt at byte {s.offset + header}\b"):
        parse_sample(bytes(raw), s.offset, shard="s.tar")
    with pytest.raises(ShardError, match=rf"truncated at byte {s.offset + header + 100}\b"):
        parse_sample(bytes(raw[: header + 100]), s.offset, shard="s.tar")
