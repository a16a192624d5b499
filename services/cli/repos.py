"""`kotadb repos` and `kotadb jobs`: register repositories, sync them and follow their jobs.

    kotadb repos add NAME URL [--branch B] [--include GLOB]… [--exclude GLOB]… [--max-file-bytes N]
                              [--token-env VAR] [--no-sync] [--watch]
                                                                   register (prints the webhook secret once)
    kotadb repos list                                              the caller's repositories
    kotadb repos sync NAME|ID [--full] [--watch]                   queue a sync job
    kotadb repos rm NAME|ID                                        delete a repository and its documents
    kotadb jobs list [--repository NAME|ID]                        newest jobs first
    kotadb jobs watch ID                                           live progress until the job ends

A private repository's access token is read from the environment variable named by
`--token-env` (never from the command line, where any user of the machine could read it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from kotadb.v1 import ingest_pb2, ingest_pb2_grpc, job_pb2, repository_pb2

from services.cli import client
from services.cli.progress import Progress

PROVIDERS: dict[str, repository_pb2.Repository.Provider.ValueType] = {
    "github": repository_pb2.Repository.GITHUB,
    "gitlab": repository_pb2.Repository.GITLAB,
    "git": repository_pb2.Repository.GIT,
}
# Job states after which a job never changes again.
FINAL_STATES = frozenset({job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED, job_pb2.Job.CANCELLED})

if TYPE_CHECKING:  # the asyncio stub type exists only in the generated .pyi
    Stub = ingest_pb2_grpc.IngestServiceAsyncStub
    Command = Callable[[Stub, client.Target, argparse.Namespace], Awaitable[int]]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """register adds `kotadb repos …` and `kotadb jobs …`."""
    repos = subparsers.add_parser("repos", help="register, list, sync and remove repositories")
    repo_commands = repos.add_subparsers(dest="repos_command", metavar="COMMAND")
    repo_commands.required = True

    add = repo_commands.add_parser("add", help="register a git repository (prints its webhook secret once)")
    add.add_argument("name", help="the repository's name, e.g. owner/project")
    add.add_argument("git_url", metavar="URL", help="https://, ssh:// or scp-style git URL")
    add.add_argument("--branch", default="", help="branch to index (default: the remote's default)")
    add.add_argument(
        "--provider",
        choices=tuple(PROVIDERS),
        default=None,
        help="default: from the URL's host (github.com, …)",
    )
    add.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="index only matching files (repeatable)",
    )
    add.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="leave matching files out (repeatable)"
    )
    add.add_argument(
        "--max-file-bytes", type=int, default=0, metavar="N", help="skip larger files (default: the server's)"
    )
    add.add_argument("--token-env", metavar="VAR", help="environment variable holding an access token")
    add.add_argument("--no-sync", action="store_true", help="register only; do not queue a first sync")
    add.add_argument("--watch", action="store_true", help="follow the first sync until it ends")
    _command(add, _add)

    listing = repo_commands.add_parser("list", help="the caller's repositories")
    _command(listing, _list)

    sync = repo_commands.add_parser("sync", help="queue a sync job")
    sync.add_argument("repository", metavar="NAME|ID")
    sync.add_argument("--full", action="store_true", help="re-read every file, not only what changed")
    sync.add_argument("--watch", action="store_true", help="follow the job until it ends")
    _command(sync, _sync)

    remove = repo_commands.add_parser("rm", help="delete a repository and its documents")
    remove.add_argument("repository", metavar="NAME|ID")
    _command(remove, _remove)

    jobs = subparsers.add_parser("jobs", help="list indexing jobs and watch their progress")
    job_commands = jobs.add_subparsers(dest="jobs_command", metavar="COMMAND")
    job_commands.required = True
    job_list = job_commands.add_parser("list", help="newest jobs first")
    job_list.add_argument("--repository", metavar="NAME|ID", default="")
    job_list.add_argument("--limit", type=int, default=20)
    _command(job_list, _jobs_list)
    watch = job_commands.add_parser("watch", help="live progress of a job until it ends")
    watch.add_argument("job_id", metavar="ID")
    _command(watch, _jobs_watch)


def _command(parser: argparse.ArgumentParser, command: Command) -> None:
    client.add_target_arguments(parser)
    parser.set_defaults(func=lambda args: run(command, args))


def run(command: Command, args: argparse.Namespace) -> int:
    """run resolves the gateway, opens a channel and runs `command`, printing failures as one line."""
    try:
        target = client.resolve_target(args)
    except client.ClientError as exc:
        return client.fail(str(exc))

    async def go() -> int:
        async with client.open_channel(target) as channel:
            return await command(ingest_pb2_grpc.IngestServiceStub(channel), target, args)

    try:
        return asyncio.run(go())
    except grpc.aio.AioRpcError as exc:
        return client.fail(client.describe_rpc_error(exc))
    except client.ClientError as exc:
        return client.fail(str(exc))


async def resolve_repository(stub: Stub, target: client.Target, name_or_id: str) -> repository_pb2.Repository:
    """resolve_repository finds the caller's repository by id or full name."""
    token = ""
    while True:
        page = await stub.ListRepositories(
            ingest_pb2.ListRepositoriesRequest(page_size=1000, page_token=token),
            metadata=client.call_metadata(target),
        )
        for repository in page.repositories:
            if name_or_id in (repository.id, repository.full_name):
                return repository
        token = page.next_page_token
        if not token:
            raise client.ClientError(f"no repository named {name_or_id!r} (see `kotadb repos list`)")


