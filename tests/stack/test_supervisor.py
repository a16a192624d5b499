"""The process supervisor with real processes: groups, stubborn children, orphans, order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from services.common.supervisor import ChildExited, StopRequested, Supervisor

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
