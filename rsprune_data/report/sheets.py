"""Contact sheets: a few dozen tiles read by byte range from the shards, tiled into one PNG.

Only the tiles shown are read: their ``(offset, length)`` ranges come from the index, neighbours in
one shard are fetched by one read (:func:`rsprune_data.tario.read_ranges`), and each sample is
parsed and decoded on its own. A tile that cannot be read any more is drawn as a grey placeholder
with the reason, so a damaged shard shows up in the report instead of failing it.

Data between the stages::

    positions [m] -> grouped by shard -> read_ranges -> bytes of one sample
      -> parse_sample -> {ext: bytes} -> pick_image_member -> decode_rgb -> HxWx3 uint8
      -> thumbnail (fit into size x size) -> {position: thumbnail}
    [Tile(position, caption, status)] + thumbnails -> one RGB sheet -> PNG
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import CorruptImageError, ShardError
from .stats import STATUS_COLORS

THUMB = 96  # thumbnail edge in pixels
_FRAME = 3  # coloured frame: the tile's fate (STATUS_COLORS)
_GAP = 6
_LINE = 13  # caption line height
_FONT_SIZE = 11
_BG = (255, 255, 255)
_PLACEHOLDER = (206, 212, 218)


@dataclass(frozen=True)
class Tile:
    """One tile of a sheet: the sample's global position, a short caption and its state."""

    pos: int
    caption: str
    status: int


def read_thumbnails(
    index: Any, positions: Iterable[int], *, size: int = THUMB, progress: bool = False
) -> dict[int, NDArray[np.uint8] | str]:
    """Thumbnails of ``positions`` (global index positions), at most ``size`` px on a side.

    Returns:
        position -> ``HxWx3`` uint8 thumbnail, or a short reason string when the sample could not
        be read or decoded.
    """
    from tqdm.auto import tqdm

    from ..tario import read_ranges

    wanted = sorted({int(p) for p in positions})
    out: dict[int, NDArray[np.uint8] | str] = {}
    if not wanted:
        return out
    pos = np.asarray(wanted, dtype=np.int64)
    shard_ids = np.asarray(index.shard_ids)[pos]
    offsets = np.asarray(index.offsets)[pos]
    lengths = np.asarray(index.lengths)[pos]
    bar = tqdm(
        total=len(wanted), unit="tile", desc="report tiles", disable=not progress, leave=False
    )
    for sid in np.unique(shard_ids).tolist():
        rows = np.flatnonzero(shard_ids == sid)
        shard = index.shards[sid]
        ranges = [(int(offsets[r]), int(lengths[r])) for r in rows]
        try:
            blobs: Iterable[bytes] = read_ranges(shard, ranges)
            for r, blob in zip(rows.tolist(), blobs, strict=True):
                out[wanted[r]] = _thumbnail(blob, int(offsets[r]), shard, size)
                bar.update(1)
        except (OSError, ShardError) as exc:  # the shard went away or changed: mark what is left
            for r in rows.tolist():
                out.setdefault(wanted[r], f"unreadable: {type(exc).__name__}")
            bar.update(len(rows))
    bar.close()
    return out


def _thumbnail(blob: bytes, offset: int, shard: str, size: int) -> NDArray[np.uint8] | str:
    from PIL import Image

    from ..images import MEMBER_EXTS, decode_rgb, sniff_image_member
    from ..tario import parse_sample

    try:
        _, members = parse_sample(blob, offset, shard=shard)
        picked = sniff_image_member(members)
        if picked is None:
            return "no image"
        name = picked[0] if picked[0].rsplit(".", 1)[-1].lower() in MEMBER_EXTS else None
        rgb = decode_rgb(picked[1], name)
    except CorruptImageError as exc:
        return exc.reason
    except ShardError:
        return "bad range"
    img = Image.fromarray(rgb)
    img.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return np.asarray(img)


def _font() -> Any:
    """DejaVu Sans from matplotlib's data (it has "→", "·", "…"); Pillow's own font otherwise."""
    from PIL import ImageFont

    try:
        import matplotlib

        ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(ttf), _FONT_SIZE)
    except (ImportError, OSError):
        return ImageFont.load_default(size=_FONT_SIZE)


def _fit(text: str, font: Any, width: float) -> str:
    """``text``, shortened in the middle with "…" until it is at most ``width`` pixels wide."""
    if font.getlength(text) <= width:
        return text
    keep = len(text) - 1
    while keep > 1:
        head = (keep + 1) // 2
        short = text[:head] + "…" + text[len(text) - (keep - head) :]
        if font.getlength(short) <= width:
            return short
        keep -= 1
    return "…"


def render_sheet(
    tiles: Sequence[Tile],
    thumbs: Mapping[int, NDArray[np.uint8] | str],
    path: str | Path,
    *,
    columns: int = 8,
    size: int = THUMB,
) -> Path:
    """Draw ``tiles`` in rows of ``columns`` (frame colour = state, caption below) into ``path``."""
    from PIL import Image, ImageDraw

    path = Path(path)
    if not tiles:
        raise ValueError("render_sheet needs at least one tile")
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    lines = max(t.caption.count("\n") + 1 for t in tiles) if any(t.caption for t in tiles) else 0
    cell_w = size + 2 * _FRAME
    cell_h = size + 2 * _FRAME + lines * _LINE + 2
    width = cols * cell_w + (cols + 1) * _GAP
    height = rows * cell_h + (rows + 1) * _GAP
    sheet = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for i, tile in enumerate(tiles):
        x = _GAP + (i % cols) * (cell_w + _GAP)
        y = _GAP + (i // cols) * (cell_h + _GAP)
        draw.rectangle(
            (x, y, x + cell_w - 1, y + size + 2 * _FRAME - 1), fill=STATUS_COLORS[tile.status]
        )
        thumb = thumbs.get(tile.pos, "not read")
        if isinstance(thumb, str):
            draw.rectangle(
                (x + _FRAME, y + _FRAME, x + _FRAME + size - 1, y + _FRAME + size - 1),
                fill=_PLACEHOLDER,
            )
            draw.text(
                (x + cell_w // 2, y + cell_w // 2), thumb, fill=(33, 37, 41), font=font, anchor="mm"
            )
        else:
            h, w = thumb.shape[:2]
            # centre a non-square thumbnail inside the frame
            sheet.paste(
                Image.fromarray(thumb), (x + _FRAME + (size - w) // 2, y + _FRAME + (size - h) // 2)
            )
        for j, text in enumerate(tile.caption.split("\n") if tile.caption else []):
            line = _fit(text, font, cell_w + _GAP - 2)
            draw.text(
                (x + cell_w // 2, y + size + 2 * _FRAME + 1 + j * _LINE),
                line,
                fill=(33, 37, 41),
                font=font,
                anchor="ma",
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=False, compress_level=6)
    return path
