"""Throwaway PostgreSQL clusters for tests and `kotadb dev`, without Docker.

An `EmbeddedPostgres` owns one directory. Inside it:

* `pg/data/`     the cluster (PGDATA), created by initdb on first start and reused afterwards;
* `pg/s/`        the Unix socket directory (or a short directory under /tmp when that path is
                 too long for a socket address);
* `pg/postgres.log` the server log;
* `pgembed.json` the port of the last start, so a second start tries the same port first.

System PostgreSQL binaries are preferred (found under /usr/lib/postgresql/*/bin or on PATH).
`pg_ctl` refuses to run as root, so when we are root every PostgreSQL program runs as an
unprivileged OS user (`postgres` if it exists, else `nobody`) that owns `pg/`. If that user
cannot traverse the data dir's ancestors (root's 0700 home, pytest's 0700 temp dirs), `pg/` is a
symlink to a stable spill directory under /var/tmp named after the data dir; spill directories
whose data dir has gone are swept on later starts. When no binaries are installed the
`pgserver` wheel (`pip install kotadb[embedded-pg]`) provides a bundled server.

The cluster listens on 127.0.0.1 only and trusts local connections: it is for development and
tests, never for data anyone cares about.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import hashlib
import json
import os
import pwd
import random
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psutil

DEFAULT_DATABASE = "kotadb"
SUPERUSER = "postgres"

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL; PostgreSQL
# appends "/.s.PGSQL.<port>" (at most 16 bytes) to the directory.
_SOCKET_PATH_LIMIT = 107
_SOCKET_SUFFIX_LEN = len("/.s.PGSQL.65535")
_START_ATTEMPTS = 3


# Where clusters go when the unprivileged runner cannot reach the data dir (see _prepare_home).
SPILL_ROOT = Path("/var/tmp")
SPILL_PREFIX = "kotadb-pg-"
SPILL_OWNER_FILE = "owner"
# A spill directory younger than this may belong to a start in progress; never sweep it.
_SPILL_GRACE_SECONDS = 300.0


class EmbeddedPostgresError(RuntimeError):
    """EmbeddedPostgresError reports a cluster that could not be created, started or stopped."""


@dataclass(frozen=True)
class _Runner:
    """_Runner names the OS account PostgreSQL programs run as (None means ourselves)."""

    user: str | None
    uid: int
    gid: int


def find_pg_bin_dir() -> Path | None:
    """find_pg_bin_dir returns the newest system PostgreSQL bin directory, or None when absent."""
    candidates: list[tuple[int, Path]] = []
    for bin_dir in Path("/usr/lib/postgresql").glob("*/bin"):
        with contextlib.suppress(ValueError):
            if (bin_dir / "pg_ctl").is_file():
                candidates.append((int(bin_dir.parent.name.split(".")[0]), bin_dir))
    if candidates:
        return max(candidates)[1]
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


# Ports handed to a child that binds them later (Postgres, Envoy) come from below the kernel's
# ephemeral range: a port picked from inside it can be taken, before the child binds, by any
# outgoing connection or `bind(("127.0.0.1", 0))` in the meantime (seen in CI as Envoy's
# "Address already in use" while the services it fronts were starting).
_PICK_FLOOR = 10000
_PICK_ATTEMPTS = 200
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_floor() -> int | None:
    """ephemeral_floor is the lowest port the kernel hands out for port 0, or None if unknown."""
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return low if low > _PICK_FLOOR + 1000 else None


def free_port() -> int:
    """free_port returns a TCP port on 127.0.0.1 that is unused now and that the kernel will not
    give to a port-0 bind or an outgoing connection (it lies below the ephemeral range).

    Where the ephemeral range is unknown or leaves no room below it, the kernel picks.
    """
    ceiling = ephemeral_floor()
    if ceiling is not None:
        rng = random.SystemRandom()
        for _ in range(_PICK_ATTEMPTS):
            port = rng.randrange(_PICK_FLOOR, ceiling)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        picked: int = sock.getsockname()[1]
        return picked


def port_is_free(port: int) -> bool:
    """port_is_free reports whether 127.0.0.1:port can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # PostgreSQL binds with SO_REUSEADDR, so a port whose old connections linger in
        # TIME_WAIT is free for it; only a live listener makes the port unusable.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _runner() -> _Runner:
    if os.geteuid() != 0:
        return _Runner(user=None, uid=os.geteuid(), gid=os.getegid())
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _Runner(user=name, uid=entry.pw_uid, gid=entry.pw_gid)
    raise EmbeddedPostgresError("running as root but neither the 'postgres' nor the 'nobody' user exists")


