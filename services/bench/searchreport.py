"""The text tables of `kotadb bench search`: builds, then warm and process query timings.

Each query table has one row per pattern and ends with two rows: MEDIAN (the median of the
column over the queries) and WORST (its largest value: the slowest query, or the worst
ratio), so a slow outlier is never hidden behind a good median.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from services.bench.report import MIB

WARM_COLUMNS = (
    ("first_page", "first p50"),
    ("exhaustive", "ranked all"),
    ("stream", "stream"),
    ("count", "count"),
)
PROCESS_COLUMNS = (
    ("kotadb-cli", "cli --all"),
    ("kotadb-cli-count", "cli count"),
    ("csearch", "csearch"),
    ("ripgrep", "ripgrep"),
    ("ripgrep-count", "rg -c"),
    ("pg_trgm", "pg_trgm"),
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def _cell(row: Mapping[str, Any], column: str) -> float | None:
    entry = row.get(column) or row.get("peers", {}).get(column)
    if not entry:
        return None
    value = entry.get("p50_ms")
    return None if value is None else float(value)


def _table(
    report: Mapping[str, Any], title: str, columns: Sequence[tuple[str, str]], ratios: Sequence[str]
) -> list[str]:
    rows = report.get("queries", [])
    present = [(key, label) for key, label in columns if any(_cell(r, key) is not None for r in rows)]
    width = max(10, *(len(label) for _, label in present), *(len(name) for name in ratios))
    lines = [title]
    header = f"{'query':<44} {'files':>6} {'lines':>7}"
    header += "".join(f" {label:>{width}}" for _, label in present)
    header += "".join(f" {name:>{width}}" for name in ratios)
    lines.append(header)
    for row in rows:
        pattern = row["pattern"]
        shown = pattern if len(pattern) <= 44 else pattern[:41] + "..."
        text = f"{shown:<44} {row.get('files', 0):>6} {row.get('lines', 0):>7}"
        text += "".join(f" {_ms(_cell(row, key)):>{width}}" for key, _ in present)
        text += "".join(f" {_ratio(row.get('ratios', {}).get(name)):>{width}}" for name in ratios)
        lines.append(text)
    for label, summary in (("MEDIAN", report.get("medians", {})), ("WORST", report.get("worst", {}))):
        text = f"{label:<44} {'':>6} {'':>7}"
        text += "".join(f" {_ms(summary.get('ms', {}).get(key)):>{width}}" for key, _ in present)
        text += "".join(f" {_ratio(summary.get('ratios', {}).get(name)):>{width}}" for name in ratios)
        lines.append(text)
    return lines


def render_search_table(report: Mapping[str, Any]) -> str:
    """render_search_table formats a `kotadb bench search` report as fixed-width text."""
    lines: list[str] = []
    m = report.get("machine", {})
    corpus = report.get("corpus", {})
    lines.append(
        f"machine: {m.get('nproc')} cpus, {m.get('cpu_model')}, {_mib(m.get('ram_bytes'))} MiB RAM; "
        f"corpus: {corpus.get('path')} ({corpus.get('files')} files, {_mib(corpus.get('bytes'))} MiB)"
    )
    load = report.get("load_before"), report.get("load_after")
    if all(load):
        lines.append(
            "load average (1, 5, 15 min) before the queries: "
            + ", ".join(f"{v:.1f}" for v in load[0] or ())
            + "; after: "
            + ", ".join(f"{v:.1f}" for v in load[1] or ())
        )
    builds = report.get("build", {})
    if builds:
        lines.append("")
        lines.append("build            seconds   MB/s    peak RSS MiB   index MiB")
        for name, build in builds.items():
            mbps = build.get("throughput_mb_s")
            lines.append(
                f"{name:<16} {build.get('seconds', 0):>7.2f} {('-' if mbps is None else f'{mbps:.1f}'):>6} "
                f"{_mib(build.get('peak_rss_bytes') or None):>14} {_mib(build.get('index_bytes')):>11}"
            )
    sym = report.get("symbols")
    if sym:
        lines.append(
            f"symbol extraction: {sym['mb_per_s']:.1f} MB/s over {sym['workers']} workers "
            f"({_mib(sym['bytes'])} MiB, {sym['files']} files, {sym['symbols']} symbols)"
        )
    lines.append("")
    lines += _table(
        report,
        "warm, in one process with the index open (ms, p50 of runs)",
        WARM_COLUMNS,
        ["warm stream / ripgrep", "warm exhaustive / csearch"],
    )
    lines.append("")
    lines += _table(
        report,
        "processes, a new one per query, as typed at a shell (ms, p50 of runs)",
        PROCESS_COLUMNS,
        ["cli / csearch", "cli / ripgrep", "cli count / ripgrep", "cli count / rg -c"],
    )
    targets = report.get("targets", [])
    if targets:
        lines.append("")
        lines.append("targets")
        for t in targets:
            met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            measured = "-" if t["measured"] is None else f"{t['measured']:.3f}"
            bound = "<=" if t["lower_is_better"] else ">="
            lines.append(
                f"  {t['name']:<52} {bound} {t['limit']:g} {t['unit']:<4} measured {measured:<10} {met}"
            )
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
