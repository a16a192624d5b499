"""render prints code search results as ripgrep does, for `kotadb index search` and `kotadb search`.

Both commands feed it the same neutral value, `FileLines` (one file's printed lines, each with
its number, byte offset and text, and the byte ranges of its matches), through one adapter per
source: `from_engine` (the offline engine's `FileMatch`), `from_proto` (the search service's
`kotadb.v1.FileMatch`, over gRPC) and `from_groups` (a streamed file's content and the packed
match groups of the engine's C scanner). `Printer` turns them into ripgrep's bytes:

* text: `path:N:text` per matching line, `path-N-text` per context line, `--` between context
  groups within a file and across files (only when context was asked for), as
  `rg --no-heading --line-number`; on a terminal (or with `--color always`) paths, line numbers
  and matches are coloured with ripgrep's default palette;
* `--json`: ripgrep's JSON Lines (`rg --json`): per file a `begin` record, one `match` or
  `context` record per printed line (`lines.text` with its newline, `line_number`,
  `absolute_offset`, `submatches` with each match's text and byte range in the line) and an
  `end` record with the file's statistics; one `summary` record closes the output.

The C fast path of `kotadb index search --all` (`_fastscan.render_lines` for plain text
without colour, `_fastscan.render_json` for `--json`) must produce exactly `Printer`'s bytes;
tests/engine/test_cli.py checks both against ripgrep on the same tree.

What ripgrep knows and a result may not: a file's size (`bytes_searched`, 0 when unknown) and
whether its last line ends with a newline (assumed, unless the size says otherwise). Elapsed
times are this process's rendering time per file and its wall time overall.
"""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, NamedTuple

# Records, not dataclasses: importing `dataclasses` (and `inspect`) was ~10 ms of every
# `kotadb index search` process.
from services.search.engine.record import Record, field

if TYPE_CHECKING:
    from kotadb.v1 import search_pb2

    from services.search.engine import FileMatch

# ripgrep's default palette: magenta paths, green line numbers, bold red matches.
PATH_COLOR = b"\x1b[35m"
LINE_COLOR = b"\x1b[32m"
MATCH_COLOR = b"\x1b[1;31m"
RESET = b"\x1b[0m"

Ranges = tuple[tuple[int, int], ...]


class Line(NamedTuple):
    """Line is one printed line: a match when `ranges` is set (byte ranges in `text`), else context.

    `offset` is the byte offset of the line's first byte in the file; `text` is the line
    without its newline.
    """

    number: int
    offset: int
    text: bytes
    ranges: Ranges | None = None  # a tuple, not a frozen dataclass: the JSON stream makes one per line


class FileLines(Record):
    """FileLines is one matching file's printed lines in line order, each once.

    No lines means the file matched by its path alone (a `file:` query). `size` is the
    file's length in bytes when the source knows it.
    """

    path: str
    lines: tuple[Line, ...] = ()
    size: int | None = None


class Stats(Record, frozen=False):
    """Stats is what ripgrep's `end` and `summary` records count (and what the printer printed)."""

    searches_with_match: int = 0
    matched_lines: int = 0
    matches: int = 0
    bytes_searched: int = 0
    bytes_printed: int = 0
    elapsed: float = 0.0

    def add(self, other: Stats) -> None:
        """add adds `other`'s counts to these (a forked worker's, see services/cli/index.py)."""
        self.searches_with_match += other.searches_with_match
        self.matched_lines += other.matched_lines
        self.matches += other.matches
        self.bytes_searched += other.bytes_searched
        self.bytes_printed += other.bytes_printed
        self.elapsed += other.elapsed


