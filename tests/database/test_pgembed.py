"""EmbeddedPostgres against the real PostgreSQL binaries: lifecycle, reuse, ports, sockets."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from services.common import pgembed
from services.common.pgembed import EmbeddedPostgres, EmbeddedPostgresError


@pytest.fixture
def cluster_home() -> Iterator[Path]:
    """cluster_home is a fresh directory the unprivileged PostgreSQL user can traverse."""
    home = Path(tempfile.mkdtemp(prefix="kotadb-pgembed-"))
    home.chmod(0o711)
    yield home
    _remove(home)


def _remove(home: Path) -> None:
    link = home / "pg"
    if link.is_symlink():
        shutil.rmtree(link.resolve(), ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)


def _query(dsn: str, sql: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def _execute(dsn: str, sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _processes_using(pgdata: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(str(pgdata) in part for part in cmdline) and _alive(proc):
            found.append(proc)
    return found


def test_stop_leaves_no_postgres_process(cluster_home: Path) -> None:
    cluster = EmbeddedPostgres(cluster_home, durable=False)
    dsn = cluster.start()
    assert _query(dsn, "select current_database()") == "kotadb"
    pid = cluster.postmaster_pid
    assert pid is not None
    postmaster = psutil.Process(pid)
    family = [postmaster, *postmaster.children(recursive=True)]
    assert len(family) > 1  # the postmaster and its background workers
    cluster.stop()
    # Zombies count as gone: the postmaster's parent is PID 1, which reaps on its own schedule.
    assert [p.pid for p in family if _alive(p)] == []
    assert _processes_using(cluster.pgdata) == []
    assert not (cluster.pgdata / "postmaster.pid").exists()
    with pytest.raises(EmbeddedPostgresError):
        _ = cluster.dsn


def test_second_start_reuses_the_cluster_and_its_data(cluster_home: Path) -> None:
    with EmbeddedPostgres(cluster_home, durable=False) as first:
        _execute(first.dsn, "create table kept (v text); insert into kept values ('still here')")
        first_port = first.port
    state = json.loads((cluster_home / "pgembed.json").read_text())
    assert state["port"] == first_port
    with EmbeddedPostgres(cluster_home, durable=False) as second:
        assert _query(second.dsn, "select v from kept") == "still here"
        # The previous port was free again, so the same DSN works for anything that saved it.
        assert second.port == first_port


def test_restart_picks_a_new_port_when_the_old_one_is_taken(cluster_home: Path) -> None:
    with EmbeddedPostgres(cluster_home, durable=False) as first:
        old_port = first.port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        # The first cluster's connections may leave the port in TIME_WAIT for a while; a listener
        # with SO_REUSEADDR takes it anyway (as Postgres would) and then holds it for real.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen(1)
        with EmbeddedPostgres(cluster_home, durable=False) as second:
            assert second.port != old_port
            assert _query(second.dsn, "select 1") == 1
            new_port = second.port
    assert json.loads((cluster_home / "pgembed.json").read_text())["port"] == new_port


def test_explicit_port_is_used(cluster_home: Path) -> None:
    port = pgembed.free_port()
    with EmbeddedPostgres(cluster_home, port=port, durable=False) as cluster:
        assert cluster.port == port
        assert f":{port}/" in cluster.dsn


def test_a_running_cluster_is_not_started_twice(cluster_home: Path) -> None:
    with (
        EmbeddedPostgres(cluster_home, durable=False),
        pytest.raises(EmbeddedPostgresError, match="already runs"),
    ):
        EmbeddedPostgres(cluster_home, durable=False).start()


def test_long_data_dir_puts_the_socket_under_tmp(cluster_home: Path) -> None:
    deep = cluster_home / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    for directory in (deep.parent, deep):
        directory.chmod(0o711)
    cluster = EmbeddedPostgres(deep, durable=False)
    cluster.start()
    try:
        connections = psutil.Process(cluster.postmaster_pid).net_connections(kind="unix")
        sockets = [str(c.laddr) for c in connections if c.laddr]
        assert sockets, "the server should listen on a Unix socket too"
        assert all(len(path) <= 107 and path.startswith("/tmp/") for path in sockets)
        socket_dir = Path(sockets[0]).parent
        assert _query(cluster.dsn, "select 1") == 1
    finally:
        cluster.stop()
    assert not socket_dir.exists()


def test_unreachable_data_dir_is_handled(cluster_home: Path) -> None:
    # A 0700 parent owned by us: when we are root, PostgreSQL runs as another user who cannot
    # traverse it, so the cluster must live in a spill directory that pg/ links to.
    private = cluster_home / "private"
    private.mkdir(mode=0o700)
    data_dir = private / "stack"
    with EmbeddedPostgres(data_dir, durable=False) as cluster:
        assert _query(cluster.dsn, "select 1") == 1
        if os.geteuid() == 0:
            assert (data_dir / "pg").is_symlink()
            assert not cluster.pgdata.is_relative_to(private)
    with EmbeddedPostgres(data_dir, durable=False) as again:
        assert _query(again.dsn, "select 1") == 1


def test_resolve_database_prefers_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KOTADB_DATABASE_URL", "postgresql://someone@db.example.test:5432/postgres")
    url, cluster = pgembed.resolve_database(tmp_path / "unused")
    assert url == "postgresql://someone@db.example.test:5432/postgres"
    assert cluster is None
    assert not (tmp_path / "unused").exists()


def test_resolve_database_starts_an_embedded_cluster(
    monkeypatch: pytest.MonkeyPatch, cluster_home: Path
) -> None:
    monkeypatch.delenv("KOTADB_DATABASE_URL", raising=False)
    url, cluster = pgembed.resolve_database(cluster_home, durable=False)
    assert cluster is not None
    try:
        assert _query(url, "select current_database()") == "kotadb"
    finally:
        cluster.stop()


def test_an_explicit_port_in_use_fails_clearly(cluster_home: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        cluster = EmbeddedPostgres(cluster_home, port=port, durable=False)
        with pytest.raises(EmbeddedPostgresError, match=f"port {port} is in use"):
            cluster.start()
    assert cluster.postmaster_pid is None
    assert not (cluster.pgdata / "postmaster.pid").exists()


def test_without_binaries_or_pgserver_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The seam: pretend no PostgreSQL is installed and the optional wheel is absent.
    monkeypatch.setattr(pgembed, "find_pg_bin_dir", lambda: None)
    monkeypatch.setitem(sys.modules, "pgserver", None)
    with pytest.raises(EmbeddedPostgresError, match=re.escape("kotadb[embedded-pg]")) as caught:
        EmbeddedPostgres(tmp_path / "cluster").start()
    assert "KOTADB_DATABASE_URL" in str(caught.value)


def test_sweep_removes_only_orphaned_spill_dirs(tmp_path: Path) -> None:
    root = tmp_path / "spill-root"
    root.mkdir()
    old = 10_000.0

    def spill(name: str, owner: Path | None, age: float) -> Path:
        directory = root / f"{pgembed.SPILL_PREFIX}{name}"
        directory.mkdir()
        if owner is not None:
            (directory / pgembed.SPILL_OWNER_FILE).write_text(f"{owner}\n")
        stamp = directory.stat().st_mtime - age
        os.utime(directory, (stamp, stamp))
        return directory

    orphan = spill("orphan", tmp_path / "deleted-data-dir", old)
    live_owner = tmp_path / "live"
    live_owner.mkdir()
    linked = spill("linked", live_owner, old)
    (live_owner / "pg").symlink_to(linked)
    young = spill("young", tmp_path / "also-deleted", 0)
    foreign = spill("foreign", None, old)

    assert pgembed.sweep_spill_dirs(root) == [orphan]
    assert not orphan.exists()
    assert linked.exists() and young.exists() and foreign.exists()


def test_free_port_lies_below_the_ephemeral_range() -> None:
    """A picked port cannot be taken by a port-0 bind or an outgoing connection meanwhile."""
    floor = pgembed.ephemeral_floor()
    assert floor is not None, "this Linux host reports its ephemeral range"
    ports = {pgembed.free_port() for _ in range(50)}
    assert all(10000 <= port < floor for port in ports)
    assert len(ports) > 1  # picked at random, so parallel pickers rarely meet
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))  # and it was free


def test_free_port_skips_a_taken_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", pgembed.free_port()))
        taken.listen()
        held = taken.getsockname()[1]
        choices = iter([held, held, held + 1 if held + 1 < 30000 else held - 1])
        monkeypatch.setattr(random.SystemRandom, "randrange", lambda _self, _a, _b: next(choices))
        port = pgembed.free_port()
    assert port != held


def test_free_port_falls_back_to_the_kernel_without_a_known_range(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(pgembed, "_EPHEMERAL_RANGE", tmp_path / "absent")
    assert pgembed.ephemeral_floor() is None
    assert 0 < pgembed.free_port() < 65536