async def _add(stub: Stub, target: client.Target, args: argparse.Namespace) -> int:
    token = ""
    if args.token_env:
        token = os.environ.get(args.token_env, "")
        if not token:
            raise client.ClientError(f"--token-env {args.token_env}: the variable is empty or not set")
    provider = PROVIDERS[args.provider] if args.provider else repository_pb2.Repository.PROVIDER_UNSPECIFIED
    request = ingest_pb2.CreateRepositoryRequest(
        repository=repository_pb2.Repository(
            full_name=args.name,
            url=args.git_url,
            default_branch=args.branch,
            provider=provider,
            include_globs=args.include,
            exclude_globs=args.exclude,
            max_file_bytes=args.max_file_bytes,
        ),
        access_token=token,
        sync=not args.no_sync,
    )
    created = await stub.CreateRepository(request, metadata=client.call_metadata(target))
    repository = created.repository
    branch = repository.default_branch or "the remote's default"
    print(f"registered {repository.full_name} ({repository.id}), branch {branch}")
    print(f"webhook URL     {repository.webhook_url}")
    print(f"webhook secret  {created.webhook_secret}   (shown once: configure it on GitHub now)")
    if created.HasField("job"):
        print(f"sync job        {created.job.id}   (kotadb jobs watch {created.job.id})")
        if args.watch:
            return await watch_job(stub, target, created.job.id)
    return 0


async def _list(stub: Stub, target: client.Target, args: argparse.Namespace) -> int:
    token = ""
    rows: list[repository_pb2.Repository] = []
    while True:
        page = await stub.ListRepositories(
            ingest_pb2.ListRepositoriesRequest(page_size=1000, page_token=token),
            metadata=client.call_metadata(target),
        )
        rows.extend(page.repositories)
        token = page.next_page_token
        if not token:
            break
    if not rows:
        print("no repositories (add one with `kotadb repos add NAME URL`)", file=sys.stderr)
        return 0
    for repository in rows:
        state = repository_pb2.Repository.State.Name(repository.state)
        commit = repository.last_synced_commit[:12] or "-"
        print(
            f"{repository.id}  {repository.full_name:<32} {state:<8} {repository.default_branch:<12} "
            f"{commit:<12} {repository.document_count} docs"
        )
    return 0


