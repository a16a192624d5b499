"""searchcold holds the `kotadb bench search` columns that run our search as a user at a shell does.

`CliPeer` runs `kotadb index search` as a new process per query, exactly what a user types
(every matching line with `--all`, `--count`, or the default ranked first page), so it is timed
like csearch and ripgrep: interpreter start, imports, index open, search and output included.
The first page is not csearch's output (50 ranked files with context, not every line), but it
is what a user gets by default, so it is held to the same "csearch + 0.1 s" bound as `--all`.
`RipgrepCountPeer` is ripgrep's counting mode (`rg -c`), the peer of `--count`. `render_stream`
is the warm, in-process twin of `--all` / `--count`: the stream the CLI prints, rendered into
memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.bench.measure import ProcessRun, run_process
from services.bench.ripgrep import ripgrep_argv
from services.search.engine import _fastscan
from services.search.engine.search.searcher import Searcher


class CliPeer:
    """CliPeer times `kotadb index search INDEX --regex` as a new process, in one output mode.

    `mode` is "all" (`--all`), "count" (`--count`) or "page" (no flag: the ranked first page).
    """

    NAMES = {"all": "kotadb-cli", "count": "kotadb-cli-count", "page": "kotadb-cli-page"}

    def __init__(self, index_dir: Path, *, mode: str) -> None:
        if mode not in self.NAMES:
            raise ValueError(f"unknown CLI mode {mode!r}")
        self.index_dir = index_dir
        self.mode = mode
        self.name = self.NAMES[mode]

    def query(self, pattern: str) -> ProcessRun:
        """query runs one search in a fresh interpreter and returns its timing and line count."""
        argv = [sys.executable, "-m", "services.cli", "index", "search", str(self.index_dir), "--regex"]
        if self.mode != "page":
            argv.append(f"--{self.mode}")
        argv += ["--color", "never", "--", pattern]
        return run_process(argv, ok_codes=(0, 1))

    def supports(self, pattern: str) -> bool:
        """supports is always true: the CLI takes RE2 patterns as they are."""
        del pattern
        return True


class RipgrepCountPeer:
    """RipgrepCountPeer times ripgrep counting matching lines per file (`rg -c`)."""

    name = "ripgrep-count"

    def __init__(self, corpus: str | Path) -> None:
        self.corpus = Path(corpus)

    def query(self, pattern: str) -> ProcessRun:
        """query runs `rg -c` over the corpus."""
        argv = ripgrep_argv(pattern, ["."], line_numbers=False)
        argv.insert(1, "--count")
        return run_process(argv, cwd=self.corpus, ok_codes=(0, 1))

    def supports(self, pattern: str) -> bool:
        """supports reports whether ripgrep can run pattern with RE2's meaning."""
        from services.bench.ripgrep import RipgrepPeer

        return RipgrepPeer(self.corpus).supports(pattern)


def render_stream(searcher: Searcher, pattern: str, *, lines: bool) -> tuple[int, int]:
    """render_stream renders what `--all` (or `--count`) prints, in memory; returns (files, lines)."""
    out: list[bytes] = []
    with searcher.stream(pattern, regex=True, lines=lines) as found:
        for file in found:
            path = file.path.encode()
            if lines and file.groups:
                out.append(_fastscan.render_lines(file.content, file.groups, path, False, 0))
            else:
                out.append(b"%s:%d\n" % (path, file.line_count))
        return found.file_count, found.match_count
