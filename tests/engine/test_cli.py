"""`kotadb index ...` run as a real subprocess on a copy of the golden corpus."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ripgrep

REPO = Path(__file__).resolve().parents[2]
GOLDEN_CORPUS = Path(__file__).parent / "goldens" / "corpus"


def kotadb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "index", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
        timeout=120,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cli")
    src = base / "src"
    shutil.copytree(GOLDEN_CORPUS, src)
    (src / "assets").mkdir()
    (src / "assets" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (src / "assets" / "latin1.txt").write_bytes(b"caf\xe9 Parser\n")
    (src / "empty.py").write_bytes(b"")
    (src / "big.txt").write_bytes(b"Parser\n" * (1 << 18))  # 1.75 MiB > the 1 MiB limit
    index = base / "index"
    proc = kotadb("build", str(src), "--out", str(index))
    assert proc.returncode == 0, proc.stderr
    assert "indexed 9 of 13 files" in proc.stderr and "skipped 4" in proc.stderr
    return src, index


def test_stats_json_lists_skipped_files_with_reasons(built: tuple[Path, Path]) -> None:
    _, index = built
    proc = kotadb("stats", str(index), "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["documents"] == 9 and stats["segments"] >= 1
    assert stats["index_bytes"] == sum(stats["index_bytes_by_part"].values())
    assert {"postings", "dict", "content", "docs", "symbols"} <= set(stats["index_bytes_by_part"])
    reasons = {row["path"]: row["reason"] for row in stats["skipped"]}
    assert reasons == {
        "assets/logo.png": "binary",
        "assets/latin1.txt": "invalid_utf8",
        "empty.py": "empty",
        "big.txt": "too_large",
    }
    text = kotadb("stats", str(index))
    assert text.returncode == 0 and "big.txt: too_large" in text.stdout


def test_search_prints_grep_style_lines(built: tuple[Path, Path]) -> None:
    _, index = built
    proc = kotadb("search", str(index), "parse_config")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "src/parser.py:14:def parse_config(text):"
    assert "tests/test_parser.py:1:from src.parser import Parser, parse_config" in lines
    assert "2 files, 4 lines" in proc.stderr


def test_search_context_and_color(built: tuple[Path, Path]) -> None:
    _, index = built
    proc = kotadb("search", str(index), '"self.text = text"', "--context", "1", "--color", "always")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[1;31mself.text = text\x1b[0m" in proc.stdout
    plain = kotadb("search", str(index), '"self.text = text"', "--context", "1")
    assert plain.stdout.splitlines() == [
        "src/parser.py-7-    def __init__(self, text):",
        "src/parser.py:8:        self.text = text",
        "src/parser.py-9-",
    ]


def test_search_json_all_is_one_object_per_line(built: tuple[Path, Path]) -> None:
    src, index = built
    proc = kotadb("search", str(index), r"Pars(er|e)\b", "--regex", "--all", "--json")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["type"] for r in records} == {"begin", "match", "end", "summary"}
    assert records[-1]["type"] == "summary"
    rows = [r["data"] for r in records if r["type"] == "match"]
    for row in rows:
        data = (src / row["path"]["text"]).read_bytes()
        line = data.split(b"\n")[row["line_number"] - 1]
        assert row["lines"]["text"] == line.decode() + "\n"
        assert data[row["absolute_offset"] :].startswith(line + b"\n")
        assert row["submatches"]
        for sub in row["submatches"]:
            assert line[sub["start"] : sub["end"]] in (b"Parser", b"Parse")
            assert sub["match"]["text"] == line[sub["start"] : sub["end"]].decode()
    # --all streams in index order: paths ascending.
    paths = [row["path"]["text"] for row in rows]
    assert paths == sorted(paths)
    found = {(r["path"]["text"], r["line_number"]) for r in rows}
    assert {("src/config.go", 5), ("src/config.go", 6), ("src/parser.py", 4)} <= found
    assert ("src/reparser.rb", 2) not in found  # "Reparser" is another word
    summary = records[-1]["data"]["stats"]
    assert summary["matched_lines"] == len(rows)
    assert summary["matches"] == sum(len(row["submatches"]) for row in rows)


def test_search_all_and_pages_print_like_ripgrep_across_files(built: tuple[Path, Path]) -> None:
    src, index = built
    for extra in ([], ["--all"]):
        proc = kotadb("search", str(index), "Parser", "--regex", "--context", "1", *extra)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        # `--` separates context groups within and across files, and only those.
        assert lines[0] != "--" and lines[-1] != "--"
        rows = [None if line == "--" else re.match(r"^(.+?)[:-](\d+)[:-]", line) for line in lines]
        for first, second in itertools.pairwise(rows):
            if first is None or second is None:
                assert first is not second  # never two separators in a row
                continue
            adjacent = first[1] == second[1] and int(second[2]) == int(first[2]) + 1
            assert adjacent, f"no -- between {first[0]!r} and {second[0]!r}"
        assert len({row[1] for row in rows if row is not None}) >= 2
    json_rows = kotadb("search", str(index), "Parser", "--regex", "--all", "--json", "--context", "1")
    records = [json.loads(line) for line in json_rows.stdout.splitlines()]
    assert {row["type"] for row in records} == {"begin", "match", "context", "end", "summary"}
    for row in (r["data"] for r in records if r["type"] in ("match", "context")):
        text = (src / row["path"]["text"]).read_bytes().decode().split("\n")[row["line_number"] - 1]
        assert row["lines"]["text"] == text + "\n"


def test_search_count_prints_lines_per_file_and_exact_totals(built: tuple[Path, Path]) -> None:
    _, index = built
    counted = kotadb("search", str(index), "Parser", "--regex", "--count")
    every = kotadb("search", str(index), "Parser", "--regex", "--all")
    assert counted.returncode == every.returncode == 0
    per_file: dict[str, int] = {}
    for line in every.stdout.splitlines():
        path = line.split(":")[0]
        per_file[path] = per_file.get(path, 0) + 1
    assert dict(line.rsplit(":", 1) for line in counted.stdout.splitlines()) == {
        path: str(n) for path, n in per_file.items()
    }
    total = f"{len(per_file)} files, {sum(per_file.values())} lines"
    assert total in counted.stderr and total in every.stderr


def test_search_pages_with_cursor(built: tuple[Path, Path]) -> None:
    _, index = built
    first = kotadb("search", str(index), "parser", "--limit", "2")
    assert first.returncode == 0
    cursor_line = [line for line in first.stderr.splitlines() if line.startswith("next page: --cursor ")]
    assert cursor_line
    token = cursor_line[0].split()[-1]
    second = kotadb("search", str(index), "parser", "--limit", "2", "--cursor", token)
    assert second.returncode == 0, second.stderr
    first_files = {line.split(":")[0] for line in first.stdout.splitlines()}
    second_files = {line.split(":")[0] for line in second.stdout.splitlines()}
    assert len(first_files) == len(second_files) == 2 and not first_files & second_files


def test_search_exit_codes(built: tuple[Path, Path]) -> None:
    _, index = built
    none = kotadb("search", str(index), "zzzznotthere")
    assert none.returncode == 1 and none.stdout == ""
    bad = kotadb("search", str(index), "(oops", "--regex")
    assert bad.returncode == 2 and "kotadb index:" in bad.stderr
    syntax = kotadb("search", str(index), 'foo "unterminated')
    assert syntax.returncode == 2 and "position" in syntax.stderr
    missing = kotadb("search", str(index.parent / "nope"), "foo")
    assert missing.returncode == 2


# Runs `kotadb ARGS` in a fresh interpreter, then prints the standard modules it never needed.
_STARTUP_PROBE = """
import sys
from services.cli import main
code = main.main(sys.argv[1:])
unneeded = ("dataclasses", "inspect", "shutil", "services.cli.client")
print("LOADED", sorted(m for m in unneeded if m in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize("mode", [["--all"], ["--all", "--json"], ["--count"]])
def test_a_streamed_search_starts_without_dataclasses_inspect_or_shutil(
    built: tuple[Path, Path], mode: list[str]
) -> None:
    # Each is milliseconds of every `kotadb index search` process (issue #14: csearch + 0.1 s).
    _, index = built
    args = ["index", "search", str(index), "Parser", *mode]
    proc = subprocess.run(
        [sys.executable, "-c", _STARTUP_PROBE, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "src/parser.py" in proc.stdout
    assert proc.stdout.rstrip().endswith("LOADED []"), proc.stdout[-300:]


def test_the_console_command_ends_a_search_without_interpreter_teardown(built: tuple[Path, Path]) -> None:
    # `kotadb index search` exits with os._exit once its output is flushed (services/cli/main.py's
    # run): every line still arrives, but an atexit hook never runs. Other commands exit normally.
    _, index = built
    probe = "import atexit; atexit.register(print, 'TEARDOWN'); from services.cli.main import run; run()"
    search = subprocess.run(
        [sys.executable, "-c", probe, "index", "search", str(index), "Parser", "--all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert search.returncode == 0, search.stderr
    assert search.stdout == kotadb("search", str(index), "Parser", "--all").stdout
    assert "src/parser.py" in search.stdout and "TEARDOWN" not in search.stdout
    assert " files, " in search.stderr
    nothing = subprocess.run(
        [sys.executable, "-c", probe, "index", "search", str(index), "zzzznotthere"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nothing.returncode == 1 and nothing.stdout == ""
    stats = subprocess.run(
        [sys.executable, "-c", probe, "index", "stats", str(index)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stats.returncode == 0 and stats.stdout.rstrip().endswith("TEARDOWN")


def test_symbols_command(built: tuple[Path, Path]) -> None:
    _, index = built
    proc = kotadb("symbols", str(index), "Parser", "--json", "--kind", "class")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows[0]["path"] == "src/parser.py" and rows[0]["qualified_name"] == "Parser"
    assert all(row["kind"] == "class" for row in rows)
    text = kotadb("symbols", str(index), "parse_config")
    assert text.stdout.splitlines()[0] == "src/parser.py:14: function parse_config"


def test_rebuild_replaces_changed_and_drops_deleted_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(GOLDEN_CORPUS, src)
    index = tmp_path / "index"
    assert kotadb("build", str(src), "--out", str(index), "--workers", "1").returncode == 0
    (src / "src" / "reparser.rb").unlink()
    (src / "docs" / "notes.md").write_text("nothing to see\n", "utf-8")
    (src / "docs" / "new.txt").write_text("a fresh Parser\n", "utf-8")
    proc = kotadb("build", str(src), "--out", str(index), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(kotadb("stats", str(index), "--json").stdout)
    assert stats["documents"] == 9
    found = kotadb("search", str(index), "parser", "--all", "--json")
    records = [json.loads(line) for line in found.stdout.splitlines()]
    paths = {r["data"]["path"]["text"] for r in records if r["type"] == "begin"}
    assert "src/reparser.rb" not in paths and "docs/notes.md" not in paths
    assert "docs/new.txt" in paths


@pytest.mark.parametrize("flags", [["--all"], ["--all", "--context", "2"], ["--all", "--json"], ["--count"]])
def test_a_stream_split_over_a_forked_worker_prints_what_one_process_prints(
    built: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    flags: list[str],
) -> None:
    from services.cli import index as index_cli
    from services.cli.main import main

    _, index = built
    argv = ["index", "search", str(index), r"\w+", "--regex", "--color", "never", *flags]
    assert main(argv) == 0
    whole = capfd.readouterr()
    monkeypatch.setattr(index_cli, "SPLIT_MIN", 1)  # every stream splits, into a forked child
    assert main(argv) == 0
    split = capfd.readouterr()
    # Elapsed times (in --json's end and summary records) are the only bytes that may differ.
    same = ripgrep.comparable(split.out.encode(), sizes_known=True)
    assert same == ripgrep.comparable(whole.out.encode(), sizes_known=True) and whole.out
    # Searched, not matched at the start: a forked child of a process that has used gRPC may
    # print gRPC's fork warning on stderr first.
    totals = re.compile(r"^\d+ files, \d+ lines; \d+ candidates, \d+ verified", re.MULTILINE)
    assert totals.search(split.err)[0] == totals.search(whole.err)[0]  # type: ignore[index]


@pytest.fixture(scope="module")
def rg_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("rg")
    src = ripgrep.write_tree(base / "src")
    index = base / "index"
    proc = kotadb("build", str(src), "--out", str(index), "--workers", "1", "--no-symbols")
    assert proc.returncode == 0, proc.stderr
    return src, index


RG_FLAGS = [[], ["--context", "2"], ["--json"], ["--json", "--context", "2"]]


@pytest.mark.parametrize("flags", RG_FLAGS, ids=["plain", "context", "json", "json-context"])
@pytest.mark.parametrize("mode", ["page", "all"])
def test_search_prints_ripgrep_s_bytes(rg_tree: tuple[Path, Path], flags: list[str], mode: str) -> None:
    src, index = rg_tree
    extra = ["--all"] if mode == "all" else []
    command = ["index", "search", str(index), ripgrep.PATTERN, "--regex", "--color", "never"]
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", *command, *extra, *flags],
        cwd=REPO,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    as_json = "--json" in flags
    paths = ripgrep.printed_paths(proc.stdout, as_json)
    assert set(paths) == ripgrep.matching_paths(src) and len(paths) == len(set(paths))
    rg_flags = ["--json" if f == "--json" else f for f in flags]
    expected = ripgrep.ripgrep(src, rg_flags, paths)
    # The stream knows each file's size (ripgrep's bytes_searched); a ranked page does not.
    sizes = mode == "all"
    ours = ripgrep.comparable(proc.stdout, sizes_known=sizes)
    assert ours == ripgrep.comparable(expected, sizes_known=sizes)
    if as_json:
        types = ripgrep.record_types(proc.stdout)
        assert types[0] == "begin" and types[-1] == "summary" and types.count("begin") == len(paths)


@pytest.mark.parametrize("context", [0, 2])
def test_the_native_renderer_prints_the_printer_s_bytes(rg_tree: tuple[Path, Path], context: int) -> None:
    from services.cli.render import Printer, from_groups
    from services.search.engine import Index, Searcher, _fastscan

    _, index = rg_tree
    printer = Printer(color=False, context=context, as_json=False)
    compared = 0
    with Index.open(index) as opened, Searcher(opened).stream(ripgrep.PATTERN, regex=True) as found:
        for file in found.files(0, found.candidates):
            if not file.groups:
                continue
            path = file.path.encode()
            native = _fastscan.render_lines(file.content, file.groups, path, False, context)
            printer.printed_any = False
            assert native == printer.render(from_groups(file.path, file.content, file.groups, context))
            compared += 1
    assert compared == len(ripgrep.matching_paths(rg_tree[0]))


@pytest.mark.parametrize("mode", [[], ["--all"]], ids=["page", "all"])
def test_colour_only_adds_escapes_to_what_ripgrep_prints(rg_tree: tuple[Path, Path], mode: list[str]) -> None:
    _, index = rg_tree
    argv = [str(index), ripgrep.PATTERN, "--regex", "--context", "2", *mode]
    plain = kotadb("search", *argv, "--color", "never")
    colored = kotadb("search", *argv, "--color", "always")
    assert plain.returncode == colored.returncode == 0, colored.stderr
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored.stdout) == plain.stdout
    # Paths, line numbers (of context lines too) and every match are coloured.
    assert "\x1b[35msrc/edges.txt\x1b[0m-\x1b[32m2\x1b[0m-line 2\n" in colored.stdout
    top = "\x1b[35msrc/edges.txt\x1b[0m:\x1b[32m1\x1b[0m:\x1b[1;31mParser\x1b[0m at the top\n"
    assert top in colored.stdout
    assert colored.stdout.count("\x1b[1;31m") == plain.stdout.count("Parser") + plain.stdout.count("Parsing")


# What ripgrep's JSON escapes and line ends can make of a line, around ripgrep.PATTERN: control
# bytes (ESC, DEL, backspace, unit separator, a form feed), quotes and backslashes inside and
# next to a match, a match in the last bytes of a file without a trailing newline, CRLF with
# context lines, and multi-byte text before, between and after two matches on one line.
JSON_TREE = {
    "a/escapes.txt": 'say "Parser"\\\\ here\x01\x1b[0m\x7f Parsing\n\tctl\x0c Parser\x08\n\x1fnext\nlast\n',
    "a/tail.txt": "first\nsecond\nthird\nfourth Parsing",
    "b/crlf.md": "Parser\r\nctx\r\n\r\nmore\r\nfill\r\nfill\r\nParsing é\r\nafter\r\n",
    "b/wide.txt": "日本語 Parser 한국어 Parsing ☃\nπ\nλ\nμ\nδ\nξ Parser\n",
    "c/none.txt": "nothing to see\n",
}


@pytest.fixture(scope="module")
def json_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("rgjson")
    for name, text in JSON_TREE.items():
        (base / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "src" / name).write_bytes(text.encode())
    index = base / "index"
    proc = kotadb("build", str(base / "src"), "--out", str(index), "--workers", "1", "--no-symbols")
    assert proc.returncode == 0, proc.stderr
    return base / "src", index


@pytest.mark.parametrize("split", [False, True], ids=["one-process", "forked"])
@pytest.mark.parametrize("context", [0, 2])
def test_native_json_stream_prints_ripgrep_s_json(
    json_tree: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capfdbinary: pytest.CaptureFixture[bytes],
    context: int,
    split: bool,
) -> None:
    # `--all --json` renders in C (the forked worker's half too), byte for byte as `rg --json`.
    from services.cli import index as index_cli
    from services.cli.main import main

    src, index = json_tree
    if split:
        monkeypatch.setattr(index_cli, "SPLIT_MIN", 1)
    argv = ["index", "search", str(index), ripgrep.PATTERN, "--regex", "--all", "--json"]
    assert main([*argv, "--context", str(context)]) == 0
    out = capfdbinary.readouterr().out
    paths = ripgrep.printed_paths(out, True)
    assert paths == sorted(set(JSON_TREE) - {"c/none.txt"})
    expected = ripgrep.ripgrep(src, ["--json", "--context", str(context)], paths)
    assert ripgrep.comparable(out, sizes_known=True) == ripgrep.comparable(expected, sizes_known=True)
    assert b"\\u0001\\u001b[0m\x7f" in out and b'"text":"fourth Parsing"}' in out  # as serde_json
    # Elapsed times are blanked above, but not the order of their keys (sorted in the summary).
    keys = re.compile(rb'"(?:elapsed|elapsed_total)":\{"(\w+)":\S+?,"(\w+)":\S+?,"(\w+)"')
    assert keys.findall(out) == keys.findall(expected) != []


@pytest.mark.parametrize("tree", ["rg", "json"])
@pytest.mark.parametrize("context", [0, 1, 2])
def test_the_native_json_renderer_prints_the_printer_s_json(
    request: pytest.FixtureRequest, tree: str, context: int
) -> None:
    from services.cli.render import Printer, from_groups, json_text
    from services.search.engine import Index, Searcher, _fastscan

    src, index = request.getfixturevalue(f"{tree}_tree")
    printer = Printer(color=False, context=context, as_json=True)
    counted = {"lines": 0, "matches": 0, "printed": 0, "size": 0}
    compared = 0
    with Index.open(index) as opened, Searcher(opened).stream(ripgrep.PATTERN, regex=True) as found:
        for file in found.files(0, found.candidates):
            path = json_text(file.path)
            content, groups = file.content, file.groups
            native, lines, matches, printed, _ = _fastscan.render_json(content, groups, path, context)
            python = printer.render(from_groups(file.path, content, groups, context))
            assert _blank(native) == _blank(python)
            assert _blank(_fastscan.render_lines(content, groups, path, True, context)) == _blank(native)
            assert printed == len(native) - len(native.splitlines(keepends=True)[-1])
            for key, value in (("lines", lines), ("matches", matches), ("printed", printed)):
                counted[key] += value
            counted["size"] += len(file.content)
            compared += 1
    assert compared == len(ripgrep.matching_paths(src))
    stats = printer.stats
    expected = [stats.matched_lines, stats.matches, stats.bytes_printed, stats.bytes_searched]
    assert list(counted.values()) == expected


def _blank(records: bytes) -> bytes:
    return ripgrep.comparable(records, sizes_known=True)


def test_build_refuses_a_segment_size_out_of_range(tmp_path: Path) -> None:
    for size in ("0", "1025"):
        proc = kotadb("build", str(GOLDEN_CORPUS), "--out", str(tmp_path / "index"), "--segment-mb", size)
        assert proc.returncode != 0
        assert "--segment-mb must be between 1 and 1024" in proc.stderr
        assert not (tmp_path / "index").exists()