def _can_traverse(path: Path, runner: _Runner) -> bool:
    """_can_traverse reports whether runner may search (x bit) every directory from / to path."""
    if runner.user is None:
        return True
    groups = {runner.gid} | {g.gr_gid for g in grp.getgrall() if runner.user in g.gr_mem}
    for directory in [path, *path.parents]:
        if not directory.exists():
            continue
        st = directory.stat()
        if st.st_uid == runner.uid:
            allowed = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            allowed = bool(st.st_mode & stat.S_IXGRP)
        else:
            allowed = bool(st.st_mode & stat.S_IXOTH)
        if not allowed:
            return False
    return True


def sweep_spill_dirs(root: Path = SPILL_ROOT) -> list[Path]:
    """sweep_spill_dirs removes spill directories whose data dir is gone, returning them.

    A spill directory is kept while its data dir still links to it, while a server runs in it,
    and for a grace period after creation; everything else is an orphan left by a deleted data
    dir (e.g. a test's temporary directory) and would otherwise pile up.
    """
    removed: list[Path] = []
    for spill in root.glob(f"{SPILL_PREFIX}*"):
        try:
            if time.time() - spill.stat().st_mtime < _SPILL_GRACE_SECONDS:
                continue
            owner = Path((spill / SPILL_OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue  # not one of ours, or not readable: leave it alone
        link = owner / "pg"
        if link.is_symlink() and link.resolve() == spill.resolve():
            continue
        pid_file = spill / "data" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            if _running(int(pid_file.read_text().splitlines()[0])):
                continue
        shutil.rmtree(spill, ignore_errors=True)
        removed.append(spill)
    return removed


def _running(pid: int | None) -> bool:
    """_running reports whether pid is a live process; zombies count as exited.

    The postmaster is re-parented to PID 1 once pg_ctl exits, and some init processes (e.g. in
    micro-VMs) reap orphans only about once a second, so a stopped server can linger as a zombie.
    """
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _chown_tree(path: Path, runner: _Runner) -> None:
    if runner.user is None:
        return
    os.chown(path, runner.uid, runner.gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), runner.uid, runner.gid, follow_symlinks=False)


class EmbeddedPostgres:
    """EmbeddedPostgres runs a local PostgreSQL cluster kept in data_dir.

    `start()` creates the cluster if needed, starts it on `port` (0 picks a free port), creates
    the `kotadb` database if missing and returns a superuser DSN on 127.0.0.1. `stop()` shuts the
    server down (`pg_ctl stop -m fast`) and waits until the postmaster has exited. With
    `durable=False` (the default is durable) fsync, synchronous_commit and full_page_writes are
    off, which makes throwaway test clusters several times faster to create and write.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        *,
        durable: bool = True,
        database: str = DEFAULT_DATABASE,
        bin_dir: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.requested_port = port
        self.durable = durable
        self.database = database
        self._bin_dir = bin_dir
        self._port: int | None = None
        self._dsn: str | None = None
        self._runner: _Runner | None = None
        self._tmp_socket_dir: Path | None = None
        self._socket_dir: Path | None = None
        self._postmaster_pid: int | None = None
        self._pgserver: Any = None

    # -- public API -------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """dsn is the superuser connection string of the running cluster."""
        if self._dsn is None:
            raise EmbeddedPostgresError("the embedded cluster is not running; call start() first")
        return self._dsn

    @property
    def port(self) -> int:
        """port is the TCP port the running cluster listens on."""
        if self._port is None:
            raise EmbeddedPostgresError("the embedded cluster is not running; call start() first")
        return self._port

    @property
    def postmaster_pid(self) -> int | None:
        """postmaster_pid is the server's process id while it runs (None for pgserver clusters)."""
        return self._postmaster_pid

    @property
    def pgdata(self) -> Path:
        """pgdata is the cluster directory (PGDATA), with symlinks resolved."""
        return self._home().resolve() / "data"

    @property
    def log_path(self) -> Path:
        """log_path is the server log file."""
        return self._home().resolve() / "postgres.log"

    def start(self) -> str:
        """start brings the cluster up (creating it on first use) and returns its DSN."""
        if self._dsn is not None:
            return self._dsn
        bin_dir = self._bin_dir or find_pg_bin_dir()
        if bin_dir is None:
            return self._start_pgserver()
        self._bin_dir = bin_dir
        self._runner = _runner()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_home()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        self._refuse_running_cluster()
        last_error = ""
        for attempt in range(_START_ATTEMPTS):
            port = self._choose_port(retry=attempt > 0)
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            result = self._pg_ctl_start(port)
            if result.returncode == 0:
                self._port = port
                break
            last_error = result.stdout + result.stderr + self._log_since(log_offset)
            # Another process can take a port between our probe and the server's bind; only
            # that failure is worth another attempt on a fresh port.
            if "could not bind" not in last_error and "in use" not in last_error:
                break
        if self._port is None:
            self._cleanup_socket_dir()
            raise EmbeddedPostgresError(f"pg_ctl start failed for {self.pgdata}:\n{last_error}")
        self._postmaster_pid = self._read_postmaster_pid()
        self._write_state()
        atexit.register(self.stop)
        try:
            self._ensure_database()
        except BaseException:
            self.stop()
            raise
        # The cluster listens on loopback without TLS: sslmode=disable spares every connection
        # asyncpg's default TLS probe (one more round trip, refused by the server), whose
        # abandoned future asyncio reported as "exception was never retrieved" at exit.
        self._dsn = f"postgresql://{SUPERUSER}@127.0.0.1:{self._port}/{quote(self.database)}?sslmode=disable"
        return self._dsn

    def stop(self) -> None:
        """stop shuts the cluster down with `pg_ctl stop -m fast` and waits for the postmaster."""
        atexit.unregister(self.stop)
        if self._pgserver is not None:
            self._pgserver.cleanup()
            self._pgserver = None
        elif self._port is not None and (self.pgdata / "postmaster.pid").exists():
            # --no-wait and our own 50 ms polling: PostgreSQL 15's pg_ctl checks only once per
            # second, which made every stop take over a second though shutdown takes ~25 ms.
            result = self._run([self._tool("pg_ctl"), "stop", "-D", str(self.pgdata), "-m", "fast", "-W"])
            if result.returncode != 0 and (self.pgdata / "postmaster.pid").exists():
                raise EmbeddedPostgresError(f"pg_ctl stop failed:\n{result.stdout}{result.stderr}")
            self._wait_for_exit()
        self._cleanup_socket_dir()
        self._port = None
        self._dsn = None
        self._postmaster_pid = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- cluster layout ---------------------------------------------------------------------

    def _home(self) -> Path:
        return self.data_dir / "pg"

    def _prepare_home(self) -> None:
        """_prepare_home makes pg/ exist and be usable by the runner, spilling if unreachable."""
        assert self._runner is not None
        home = self._home()
        if not home.exists() and not home.is_symlink():
            if _can_traverse(self.data_dir, self._runner):
                home.mkdir(mode=0o700)
            else:
                # The unprivileged runner cannot reach data_dir (e.g. under root's 0700 home), so
                # the cluster lives in a stable spill directory that pg/ points to; the same
                # data_dir always maps to the same spill directory, so reuse still works.
                sweep_spill_dirs()
                digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
                spill = SPILL_ROOT / f"{SPILL_PREFIX}{digest}"
                spill.mkdir(mode=0o700, exist_ok=True)
                (spill / SPILL_OWNER_FILE).write_text(str(self.data_dir) + "\n")
                home.symlink_to(spill)
        real_home = home.resolve()
        if not _can_traverse(real_home.parent, self._runner):
            raise EmbeddedPostgresError(f"user {self._runner.user} cannot reach {real_home}")
        if real_home.stat().st_uid != self._runner.uid:
            _chown_tree(real_home, self._runner)
        socket_dir = real_home / "s"
        if len(str(socket_dir)) + _SOCKET_SUFFIX_LEN <= _SOCKET_PATH_LIMIT:
            socket_dir.mkdir(mode=0o700, exist_ok=True)
            if self._runner.user is not None:
                os.chown(socket_dir, self._runner.uid, self._runner.gid)
        else:
            socket_dir = Path(tempfile.mkdtemp(prefix="kpg-", dir="/tmp"))
            if self._runner.user is not None:
                os.chown(socket_dir, self._runner.uid, self._runner.gid)
            self._tmp_socket_dir = socket_dir
        self._socket_dir = socket_dir

    def _cleanup_socket_dir(self) -> None:
        if self._tmp_socket_dir is not None:
            shutil.rmtree(self._tmp_socket_dir, ignore_errors=True)
            self._tmp_socket_dir = None

    def _state_path(self) -> Path:
        return self.data_dir / "pgembed.json"

    def _write_state(self) -> None:
        state = {"port": self._port, "pgdata": str(self.pgdata.resolve()), "database": self.database}
        self._state_path().write_text(json.dumps(state, indent=2) + "\n")

    def _choose_port(self, *, retry: bool) -> int:
        if self.requested_port and not retry:
            return self.requested_port
        if self.requested_port and retry:
            raise EmbeddedPostgresError(f"port {self.requested_port} is in use")
        if not retry and self._state_path().exists():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                previous = int(json.loads(self._state_path().read_text())["port"])
                if previous and port_is_free(previous):
                    return previous
        return free_port()

    # -- running PostgreSQL programs --------------------------------------------------------

    def _tool(self, name: str) -> str:
        assert self._bin_dir is not None
        return str(self._bin_dir / name)

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        runner = self._runner or _runner()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
            "HOME": str(self._home().resolve()),
        }
        kwargs: dict[str, Any] = {}
        if runner.user is not None:
            kwargs = {"user": runner.uid, "group": runner.gid, "extra_groups": []}
        # cwd inside the cluster home: PostgreSQL programs complain when they cannot access it.
        return subprocess.run(
            argv,
            cwd=str(self._home().resolve()),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            **kwargs,
        )

    def _initdb(self) -> None:
        result = self._run(
            [
                self._tool("initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ]
            + ([] if self.durable else ["--no-sync"])
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed for {self.pgdata}:\n{result.stdout}{result.stderr}")

    def _server_options(self, port: int) -> str:
        options = [
            f"-p {port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories='{self._socket_dir}'",
            "-c max_connections=200",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        return " ".join(options)

    def _pg_ctl_start(self, port: int) -> subprocess.CompletedProcess[str]:
        return self._run(
            [
                self._tool("pg_ctl"),
                "start",
                "-D",
                str(self.pgdata),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                "60",
                "-o",
                self._server_options(port),
            ]
        )

    def _log_since(self, offset: int, lines: int = 20) -> str:
        """_log_since returns the last lines the server logged after byte offset."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _read_postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _refuse_running_cluster(self) -> None:
        """_refuse_running_cluster fails when another server already runs on this PGDATA."""
        pid = self._read_postmaster_pid()
        if pid is None:
            return
        result = self._run([self._tool("pg_ctl"), "status", "-D", str(self.pgdata)])
        if result.returncode == 0:
            runner = self._runner or _runner()
            command = f"{self._tool('pg_ctl')} stop -D {self.pgdata} -m fast"
            if runner.user is not None:
                command = f"runuser -u {runner.user} -- {command}"
            raise EmbeddedPostgresError(
                f"a PostgreSQL server (pid {pid}) already runs on {self.pgdata}, perhaps left by a "
                f"killed process; stop it first: {command}"
            )

    def _wait_for_exit(self, timeout: float = 60.0) -> None:
        """_wait_for_exit waits until the postmaster process is gone and its pid file removed."""
        pid = self._postmaster_pid
        pid_file = self.pgdata / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _running(pid) and not pid_file.exists():
                return
            time.sleep(0.05)
        raise EmbeddedPostgresError(f"postmaster {pid} did not exit within {timeout:.0f}s")

    def _psql(self, sql: str, database: str = "postgres") -> str:
        result = self._run(
            [
                self._tool("psql"),
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self._port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ]
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def _ensure_database(self) -> None:
        literal = self.database.replace("'", "''")
        if self._psql(f"select 1 from pg_database where datname = '{literal}'") != "1":
            identifier = self.database.replace('"', '""')
            self._psql(f'create database "{identifier}"')

    # -- pgserver fallback ------------------------------------------------------------------

    def _start_pgserver(self) -> str:
        try:
            import pgserver
        except ImportError as exc:
            raise EmbeddedPostgresError(
                "no PostgreSQL available: install the server binaries (e.g. apt-get install "
                "postgresql), install the bundled server with `pip install 'kotadb[embedded-pg]'`, "
                "or set KOTADB_DATABASE_URL"
            ) from exc
        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(self.data_dir / "pgserver", cleanup_mode="stop")
        self._pgserver = server
        literal = self.database.replace("'", "''")
        probe = f"select 'present:' || datname from pg_database where datname = '{literal}';"
        if "present:" not in str(server.psql(probe)):
            identifier = self.database.replace('"', '""')
            server.psql(f'create database "{identifier}";')
        self._dsn = str(server.get_uri(self.database))
        atexit.register(self.stop)
        return self._dsn


def resolve_database(data_dir: Path, *, durable: bool = True) -> tuple[str, EmbeddedPostgres | None]:
    """resolve_database returns KOTADB_DATABASE_URL when set, else starts an embedded cluster.

    The second element is the started cluster (the caller stops it) or None for an external
    database.
    """
    url = os.environ.get("KOTADB_DATABASE_URL", "").strip()
    if url:
        return url, None
    cluster = EmbeddedPostgres(Path(data_dir), durable=durable)
    return cluster.start(), cluster
