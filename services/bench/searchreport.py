"""searchreport renders `kotadb bench search` as text: builds, then warm and process query timings.

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
    ("kotadb-cli-page", "cli page"),
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
    report: Mapping[str, Any],
    title: str,
    columns: Sequence[tuple[str, str]],
    ratios: Sequence[str],
    differences: Sequence[str] = (),
) -> list[str]:
    rows = report.get("queries", [])
    present = [(key, label) for key, label in columns if any(_cell(r, key) is not None for r in rows)]
    cells = [(max(9, len(label)), label) for _, label in present]
    cells += [(max(9, len(name) + 3), f"{name} ms") for name in differences]
    cells += [(max(9, len(name)), name) for name in ratios]
    lines = [title, f"{'query':<44} {'files':>6} {'lines':>7}" + "".join(f" {t:>{w}}" for w, t in cells)]

    def values(ms: Mapping[str, Any], ratio_of: Mapping[str, Any], diff_of: Mapping[str, Any]) -> str:
        shown = (
            [_ms(ms.get(key)) for key, _ in present]
            + [_ms(diff_of.get(name)) for name in differences]
            + [_ratio(ratio_of.get(name)) for name in ratios]
        )
        return "".join(f" {v:>{w}}" for (w, _), v in zip(cells, shown, strict=True))

    for row in rows:
        pattern = row["pattern"]
        shown = pattern if len(pattern) <= 44 else pattern[:41] + "..."
        ms = {key: _cell(row, key) for key, _ in present}
        lines.append(
            f"{shown:<44} {row.get('files', 0):>6} {row.get('lines', 0):>7}"
            + values(ms, row.get("ratios", {}), row.get("differences_ms", {}))
        )
    for label, summary in (("MEDIAN", report.get("medians", {})), ("WORST", report.get("worst", {}))):
        lines.append(
            f"{label:<44} {'':>6} {'':>7}"
            + values(summary.get("ms", {}), summary.get("ratios", {}), summary.get("differences_ms", {}))
        )
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
        ["cli - csearch", "page - csearch"],
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
