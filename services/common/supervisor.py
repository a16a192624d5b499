"""Child-process supervision for `kotadb dev`: start, watch, and stop without leaving strays.

Each child runs in its own session (so its own process group): a Ctrl-C in the terminal reaches
only the supervising process, which then stops the children itself, in reverse start order,
with SIGTERM to the whole group, a grace period, then SIGKILL to whatever is left of the group.
On Linux every child also gets PR_SET_PDEATHSIG, so even a SIGKILLed supervisor takes its
children with it.

Things that are not plain child processes (the embedded Postgres cluster, which daemonizes) join
the same ordered shutdown as named stop callbacks.

A part may be restartable: a child spawned with `restart=True`, or anything `watch`ed (the
cluster). `check()` then restarts it when it dies, after a backoff that doubles with each attempt
in a row (RestartPolicy), and raises GaveUp, naming the part's log file, once the attempts are
spent. A part that stays up for `stable_after` seconds gets its attempts back. Child logs are
created 0600: services may log what a caller sent.
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
from typing import IO, Any, Protocol

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


class GaveUp(RuntimeError):
    """GaveUp reports a restartable part that kept dying: the restarts are spent.

    Its message names the part's log file (a file, not a directory), where the reason is.
    """

    def __init__(self, name: str, attempts: int, log_path: Path, detail: str = "") -> None:
        super().__init__(
            f"{name} kept exiting{f' ({detail})' if detail else ''}; gave up after {attempts} "
            f"restart attempt{'s' if attempts != 1 else ''}. See its log: {log_path}"
        )
        self.name = name
        self.attempts = attempts
        self.log_path = log_path


@dataclass(frozen=True)
class RestartPolicy:
    """RestartPolicy bounds restarts: `attempts` in a row, waiting `backoff` seconds doubled each time.

    The wait never exceeds `max_backoff`; a part that stays up `stable_after` seconds starts
    counting from zero again, so a crash a day is restarted forever but a crash loop is not.
    """

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 8.0
    stable_after: float = 60.0

    def delay(self, attempt: int) -> float:
        """delay is the wait before restart attempt number `attempt` (1-based)."""
        return float(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))


class Restartable(Protocol):
    """Restartable is what the supervisor needs to watch a part and bring it back."""

    @property
    def name(self) -> str: ...

    @property
    def log_path(self) -> Path: ...

    def alive(self) -> bool: ...

    def restart(self) -> None: ...


@dataclass
class _Watch:
    """_Watch is the restart state of one restartable part."""

    target: Restartable
    failures: int = 0
    up_since: float = field(default_factory=time.monotonic)
    retry_at: float | None = None
    last_error: str = ""


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
        self.log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # 0600 from creation: a service may log what a caller sent.
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        self._log = os.fdopen(fd, "ab")
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

    def restart(self) -> None:
        """restart starts the command again (same argv, env and log) after it exited.

        Whatever the old process left in its group is killed first, so workers it started do
        not outlive it.
        """
        if self.popen is not None:
            if self.popen.poll() is None:
                raise RuntimeError(f"{self.name} is still running")
            _signal_group(self.popen.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.start()

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


def _exit_detail(target: Restartable) -> str:
    """_exit_detail says how a part stopped: its exit status when it is a child process."""
    if isinstance(target, ChildProcess) and target.returncode is not None:
        return f"exited with status {target.returncode}"
    return "stopped running"


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

    def __init__(
        self,
        grace: float = DEFAULT_GRACE,
        *,
        policy: RestartPolicy | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.grace = grace
        self.policy = policy or RestartPolicy()
        self.log = log
        self._watches: dict[str, _Watch] = {}
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
        restart: bool = False,
    ) -> ChildProcess:
        """spawn starts a child process and adds it to the shutdown order.

        With `restart`, `check()` restarts it when it dies (see RestartPolicy) instead of
        raising ChildExited. A child spawned under the name of one that has exited replaces it.
        """
        child = ChildProcess(name=name, argv=argv, log_path=log_path, env=env, cwd=cwd)
        child.start()
        self._entries = [
            entry
            for entry in self._entries
            if not (isinstance(entry, ChildProcess) and entry.name == name and not entry.alive())
        ]
        self._entries.append(child)
        self._watches.pop(name, None)
        if restart:
            self.watch(child)
        return child

    def watch(self, target: Restartable) -> None:
        """watch makes `check()` restart target when it dies (it must already be running)."""
        self._watches[target.name] = _Watch(target)

    def on_stop(self, name: str, stop: Callable[[], None]) -> None:
        """on_stop adds a stop callback (e.g. for a daemonized database) to the shutdown order."""
        self._entries.append(_Callback(name, stop))

    def check(self) -> list[str]:
        """check restarts restartable parts that died and returns the names of those restarted.

        A dead child that is not restartable raises ChildExited; a restartable part whose
        attempts are spent raises GaveUp. Restarts wait out their backoff across calls (check
        itself never sleeps), so callers keep polling it.
        """
        for child in self.children:
            if child.name not in self._watches and not child.alive():
                raise ChildExited(child)
        restarted: list[str] = []
        for watch in list(self._watches.values()):
            if self._stopping:
                break
            if self._tend(watch):
                restarted.append(watch.target.name)
        return restarted

    def _tend(self, watch: _Watch) -> bool:
        """_tend advances one part's restart state; True when it was restarted just now."""
        target, now = watch.target, time.monotonic()
        if watch.retry_at is None:
            if target.alive():
                if watch.failures and now - watch.up_since >= self.policy.stable_after:
                    watch.failures = 0
                return False
            self._schedule(watch, _exit_detail(target), now)
            return False
        if now < watch.retry_at:
            return False
        try:
            target.restart()
        except Exception as exc:  # a failed start is one more failed attempt, with its reason
            self._schedule(watch, f"restart failed: {exc}", time.monotonic())
            return False
        watch.retry_at = None
        watch.up_since = time.monotonic()
        self._say(f"{target.name} restarted (attempt {watch.failures} of {self.policy.attempts})")
        return True

    def _schedule(self, watch: _Watch, detail: str, now: float) -> None:
        """_schedule counts one failure and sets the next attempt's time, or gives up."""
        watch.failures += 1
        watch.last_error = detail
        if watch.failures > self.policy.attempts:
            raise GaveUp(watch.target.name, self.policy.attempts, watch.target.log_path, detail)
        delay = self.policy.delay(watch.failures)
        watch.retry_at = now + delay
        self._say(f"{watch.target.name} {detail}; restarting in {delay:.1f}s")

    def _say(self, message: str) -> None:
        """_say reports a restart decision to the supervisor's log callback, if it has one."""
        if self.log is not None:
            self.log(message)

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
