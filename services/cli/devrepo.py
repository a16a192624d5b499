"""The dev stack's demo repository: the KotaDB checkout `kotadb dev` runs from, indexed at start.

`kotadb dev` registers this checkout as a `file://` repository of the demo user (the ingest
service accepts local URLs only because the dev stack sets KOTADB_INGEST_ALLOW_LOCAL_URLS) and
queues its sync, so the stack holds real code the moment it is up. It goes through the gateway
with the demo key, the way a user's `kotadb repos add` does, so the path it exercises is the real
one. A data dir that already has the repository gets a new sync instead (the checkout may have
moved on since the last run); an installed copy without a git checkout registers nothing.

The sync indexes the checkout's committed HEAD, as a worker would a remote's branch: files edited
but not committed are what `kotadb push` is for, and the printed examples say so.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
from kotadb.v1 import ingest_pb2, ingest_pb2_grpc, repository_pb2

from services.cli import client, gateway, status
from services.common.stack import StackInfo

DEMO_REPOSITORY = "kotadb/kotadb"
# Seconds each registration call may take: the services are healthy, but the machine may be busy.
CALL_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class DemoRepository:
    """DemoRepository is the registered checkout: its name, id, file URL and the sync job queued."""

    name: str
    id: str
    url: str
    job_id: str
    created: bool


def project_checkout() -> Path | None:
    """project_checkout is the git checkout this code runs from, or None for an installed copy."""
    root = gateway.REPO_ROOT
    return root if (root / ".git").exists() else None


def checkout_branch(checkout: Path) -> str:
    """checkout_branch is the branch the checkout has out ("" when its HEAD is detached).

    The demo repository tracks that branch rather than the remote's default, so a developer on a
    feature branch sees their branch indexed; a detached HEAD has no branch a sync could follow.
    """
    found = subprocess.run(
        ["git", "-C", str(checkout), "symbolic-ref", "--short", "-q", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() if found.returncode == 0 else ""


def register_demo_repository(stack: StackInfo, checkout: Path) -> DemoRepository:
    """register_demo_repository registers `checkout` for the demo user (or finds it) and syncs it.

    It raises grpc.RpcError when the gateway refuses; `kotadb dev` prints that as one line and
    keeps the stack running.
    """
    target = client.target_from_url(stack.gateway, stack.demo_api_key)
    metadata = client.call_metadata(target)
    url = checkout.absolute().as_uri()
    with grpc.insecure_channel(target.address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        existing = _find(stub, metadata, DEMO_REPOSITORY)
        if existing is None:
            created = stub.CreateRepository(
                ingest_pb2.CreateRepositoryRequest(
                    repository=repository_pb2.Repository(
                        full_name=DEMO_REPOSITORY,
                        url=url,
                        default_branch=checkout_branch(checkout),
                        provider=repository_pb2.Repository.GIT,
                    ),
                    sync=True,
                ),
                metadata=metadata,
                timeout=CALL_TIMEOUT,
            )
            repository = created.repository
            return DemoRepository(repository.full_name, repository.id, repository.url, created.job.id, True)
        job = stub.SyncRepository(
            ingest_pb2.SyncRepositoryRequest(id=existing.id), metadata=metadata, timeout=CALL_TIMEOUT
        )
        return DemoRepository(existing.full_name, existing.id, existing.url, job.id, False)


def _find(
    stub: ingest_pb2_grpc.IngestServiceStub, metadata: tuple[tuple[str, str], ...], name: str
) -> repository_pb2.Repository | None:
    """_find returns the caller's repository called `name`, walking every page of the list."""
    token = ""
    while True:
        page = stub.ListRepositories(
            ingest_pb2.ListRepositoriesRequest(page_size=1000, page_token=token),
            metadata=metadata,
            timeout=CALL_TIMEOUT,
        )
        for repository in page.repositories:
            if repository.full_name == name:
                return repository
        token = page.next_page_token
        if not token:
            return None


def data_dir_flag(stack: StackInfo) -> str:
    """data_dir_flag is ` --data-dir D` for a stack outside the default data dir, else nothing."""
    return "" if Path(stack.data_dir) == status.default_data_dir() else f" --data-dir {stack.data_dir}"


def examples(stack: StackInfo, demo: DemoRepository | None) -> list[str]:
    """examples are the commands `kotadb dev` prints: watch the demo sync, push, list, add."""
    # The client commands find this stack through the default data dir's stack.json; any other
    # data dir has to be named.
    where = data_dir_flag(stack)
    rows: list[tuple[str, str]] = []
    if demo is not None:
        rows.append((f"kotadb jobs watch {demo.job_id}{where}", f"the demo repository {demo.name} indexing"))
    rows += [
        (f"kotadb push .{where}", "send this directory's changed files (uncommitted ones too)"),
        (f"kotadb repos list{where}", "the demo user's repositories"),
        (f"kotadb repos sync {DEMO_REPOSITORY} --watch{where}", "index its newest commit again"),
        (f"kotadb jobs list{where}", "indexing jobs, newest first"),
    ]
    return [f"  {command}   # {comment}" for command, comment in rows]


def register_logged(stack: StackInfo, log: Callable[[str], None]) -> DemoRepository | None:
    """register_logged indexes this checkout for the demo user; a refusal is logged, not fatal."""
    checkout = project_checkout()
    if checkout is None:
        log("not running from a git checkout: no demo repository registered")
        return None
    if not checkout_branch(checkout):
        log("the checkout's HEAD is detached (no branch a sync could follow): no demo repository registered")
        return None
    try:
        demo = register_demo_repository(stack, checkout)
    except grpc.RpcError as exc:
        log(f"could not register the demo repository: {client.describe_rpc_error(exc)}")
        return None
    verb = "registered" if demo.created else "found"
    log(f"{verb} demo repository {demo.name} ({demo.url}); sync job {demo.job_id} queued")
    return demo
