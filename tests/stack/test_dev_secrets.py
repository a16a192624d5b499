"""Secrets never reach a log or a readable file of a `kotadb dev` stack.

A live stack (a `kotadb dev` subprocess with a session-JWT secret) gets keys made with `kotadb keys`
(created, rotated, revoked, an admin key), a user session JWT, and every way of presenting them:
the `Authorization` header through the gateway (REST and gRPC), the refused `?key=` and
`?access_token=` query parameters, gRPC metadata straight to the services, unknown and revoked
keys. Then every file the stack wrote under its data dir (Postgres' own log included, its data
files not) is searched for each secret: none may appear, except where a secret must live — the
demo key in stack.json, the identity key in identity.key, the ingest secret key in
ingest-secret.keys, the access-log token in the rendered Envoy config — and those files, like
every log, are 0600 in 0700 directories. Ingest secrets are in the search too: a repository's
access token (given with `kotadb repos add --token-env` and used by its sync), its webhook secret
(shown once by the command), the rotated one and a delivery signed with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from kotadb.v1 import auth_pb2, auth_pb2_grpc, ingest_pb2, ingest_pb2_grpc, search_pb2, search_pb2_grpc

from services.cli.keys import DEMO_USER_ID
from services.common.identity import access_log_token
from services.common.stack import StackInfo
from tests.gatewayhttp import http
from tests.harness import DevStack, kotadb

SETTLE_LIMIT = 60.0
# Postgres' cluster files (tables, WAL, ...) are not logs: API keys are stored hashed there.
POSTGRES_DATA = "data"


@pytest.fixture(scope="module")
def jwt_secret() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory, jwt_secret: str) -> Iterator[DevStack]:
    stack = DevStack(
        tmp_path_factory.mktemp("secrets") / "dev",
        "--gateway-port",
        "0",
        env={"KOTADB_AUTH_JWT_SECRET": jwt_secret},
    )
    try:
        stack.wait_for_stack()
        yield stack
    finally:
        stack.kill_if_running()


def _cli_env() -> dict[str, str]:
    """_cli_env is this environment without the test session's database: the stack's is used."""
    env = dict(os.environ)
    env.pop("KOTADB_DATABASE_URL", None)
    return env


def _keys(dev: DevStack, *args: str) -> dict[str, object]:
    result = kotadb("keys", *args, "--data-dir", str(dev.data_dir), "--json", env=_cli_env())
    assert result.returncode == 0, result.stdout + result.stderr
    document: dict[str, object] = json.loads(result.stdout)
    return document


def _grpc_code(target: str, call: str, token: str) -> grpc.StatusCode:
    """_grpc_code makes one gRPC call with `authorization` metadata and returns its status code."""
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(target) as channel:
        try:
            if call == "ListApiKeys":
                auth_pb2_grpc.AuthServiceStub(channel).ListApiKeys(
                    auth_pb2.ListApiKeysRequest(), metadata=metadata, timeout=30
                )
            else:
                search_pb2_grpc.SearchServiceStub(channel).GetIndexStatus(
                    search_pb2.GetIndexStatusRequest(), metadata=metadata, timeout=30
                )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _rotate_webhook_secret(target: str, key: str, repository_id: str) -> str:
    with grpc.insecure_channel(target) as channel:
        rotated = ingest_pb2_grpc.IngestServiceStub(channel).RotateWebhookSecret(
            ingest_pb2.RotateWebhookSecretRequest(id=repository_id),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=30,
        )
    return str(rotated.webhook_secret)


def _session_jwt(secret: str) -> str:
    claims = {"sub": str(DEMO_USER_ID), "aud": "authenticated", "role": "authenticated"}
    return jwt.encode({**claims, "exp": int(time.time()) + 600}, secret, algorithm="HS256")


def _stack_files(info: StackInfo) -> list[Path]:
    """_stack_files lists every file the stack wrote: the data dir's and Postgres' own log."""
    root = Path(info.data_dir)
    found: list[Path] = []
    for directory, subdirectories, files in os.walk(root):
        if Path(directory) == root / "postgres":
            subdirectories[:] = []  # pg/ (its data files; the log is added below)
        found += [Path(directory) / name for name in files]
    found.append(Path(info.log_files["postgres"]))
    return found


def _wait_for_access_log(envoy_log: Path, lines: int) -> None:
    """_wait_for_access_log waits until Envoy has written an access-log line per gateway request."""
    deadline = time.monotonic() + SETTLE_LIMIT
    while time.monotonic() < deadline:
        written = envoy_log.read_text(errors="replace").count('"logger":"envoy.access"')
        if written >= lines:
            return
        time.sleep(0.2)
    pytest.fail(f"fewer than {lines} access-log lines in {envoy_log}")


def test_no_secret_reaches_a_log_or_a_readable_file(dev: DevStack, jwt_secret: str) -> None:
    info = dev.info()
    gateway = info.gateway
    reader = _keys(dev, "create", "--name", "secrets reader", "--permissions", "read,write")
    admin = _keys(dev, "create", "--name", "secrets admin", "--permissions", "admin")
    rotated = _keys(dev, "rotate", str(reader["id"]))
    doomed = _keys(dev, "create", "--name", "secrets revoked", "--permissions", "read")
    _keys(dev, "revoke", str(doomed["id"]))
    session = _session_jwt(jwt_secret)
    unknown = "kdb_live_" + secrets.token_urlsafe(30)
    key_secrets = {
        "reader key": str(reader["secret"]),
        "admin key": str(admin["secret"]),
        "rotated key": str(rotated["secret"]),
        "revoked key": str(doomed["secret"]),
        "unknown key": unknown,
        "session JWT": session,
        "JWT secret": jwt_secret,
    }

    requests = [
        (f"{gateway}/v1/usage", key_secrets["reader key"], 200),
        (f"{gateway}/v1/usage", key_secrets["rotated key"], 200),
        (f"{gateway}/v1/apiKeys", key_secrets["admin key"], 200),
        (f"{gateway}/v1/apiKeys", session, 200),
        (f"{gateway}/v1/usage", key_secrets["revoked key"], 401),
        (f"{gateway}/v1/usage", unknown, 401),
        (f"{gateway}/v1/usage?key={key_secrets['reader key']}", None, 401),
        (f"{gateway}/v1/apiKeys?access_token={session}", None, 401),
        (f"{gateway}/v1/usage?api_key={key_secrets['admin key']}&key={unknown}", None, 401),
    ]
    for url, token, expected in requests:
        assert http("GET", url, token, timeout=10)[0] == expected, url
    target = gateway.removeprefix("http://")
    assert _grpc_code(target, "ListApiKeys", key_secrets["admin key"]) == grpc.StatusCode.OK
    assert _grpc_code(info.grpc["auth"], "ListApiKeys", key_secrets["admin key"]) == grpc.StatusCode.OK
    assert _grpc_code(info.grpc["auth"], "ListApiKeys", session) == grpc.StatusCode.OK
    assert _grpc_code(info.grpc["auth"], "ListApiKeys", unknown) == grpc.StatusCode.UNAUTHENTICATED
    assert _grpc_code(info.grpc["search"], "GetIndexStatus", key_secrets["revoked key"]) in {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
    # A repository with an access token (given through the environment, as `--token-env` wants),
    # its webhook secret shown once, then rotated; and a signed webhook delivery for it.
    origin = Path(info.data_dir).parent / "secrets-origin"
    origin.mkdir()
    for args in (("init", "-q", "-b", "main"), ("commit", "-q", "--allow-empty", "-m", "first")):
        subprocess.run(
            ["git", "-c", "user.email=t@example.test", "-c", "user.name=t", *args], cwd=origin, check=True
        )
    access_token = "ghp_" + secrets.token_urlsafe(30)
    added = kotadb(
        "repos",
        "add",
        "octo/secrets",
        origin.as_uri(),
        "--token-env",
        "SECRETS_TEST_TOKEN",
        "--watch",
        "--data-dir",
        str(dev.data_dir),
        env=_cli_env() | {"SECRETS_TEST_TOKEN": access_token},
    )
    assert added.returncode == 0, added.stdout + added.stderr
    webhook_secret = added.stdout.split("webhook secret", 1)[1].split()[0]
    repository_id = added.stdout.split("(", 1)[1].split(")", 1)[0]
    rotated_secret = _rotate_webhook_secret(target, info.demo_api_key, repository_id)
    body = json.dumps({"zen": "secrets"}).encode()
    signature = "sha256=" + hmac.new(rotated_secret.encode(), body, hashlib.sha256).hexdigest()
    ping = urllib.request.Request(
        f"{gateway}/v1/webhooks/github/{repository_id}",
        data=body,
        method="POST",
        headers={
            "content-type": "application/json",
            "x-github-event": "ping",
            "x-github-delivery": str(uuid.uuid4()),
            "x-hub-signature-256": signature,
        },
    )
    with urllib.request.urlopen(ping, timeout=30) as answered:
        assert answered.status == 200
    key_secrets |= {
        "access token": access_token,
        "webhook secret": webhook_secret,
        "rotated webhook secret": rotated_secret,
    }
    _wait_for_access_log(Path(info.log_files["envoy"]), len(requests) + 4)

    identity_key = (dev.data_dir / "identity.key").read_text().strip()
    # The AES key itself (the base64 after `kid:`), wherever it might be copied.
    ingest_key = (dev.data_dir / "ingest-secret.keys").read_text().strip().split(":", 1)[1]
    allowed = {
        # Where a secret must be kept, each in one 0600 file of its own.
        "demo key": (info.demo_api_key, {dev.data_dir / "stack.json"}),
        "identity key": (identity_key, {dev.data_dir / "identity.key"}),
        "access-log token": (access_log_token(identity_key), {dev.data_dir / "envoy" / "envoy.yaml"}),
        "ingest secret key": (ingest_key, {dev.data_dir / "ingest-secret.keys"}),
    }
    searched = {name: (value, set[Path]()) for name, value in key_secrets.items()} | allowed
    files = _stack_files(info)
    assert Path(info.log_files["auth"]) in files and Path(info.log_files["postgres"]) in files
    hits = []
    for path in files:
        content = path.read_bytes()
        for name, (value, homes) in searched.items():
            if value.encode() in content and path not in homes:
                hits.append(f"{name} in {path}")
    assert not hits, "secrets written where they do not belong:\n" + "\n".join(hits)


def test_logs_and_secrets_are_private_files_in_private_directories(dev: DevStack) -> None:
    info = dev.info()
    root = dev.data_dir
    for directory in (root, root / "logs", root / "run", root / "envoy", root / "search", root / "postgres"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    private = [
        root / "stack.json",
        root / "identity.key",
        root / "ingest-secret.keys",
        root / "envoy" / "envoy.yaml",
        *(Path(path) for path in info.log_files.values()),
    ]
    assert {Path(path).name for path in info.log_files.values()} >= {
        "auth.log",
        "ingest.log",
        "search.log",
        "envoy.log",
        "postgres.log",
    }
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for log in (root / "logs").iterdir():
        assert stat.S_IMODE(log.stat().st_mode) == 0o600, log


def test_stack_json_is_typed_and_private(dev: DevStack, tmp_path: Path) -> None:
    info = dev.info()
    assert info.metrics["envoy"] == f"{info.envoy_admin}/stats/prometheus"
    copy = tmp_path / "stack.json"
    info.save(copy)
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert StackInfo.load(copy) == info
    broken = json.loads(copy.read_text()) | {"pids": {"auth": "one"}}
    copy.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'pids'"):
        StackInfo.load(copy)
    del broken["gateway"]
    copy.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="no 'gateway'"):
        StackInfo.load(copy)
    assert uuid.UUID(info.demo_user_id) == DEMO_USER_ID
