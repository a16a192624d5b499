"""services/common/stack.py without a running stack: stack.json's type, metrics URLs, private files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from services.common.server import write_port_file
from services.common.stack import (
    StackInfo,
    metrics_urls,
    private_dir,
    private_file,
    read_port,
    redact,
    write_private,
)
from tests.harness import kotadb


def _info(tmp_path: Path, **changes: object) -> StackInfo:
    values: dict[str, object] = {
        "gateway": "http://127.0.0.1:8080",
        "grpc": {"auth": "127.0.0.1:50051", "ingest": "127.0.0.1:50052", "search": "127.0.0.1:50053"},
        "auth_check": "127.0.0.1:50055",
        "database_url": "postgresql://postgres:pw@127.0.0.1:5432/kotadb",
        "envoy_admin": "http://127.0.0.1:9901",
        "pid": os.getpid(),
        "started_at": StackInfo.now(),
        "data_dir": str(tmp_path),
        "logs": str(tmp_path / "logs"),
        "pids": {"postgres": None, "auth": 12},
        "demo_api_key": "kdb_live_x",
        "demo_api_key_id": "id",
        "demo_user_id": "user",
    }
    values.update(changes)
    return StackInfo.from_json(values)


def test_stack_json_round_trips_at_0600(tmp_path: Path) -> None:
    info = _info(tmp_path, metrics={"envoy": "http://127.0.0.1:9901/stats/prometheus"})
    path = tmp_path / "stack.json"
    info.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert StackInfo.load(path) == info
    assert json.loads(path.read_text())["pids"] == {"postgres": None, "auth": 12}


def test_an_older_stack_json_without_metrics_still_loads(tmp_path: Path) -> None:
    document = _info(tmp_path).to_json()
    del document["metrics"], document["log_files"]
    assert StackInfo.from_json(document).metrics == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pid": "12"}, "'pid' is not a int"),
        ({"pid": True}, "'pid' is not a int"),
        ({"grpc": {"auth": 50051}}, "'grpc'"),
        ({"pids": {"auth": "12"}}, "'pids'"),
        ({"gateway": None}, "'gateway'"),
    ],
)
def test_a_malformed_stack_json_names_the_field(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    document = _info(tmp_path).to_json() | change
    with pytest.raises(ValueError, match=message):
        StackInfo.from_json(document)


def test_metrics_urls_list_the_listeners_that_reported_a_port(tmp_path: Path) -> None:
    port_files = {name: tmp_path / f"{name}.port" for name in ("auth", "ingest", "search")}
    write_port_file(tmp_path / "auth.port.metrics", 9464)
    write_port_file(tmp_path / "search.port.metrics", 9465)
    urls = metrics_urls(port_files, "http://127.0.0.1:9901")
    assert urls == {
        "auth": "http://127.0.0.1:9464/metrics",
        "search": "http://127.0.0.1:9465/metrics",
        "envoy": "http://127.0.0.1:9901/stats/prometheus",
    }
    assert metrics_urls({}, None) == {}


def test_private_files_and_directories(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        directory = private_dir(tmp_path / "a" / "logs")
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o755)
        assert stat.S_IMODE(private_dir(loose).stat().st_mode) == 0o700
        log = private_file(directory / "x.log")
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        (directory / "y.log").write_text("old")
        (directory / "y.log").chmod(0o644)
        assert stat.S_IMODE(private_file(directory / "y.log").stat().st_mode) == 0o600
        assert (directory / "y.log").read_text() == "old"
        write_private(directory / "secret", "s3cret\n")
        assert stat.S_IMODE((directory / "secret").stat().st_mode) == 0o600
        assert (directory / "secret").read_text() == "s3cret\n"
    finally:
        os.umask(old)


def test_read_port_and_redact(tmp_path: Path) -> None:
    assert read_port(tmp_path / "missing") is None
    (tmp_path / "partial").write_text("")
    assert read_port(tmp_path / "partial") is None
    write_port_file(tmp_path / "p", 4321)
    assert read_port(tmp_path / "p") == 4321
    assert (
        redact("postgresql://postgres:pw@127.0.0.1:5432/kotadb")
        == "postgresql://postgres:***@127.0.0.1:5432/kotadb"
    )
    assert redact("postgresql://postgres@127.0.0.1/kotadb") == "postgresql://postgres@127.0.0.1/kotadb"


def test_keys_without_a_database_name_the_stack_json_they_looked_for(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop("KOTADB_DATABASE_URL", None)
    done = kotadb("keys", "list", "--data-dir", str(tmp_path), env=env)
    assert done.returncode == 1
    assert f"start `kotadb dev` ({tmp_path / 'stack.json'} does not exist)" in done.stderr
    assert "(NO_DATABASE_URL)" in done.stderr
