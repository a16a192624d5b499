"""The search benchmark's report: machine description, targets, a readable table and JSON.

The report is a plain dict (what `--out` writes as JSON) built by services.bench.search;
this module describes the machine, checks the issue's targets against the measured figures
and renders the text table the command prints and BENCHMARKS.md quotes.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

MIB = 1 << 20


def machine() -> dict[str, Any]:
    """machine describes the host: CPU count and model, memory, OS and Python versions."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = 0
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_bytes": ram,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


@dataclass(frozen=True, slots=True)
class Target:
    """Target is one of the issue's goals with the measured value and whether it was met.

    `limit` and `measured` share a unit; `lower_is_better` says which way the bound points.
    `margin` is measured/limit: below 1 is met for lower-is-better targets.
    """

    name: str
    limit: float
    measured: float | None
    unit: str
    lower_is_better: bool = True

    @property
    def met(self) -> bool | None:
        """met is None when the figure could not be measured."""
        if self.measured is None:
            return None
        return self.measured <= self.limit if self.lower_is_better else self.measured >= self.limit

    @property
    def margin(self) -> float | None:
        """margin is measured divided by limit (None when unmeasured or the limit is 0)."""
        if self.measured is None or self.limit == 0:
            return None
        return self.measured / self.limit

    def as_dict(self) -> dict[str, Any]:
        """as_dict returns the target with `met` and `margin` filled in."""
        out = asdict(self)
        out["met"] = self.met
        out["margin"] = self.margin
        return out


def median_or_none(values: Sequence[float | None]) -> float | None:
    """median_or_none is the median of the values that are not None, or None if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ratio is ours/theirs, or None when either is missing or theirs is zero."""
    if ours is None or theirs is None or theirs <= 0:
        return None
    return ours / theirs


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def _peer_ms(row: Mapping[str, Any], peer: str) -> float | None:
    entry = row.get("peers", {}).get(peer)
    if not entry:
        return None
    value = entry.get("p50_ms")
    return None if value is None else float(value)


def render_table(report: Mapping[str, Any]) -> str:
    """render_table formats a report as the fixed-width text the command prints."""
    lines: list[str] = []
    m = report.get("machine", {})
    corpus = report.get("corpus", {})
    lines.append(
        f"machine: {m.get('nproc')} cpus, {m.get('cpu_model')}, {_mib(m.get('ram_bytes'))} MiB RAM; "
        f"corpus: {corpus.get('path')} ({corpus.get('files')} files, {_mib(corpus.get('bytes'))} MiB)"
    )
    lines.append("")
    lines.append("build            seconds   MB/s    peak RSS MiB   index MiB")
    for name, build in report.get("build", {}).items():
        if not build:
            continue
        mbps = build.get("throughput_mb_s")
        lines.append(
            f"{name:<16} {build.get('seconds', 0):>7.2f} {('-' if mbps is None else f'{mbps:.1f}'):>6} "
            f"{_mib(build.get('peak_rss_bytes') or None):>14} {_mib(build.get('index_bytes')):>11}"
        )
    if "kotadb-index" in report.get("build", {}):
        lines.append(
            "(kotadb-index: --no-symbols, what cindex builds; kotadb-symbols: the extra time and "
            "bytes symbols cost; kotadb: the full index the queries use)"
        )
    parts = report.get("build", {}).get("kotadb", {}).get("parts", {})
    if parts:
        lines.append(
            "kotadb index by part (MiB): " + ", ".join(f"{k} {_mib(v)}" for k, v in sorted(parts.items()))
        )
    sym = report.get("symbols")
    if sym:
        lines.append(
            f"symbol extraction: {sym['mb_per_s']:.1f} MB/s over {sym['workers']} workers "
            f"({_mib(sym['bytes'])} MiB, {sym['files']} files, {sym['symbols']} symbols)"
        )
    lines.append("")
    peers = report.get("peer_names", [])
    header = f"{'query':<44} {'files':>6} {'lines':>7} {'first p50':>9} {'first p99':>9} {'exhaust':>8}"
    for peer in peers:
        header += f" {peer:>9}"
    for peer in peers:
        header += f" {'/' + peer:>9}"
    lines.append(header + "   (times in ms, p50 of runs; /peer = our exhaustive / peer)")
    for row in report.get("queries", []):
        pattern = row["pattern"]
        shown = pattern if len(pattern) <= 44 else pattern[:41] + "..."
        text = (
            f"{shown:<44} {row.get('files', 0):>6} {row.get('lines', 0):>7} "
            f"{_ms(row['first_page'].get('p50_ms')):>9} {_ms(row['first_page'].get('p99_ms')):>9} "
            f"{_ms(row['exhaustive'].get('p50_ms')):>8}"
        )
        for peer in peers:
            text += f" {_ms(_peer_ms(row, peer)):>9}"
        for peer in peers:
            text += f" {_ratio(row.get('ratios', {}).get(peer)):>9}"
        lines.append(text)
    med = report.get("medians", {})
    if med:
        text = (
            f"{'MEDIAN':<44} {'':>6} {'':>7} {_ms(med.get('first_page_p50_ms')):>9} "
            f"{_ms(med.get('first_page_p99_ms')):>9} {_ms(med.get('exhaustive_ms')):>8}"
        )
        for peer in peers:
            text += f" {_ms(med.get('peers_ms', {}).get(peer)):>9}"
        for peer in peers:
            text += f" {_ratio(med.get('ratios', {}).get(peer)):>9}"
        lines.append(text)
    targets = report.get("targets", [])
    if targets:
        lines.append("")
        lines.append("targets")
        for t in targets:
            met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            measured = "-" if t["measured"] is None else f"{t['measured']:.3f}"
            bound = "<=" if t["lower_is_better"] else ">="
            margin = "" if t["margin"] is None else f"  (measured/limit = {t['margin']:.2f})"
            limit = f"{bound} {t['limit']:g} {t['unit']}"
            lines.append(f"  {t['name']:<52} {limit:<12} measured {measured:<10} {met}{margin}")
    notes = report.get("notes", [])
    if notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)
