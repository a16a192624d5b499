"""Tests for the line-oriented verifier (services/search/engine/query/verify.py), including a
differential check against ripgrep on real stdlib source."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sysconfig

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.search.engine import _fastscan
from services.search.engine.query.verify import (
    InvalidPatternError,
    LineMatch,
    LineMatcher,
    char_column,
    pack_groups,
)

RG = shutil.which("rg")


def _found(matcher: LineMatcher, content: bytes) -> list[tuple[int, list[tuple[int, int]]]]:
    return [(m.line_number, list(m.ranges)) for m in matcher.find(content)]


def test_literal_hits_every_occurrence_per_line() -> None:
    content = b"foo foo\nbar\n  foofoo\nfo\nfoo"
    matcher = LineMatcher("foo", case_sensitive=True)
    assert matcher.strategy == "literal"
    matches = matcher.find(content)
    assert [(m.line_number, m.ranges) for m in matches] == [
        (1, ((0, 3), (4, 7))),
        (3, ((2, 5), (5, 8))),
        (5, ((0, 3),)),
    ]
    assert [m.line(content) for m in matches] == [b"foo foo", b"  foofoo", b"foo"]
    assert matches[1] == LineMatch(3, 12, 20, ((2, 5), (5, 8)))


def test_regex_that_is_a_literal_takes_the_literal_path() -> None:
    matcher = LineMatcher(r"copy_from_user\(", case_sensitive=True)
    assert matcher.strategy == "literal"
    assert _found(matcher, b"x = copy_from_user(a)\ncopy_from_user\n") == [(1, [(4, 19)])]


def test_prefilter_path_agrees_with_whole_buffer_regex() -> None:
    content = b"class FooError(Exception):\n  x = 1\nclass Bar(Exception):\nclass BazError(Exception): pass\n"
    matcher = LineMatcher(r"[A-Z]\w+Error\(Exception\)", case_sensitive=True)
    assert matcher.strategy == "prefilter"
    plain = LineMatcher(r"class \w+Error\(Exception\)", case_sensitive=True)
    assert plain.strategy == "prefilter"
    assert _found(matcher, content) == [(1, [(6, 25)]), (4, [(6, 25)])]
    assert _found(plain, content) == [(1, [(0, 25)]), (4, [(0, 25)])]


def test_case_insensitive_follows_re2_unicode_folding() -> None:
    content = "Kelvin\n\u212aELVIN\nkelvin\nstra\u00dfe\n\u017ftrasse\n".encode()
    matcher = LineMatcher("kelvin", case_sensitive=False)
    assert [m.line_number for m in matcher.find(content)] == [1, 2, 3]
    # KELVIN SIGN is three bytes: the ranges are byte offsets.
    assert matcher.find(content)[1].ranges == ((0, 8),)
    assert [m.line_number for m in LineMatcher("STRASSE", case_sensitive=False).find(content)] == [5]
    assert [m.line_number for m in LineMatcher("(?i)kel", case_sensitive=True).find(content)] == [1, 2, 3]
    assert [m.line_number for m in LineMatcher("Kel", case_sensitive=True).find(content)] == [1]


def test_case_insensitive_prefilter_on_folded_copy() -> None:
    matcher = LineMatcher(r"\bcontextMANAGER\b", case_sensitive=False)
    assert matcher.strategy == "prefilter"
    content = b"from contextlib import contextmanager\n@ContextManager\nxcontextmanager\n"
    assert _found(matcher, content) == [(1, [(23, 37)]), (2, [(1, 15)])]


def test_matches_never_span_lines() -> None:
    content = b"a\nb\na b\n"
    assert _found(LineMatcher(r"a\sb", case_sensitive=True), content) == [(3, [(0, 3)])]
    assert _found(LineMatcher(r"a[^x]b", case_sensitive=True), content) == [(3, [(0, 3)])]
    assert _found(LineMatcher("(?s)a.b", case_sensitive=True), content) == [(3, [(0, 3)])]
    assert _found(LineMatcher("a\nb", case_sensitive=True, literal=True), content) == []
    assert not LineMatcher("a\nb", case_sensitive=True, literal=True).matches(content)


def test_anchors_are_per_line() -> None:
    content = b"foo bar\nbar foo\nfoo"
    assert _found(LineMatcher("^foo", case_sensitive=True), content) == [(1, [(0, 3)]), (3, [(0, 3)])]
    assert _found(LineMatcher("foo$", case_sensitive=True), content) == [(2, [(4, 7)]), (3, [(0, 3)])]
    # ripgrep treats \A and \z as line anchors too.
    assert _found(LineMatcher(r"\Afoo", case_sensitive=True), content) == [(1, [(0, 3)]), (3, [(0, 3)])]
    assert _found(LineMatcher(r"foo\z", case_sensitive=True), content) == [(2, [(4, 7)]), (3, [(0, 3)])]


def test_empty_matches_like_ripgrep() -> None:
    content = "aab\nbbb\n\n\u00e9\n".encode()
    matcher = LineMatcher("a*", case_sensitive=True)
    # An empty match abutting the previous match is skipped; there is no line after the final
    # newline; offsets advance by bytes, so an empty match can sit inside a UTF-8 sequence.
    assert _found(matcher, content) == [
        (1, [(0, 2), (3, 3)]),
        (2, [(0, 0), (1, 1), (2, 2), (3, 3)]),
        (3, [(0, 0)]),
        (4, [(0, 0), (1, 1), (2, 2)]),
    ]
    assert _found(LineMatcher("^$", case_sensitive=True), b"x\n\ny\n") == [(2, [(0, 0)])]
    assert _found(LineMatcher("^$", case_sensitive=True), b"") == []
    assert _found(LineMatcher("", case_sensitive=True), b"ab") == [(1, [(0, 0), (1, 1), (2, 2)])]


def test_max_matches_and_matches() -> None:
    content = b"x1\nx2\nx3\n"
    for pattern in ("x", "x[0-9]", r"\bx\d"):
        matcher = LineMatcher(pattern, case_sensitive=True)
        assert [m.line_number for m in matcher.find(content, max_matches=2)] == [1, 2]
        assert matcher.find(content, max_matches=0) == []
        assert matcher.matches(content)
        assert not matcher.matches(b"y1\ny2")


def test_accepts_memoryview_and_bytearray() -> None:
    content = b"alpha\nbeta gamma\n"
    matcher = LineMatcher("gam+a", case_sensitive=True)
    expected = matcher.find(content)
    assert matcher.find(memoryview(content)) == expected
    assert matcher.find(bytearray(content)) == expected
    assert matcher.matches(memoryview(content))


def test_columns_count_characters() -> None:
    content = "naïve café = café\n".encode()
    match = LineMatcher("café", case_sensitive=True).find(content)[0]
    assert match.ranges == ((7, 12), (15, 20))
    assert match.columns(content) == ((6, 10), (13, 17))
    assert char_column("日本語x".encode(), 9) == 3
    ascii_match = LineMatcher("b", case_sensitive=True).find(b"abc")[0]
    assert ascii_match.columns(b"abc") == ((1, 2),)


def test_invalid_patterns_raise_re2_errors() -> None:
    with pytest.raises(InvalidPatternError, match=r"missing \): a\("):
        LineMatcher("a(", case_sensitive=True)
    with pytest.raises(InvalidPatternError, match="bad repetition operator"):
        LineMatcher("a**", case_sensitive=False)
    with pytest.raises(InvalidPatternError):
        LineMatcher(r"(?<=a)b", case_sensitive=True)
    # A literal pattern is never invalid.
    assert LineMatcher("a(", case_sensitive=True, literal=True).matches(b"xa(")


@pytest.mark.timeout(120)
def test_pathological_patterns_finish() -> None:
    line = b"a" * 100_000
    content = line + b"\n" + line
    assert LineMatcher("(a*)*b", case_sensitive=True).find(content) == []
    assert LineMatcher("(a|aa)+$", case_sensitive=True).find(content)[1].ranges == ((0, 100_000),)
    assert LineMatcher("(x+x+)+y", case_sensitive=True).find(b"x" * 100_000) == []
    assert LineMatcher("(?i)(a*)*B", case_sensitive=True).matches(content) is False


# ---------------------------------------------------------------------------------------------
# Differential check against ripgrep.

_STDLIB_FILES = [
    "argparse.py",
    "contextlib.py",
    "ftplib.py",
    "socket.py",
    "urllib/request.py",
    "http/client.py",
    "unittest/case.py",
    "textwrap.py",
]

_SYNTHETIC = (
    "Kelvin \u212aelvin kelvin\n"
    "stra\u00dfe STRASSE \u017ftrasse\n"
    "h\u00e9llo H\u00c9LLO hello\n"
    "\n"
    "\tindented = 1  \n"
    "aab\n"
    "# comment )\n"
    "\u65e5\u672c\u8a9e 123.45\n"
    "no newline at the end)"
)

# (our RE2 pattern, the same pattern for ripgrep, case_sensitive). ripgrep's \w \d \s \b are
# Unicode-aware while RE2's are ASCII, so the ripgrep side spells them with (?-u:...).
_PATTERNS: list[tuple[str, str, bool]] = [
    ("def __init__", "def __init__", True),
    (r"class \w+Error\(Exception\)", r"class (?-u:\w)+Error\(Exception\)", True),
    (r"[A-Z]\w+Error\b", r"[A-Z](?-u:\w)+Error(?-u:\b)", True),
    ("http_proxy", "http_proxy", False),
    ("TODO|FIXME|XXX", "TODO|FIXME|XXX", True),
    (r"\bself\b", r"(?-u:\b)self(?-u:\b)", True),
    (r"^\s*import ", r"^(?-u:\s)*import ", True),
    ("[A-Z]{3,}", "[A-Z]{3,}", True),
    (r"\d+\.\d+", r"(?-u:\d)+\.(?-u:\d)+", True),
    ("(?i)Return None", "(?i)Return None", True),
    ("kelvin", "kelvin", False),
    ("strasse", "strasse", False),
    ("h\u00e9llo", "h\u00e9llo", False),
    ("^$", "^$", True),
    (r"\)$", r"\)$", True),
    (r"\A#", r"\A#", True),
    ("[^\\x00-\\x7f]+", "[^\\x00-\\x7f]+", True),
    ("a*b", "a*b", True),
    # No required literal: whole-buffer RE2, where \s could otherwise run across a newline.
    (r":\s+\w", r":(?-u:\s)+(?-u:\w)", True),
    ("(?:raise|return) [a-z]+", "(?:raise|return) [a-z]+", True),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("rgcorpus")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    copied = 0
    for name in _STDLIB_FILES:
        source = stdlib / name
        if source.exists():
            (root / name.replace("/", "_")).write_bytes(source.read_bytes())
            copied += 1
    assert copied >= 5, "stdlib sources not found"
    (root / "synthetic.txt").write_text(_SYNTHETIC, encoding="utf-8")
    return root


def _ripgrep(
    root: pathlib.Path, pattern: str, case_sensitive: bool
) -> set[tuple[str, int, tuple[tuple[int, int], ...]]]:
    assert RG is not None, "ripgrep (rg) must be installed"
    args = [RG, "--json", "--no-config", "--no-ignore", "--hidden", "--case-sensitive"]
    if not case_sensitive:
        args.append("--ignore-case")
    proc = subprocess.run([*args, "-e", pattern, "--", str(root)], capture_output=True, check=False)
    assert proc.returncode in (0, 1), proc.stderr.decode()
    out = set()
    for raw in proc.stdout.splitlines():
        event = json.loads(raw)
        if event["type"] != "match":
            continue
        data = event["data"]
        name = pathlib.Path(data["path"]["text"]).name
        ranges = tuple((s["start"], s["end"]) for s in data["submatches"])
        out.add((name, data["line_number"], ranges))
    return out


def _ours(
    root: pathlib.Path, pattern: str, case_sensitive: bool
) -> set[tuple[str, int, tuple[tuple[int, int], ...]]]:
    matcher = LineMatcher(pattern, case_sensitive=case_sensitive)
    out = set()
    for path in sorted(root.iterdir()):
        for match in matcher.find(path.read_bytes()):
            out.add((path.name, match.line_number, match.ranges))
    return out


@pytest.mark.parametrize(("pattern", "rg_pattern", "case_sensitive"), _PATTERNS)
def test_agrees_with_ripgrep(
    corpus: pathlib.Path, pattern: str, rg_pattern: str, case_sensitive: bool
) -> None:
    expected = _ripgrep(corpus, rg_pattern, case_sensitive)
    assert expected, f"{pattern!r} matches nothing in the corpus: the comparison would be vacuous"
    ours = _ours(corpus, pattern, case_sensitive)
    if "\\A" in pattern:
        # ripgrep finds the lines per line but locates submatches in the whole buffer, where \A
        # only matches once: after the first line it reports matching lines with no ranges.
        # Compare the lines only.
        assert {(f, n) for f, n, _ in ours} == {(f, n) for f, n, _ in expected}
        return
    assert ours == expected


@pytest.mark.parametrize(("pattern", "rg_pattern", "case_sensitive"), _PATTERNS)
def test_counts_and_packed_groups_agree_with_find(
    corpus: pathlib.Path, pattern: str, rg_pattern: str, case_sensitive: bool
) -> None:
    matcher = LineMatcher(pattern, case_sensitive=case_sensitive)
    for path in sorted(corpus.iterdir()):
        data = path.read_bytes()
        found = matcher.find(data)
        assert matcher.count(data) == len(found), path.name
        groups, lines, matches = matcher.groups(data)
        assert groups == pack_groups(found)
        assert (lines, matches) == (len(found), sum(len(m.ranges) for m in found))


@pytest.mark.parametrize("context", [0, 1, 3])
@pytest.mark.parametrize("pattern", ["return", r"def \w+\(self", "(?i)error", "^$"])
def test_rendered_lines_equal_ripgrep_output(corpus: pathlib.Path, pattern: str, context: int) -> None:
    # render_lines prints what `rg -n -H -C N` prints for one file, `--` separators included.
    assert RG is not None
    matcher = LineMatcher(pattern, case_sensitive=True)
    for path in sorted(corpus.iterdir())[:4]:
        args = [
            RG,
            "--no-config",
            "--no-ignore",
            "-n",
            "-H",
            "-C",
            str(context),
            "-e",
            pattern,
            "--",
            str(path),
        ]
        expected = subprocess.run(args, capture_output=True, check=False).stdout
        data = path.read_bytes()
        groups, _, _ = matcher.groups(data)
        assert _fastscan.render_lines(data, groups, str(path).encode(), False, context) == expected, path.name


def test_rendered_json_lines_carry_text_and_context() -> None:
    # ripgrep's records (tests/engine/test_native.py compares them with `rg --json` byte for byte).
    data = b'a "x"\tx\nplain\nb\n\n\nx\n'
    groups, _, _ = LineMatcher("x", case_sensitive=True).groups(data)
    rows = [json.loads(r) for r in _fastscan.render_lines(data, groups, b'"p.c"', True, 1).splitlines()]
    path = {"text": "p.c"}
    assert [row["type"] for row in rows] == ["begin", "match", "context", "context", "match", "end"]
    assert [row["data"].get("line_number") for row in rows[1:-1]] == [1, 2, 5, 6]
    assert rows[1]["data"] == {
        "path": path,
        "lines": {"text": 'a "x"\tx\n'},
        "line_number": 1,
        "absolute_offset": 0,
        "submatches": [
            {"match": {"text": "x"}, "start": 3, "end": 4},
            {"match": {"text": "x"}, "start": 6, "end": 7},
        ],
    }
    assert rows[-1]["data"]["stats"]["matched_lines"] == 2 and rows[-1]["data"]["stats"]["matches"] == 3


@pytest.mark.parametrize(("pattern", "rg_pattern", "case_sensitive"), _PATTERNS[:6])
def test_literal_mode_agrees_with_ripgrep_fixed_strings(
    corpus: pathlib.Path, pattern: str, rg_pattern: str, case_sensitive: bool
) -> None:
    # The same strings taken literally (rg -F): exercises the bytes.find path.
    text = pattern.split("|")[0].replace("\\", "")
    assert RG is not None
    args = [RG, "--json", "--no-config", "--no-ignore", "--fixed-strings"]
    args.append("--case-sensitive" if case_sensitive else "--ignore-case")
    proc = subprocess.run([*args, "-e", text, "--", str(corpus)], capture_output=True, check=False)
    expected = set()
    for raw in proc.stdout.splitlines():
        event = json.loads(raw)
        if event["type"] == "match":
            data = event["data"]
            ranges = tuple((s["start"], s["end"]) for s in data["submatches"])
            expected.add((pathlib.Path(data["path"]["text"]).name, data["line_number"], ranges))
    matcher = LineMatcher(text, case_sensitive=case_sensitive, literal=True)
    ours = {
        (path.name, m.line_number, m.ranges)
        for path in sorted(corpus.iterdir())
        for m in matcher.find(path.read_bytes())
    }
    assert ours == expected


# No anchors: RE2 and Rust's regex disagree on which alternative an empty-width loop prefers
# (`(?:^|a)*` on "a": RE2 reports (0,0), ripgrep (0,1)), and we follow RE2. The fixed
# patterns above cover anchors.
_DIFF_ATOMS = st.sampled_from(
    [
        "a",
        "b",
        "ab",
        "K",
        "k",
        "s",
        "\u017f",
        "\u212a",
        "\u00e9",
        " ",
        ".",
        "[ab]",
        "[^a]",
        "[a-c]",
        "x",
    ]
)


def _diff_regexes() -> st.SearchStrategy[str]:
    flat = st.lists(_DIFF_ATOMS, min_size=1, max_size=5).map("".join)
    return flat | st.recursive(
        _DIFF_ATOMS,
        lambda inner: st.one_of(
            st.lists(inner, min_size=2, max_size=4).map("".join),
            st.tuples(inner, inner).map(lambda p: f"(?:{p[0]}|{p[1]})"),
            inner.map(lambda r: f"(?:{r})*"),
            inner.map(lambda r: f"(?:{r})+"),
            inner.map(lambda r: f"(?:{r})?"),
            inner.map(lambda r: f"(?:{r}){{1,2}}"),
            inner.map(lambda r: f"(?i:{r})"),
        ),
        max_leaves=6,
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pattern=_diff_regexes(),
    case_sensitive=st.booleans(),
    lines=st.lists(st.text("abkKsS x\u017f\u212a\u00e9\u00c9", max_size=12), min_size=1, max_size=6),
    literal=st.booleans(),
)
def test_random_patterns_agree_with_ripgrep(
    tmp_path: pathlib.Path, pattern: str, case_sensitive: bool, lines: list[str], literal: bool
) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert RG is not None
    args = [RG, "--json", "--no-config", "--no-ignore"]
    args.append("--case-sensitive" if case_sensitive else "--ignore-case")
    if literal:
        args.append("--fixed-strings")
    proc = subprocess.run([*args, "-e", pattern, "--", str(doc)], capture_output=True, check=False)
    assert proc.returncode in (0, 1), proc.stderr.decode()
    expected = set()
    for raw in proc.stdout.splitlines():
        event = json.loads(raw)
        if event["type"] == "match":
            data = event["data"]
            expected.add((data["line_number"], tuple((s["start"], s["end"]) for s in data["submatches"])))
    matcher = LineMatcher(pattern, case_sensitive=case_sensitive, literal=literal)
    assert {(m.line_number, m.ranges) for m in matcher.find(doc.read_bytes())} == expected
    assert matcher.count(doc.read_bytes()) == len({line for line, _ in expected})
