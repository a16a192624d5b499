"""Python function bodies left out of the symbol parse: `python_gaps` and its `Gap`s.

Parsing is most of symbol extraction's cost, and most Python bytes are function bodies that
define nothing. symbols.py parses a Python document with these bodies' tails left out
(tree-sitter's included ranges), which gives the same definitions; each `Gap` says where a
definition cut short by the parse really ends. Measured on this Python's standard library
(31.5 MB, 1,790 files): 42% of the bytes are left out, 0.2% of them in files parsed again whole
because the cut parse had an error; the symbols are identical on the standard library and on
5,401 files of installed packages and tests, which BENCHMARKS.md's ingest section reports
with the speed-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import tree_sitter

__all__ = ["END_BYTE", "END_POINT", "WHOLE", "Gap", "python_gaps", "trailing_comment_lines"]

END_BYTE = 0xFFFFFFFF
"""END_BYTE is tree-sitter's "to the end of the document" byte offset."""

END_POINT = tree_sitter.Point(0xFFFFFFFF, 0xFFFFFFFF)
"""END_POINT is tree-sitter's "to the end of the document" point."""

WHOLE = tree_sitter.Range(tree_sitter.Point(0, 0), END_POINT, 0, END_BYTE)
"""WHOLE is the included range of a whole document."""

# A `type` alias statement, the only definition a function body can hold besides def/class.
_PY_TYPE = re.compile(rb"\btype\b[ \t\\\r\n]*\w+[ \t\\\r\n]*[=\[]")
_PY_KEYWORDS = (b"def ", b"def\t", b"class ", b"class\t")
_PY_BODY_ENDS: dict[bytes, re.Pattern[bytes]] = {}


def _py_blocks(content: bytes) -> list[tuple[int, bytes, bool]]:
    """_py_blocks lists the `def` and `class` lines: (line start, indentation, a def to cut), in order.

    `bytes.find` locates the keywords far faster than a regex scans the lines; a keyword
    counts when only indentation (and `async`) precedes it on its line.
    """
    found: list[tuple[int, bytes, bool]] = []
    for keyword in _PY_KEYWORDS:
        is_def = keyword[0] == 0x64  # "d"
        at = content.find(keyword)
        while at >= 0:
            line = content.rfind(b"\n", 0, at) + 1
            indent = content[line:at]
            if not indent.strip() or (is_def and indent.split() == [b"async"]):
                indent = indent[: len(indent) - len(indent.lstrip())]
                # Only space and tab indentation is measured; a form feed's body is parsed whole.
                found.append((line, indent, is_def and not indent.strip(b" \t")))
            at = content.find(keyword, at + 4)
    found.sort()
    return found


def _py_body_end(indent: bytes) -> re.Pattern[bytes]:
    """_py_body_end matches the newline before the first line not indented deeper than `indent`.

    Blank and comment lines never end a body (Python ignores their indentation). Space
    indentation gets a simpler pattern that the regex engine runs several times faster.
    """
    found = _PY_BODY_ENDS.get(indent)
    if found is None:
        if not indent.strip(b" "):
            pattern = rb"\n {0,%d}+[^ \t\r\n#]" % len(indent)
        else:
            pattern = rb"\n(?![ \t]*(?:#|\r?\n|\r?\Z)|" + re.escape(indent) + rb"[ \t])"
        found = _PY_BODY_ENDS[indent] = re.compile(pattern)
    return found


def _balanced(content: bytes, start: int, end: int) -> bool:
    """_balanced reports equal counts of each bracket pair in `content[start:end]`."""
    return (
        content.count(b"(", start, end) == content.count(b")", start, end)
        and content.count(b"[", start, end) == content.count(b"]", start, end)
        and content.count(b"{", start, end) == content.count(b"}", start, end)
    )


@dataclass(frozen=True, slots=True)
class Gap:
    """Gap is a Python function body's tail left out of the parse (see `python_gaps`).

    `zone` is where the kept last line starts: a definition the parse ends in
    [zone, start] really ends at `end`, the body's last visible byte (on 0-based `end_row`).
    """

    zone: int
    start: int
    end: int
    end_row: int


