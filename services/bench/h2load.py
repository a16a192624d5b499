"""h2load runs nghttp2's `h2load` load generator and reads back what it measured.

Why a C load generator: a Python gRPC client spends more CPU per call than the auth service's
lean Check listener does, so on a small machine Python clients measure themselves. h2load costs
a few microseconds per request, so a closed loop driven by it shows the server's ceiling.

What is read: the summary lines h2load prints (requests started, done, succeeded, failed,
errored, timed out; status classes; the rate it reports) and the per-request `--log-file`
(start time in microseconds since the epoch, HTTP status, microseconds until the response
ended). Latencies come from the log file. Two caveats the report repeats: h2load's start time
is when the request was *sent*, not when an open-loop schedule wanted it sent (a stalled server
delays sending, which hides part of its queueing delay), and h2load sees only HTTP statuses
(a gRPC answer is HTTP 200 whatever its grpc-status or its payload says), so callers check
the answers themselves.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

H2LOAD = "h2load"
INSTALL_HINT = "h2load (nghttp2's load generator) is needed: apt-get install nghttp2-client"
# How long past its nominal duration an h2load run may take before it counts as hung.
SLACK_SECONDS = 60.0

_REQUESTS = re.compile(
    r"requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored, "
    r"(?P<timeout>\d+) timeout"
)
_FINISHED = re.compile(r"finished in (?P<seconds>[\d.]+)(?P<unit>us|ms|s), (?P<rate>[\d.]+) req/s")
_STATUS_CLASSES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


class H2loadMissing(RuntimeError):
    """H2loadMissing says h2load is not installed, and how to install it."""


def find_h2load() -> str:
    """find_h2load is the path of the h2load executable; H2loadMissing when there is none."""
    path = shutil.which(H2LOAD)
    if path is None:
        raise H2loadMissing(INSTALL_HINT)
    return path


@dataclasses.dataclass(frozen=True)
class H2loadRun:
    """H2loadRun is one finished h2load run: its own counts and every logged request.

    `seconds` is the measured phase: the `-D` duration, or h2load's own time for `-n`; `starts_us`,
    `statuses` and `latencies_us` are the log file's columns, one entry per finished request.
    """

    argv: tuple[str, ...]
    seconds: float
    reported_per_s: float
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_classes: dict[str, int]
    starts_us: tuple[int, ...]
    statuses: tuple[int, ...]
    latencies_us: tuple[int, ...]

    @property
    def latencies_s(self) -> list[float]:
        """latencies_s is the logged latencies in seconds."""
        return [value * 1e-6 for value in self.latencies_us]

    def status_counts(self) -> dict[str, int]:
        """status_counts counts the logged requests by HTTP status (-1: no response)."""
        counts: dict[str, int] = {}
        for status in self.statuses:
            counts[str(status)] = counts.get(str(status), 0) + 1
        return dict(sorted(counts.items()))


def parse_summary(stdout: str) -> dict[str, float]:
    """parse_summary reads the summary lines h2load prints; ValueError when they are missing."""
    requests = _REQUESTS.search(stdout)
    finished = _FINISHED.search(stdout)
    if requests is None or finished is None:
        raise ValueError(f"h2load printed no summary:\n{stdout[-2000:]}")
    summary: dict[str, float] = {name: int(value) for name, value in requests.groupdict().items()}
    summary["seconds"] = float(finished["seconds"]) * _UNIT_SECONDS[finished["unit"]]
    summary["reported_per_s"] = float(finished["rate"])
    classes = _STATUS_CLASSES.search(stdout)
    for index, name in enumerate(("2xx", "3xx", "4xx", "5xx")):
        summary[name] = int(classes.group(index + 1)) if classes else 0
    return summary


def parse_log(text: str) -> tuple[list[int], list[int], list[int]]:
    """parse_log splits h2load's tab-separated log into start times, statuses and latencies (us)."""
    starts: list[int] = []
    statuses: list[int] = []
    latencies: list[int] = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        starts.append(int(fields[0]))
        statuses.append(int(fields[1]))
        latencies.append(int(fields[2]))
    return starts, statuses, latencies


def run(
    url: str,
    *,
    clients: int = 1,
    streams: int = 1,
    seconds: float | None = None,
    requests: int | None = None,
    rps: float | None = None,
    warm_up: float | None = None,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    h1: bool = False,
    work_dir: Path | None = None,
) -> H2loadRun:
    """run drives `url` with h2load and returns what it measured.

    Exactly one of `seconds` (a timed `-D` run) and `requests` (`-n`) bounds the run. `body`
    makes every request a POST of those bytes; `h1` forces HTTP/1.1 with keep-alive.
    """
    if (seconds is None) == (requests is None):
        raise ValueError("h2load.run needs exactly one of seconds and requests")
    argv = [find_h2load(), "-t", "1", "-c", str(clients), "-m", str(streams)]
    if seconds is not None:
        argv += ["-D", f"{seconds:g}"]
        if warm_up:
            argv += ["--warm-up-time", f"{warm_up:g}"]
    else:
        argv += ["-n", str(requests)]
    if rps is not None:
        argv += ["--rps", f"{rps:g}"]
    if h1:
        argv.append("--h1")
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    with tempfile.TemporaryDirectory(prefix="h2load-", dir=work_dir) as scratch:
        log_path = Path(scratch) / "requests.log"
        argv += ["--log-file", str(log_path)]
        if body is not None:
            body_path = Path(scratch) / "body"
            body_path.write_bytes(body)
            argv += ["-d", str(body_path)]
        argv.append(url)
        limit = (seconds or 0.0) + (warm_up or 0.0) + SLACK_SECONDS
        if requests is not None:
            limit += requests / 100  # even a slow target answers 100 requests a second
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
        if completed.returncode != 0:
            raise RuntimeError(
                f"h2load exited with status {completed.returncode}: "
                f"{(completed.stderr or completed.stdout).strip()[-1000:]}"
            )
        summary = parse_summary(completed.stdout)
        starts, statuses, latencies = parse_log(log_path.read_text() if log_path.exists() else "")
    return H2loadRun(
        argv=tuple(argv),
        # A `-D` run's summary counts the warm-up in its time but not in its requests.
        seconds=seconds if seconds is not None else summary["seconds"],
        reported_per_s=summary["reported_per_s"],
        started=int(summary["started"]),
        done=int(summary["done"]),
        succeeded=int(summary["succeeded"]),
        failed=int(summary["failed"]),
        errored=int(summary["errored"]),
        timeout=int(summary["timeout"]),
        status_classes={name: int(summary[name]) for name in ("2xx", "3xx", "4xx", "5xx")},
        starts_us=tuple(starts),
        statuses=tuple(statuses),
        latencies_us=tuple(latencies),
    )


def grpc_frame(message: bytes) -> bytes:
    """grpc_frame is a gRPC length-prefixed message: not compressed, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


GRPC_HEADERS: Mapping[str, str] = {"content-type": "application/grpc", "te": "trailers"}


def describe(argv: Sequence[str]) -> str:
    """describe is an h2load command line with its temporary file arguments elided, for the report."""
    shown: list[str] = ["h2load"]
    skip = False
    for arg in argv[1:]:
        shown.append("FILE" if skip else arg)
        skip = not skip and arg in ("--log-file", "-d")
    return shlex.join(shown)