class Printer(Record, frozen=False):
    """Printer renders files one after another, remembering what separates them.

    `printed_any` says whether some file was printed before the first one given here, so that
    `--` separates context groups across files, pages and stream batches alike.
    """

    color: bool
    context: int
    as_json: bool
    printed_any: bool = False
    stats: Stats = field(default_factory=Stats)

    def render(self, file: FileLines) -> bytes:
        """render returns one file's output (text or JSON records) and counts it."""
        chunk = self._json(file) if self.as_json else self._text(file)
        self.printed_any = True
        return chunk

    def _text(self, file: FileLines) -> bytes:
        path = file.path.encode("utf-8", "surrogateescape")
        if self.color:
            path = PATH_COLOR + path + RESET
        if not file.lines:
            return path + b"\n"
        out: list[bytes] = []
        last = 0
        for line in file.lines:
            # `--` between context groups, within a file and across files (as ripgrep).
            if self.context and (line.number > last + 1 if last else self.printed_any):
                out.append(b"--\n")
            sep = b"-" if line.ranges is None else b":"
            number = b"%d" % line.number
            text = line.text
            if self.color:
                number = LINE_COLOR + number + RESET
                if line.ranges:
                    text = highlight(text, line.ranges)
            out.append(b"%s%s%s%s%s\n" % (path, sep, number, sep, text))
            last = line.number
        return b"".join(out)

    def _json(self, file: FileLines) -> bytes:
        started = time.perf_counter()
        path = json_text(file.path)
        out = [b'{"type":"begin","data":{"path":{"text":%s}}}\n' % path]
        matched_lines = matches = 0
        for line in file.lines:
            text = json_text(line.text)
            if file.size is None or line.offset + len(line.text) < file.size:
                text = text[:-1] + b'\\n"'  # the line's newline, as ripgrep includes it
            submatches = b",".join(
                b'{"match":{"text":%s},"start":%d,"end":%d}' % (json_text(line.text[s:e]), s, e)
                for s, e in line.ranges or ()
            )
            kind = b"context" if line.ranges is None else b"match"
            out.append(
                b'{"type":"%s","data":{"path":{"text":%s},"lines":{"text":%s},"line_number":%d,'
                b'"absolute_offset":%d,"submatches":[%s]}}\n'
                % (kind, path, text, line.number, line.offset, submatches)
            )
            if line.ranges is not None:
                matched_lines += 1
                matches += len(line.ranges)
        printed = sum(len(chunk) for chunk in out)
        elapsed = time.perf_counter() - started
        stats = Stats(1, matched_lines, matches, file.size or 0, printed, elapsed)
        self.stats.add(stats)
        end = {
            "type": "end",
            "data": {
                "path": {"text": file.path},
                "binary_offset": None,
                "stats": {
                    "elapsed": _duration(elapsed),
                    "searches": 1,
                    "searches_with_match": 1,
                    "bytes_searched": stats.bytes_searched,
                    "bytes_printed": printed,
                    "matched_lines": matched_lines,
                    "matches": matches,
                },
            },
        }
        out.append(_dumps(end))
        return b"".join(out)

    def summary(self, *, searches: int, bytes_searched: int | None, elapsed_total: float) -> bytes:
        """summary is ripgrep's closing `summary` record (JSON only; empty for text).

        `searches` is the number of files searched (verified), `bytes_searched` their size
        when the source reports it (else the sizes of the printed files that are known).
        """
        if not self.as_json:
            return b""
        stats = self.stats
        record = {
            "data": {
                "elapsed_total": _duration(elapsed_total, keys_sorted=True),
                "stats": {
                    "bytes_printed": stats.bytes_printed,
                    "bytes_searched": stats.bytes_searched if bytes_searched is None else bytes_searched,
                    "elapsed": _duration(stats.elapsed, keys_sorted=True),
                    "matched_lines": stats.matched_lines,
                    "matches": stats.matches,
                    "searches": max(searches, stats.searches_with_match),
                    "searches_with_match": stats.searches_with_match,
                },
            },
            "type": "summary",
        }
        return _dumps(record)


def highlight(text: bytes, ranges: Ranges) -> bytes:
    """highlight wraps each byte range of `text` in the match colour (overlaps and empties skipped)."""
    parts: list[bytes] = []
    at = 0
    for start, end in ranges:
        if end <= start or start < at:
            continue
        parts += (text[at:start], MATCH_COLOR, text[start:end], RESET)
        at = end
    parts.append(text[at:])
    return b"".join(parts)


# Control bytes but tab: a JSON string literal escapes them (json.dumps, rarely needed); tab,
# quote and backslash are escaped by replacement, and any other UTF-8 is written as it is.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f]")


def json_text(value: str | bytes) -> bytes:
    """json_text is `value` as a JSON string literal, UTF-8 unescaped as serde_json (ripgrep) writes.

    Most source lines need no escape at all: they are copied between quotes, which costs a
    tenth of json.dumps (the JSON stream renders tens of thousands of lines a second). Where
    ripgrep prints a line that is not UTF-8 as `{"bytes": base64}`, this decodes it with
    U+FFFD: the engine never indexes such a file (the builder skips it as invalid UTF-8), so
    only a path could differ.
    """
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if _CONTROL.search(raw) is None:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return b'"%s"' % raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\t", b"\\t")
    text = raw.decode("utf-8", "replace")
    return json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogateescape")


def _dumps(record: object) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _duration(seconds: float, *, keys_sorted: bool = False) -> dict[str, object]:
    """_duration is ripgrep's elapsed time object.

    ripgrep writes an `end` record's keys in declaration order (secs, nanos, human) and the
    `summary` record's sorted (it is built as a JSON map), hence `keys_sorted`.
    """
    whole = int(seconds)
    nanos = int((seconds - whole) * 1e9)
    value: dict[str, object] = {"secs": whole, "nanos": nanos, "human": f"{seconds:.6f}s"}
    return dict(sorted(value.items())) if keys_sorted else value


