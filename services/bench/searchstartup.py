"""searchstartup measures how fast `kotadb` starts: `--help`, and a search up to its first index read.

    python -m services.bench.searchstartup INDEX_DIR [--runs N]

Each figure is taken in fresh interpreters (the median of `runs`): the wall time of
`kotadb --help`; and, inside a child that does what `kotadb index search` does before it
touches the index, the time to import the CLI entry point, then the index command and the
engine modules a search needs, then to open the index, pin a snapshot and look up one posting
list (the first index read). Whether numpy was imported by then is reported too: no search
needs it (building and merging do). On a shared machine the CPU time of the child up to its imports and up
to its first read (`*_cpu_ms`) varies less with the load than the wall times do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

# Runs in the child: the steps of `kotadb index search` up to its first read, timed.
_CHILD = """
import json, sys, time
c0, t0 = time.process_time(), time.perf_counter()
from services.cli.main import build_parser
t1 = time.perf_counter()
build_parser("index", ["search"])  # what `kotadb index search` builds
from services.search.engine.index.index import Index
from services.search.engine.search.searcher import Searcher
c2, t2 = time.process_time(), time.perf_counter()
snap = Index.open(sys.argv[1]).snapshot()
snap.segments[0].postings(b"the")
c3, t3 = time.process_time(), time.perf_counter()
print(json.dumps({"main_ms": 1e3 * (t1 - t0), "imports_ms": 1e3 * (t2 - t1), "open_read_ms": 1e3 * (t3 - t2),
                  "imports_cpu_ms": 1e3 * (c2 - c0), "first_read_cpu_ms": 1e3 * (c3 - c0),
                  "numpy": "numpy" in sys.modules}))
"""


def measure(index_dir: str, runs: int) -> dict[str, float | bool]:
    """measure returns the medians of `runs` fresh-process measurements (see the module docstring)."""
    help_ms: list[float] = []
    rows: list[dict[str, float | bool]] = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "services.cli", "--help"], capture_output=True, check=True)
        help_ms.append(1e3 * (time.perf_counter() - started))
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, index_dir], capture_output=True, check=True, text=True
        )
        row = json.loads(out.stdout)
        row["process_ms"] = 1e3 * (time.perf_counter() - started)
        rows.append(row)
    result: dict[str, float | bool] = {"help_ms": statistics.median(help_ms)}
    for key in ("main_ms", "imports_ms", "open_read_ms", "process_ms", "imports_cpu_ms", "first_read_cpu_ms"):
        result[key] = statistics.median(float(row[key]) for row in rows)
    result["first_read_ms"] = (
        float(result["main_ms"]) + float(result["imports_ms"]) + float(result["open_read_ms"])
    )
    result["numpy"] = any(bool(row["numpy"]) for row in rows)
    return result


def main() -> None:
    """main prints the start-up figures of an index as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("index", metavar="INDEX_DIR")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(json.dumps(measure(args.index, args.runs), indent=2))


if __name__ == "__main__":
    main()
