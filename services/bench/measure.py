"""Measurement primitives for benchmarks: timed child processes, timed calls, and summaries.

Peak RSS comes from GNU time (`/usr/bin/time -f %M`) wrapped around the child. Reading
`ru_maxrss` from `os.wait4` directly looks simpler but is wrong: Python starts children with
vfork, and Linux carries the parent's high-water mark into the child across exec, so every
child appeared to use at least as much memory as the benchmark process (ripgrep on the stdlib
corpus read 14-101 MiB, growing with the parent; GNU time reports 7 MiB). Output is read through a pipe and
counted instead of being sent to /dev/null: ripgrep notices /dev/null and stops at the first
match, which would make it look far faster than it is.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

GNU_TIME = "/usr/bin/time"

# Large reads keep the number of Python-level loop iterations (our overhead, not the peer's)
# small when a query prints tens of megabytes.
_READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ProcessRun:
    """ProcessRun is one finished child process: wall time, peak RSS, exit code and output size.

    `output` holds the child's standard output only when the caller asked to keep it;
    `output_lines` counts newline-terminated lines either way.
    """

    seconds: float
    peak_rss_bytes: int
    returncode: int
    output_bytes: int
    output_lines: int
    output: bytes = b""
    stderr: str = ""


@dataclass(frozen=True, slots=True)
class PeerBuild:
    """PeerBuild is what building one index cost: wall time, size on disk and peak RSS.

    `detail` carries peer-specific figures (load vs. index time, sizes by part).
    """

    seconds: float
    index_bytes: int
    peak_rss_bytes: int
    detail: dict[str, int | float | str] = field(default_factory=dict)


class ProcessFailed(RuntimeError):
    """ProcessFailed reports a benchmark child that exited with an unexpected status."""

    def __init__(self, argv: Sequence[str], run: ProcessRun) -> None:
        self.argv = list(argv)
        self.run = run
        super().__init__(
            f"{argv[0]} exited with status {run.returncode}: {run.stderr.strip()[-500:] or '(no stderr)'}"
        )


def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    keep_output: bool = False,
    ok_codes: tuple[int, ...] = (0,),
    stderr_path: str | Path | None = None,
    measure_rss: bool = False,
) -> ProcessRun:
    """run_process runs argv to completion and returns its wall time and peak RSS.

    The child's stdout is drained through a pipe (kept when `keep_output`), stderr goes to
    `stderr_path` when given (so a progress bar does not fill a pipe nobody reads) and is
    otherwise captured into memory. With `measure_rss` the child runs under GNU time and
    `peak_rss_bytes` is its high-water mark (0 otherwise); GNU time's own fork and exec add
    about a millisecond, so query timings are taken without it. An exit code outside
    `ok_codes` raises ProcessFailed.
    """
    full_env = dict(os.environ)
    if env is not None:
        full_env.update(env)
    rss_file: Path | None = None
    if measure_rss:
        fd, rss_name = tempfile.mkstemp(prefix="kotadb-rss-")
        os.close(fd)
        rss_file = Path(rss_name)
        argv = [GNU_TIME, "-f", "%M", "-o", rss_name, "--", *argv]
    err_target = Path(stderr_path) if stderr_path is not None else None
    err_file = open(err_target, "wb") if err_target is not None else None  # noqa: SIM115
    try:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=err_file if err_file is not None else subprocess.PIPE,
            env=full_env,
            cwd=cwd,
        )
        assert proc.stdout is not None
        chunks: list[bytes] = []
        total = 0
        lines = 0
        stderr_text = ""
        while True:
            chunk = proc.stdout.read(_READ_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            lines += chunk.count(b"\n")
            if keep_output:
                chunks.append(chunk)
        if proc.stderr is not None:
            stderr_text = proc.stderr.read().decode("utf-8", "replace")
        proc.wait()
        seconds = time.perf_counter() - started
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    finally:
        if err_file is not None:
            err_file.close()
    if err_target is not None:
        stderr_text = err_target.read_text("utf-8", "replace")[-4000:]
    peak_rss = 0
    if rss_file is not None:
        peak_rss = _read_gnu_time_kib(rss_file) * 1024
        rss_file.unlink(missing_ok=True)
    run = ProcessRun(
        seconds=seconds,
        peak_rss_bytes=peak_rss,
        returncode=proc.returncode,
        output_bytes=total,
        output_lines=lines,
        output=b"".join(chunks),
        stderr=stderr_text,
    )
    if run.returncode not in ok_codes:
        raise ProcessFailed(argv, run)
    return run


def _read_gnu_time_kib(path: Path) -> int:
    # GNU time writes "Command exited with non-zero status N" before the figure on failure.
    for line in reversed(path.read_text("utf-8", "replace").splitlines()):
        if line.strip().isdigit():
            return int(line.strip())
    return 0


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """timed calls fn once and returns (seconds, result) measured with perf_counter."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


@dataclass(frozen=True, slots=True)
class Summary:
    """Summary condenses repeated timings (seconds) into the figures the report prints."""

    runs: int
    min: float
    p50: float
    p99: float
    max: float
    mean: float

    def as_dict(self) -> dict[str, float | int]:
        """as_dict returns the summary as plain JSON-ready values, times in milliseconds."""
        return {
            "runs": self.runs,
            "min_ms": self.min * 1e3,
            "p50_ms": self.p50 * 1e3,
            "p99_ms": self.p99 * 1e3,
            "max_ms": self.max * 1e3,
            "mean_ms": self.mean * 1e3,
        }


def percentile(samples: Sequence[float], fraction: float) -> float:
    """percentile returns the nearest-rank percentile of samples (fraction in [0, 1]).

    Nearest rank never invents a value that was not measured, which matters with the handful
    of runs a benchmark affords: with 5 runs, p99 is simply the slowest run.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} outside [0, 1]")
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summarize(samples: Sequence[float]) -> Summary:
    """summarize computes min, p50 (median), p99, max and mean of samples."""
    if not samples:
        raise ValueError("summarize of no samples")
    return Summary(
        runs=len(samples),
        min=min(samples),
        p50=statistics.median(samples),
        p99=percentile(samples, 0.99),
        max=max(samples),
        mean=statistics.fmean(samples),
    )


def directory_bytes(path: str | Path) -> int:
    """directory_bytes sums the sizes of regular files under path (or of path itself)."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                total += os.stat(full).st_size
    return total