def _rows(
    number: int, offset: int, text: bytes, ranges: Ranges, before: list[bytes], after: list[bytes]
) -> list[Line]:
    """_rows lays out one match with its context, computing each context line's byte offset."""
    rows: list[Line] = []
    at = offset - sum(len(b) + 1 for b in before)
    for i, line in enumerate(before):
        rows.append(Line(number - len(before) + i, at, line))
        at += len(line) + 1
    rows.append(Line(number, offset, text, ranges))
    at = offset + len(text) + 1
    for i, line in enumerate(after):
        rows.append(Line(number + 1 + i, at, line))
        at += len(line) + 1
    return rows


def _merged(path: str, groups: list[list[Line]], size: int | None = None) -> FileLines:
    """_merged keeps each line once, in order, a match over the same line shown as context.

    A match's context may reach over the next match (the engine and the service send each
    match with its own context); ripgrep prints such a line once, as a match.
    """
    lines: dict[int, Line] = {}
    for group in groups:
        for line in group:
            if line.number not in lines or line.ranges is not None:
                lines[line.number] = line
    return FileLines(path, tuple(lines[number] for number in sorted(lines)), size)


def from_engine(file: FileMatch) -> FileLines:
    """from_engine adapts the offline engine's result for one file."""
    groups = [
        _rows(
            line.line_number,
            line.line_start,
            line.text.encode(),
            tuple((r.start, r.end) for r in line.ranges),
            [c.text.encode() for c in line.before],
            [c.text.encode() for c in line.after],
        )
        for line in file.line_matches
    ]
    return _merged(file.path, groups)


def from_proto(file: search_pb2.FileMatch) -> FileLines:
    """from_proto adapts the search service's result for one file (SearchCode, StreamSearchCode)."""
    groups = [
        _rows(
            line.line_number,
            line.line_start,
            line.line.encode(),
            tuple((r.start_byte, r.end_byte) for r in line.ranges),
            [text.encode() for text in line.before],
            [text.encode() for text in line.after],
        )
        for line in file.line_matches
    ]
    return _merged(file.path, groups)


def from_groups(path: str, content: bytes | memoryview, groups: bytes, context: int) -> FileLines:
    """from_groups adapts a streamed file: its content and its matches in the C scanner's layout.

    `groups` holds int64 values, per matching line: line_number, line_start, line_end,
    range_count, then range_count (start, end) pairs relative to line_start (see
    services/search/engine/_fastscan.c). Context lines are cut from `content` exactly as
    `_fastscan.render_lines` cuts them: before-context never reprints a line, after-context
    stops at the next match's line and at the end of the file.
    """
    values = memoryview(groups).cast("q").tolist()
    data = bytes(content)
    size = len(data)
    lines: list[Line] = []
    if not context:  # the common case, in one tight loop
        at = 0
        while at + 4 <= len(values):
            number, start, end, count = values[at : at + 4]
            pairs = values[at + 4 : at + 4 + 2 * count]
            ranges = tuple(zip(pairs[::2], pairs[1::2], strict=True))
            lines.append(Line(number, start, data[start:end], ranges))
            at += 4 + 2 * count
        return FileLines(path, tuple(lines), size)
    last_printed = 0
    at = 0
    while at + 4 <= len(values):
        number, start, end, count = values[at : at + 4]
        pairs = values[at + 4 : at + 4 + 2 * count]
        at += 4 + 2 * count
        next_number = values[at] if at + 4 <= len(values) else -1
        first = max(number - context, last_printed + 1, 1)
        pos = start
        for _ in range(number - first):  # walk back to the first context line's start
            pos = data.rfind(b"\n", 0, max(pos - 1, 0)) + 1
        for line in range(first, number):
            eol = data.find(b"\n", pos, start)
            stop = eol if eol >= 0 else start
            lines.append(Line(line, pos, data[pos:stop]))
            pos = stop + 1
        lines.append(Line(number, start, data[start:end], tuple(zip(pairs[::2], pairs[1::2], strict=True))))
        last_printed = number
        last_end = min(end + 1, size)
        for line in range(number + 1, number + context + 1):
            if last_end >= size or 0 < next_number <= line:
                break
            eol = data.find(b"\n", last_end)
            stop = eol if eol >= 0 else size
            lines.append(Line(line, last_end, data[last_end:stop]))
            last_printed = line
            last_end = min(stop + 1, size)
    return FileLines(path, tuple(lines), size)
