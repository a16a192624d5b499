"""The process supervisor with real processes: groups, stubborn children, orphans, order."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from services.common.supervisor import ChildExited, GaveUp, RestartPolicy, StopRequested, Supervisor

# A shell that ignores SIGTERM and leaves a grandchild (sleep) in its process group.
STUBBORN = "trap '' TERM; sleep 300 & echo $! > {pid_file}; while true; do sleep 0.1; done"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for_file(path: Path, limit: float = 30.0) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    pytest.fail(f"{path} never appeared")


def test_stop_kills_a_child_that_ignores_sigterm_and_its_grandchildren(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    with Supervisor(grace=1.0) as supervisor:
        child = supervisor.spawn(
            "stubborn", ["sh", "-c", STUBBORN.format(pid_file=pid_file)], log_path=tmp_path / "stubborn.log"
        )
        grandchild = int(_wait_for_file(pid_file))
        assert os.getpgid(child.pid) == child.pid, "each child leads its own process group"
        assert os.getpgid(grandchild) == child.pid
        assert set(child.group_members()) >= {child.pid, grandchild}
        supervisor.stop_all()
    assert child.returncode == -signal.SIGKILL
    assert not _alive(child.pid) and not _alive(grandchild)


def test_stop_order_is_reverse_of_start(tmp_path: Path) -> None:
    stopped: list[str] = []
    supervisor = Supervisor(grace=5.0)
    supervisor.on_stop("first", lambda: stopped.append("first"))
    supervisor.spawn("second", ["sleep", "300"], log_path=tmp_path / "second.log")
    supervisor.on_stop("third", lambda: stopped.append("third"))
    messages: list[str] = []
    supervisor.stop_all(messages.append)
    assert stopped == ["third", "first"]
    assert messages == ["stopping third", "stopping second", "stopping first"]
    assert supervisor.children == []


def test_check_reports_a_child_that_exited(tmp_path: Path) -> None:
    with Supervisor(grace=1.0) as supervisor:
        supervisor.spawn("short", ["sh", "-c", "echo bye; exit 3"], log_path=tmp_path / "short.log")
        deadline = time.monotonic() + 30
        while supervisor.children[0].alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ChildExited) as raised:
            supervisor.check()
        assert raised.value.child.returncode == 3
        assert "bye" in raised.value.child.log_tail()


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    # A supervising process that is SIGKILLed cannot clean up; PR_SET_PDEATHSIG must do it.
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from services.common.supervisor import Supervisor
        supervisor = Supervisor()
        child = supervisor.spawn("sleeper", ["sleep", "300"], log_path=Path({str(tmp_path / "s.log")!r}))
        Path({str(pid_file)!r}).write_text(str(child.pid))
        time.sleep(300)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        child_pid = int(_wait_for_file(pid_file))
        assert _alive(child_pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_sigterm_becomes_stop_requested_once(tmp_path: Path) -> None:
    supervisor = Supervisor(grace=1.0)
    supervisor.handle_signals()
    try:
        with pytest.raises(StopRequested) as raised:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this finishes
        assert raised.value.signum == signal.SIGTERM
        # A second signal while stopping is ignored rather than cutting shutdown short.
        os.kill(os.getpid(), signal.SIGINT)
    finally:
        supervisor.stop_all()
        supervisor.restore_signals()
    assert signal.getsignal(signal.SIGTERM) is not supervisor._on_signal


def _check_until(supervisor: Supervisor, done: Callable[[], bool], limit: float = 60.0) -> list[str]:
    """_check_until polls supervisor.check() until done() holds; returns every name it restarted."""
    restarted: list[str] = []
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, "the supervisor never got there"
        restarted += supervisor.check()
        time.sleep(0.02)
    return restarted


def test_a_restartable_child_killed_with_sigkill_comes_back(tmp_path: Path) -> None:
    messages: list[str] = []
    policy = RestartPolicy(attempts=3, backoff=0.05)
    with Supervisor(grace=1.0, policy=policy, log=messages.append) as supervisor:
        child = supervisor.spawn("sleeper", ["sleep", "300"], log_path=tmp_path / "sleeper.log", restart=True)
        first = child.pid
        os.kill(first, signal.SIGKILL)
        restarted = _check_until(supervisor, lambda: child.alive() and child.pid != first)
        assert restarted == ["sleeper"]
        assert supervisor.check() == []  # alive: nothing more to do
        assert messages[0] == "sleeper exited with status -9; restarting in 0.1s"
        assert messages[1] == "sleeper restarted (attempt 1 of 3)"
        assert not _alive(first)
    assert not child.alive()


def test_a_child_that_keeps_dying_is_given_up_naming_its_log_file(tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "flaky.log"
    messages: list[str] = []
    policy = RestartPolicy(attempts=3, backoff=0.01)
    with Supervisor(grace=1.0, policy=policy, log=messages.append) as supervisor:
        supervisor.spawn("flaky", ["sh", "-c", "echo starting; exit 7"], log_path=log_path, restart=True)
        deadline = time.monotonic() + 60
        with pytest.raises(GaveUp) as raised:
            while time.monotonic() < deadline:
                supervisor.check()
                time.sleep(0.02)
    message = str(raised.value)
    assert message.endswith(f"See its log: {log_path}"), message
    assert "flaky kept exiting (exited with status 7); gave up after 3 restart attempts" in message
    # The first run and three restarts, all appending to the one log file (0600: logs may hold
    # what callers sent).
    assert log_path.read_text().splitlines() == ["starting"] * 4
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_path.parent.stat().st_mode) == 0o700
    restarts = [m for m in messages if "restarted" in m]
    assert restarts == [f"flaky restarted (attempt {n} of 3)" for n in (1, 2, 3)]


def test_a_part_that_stays_up_gets_its_attempts_back(tmp_path: Path) -> None:
    policy = RestartPolicy(attempts=1, backoff=0.01, stable_after=0.3)
    with Supervisor(grace=1.0, policy=policy) as supervisor:
        child = supervisor.spawn("sleeper", ["sleep", "300"], log_path=tmp_path / "s.log", restart=True)
        for _ in range(3):  # three crashes, each after a stable run: never given up
            time.sleep(0.4)
            supervisor.check()  # notices it has been up long enough
            pid = child.pid
            os.kill(pid, signal.SIGKILL)
            _check_until(supervisor, lambda pid=pid: child.alive() and child.pid != pid)  # type: ignore[misc]
        # Without a stable run in between, the second crash in a row is one too many.
        os.kill(child.pid, signal.SIGKILL)
        _check_until(supervisor, lambda: child.alive())
        os.kill(child.pid, signal.SIGKILL)
        with pytest.raises(GaveUp):
            _check_until(supervisor, lambda: False)


def test_a_non_restartable_child_still_ends_the_check(tmp_path: Path) -> None:
    with Supervisor(grace=1.0) as supervisor:
        supervisor.spawn("kept", ["sleep", "300"], log_path=tmp_path / "kept.log", restart=True)
        once = supervisor.spawn("once", ["sh", "-c", "exit 2"], log_path=tmp_path / "once.log")
        with pytest.raises(ChildExited) as raised:
            _check_until(supervisor, lambda: False)
        assert raised.value.child is once
