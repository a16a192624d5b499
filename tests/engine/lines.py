"""The reference for native literal scans: a document's lines holding a needle, found with bytes.find."""

from __future__ import annotations

from services.search.engine.query.verify import LineMatch


def reference_lines(data: bytes, needle: bytes, folded: bool = False) -> list[LineMatch]:
    """reference_lines splits the document into lines and finds every occurrence of the needle in each.

    With `folded`, the document is ASCII-lowercased first (the needle is given lowercased).
    Occurrences do not overlap, as the scanner reports them.
    """
    hay = data.lower() if folded else data
    out: list[LineMatch] = []
    start = 0
    for number, line in enumerate(hay.split(b"\n"), 1):
        ranges: list[tuple[int, int]] = []
        at = line.find(needle)
        while at >= 0:
            ranges.append((at, at + len(needle)))
            at = line.find(needle, at + len(needle))
        if ranges:
            out.append(LineMatch(number, start, start + len(line), tuple(ranges)))
        start += len(line) + 1
    return out
