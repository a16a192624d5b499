"""`kotadb bench search`'s summary: the per-query "time over csearch" bound and its worst row.

A median ratio to csearch can hide the query csearch answers in a few ms while we pay Python's
start-up; the issue bounds every query at csearch's time plus 0.1 s, so the report carries the
difference per query, its worst, and a target on it.
"""

from __future__ import annotations

from typing import Any

from services.bench import search
from services.bench.searchreport import render_search_table


def _row(pattern: str, cli_ms: float, csearch_ms: float) -> dict[str, Any]:
    def timing(ms: float) -> dict[str, float]:
        return {"p50_ms": ms}

    row: dict[str, Any] = {
        "pattern": pattern,
        "files": 1,
        "lines": 1,
        "first_page": timing(2.0),
        "first_page_samples_ms": [2.0, 2.0],
        "exhaustive": timing(5.0),
        "stream": timing(4.0),
        "count": timing(3.0),
        "peers": {"kotadb-cli": timing(cli_ms), "csearch": timing(csearch_ms)},
    }
    row["ratios"] = search._ratios(row)
    row["differences_ms"] = search._differences(row)
    return row


def _report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    report: dict[str, Any] = {"queries": rows, "peer_names": ["kotadb-cli", "csearch"], "build": {}}
    search._summarise(report, corpus_bytes=1)
    return report


def _target(report: dict[str, Any], name: str) -> dict[str, Any]:
    targets: list[dict[str, Any]] = [t for t in report["targets"] if t["name"] == name]
    (target,) = targets
    return target


def test_a_good_median_does_not_hide_a_query_past_csearch_plus_100_ms() -> None:
    # Two queries far faster than csearch and one csearch answers in 5 ms that takes us 120 ms.
    report = _report([_row("a", 100.0, 400.0), _row("b", 90.0, 300.0), _row("c", 120.0, 5.0)])
    assert report["medians"]["ratios"]["cli / csearch"] < 1.0
    assert _target(report, "cli --all: median of per-query ratio to csearch")["met"] is True
    over = _target(report, "cli --all: worst per-query time over csearch")
    assert over["measured"] == 115.0
    assert over["met"] is False
    assert report["worst"]["differences_ms"]["cli - csearch"] == 115.0
    assert report["medians"]["differences_ms"]["cli - csearch"] == -210.0


def test_every_query_within_the_bound_meets_it_and_the_table_shows_the_column() -> None:
    report = _report([_row("a", 100.0, 400.0), _row("c", 60.0, 5.0)])
    assert _target(report, "cli --all: worst per-query time over csearch")["met"] is True
    lines = render_search_table(report).splitlines()
    assert any(line.startswith("query") and "cli - csearch ms" in line for line in lines)
    worst = [line for line in lines if line.startswith("WORST")][-1]
    # The WORST row of the process table carries the largest difference, 55.0 ms.
    assert "55.0" in worst.split()


def test_a_query_without_a_csearch_time_has_no_difference() -> None:
    row = _row("a", 100.0, 400.0)
    del row["peers"]["csearch"]
    assert search._differences(row) == {"cli - csearch": None, "page - csearch": None}


def test_the_first_page_column_is_shown_with_its_difference_and_held_to_the_same_bound() -> None:
    row = _row("a", 100.0, 5.0)
    row["peers"]["kotadb-cli-page"] = {"p50_ms": 130.0}
    row["differences_ms"] = search._differences(row)
    report = _report([row])
    assert report["worst"]["differences_ms"]["page - csearch"] == 125.0
    # What a user types by default (a ranked page) and `--all` (csearch's output) each have
    # the +0.1 s bound: here `--all` meets it and the page does not.
    assert _target(report, "cli --all: worst per-query time over csearch")["met"] is True
    page = _target(report, "cli page (the default ranked first page): worst per-query time over csearch")
    assert page["measured"] == 125.0 and page["met"] is False
    lines = render_search_table(report).splitlines()
    assert any("cli page" in line and "page - csearch ms" in line for line in lines)
