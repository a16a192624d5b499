"""_fastscan is the engine's C extension (services/search/engine/_fastscan.c); these are its types."""

from collections.abc import Sequence
from typing import Any, TypeVar

from numpy.typing import NDArray
from typing_extensions import Buffer

_Line = TypeVar("_Line", bound=tuple[int, int, int, tuple[tuple[int, int], ...]])

def find_literal(
    data: Buffer, needle: bytes, folded: bool, guard: bool, limit: int, line_type: type[_Line], /
) -> list[_Line] | None:
    """find_literal lists the lines of data holding needle (None: guard found KELVIN SIGN/LONG S)."""

def needle_lines(
    data: Buffer, needle: bytes, folded: bool, guard: bool, /
) -> list[tuple[int, int, int]] | None:
    """needle_lines lists (line_number, line_start, line_end) of each line holding needle."""

def scan_literal(data: Buffer, needle: bytes, folded: bool, guard: bool, /) -> tuple[bytes, int, int] | None:
    """scan_literal packs find_literal's lines as int64 groups, with (lines, matches) counts."""

def count_literal(data: Buffer, needle: bytes, folded: bool, guard: bool, /) -> tuple[int, int] | None:
    """count_literal returns (matching lines, matches) of find_literal without per-line objects."""

def render_lines(data: Buffer, groups: Buffer, path: bytes, json: bool, context: int, /) -> bytes:
    """render_lines renders one file's packed matching lines as grep-style lines or ripgrep's JSON records."""

def render_json(
    data: Buffer, groups: Buffer, path: bytes, context: int, /
) -> tuple[bytes, int, int, int, float]:
    """render_json is render_lines' JSON with matched lines, matches, bytes printed, elapsed (its end)."""

def distinct_trigrams(data: Buffer, /) -> bytes:
    """distinct_trigrams returns the distinct folded trigram ids without newlines, as uint32 bytes."""

def any_whole_word(
    data: Buffer, lines: Sequence[tuple[int, int, int, tuple[tuple[int, int], ...]]], /
) -> bool:
    """any_whole_word says whether any range of any line is a whole word (rank.is_whole_word)."""

def invert_postings(docs: Sequence[Buffer | NDArray[Any]], /) -> tuple[bytes, bytes, bytes]:
    """invert_postings inverts per-document trigram ids into (ids, starts, ordinals) bytes."""

def regex_compile(
    pattern: bytes,
    case_sensitive: bool,
    literal: bool,
    run_set: bytes | None = None,
    run_len: int = 0,
    /,
) -> object:
    """regex_compile compiles an RE2 pattern for regex_scan/regex_count (ValueError: RE2's message);
    with a run (256 flag bytes, a length), whole-buffer scans give RE2 only the lines holding one."""

def regex_scan(
    regex: object, data: Buffer, lines: Sequence[tuple[int, int, int]] | None, limit: int, /
) -> tuple[bytes, int, int]:
    """regex_scan packs the matching lines of data (or of the listed lines) with (lines, matches) counts."""

def regex_count(regex: object, data: Buffer, lines: Sequence[tuple[int, int, int]] | None, /) -> int:
    """regex_count counts the matching lines of data (or of the listed lines)."""

def regex_scan_needle(
    regex: object, data: Buffer, needle: bytes, folded: bool, guard: bool, limit: int, /
) -> tuple[bytes, int, int] | None:
    """regex_scan_needle is regex_scan over the lines holding needle (None: the guard tripped)."""

def regex_count_needle(
    regex: object, data: Buffer, needle: bytes, folded: bool, guard: bool, /
) -> int | None:
    """regex_count_needle is regex_count over the lines holding needle (None as regex_scan_needle)."""

def crc32(data: Buffer, value: int = 0, /) -> int:
    """crc32 is zlib.crc32(data, value), folded with PCLMULQDQ when the CPU has it."""

def crc32_accelerated() -> bool:
    """crc32_accelerated says whether crc32 folds with PCLMULQDQ on this CPU."""

def record_spans(
    table: Buffer,
    ordinals: Buffer,
    table_start: int,
    record_size: int,
    base: int,
    limit: int,
    offset_at: int,
    size_at: int,
    size_bytes: int,
    /,
) -> bytes:
    """record_spans reads an (offset, size) of each record as int64 (start, end) pairs after base."""

def split_strings(data: Buffer, spans: Buffer, fields: int, keep: int, /) -> list[tuple[str, ...]]:
    """split_strings decodes each span, split at NUL into `fields` strings, and keeps the first `keep`."""

def verify_blocks(data: Buffer, spans: Buffer, block_size: int, verified: Buffer, sums: Buffer, /) -> int:
    """verify_blocks checks the unverified blocks the int64 spans cover: -1, or the first bad block."""

def count_spans(
    regex: object, needle: bytes | None, pure: bool, folded: bool, guard: bool, data: Buffer, spans: Buffer, /
) -> bytes:
    """count_spans counts the matching lines of each int64 (start, end) span of data, as int64 counts."""

def symbol_hits(
    data: Buffer,
    spans: Buffer,
    needle: bytes | None,
    regex: object = None,
    qualified: bool = False,
    guard: bytes | None = None,
    /,
) -> bytes:
    """symbol_hits lists, as int64 (span, symbol, record offset, strings offset), the symbols of each
    span (one document's symbols.bin block) whose name or qualified name holds the ASCII needle
    under ASCII case folding, or holds a non-ASCII byte; with `regex` also those whose name
    (qualified name) it matches or that hold a newline or a non-ASCII byte there, among those
    holding `guard` (as the needle is held) when given."""

def record_facts(
    table: Buffer, ordinals: Buffer, table_start: int, record_size: int, field_at: int, required: int, /
) -> bytes:
    """record_facts reads the low byte of each record's u32 field at field_at (one byte per int64
    ordinal); IndexError for a record outside the table, ValueError for a field without `required`."""

def stable_order(keys: Buffer, /) -> bytes:
    """stable_order returns the positions of `keys` as int64 by key byte ascending, ties in position order."""

def symbols_define(records: Buffer, count: int, record_size: int, ranges: Buffer, /) -> bool:
    """symbols_define says whether an int64 (start, end) range covers a record's name bytes
    [start_byte, end_byte) (records start with u32 start_line, end_line, start_byte, end_byte)."""

def symbols_enclosing(records: Buffer, count: int, record_size: int, lines: Buffer, /) -> bytes:
    """symbols_enclosing returns, as int64, each line's innermost enclosing record (shortest, then
    latest start, then first recorded) or -1."""
