"""Helpers for tests that damage a segment on purpose."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from services.search.engine.index.format import block_sums_json, dump_checked_json, pack_block_sums


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
