"""A minimal, deterministic tar writer for packing (USTAR headers built from constant parts)."""

from __future__ import annotations

from typing import Any


def _header_parts() -> tuple[bytes, bytes, int]:
    """The constant fields of :class:`TarOut`'s USTAR header around the name, size and checksum
    (mode 0444, uid/gid 0, mtime 0, regular file, owner ``bigdata``), and their checksum share."""
    # bytes 100-124 mode, uid, gid; then size (124-136, per member); then mtime 136-148
    mid = b"0000444\0" + b"0000000\0" * 2
    mtime = b"00000000000\0"
    # after the checksum (148-156, per member): typeflag, linkname, magic + version, uname,
    # gname, devmajor, devminor: up to byte 345, where the name prefix starts
    tail = b"0" + bytes(100) + b"ustar\x0000" + b"bigdata".ljust(32, b"\0") * 2 + bytes(16)
    total = sum(mid) + sum(mtime) + sum(tail) + 8 * 32  # the checksum field counts as spaces
    return mid + b"%s", mtime + b"%s" + tail, total


_MID, _TAIL, _HEADER_SUM = _header_parts()


class TarOut:
    """A minimal deterministic tar writer: one USTAR header per member (mode 0444, mtime 0, owner
    ``bigdata`` like webdataset's ``TarWriter``), then the data padded to 512 bytes.

    ``tarfile`` builds each header in Python through a pax header (webdataset's writer took about
    three quarters of the packing time in a profile); a member name that does not fit USTAR's
    100 + 155 bytes, or is not ASCII, still goes through ``tarfile``'s pax path.
    """

    def __init__(self, f: Any) -> None:
        self.f = f

    def parts(self, name: str, data: bytes) -> list[bytes]:
        """Header, data and padding of one member, to be written in this order."""
        raw = name.encode("utf-8")
        prefix, base = b"", raw
        if len(raw) > 100 and b"/" in raw[-101:]:
            cut = raw.index(b"/", len(raw) - 101)
            prefix, base = raw[:cut], raw[cut + 1 :]
        if len(base) > 100 or len(prefix) > 155 or not raw.isascii():
            import tarfile

            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            info.uname = info.gname = "bigdata"
            hdr = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        else:
            size = b"%011o\0" % len(data)
            cks = b"%06o\0 " % (_HEADER_SUM + sum(base) + sum(size) + sum(prefix))
            hdr = (
                base.ljust(100, b"\0")
                + _MID % size
                + _TAIL % cks
                + prefix.ljust(155, b"\0")
                + bytes(12)
            )
        pad = -len(data) % 512
        return [hdr, data, bytes(pad)] if pad else [hdr, data]

    def add(self, name: str, data: bytes) -> None:
        self.f.writelines(self.parts(name, data))

    def write(self, sample: dict[str, object]) -> None:
        """One webdataset sample: ``<__key__>.<ext>`` members in sorted order (as ``TarWriter``)."""
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = sample[ext]
            if not isinstance(data, bytes | bytearray):
                raise TypeError(f"sample {key!r}: member {ext!r} must be bytes, got {type(data)}")
            self.add(f"{key}.{ext}", bytes(data))

    def close(self) -> None:
        self.f.write(bytes(1024))  # two zero blocks end the archive
