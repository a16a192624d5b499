"""Child-process supervision for `kotadb dev`: start, watch, and stop without leaving strays.

Each child runs in its own session (so its own process group): a Ctrl-C in the terminal reaches
only the supervising process, which then stops the children itself, in reverse start order,
with SIGTERM to the whole group, a grace period, then SIGKILL to whatever is left of the group.
On Linux every child also gets PR_SET_PDEATHSIG, so even a SIGKILLed supervisor takes its
children with it.

Things that are not plain child processes (the embedded Postgres cluster, which daemonizes) join
the same ordered shutdown as named stop callbacks.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psutil

# Seconds a child gets between SIGTERM and SIGKILL. The services finish in-flight calls within
# their own grace period (a few seconds); this leaves room for that plus pool shutdown.
DEFAULT_GRACE = 15.0

_PR_SET_PDEATHSIG = 1

# What signal.signal returns: a Python handler, SIG_DFL/SIG_IGN, or None.
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class StopRequested(BaseException):
    """StopRequested is raised in the main thread when SIGTERM or SIGINT asks the stack to stop.

    Like KeyboardInterrupt it derives from BaseException, so `except Exception` blocks on the
    way up do not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class ChildExited(RuntimeError):
    """ChildExited reports a supervised child that stopped while it should have been running."""

    def __init__(self, child: ChildProcess) -> None:
        super().__init__(f"{child.name} exited with status {child.returncode}")
        self.child = child


# Resolved once, in the parent: between fork and exec the child should do as little as possible
# (other threads of the parent, e.g. gRPC's, may hold locks that dlopen would need).
_prctl: Callable[..., int] | None = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None

_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """_die_with_parent runs in the forked child before exec: SIGTERM it if the parent dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class ChildProcess:
    """ChildProcess is one supervised subprocess, the leader of its own process group."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        """start launches the process with stdout and stderr appended to log_path."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        # The death signal is set by util-linux's `setpriv` exec'ing the real command rather than by a
        # `preexec_fn`: a preexec_fn forces a plain fork() of this process, and forking a process with
        # gRPC threads running makes the child abort now and then in gRPC's poller (grpc/grpc#43055).
        # Without a preexec_fn, subprocess uses vfork/posix_spawn, which gRPC tolerates.
        argv, preexec = list(self.argv), None
        if _SETPRIV is not None:
            argv = [_SETPRIV, "--pdeathsig", "TERM", "--", *argv]
        else:
            preexec = _die_with_parent
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(self.env) if self.env is not None else None,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=preexec,
        )

    @property
    def pid(self) -> int:
        """pid is the child's process id (also its process group id)."""
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """returncode is the exit status once the child has exited, else None."""
        return None if self.popen is None else self.popen.poll()

    def alive(self) -> bool:
        """alive reports whether the child has been started and has not exited."""
        return self.popen is not None and self.popen.poll() is None

    def group_members(self) -> list[int]:
        """group_members lists live processes in the child's process group, leader included."""
        if self.popen is None:
            return []
        members: list[int] = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(proc.pid) == self.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    members.append(proc.pid)
        return members

    def stop(self, grace: float = DEFAULT_GRACE) -> int | None:
        """stop sends SIGTERM to the group, waits up to grace seconds, then SIGKILLs the rest.

        Returns the leader's exit status. Members of the group that outlive the leader are
        killed too, so nothing the child started survives it.
        """
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait()
        deadline = time.monotonic() + grace
        while self.group_members() and time.monotonic() < deadline:
            _signal_group(self.pid, signal.SIGTERM)
            time.sleep(0.1)
        _signal_group(self.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.popen.returncode

    def log_tail(self, lines: int = 30) -> str:
        """log_tail returns the last lines of the child's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _signal_group(pgid: int, signum: int) -> None:
    """_signal_group signals a process group, ignoring a group that no longer exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


@dataclass
class _Callback:
    """_Callback is a named stop action for something that is not a plain child process."""

    name: str
    stop: Callable[[], None]


class Supervisor:
    """Supervisor starts children in order and stops them in reverse order.

    Use it as a context manager: leaving the block (normally, by exception, or by
    StopRequested from a signal) stops everything that was started.
    """

    def __init__(self, grace: float = DEFAULT_GRACE) -> None:
        self.grace = grace
        self._entries: list[ChildProcess | _Callback] = []
        self._stopping = False
        self._previous_handlers: dict[int, _Handler] = {}

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    @property
    def children(self) -> list[ChildProcess]:
        """children lists the started child processes in start order."""
        return [entry for entry in self._entries if isinstance(entry, ChildProcess)]

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ChildProcess:
        """spawn starts a child process and adds it to the shutdown order."""
        child = ChildProcess(name=name, argv=argv, log_path=log_path, env=env, cwd=cwd)
        child.start()
        self._entries.append(child)
        return child

    def on_stop(self, name: str, stop: Callable[[], None]) -> None:
        """on_stop adds a stop callback (e.g. for a daemonized database) to the shutdown order."""
        self._entries.append(_Callback(name, stop))

    def check(self) -> None:
        """check raises ChildExited if any child has exited on its own."""
        for child in self.children:
            if not child.alive():
                raise ChildExited(child)

    def handle_signals(self) -> None:
        """handle_signals makes SIGTERM and SIGINT raise StopRequested in the main thread.

        The first signal raises; later ones (a second Ctrl-C while stopping) are ignored so the
        orderly shutdown is not cut short.
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def restore_signals(self) -> None:
        """restore_signals puts back the handlers handle_signals replaced."""
        for signum, handler in self._previous_handlers.items():
            # None means a handler not installed from Python; the default is the closest match.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """_on_signal turns the first stop signal into StopRequested."""
        if self._stopping:
            return
        self._stopping = True
        raise StopRequested(signum)

    def stop_all(self, log: Callable[[str], None] | None = None) -> None:
        """stop_all stops every child and callback in reverse start order; safe to call twice."""
        self._stopping = True
        while self._entries:
            entry = self._entries.pop()
            if log is not None:
                log(f"stopping {entry.name}")
            try:
                if isinstance(entry, ChildProcess):
                    entry.stop(self.grace)
                else:
                    entry.stop()
            except Exception as exc:  # keep stopping the rest; report what failed
                if log is not None:
                    log(f"stopping {entry.name} failed: {exc}")
