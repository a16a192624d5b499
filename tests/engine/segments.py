"""Helpers for tests that build segments in bulk or damage one on purpose."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

from services.search.engine.index.format import block_sums_json, dump_checked_json, pack_block_sums
from services.search.engine.index.index import Index
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SourceDocument


def build_segments(
    root: Path, segments: int, per_segment: int, document: Callable[[int], SourceDocument]
) -> Index:
    """build_segments writes documents 0..segments*per_segment-1, one commit (segment) per `per_segment`."""
    index = Index.create(root)
    for part in range(segments):
        with IndexWriter(index) as writer:
            for i in range(part * per_segment, (part + 1) * per_segment):
                writer.add(document(i))
            writer.commit()
    return index


def rewrite_part(seg_dir: Path, part: str, raw: bytes) -> None:
    """rewrite_part replaces a part and its checksums in meta.json (a writer bug, not bit rot)."""
    (seg_dir / part).write_bytes(raw)
    meta = json.loads((seg_dir / "meta.json").read_bytes())
    size = meta["block_size"]
    meta["parts"][part]["crc32"] = zlib.crc32(raw)
    meta["parts"][part]["blocks"] = block_sums_json(
        pack_block_sums([zlib.crc32(raw[i : i + size]) for i in range(0, len(raw), size)])
    )
    (seg_dir / "meta.json").write_bytes(dump_checked_json(meta))