async def _sync(stub: Stub, target: client.Target, args: argparse.Namespace) -> int:
    repository = await resolve_repository(stub, target, args.repository)
    job = await stub.SyncRepository(
        ingest_pb2.SyncRepositoryRequest(id=repository.id, full=args.full),
        metadata=client.call_metadata(target),
    )
    print(f"queued job {job.id} ({job_pb2.Job.Kind.Name(job.kind)}) for {repository.full_name}")
    if args.watch:
        return await watch_job(stub, target, job.id)
    return 0


async def _remove(stub: Stub, target: client.Target, args: argparse.Namespace) -> int:
    repository = await resolve_repository(stub, target, args.repository)
    await stub.DeleteRepository(
        ingest_pb2.DeleteRepositoryRequest(id=repository.id), metadata=client.call_metadata(target)
    )
    print(f"deleted {repository.full_name} ({repository.id})")
    return 0


async def _jobs_list(stub: Stub, target: client.Target, args: argparse.Namespace) -> int:
    repository_id = ""
    if args.repository:
        repository_id = (await resolve_repository(stub, target, args.repository)).id
    page = await stub.ListJobs(
        ingest_pb2.ListJobsRequest(page_size=max(1, min(args.limit, 1000)), repository_id=repository_id),
        metadata=client.call_metadata(target),
    )
    for job in page.jobs:
        progress = job.progress
        print(
            f"{job.id}  {job_pb2.Job.State.Name(job.state):<9} {job_pb2.Job.Kind.Name(job.kind):<16} "
            f"{progress.files_processed}/{progress.files_total} files  "
            f"{job.create_time.ToDatetime():%Y-%m-%d %H:%M:%S}"
        )
    return 0


async def _jobs_watch(stub: Stub, target: client.Target, args: argparse.Namespace) -> int:
    return await watch_job(stub, target, args.job_id)


async def watch_job(stub: Stub, target: client.Target, job_id: str) -> int:
    """watch_job follows a job's events with a progress line; exit 0 only when it succeeded.

    A watch stream the server closes before the job ends (it bounds how long one stays open) is
    resumed after the last event seen. The final line counts what the job did.
    """
    progress = Progress(f"job {job_id[:8]}")
    last = job_pb2.Job.STATE_UNSPECIFIED
    sequence = 0
    while last not in FINAL_STATES:
        stream = stub.WatchJob(
            ingest_pb2.WatchJobRequest(id=job_id, after_sequence=sequence),
            metadata=client.call_metadata(target),
        )
        try:
            async for event in stream:
                last, sequence = event.state, event.sequence
                done = event.progress
                progress.update(
                    files_done=done.files_processed,
                    files_total=done.files_total,
                    bytes_done=done.bytes_processed,
                )
        except BaseException:
            progress.clear()
            raise
    progress.finish()
    job = await stub.GetJob(ingest_pb2.GetJobRequest(id=job_id), metadata=client.call_metadata(target))
    state = job_pb2.Job.State.Name(job.state)
    if job.state == job_pb2.Job.SUCCEEDED:
        print(f"job {job_id} {state}: {describe_progress(job)}")
        return 0
    return client.fail(f"job {job_id} {state}: {job.error.message or describe_progress(job)}")


def describe_progress(job: job_pb2.Job) -> str:
    """describe_progress summarises a job's counts: indexed, skipped by reason, deleted, commit."""
    done = job.progress
    text = f"{done.files_indexed} indexed, {done.files_skipped} skipped"
    if done.skipped_by_reason:
        reasons = sorted(done.skipped_by_reason.items(), key=lambda item: -item[1])
        text += " (" + ", ".join(f"{count} {reason}" for reason, count in reasons) + ")"
    text += f", {done.files_deleted} deleted, {done.symbols_extracted} symbols"
    if job.commit_sha:
        text += f", at {job.commit_sha[:12]}"
    return text
