"""ripgrep as a peer and as the oracle: RE2 patterns translated to ripgrep's dialect.

ripgrep is brute force (no index), so it is the floor any index must beat, and its output
is the truth the differential test compares us against. Both sides must agree on what a
pattern means, which takes care:

* Escapes. RE2 accepts `\\` before any punctuation; ripgrep only before its meta
  characters, so escaped punctuation is rewritten as `\\x{HH}`.
* Perl classes. RE2's `\\w`, `\\d`, `\\s` and `\\b` are ASCII-only; ripgrep's are Unicode.
  `translate_pattern` rewrites them to ripgrep's ASCII POSIX classes (`[[:word:]]`,
  `[[:digit:]]`), RE2's exact whitespace set `[\\t\\n\\f\\r ]` (no `\\v`), and `(?-u:\\b)`.
  Negated forms become negated classes that still match whole characters, because RE2 in
  UTF-8 mode steps over characters, not bytes.
* Encoding. ripgrep sniffs BOMs and transcodes UTF-16; `-E none` makes it search raw bytes
  as our verifier does (a UTF-8 BOM stays in the first line on both sides).
* Files. `--no-ignore --hidden` searches what the index walker sees (it does not read
  .gitignore); `-a` searches files ripgrep would call binary, and the caller then drops every
  file the index reports as skipped; `--no-config` ignores a user's ripgreprc.
* Lines. Both treat `\\n` as the only line terminator; a `\\r` before it is line content.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.bench.measure import ProcessRun, run_process

RG = "rg"

# RE2's ASCII classes spelled so that ripgrep means the same thing. Outside a bracket
# expression each becomes a full class; inside one, only the positive forms have a spelling.
_OUTSIDE: dict[str, str] = {
    "w": "[[:word:]]",
    "W": "[^[:word:]]",
    "d": "[[:digit:]]",
    "D": "[^[:digit:]]",
    "s": "[\\t\\n\\f\\r ]",
    "S": "[^\\t\\n\\f\\r ]",
    "b": "(?-u:\\b)",
    "B": "(?-u:\\B)",
}
_INSIDE: dict[str, str] = {
    "w": "[:word:]",
    "d": "[:digit:]",
    "s": "\\t\\n\\f\\r ",
}


class UntranslatablePattern(ValueError):
    """UntranslatablePattern marks an RE2 pattern this module cannot express for ripgrep."""


def translate_pattern(pattern: str) -> str:
    """translate_pattern rewrites an RE2 pattern so ripgrep matches exactly the same lines.

    Only escapes whose meaning differs are touched; everything else passes through. A
    negated Perl class inside brackets (`[\\W.]`) has no faithful spelling and raises
    UntranslatablePattern.
    """
    out: list[str] = []
    i = 0
    depth = 0  # > 0 while inside a bracket expression
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if depth == 0 and nxt in _OUTSIDE:
                out.append(_OUTSIDE[nxt])
            elif depth > 0 and nxt in _INSIDE:
                out.append(_INSIDE[nxt])
            elif depth > 0 and nxt in "WDSbB":
                raise UntranslatablePattern(f"\\{nxt} inside a character class in {pattern!r}")
            elif nxt.isascii() and not nxt.isalnum():
                # RE2 lets any punctuation be escaped (re2.escape writes `\"`); ripgrep's
                # regex crate rejects escapes of characters that are not meta, so spell the
                # character by code point, which both read the same inside and outside classes.
                out.append(f"\\x{{{ord(nxt):02X}}}")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if depth == 0 and ch == "[":
            depth = 1
            out.append(ch)
            i += 1
            # A leading ^ and a leading ] are literal parts of the class syntax.
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            if i < n and pattern[i] == "]":
                out.append("\\]")
                i += 1
            continue
        if depth > 0 and ch == "[" and pattern.startswith("[:", i):
            end = pattern.find(":]", i + 2)
            if end < 0:
                raise UntranslatablePattern(f"unterminated POSIX class in {pattern!r}")
            out.append(pattern[i : end + 2])
            i = end + 2
            continue
        if depth > 0 and ch == "[":
            # ripgrep would read a nested '[' as a set operation; RE2 reads a literal.
            out.append("\\[")
            i += 1
            continue
        if depth > 0 and ch == "]":
            depth = 0
        elif depth > 0 and ch in "&~-" and i + 1 < n and pattern[i + 1] == ch:
            # '&&', '~~' and '--' are set operators in ripgrep's classes; literal in RE2.
            out.append("\\" + ch)
            i += 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def ripgrep_argv(pattern: str, paths: Sequence[str | Path], *, line_numbers: bool = True) -> list[str]:
    """ripgrep_argv is the command line for one line-oriented search of paths.

    Output is `path NUL line:text` per matching line (`-0` so paths with colons parse).
    """
    argv = [
        RG,
        "--no-config",
        "--no-ignore",
        "--hidden",
        "-a",
        "-E",
        "none",
        "--no-heading",
        "--with-filename",
        "-0",
        "--color",
        "never",
    ]
    if line_numbers:
        argv.append("-n")
    argv += ["-e", translate_pattern(pattern), "--"]
    argv += [str(p) for p in paths]
    return argv


@dataclass(frozen=True, slots=True)
class RipgrepMatches:
    """RipgrepMatches is the (path, line) set ripgrep printed, paths relative to the root."""

    lines: frozenset[tuple[str, int]]
    run: ProcessRun


def _relative(path: bytes, root: str) -> str:
    text = os.fsdecode(path)
    if text.startswith(root):
        text = text[len(root) :].lstrip("/")
    return text[2:] if text.startswith("./") else text


def parse_output(output: bytes, root: str | Path) -> frozenset[tuple[str, int]]:
    """parse_output turns `path NUL line:text` records into a (relative path, line) set."""
    root_text = str(root).rstrip("/") + "/"
    found: set[tuple[str, int]] = set()
    for record in output.split(b"\n"):
        if not record:
            continue
        path, sep, rest = record.partition(b"\0")
        if not sep:
            raise ValueError(f"unexpected ripgrep output line {record[:200]!r}")
        number, _, _ = rest.partition(b":")
        found.add((_relative(path, root_text), int(number)))
    return frozenset(found)


def search_lines(pattern: str, root: str | Path) -> RipgrepMatches:
    """search_lines runs ripgrep over root and returns every matching (path, line).

    Exit status 1 means "no match" for ripgrep and is not an error.
    """
    run = run_process(ripgrep_argv(pattern, ["."]), cwd=root, keep_output=True, ok_codes=(0, 1))
    return RipgrepMatches(lines=parse_output(run.output, "."), run=run)


class RipgrepPeer:
    """RipgrepPeer times ripgrep printing every matching line of a corpus (no index to build)."""

    name = "ripgrep"

    def __init__(self, corpus: str | Path) -> None:
        self.corpus = Path(corpus)

    def query(self, pattern: str) -> ProcessRun:
        """query runs one search over the corpus and returns its timing and line count."""
        return run_process(ripgrep_argv(pattern, ["."]), cwd=self.corpus, ok_codes=(0, 1))

    def supports(self, pattern: str) -> bool:
        """supports reports whether ripgrep can run pattern with RE2's meaning."""
        try:
            translate_pattern(pattern)
        except UntranslatablePattern:
            return False
        return True
