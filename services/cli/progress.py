"""Progress: one status line on stderr for long client commands (push, job watching).

On a terminal the line is redrawn in place at most ten times a second; into a file or pipe a line
is written every few seconds instead, so logs stay short. Stdout is never touched.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(count: float) -> str:
    """human_bytes renders a byte count with a binary unit: `512 B`, `3.4 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Progress tracks files and bytes done against totals and draws them with rate and ETA."""

    def __init__(self, label: str, *, stream: TextIO | None = None, interval: float | None = None) -> None:
        self._label = label
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._interval = interval if interval is not None else (0.1 if self._tty else 5.0)
        self._start = time.monotonic()
        # The first line waits one interval too: a command that fails at once prints only its error.
        self._last_draw = self._start
        self._drawn = False
        self.files_done = 0
        self.files_total = 0
        self.bytes_done = 0
        self.bytes_total = 0

    def update(
        self,
        *,
        files_done: int | None = None,
        files_total: int | None = None,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
    ) -> None:
        """update records new counts and redraws when the drawing interval has passed."""
        if files_done is not None:
            self.files_done = files_done
        if files_total is not None:
            self.files_total = files_total
        if bytes_done is not None:
            self.bytes_done = bytes_done
        if bytes_total is not None:
            self.bytes_total = bytes_total
        now = time.monotonic()
        if now - self._last_draw >= self._interval:
            self._last_draw = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        """line is the current status text: files, bytes, rate and estimated time left."""
        elapsed = max((now if now is not None else time.monotonic()) - self._start, 1e-6)
        rate = self.bytes_done / elapsed
        files = (
            f"{self.files_done}/{self.files_total} files" if self.files_total else f"{self.files_done} files"
        )
        size = human_bytes(self.bytes_done)
        if self.bytes_total:
            size += f"/{human_bytes(self.bytes_total)}"
        text = f"{self._label}: {files}, {size}, {human_bytes(rate)}/s"
        if self.bytes_total and rate > 0 and self.bytes_done < self.bytes_total:
            text += f", ETA {_clock((self.bytes_total - self.bytes_done) / rate)}"
        return text

    def clear(self) -> None:
        """clear removes a drawn terminal line (before an error is printed in its place)."""
        if self._tty and self._drawn:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()

    def _draw(self, now: float) -> None:
        self._drawn = True
        if self._tty:
            self._stream.write("\r\x1b[2K" + self.line(now))
        else:
            self._stream.write(self.line(now) + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """finish draws the final state and ends the line."""
        if self._tty:
            self._stream.write("\r\x1b[2K" + self.line() + "\n")
        else:
            self._stream.write(self.line() + "\n")
        self._stream.flush()