def python_gaps(content: bytes) -> tuple[list[tree_sitter.Range], list[Gap]]:
    """python_gaps returns the ranges to parse and the function-body tails left out.

    Most Python bytes are function bodies that define nothing, yet parsing them is most of the
    cost. A body (the lines after a `def`, indented deeper) whose text shows no nested `def`,
    `class` or `type` alias keeps its header, its docstring and first statement, and the rest
    is left out of the parse: the definition is still a definition with its name, and its end
    (and that of the definitions ending with it) is restored from the gap. The cut is made
    only where the text is plainly between statements: brackets balanced on both sides, no
    triple-quoted string after it, no continuation backslash. The caller parses the whole
    document again if the cut parse has an error, so a misjudged cut costs time, not symbols.
    """
    ranges: list[tree_sitter.Range] = []
    gaps: list[Gap] = []
    size = len(content)
    start = 0  # start of the range being kept
    row = 0  # newlines before `counted`
    counted = 0
    start_point = tree_sitter.Point(0, 0)
    blocks = _py_blocks(content)
    for at, (head, indent, is_def) in enumerate(blocks):
        if not is_def or head < start:
            continue
        first = content.find(b"\n", head) + 1  # the line after the `def` line
        if first <= 0:
            break
        stop_match = _py_body_end(indent).search(content, first - 1)
        stop = stop_match.start() + 1 if stop_match is not None else size
        body_end = head + len(content[head:stop].rstrip())  # after the body's last visible byte
        if body_end <= first:
            continue
        if at + 1 < len(blocks) and blocks[at + 1][0] < body_end:
            continue  # A nested def or class: its symbols need the parse.
        if content.find(b"type", first, body_end) >= 0 and _PY_TYPE.search(content, first, body_end):
            continue
        quotes = max(content.rfind(b'"""', head, body_end), content.rfind(b"'''", head, body_end))
        # Brackets are counted outside triple-quoted strings: over the `def` line, and after the
        # body's last triple quote (usually the docstring's end) up to the line to keep.
        if quotes >= first and not _balanced(content, head, first):
            continue
        base = head if quotes < first else quotes + 3
        # Keep lines until one ends a plain statement: the gap starts after it.
        line = first
        cut = -1
        while line < body_end:
            line_end = content.find(b"\n", line)
            if line_end < 0 or line_end >= body_end:
                break
            text = content[line:line_end].strip()
            if (
                text
                and not text.startswith(b"#")
                and not text.endswith((b"\\", b":", b","))
                and line_end > quotes
                and _balanced(content, base, line_end)
            ):
                cut = line_end + 1
                break
            line = line_end + 1
        if cut < 0 or cut >= body_end or not content[cut:body_end].strip():
            continue
        if content[body_end - 1 : body_end] == b"\\" or not _balanced(content, cut, body_end):
            continue
        row += content.count(b"\n", counted, cut)
        ranges.append(tree_sitter.Range(start_point, tree_sitter.Point(row, 0), start, cut))
        row += content.count(b"\n", cut, body_end)
        counted = start = body_end
        column = body_end - (content.rfind(b"\n", cut - 1, body_end) + 1)
        start_point = tree_sitter.Point(row, column)
        gaps.append(Gap(line, cut, body_end, row))
    ranges.append(tree_sitter.Range(start_point, END_POINT, start, END_BYTE))
    return ranges, gaps


def trailing_comment_lines(content: bytes, start: int, end: int) -> int:
    """trailing_comment_lines counts the comment and blank lines that end a Python block.

    tree-sitter-python keeps comments that follow a body, at its indentation, inside the
    block; Python's own `ast` ends a definition at its last statement, and so do we.
    """
    lines = 0
    while end > start:
        line_start = content.rfind(b"\n", start, end) + 1
        if line_start <= start:
            break
        text = content[line_start:end].strip()
        if text and not text.startswith(b"#"):
            break
        end = line_start - 1
        lines += 1
    return lines
