"""`kotadb push DIR`: send a local tree's text files to KotaDB, only what changed.

    kotadb push DIR [--repository NAME|ID] [--prefix P] [--prune] [--dry-run] [--verbose]

1. The tree is walked with the sync workers' own rules (services/ingest/walk.py, with the
   workers' default skipped directories and size limit), so a push and a repository sync leave
   out the same files for the same reasons (binary, not UTF-8, too large, symlinks, vendored and
   generated directories).
2. The server is asked for its path → content hash map of the same scope (ListDocuments with a
   read mask of id, path, hash and revision); local files whose SHA-256 matches are never sent.
3. The rest is streamed with StreamUpsertDocuments, read off the event loop in batches one batch
   ahead of the stream (memory stays bounded whatever the tree's size), with a progress line on
   stderr: files, bytes, rate and ETA.
4. `--prune` deletes the scope's documents whose paths are no longer in the tree (tombstones in
   the change feed, like a repository sync's deletions).

The scope is one repository (`--repository`) or, without it, the caller's documents that belong
to no repository; `--prefix P` narrows it to paths under `P/` (each file is stored as
`P/<path>`), so several trees can share a scope without pruning each other. Stdout gets the
summary: sent, unchanged, skipped with reasons, rejected, deleted, and the final revision (pass it
as `min_revision` to a search to read what was pushed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf import field_mask_pb2
from kotadb.v1 import document_pb2, ingest_pb2

from services.cli import client
from services.cli.progress import Progress, human_bytes
from services.cli.repos import resolve_repository, run
from services.ingest.config import IngestSettings
from services.ingest.walk import FileEntry, Skip, WalkRules, read_file, split_dirs, walk

if TYPE_CHECKING:
    from services.cli.repos import Stub

# Paths of rejected documents and skipped files listed in the summary (all with --verbose).
SHOWN = 10
# Files read per trip to the reading thread: a thread hop costs ~0.1 ms, so one per file would
# cost seconds on a 70,000-file tree; 8 MiB bounds what a batch holds in memory.
READ_BATCH_FILES = 128
READ_BATCH_BYTES = 8 * 1024 * 1024


@dataclasses.dataclass
class PushReport:
    """PushReport counts what a push did, for the summary."""

    sent: int = 0
    sent_bytes: int = 0
    unchanged: int = 0
    created: int = 0
    updated: int = 0
    rejected_count: int = 0
    rejected: list[str] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    deleted: int = 0
    revision: int = 0


@dataclasses.dataclass(frozen=True)
class Stored:
    """Stored is what the server holds for one path of the scope."""

    id: str
    content_hash: str
    revision: int


def worker_rules(max_file_bytes: int | None = None) -> WalkRules:
    """worker_rules are the sync workers' default walk rules (IngestSettings' defaults).

    The defaults, not this machine's KOTADB_INGEST_* variables: a client's environment says
    nothing about the server's configuration.
    """
    defaults: dict[str, object] = {field.name: field.default for field in dataclasses.fields(IngestSettings)}
    limit = defaults["sync_max_file_bytes"]
    assert isinstance(limit, int)
    return WalkRules(max_file_bytes=max_file_bytes or limit, skip_dirs=split_dirs(str(defaults["skip_dirs"])))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """register adds `kotadb push`."""
    parser = subparsers.add_parser("push", help="send a directory's changed text files to KotaDB")
    parser.add_argument("directory", type=Path, metavar="DIR")
    parser.add_argument("--repository", metavar="NAME|ID", default="", help="push into this repository")
    parser.add_argument("--prefix", default="", help="store each file as PREFIX/<path>; the scope is PREFIX/")
    parser.add_argument("--prune", action="store_true", help="delete documents whose files are gone")
    parser.add_argument("--dry-run", action="store_true", help="compare and report; send and delete nothing")
    parser.add_argument("--verbose", "-v", action="store_true", help="list every skipped and rejected file")
    parser.add_argument(
        "--max-file-bytes", type=int, default=None, help="skip larger files (default: the workers' 1 MiB)"
    )
    client.add_target_arguments(parser)
    parser.set_defaults(func=lambda args: run(_push, args))


async def remote_hashes(
    stub: Stub, target: client.Target, repository_id: str, prefix: str = ""
) -> dict[str, Stored]:
    """remote_hashes maps each stored path of the scope to its document id, hash and revision."""
    found: dict[str, Stored] = {}
    mask = field_mask_pb2.FieldMask(paths=["id", "path", "content_hash", "repository_id", "revision"])
    token = ""
    while True:
        page = await stub.ListDocuments(
            ingest_pb2.ListDocumentsRequest(
                page_size=1000,
                page_token=token,
                repository_id=repository_id,
                path_prefix=prefix,
                read_mask=mask,
            ),
            metadata=client.call_metadata(target),
        )
        for document in page.documents:
            if document.repository_id == repository_id:  # "" lists every scope; keep ours
                found[document.path] = Stored(document.id, document.content_hash, document.revision)
        token = page.next_page_token
        if not token:
            return found


@dataclasses.dataclass(frozen=True)
class LocalTree:
    """LocalTree is a walked directory: files to send, unchanged paths, and skips, with the rules."""

    root: Path
    rules: WalkRules
    scope: str
    to_send: list[FileEntry]
    present: set[str]
    unchanged: int
    skipped: list[Skip]


def compare_tree(root: Path, rules: WalkRules, scope: str, remote: dict[str, Stored]) -> LocalTree:
    """compare_tree walks `root` and hashes the files the server already has (blocking: run in a thread).

    A file the server lacks is sent without hashing; one it has is sent only when the hashes differ.
    """
    to_send: list[FileEntry] = []
    present: set[str] = set()
    skipped: list[Skip] = []
    unchanged = 0
    for found in walk(root, rules):
        if isinstance(found, Skip):
            skipped.append(found)
            continue
        path = scope + found.path
        stored = remote.get(path)
        if stored is None:
            present.add(path)
            to_send.append(found)
            continue
        content = read_file(root, found.path, rules)
        if isinstance(content, Skip):
            skipped.append(content)
            continue
        present.add(path)
        if hashlib.sha256(content).hexdigest() == stored.content_hash:
            unchanged += 1
        else:
            to_send.append(found)
    return LocalTree(root, rules, scope, to_send, present, unchanged, skipped)


def _batches(entries: Sequence[FileEntry]) -> Iterator[list[FileEntry]]:
    batch: list[FileEntry] = []
    size = 0
    for entry in entries:
        if batch and (len(batch) >= READ_BATCH_FILES or size + entry.size > READ_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry.size
    if batch:
        yield batch


def _read_batch(tree: LocalTree, batch: list[FileEntry]) -> list[tuple[FileEntry, bytes | Skip]]:
    return [(entry, read_file(tree.root, entry.path, tree.rules)) for entry in batch]


async def _requests(
    tree: LocalTree, repository_id: str, report: PushReport, progress: Progress
) -> AsyncIterator[ingest_pb2.StreamUpsertDocumentsRequest]:
    """_requests yields the changed files as stream messages, reading the next batch meanwhile."""
    batches = _batches(tree.to_send)
    first = next(batches, None)
    pending = asyncio.ensure_future(asyncio.to_thread(_read_batch, tree, first)) if first else None
    while pending is not None:
        batch = await pending
        following = next(batches, None)
        pending = (
            asyncio.ensure_future(asyncio.to_thread(_read_batch, tree, following)) if following else None
        )
        for entry, content in batch:
            progress.update(files_done=progress.files_done + 1, bytes_done=progress.bytes_done + entry.size)
            if isinstance(content, Skip):  # changed or vanished since the walk
                report.skipped.append(content)
                tree.present.discard(tree.scope + entry.path)
                continue
            report.sent += 1
            report.sent_bytes += len(content)
            yield ingest_pb2.StreamUpsertDocumentsRequest(
                document=document_pb2.Document(
                    path=tree.scope + entry.path, repository_id=repository_id, content_bytes=content
                )
            )


async def _refusal_behind(
    stub: Stub, target: client.Target, error: grpc.aio.AioRpcError
) -> grpc.aio.AioRpcError:
    """_refusal_behind is the real refusal behind a stream cut while it was still uploading.

    The gateway refuses a call from its headers (no permission, rate limited) and closes the
    stream; a client still sending then sometimes sees only gRPC's INTERNAL "Internal error from
    Core" instead of the status. An empty stream asks the same question without uploading
    anything, so its refusal arrives intact; if it is accepted, the original error stands.
    """
    if error.code() != grpc.StatusCode.INTERNAL:
        return error

    async def nothing() -> AsyncIterator[ingest_pb2.StreamUpsertDocumentsRequest]:
        return
        yield  # an async generator that sends no message

    try:
        await stub.StreamUpsertDocuments(nothing(), metadata=client.call_metadata(target))
    except grpc.aio.AioRpcError as refused:
        return refused
    return error


async def _push(stub: Stub, target: client.Target, args: argparse.Namespace) -> int:
    root: Path = args.directory
    prefix = args.prefix.strip("/")
    scope = f"{prefix}/" if prefix else ""
    repository_id = ""
    if args.repository:
        repository_id = (await resolve_repository(stub, target, args.repository)).id
    remote = await remote_hashes(stub, target, repository_id, scope)
    if not await asyncio.to_thread(root.is_dir):
        raise client.ClientError(f"{root}: not a directory")
    tree = await asyncio.to_thread(compare_tree, root, worker_rules(args.max_file_bytes), scope, remote)
    report = PushReport(unchanged=tree.unchanged, skipped=list(tree.skipped))
    report.revision = max((stored.revision for stored in remote.values()), default=0)
    progress = Progress("push")
    progress.update(files_total=len(tree.to_send), bytes_total=sum(entry.size for entry in tree.to_send))
    if args.dry_run:  # the files are read all the same: content checks may still skip some
        async for _ in _requests(tree, repository_id, report, progress):
            pass
    elif tree.to_send:
        try:
            response = await stub.StreamUpsertDocuments(
                _requests(tree, repository_id, report, progress), metadata=client.call_metadata(target)
            )
        except grpc.aio.AioRpcError as exc:
            progress.clear()
            raise await _refusal_behind(stub, target, exc) from None
        except BaseException:
            progress.clear()
            raise
        progress.finish()
        report.revision = max(report.revision, response.revision)
        report.created = response.created_count
        report.updated = response.updated_count
        # A file whose content equals the stored one after all (edited back) is not counted as sent.
        report.unchanged += response.unchanged_count
        report.sent -= response.unchanged_count + response.rejected_count
        for result in response.results:
            if result.field_violations:
                reasons = "; ".join(v.description for v in result.field_violations)
                report.rejected.append(f"{result.path}: {reasons}")
        report.rejected_count = int(response.rejected_count)
    if args.prune:
        for path in sorted(set(remote) - tree.present):
            if not args.dry_run:
                deleted = await stub.DeleteDocument(
                    ingest_pb2.DeleteDocumentRequest(id=remote[path].id),
                    metadata=client.call_metadata(target),
                )
                report.revision = max(report.revision, deleted.revision)
            report.deleted += 1
    print_summary(report, verbose=args.verbose, dry_run=args.dry_run)
    return 1 if report.rejected_count else 0


def print_summary(report: PushReport, *, verbose: bool, dry_run: bool) -> None:
    """print_summary writes the push's outcome to stdout, skips grouped by reason."""
    would = "would send" if dry_run else "sent"
    print(
        f"{would} {report.sent} files ({human_bytes(report.sent_bytes)}; {report.created} new, "
        f"{report.updated} updated), {report.unchanged} unchanged, {len(report.skipped)} skipped, "
        f"{report.rejected_count} rejected, {report.deleted} {'to delete' if dry_run else 'deleted'}"
    )
    by_reason = collections.Counter(skip.reason for skip in report.skipped)
    if by_reason:
        print("skipped: " + ", ".join(f"{count} {reason}" for reason, count in by_reason.most_common()))
    for skip in report.skipped if verbose else report.skipped[:SHOWN]:
        print(f"  skipped {skip.path}: {skip.reason}" + (f" ({skip.detail})" if skip.detail else ""))
    if not verbose and len(report.skipped) > SHOWN:
        print(f"  ... {len(report.skipped) - SHOWN} more (--verbose lists them)")
    for line in report.rejected if verbose else report.rejected[:SHOWN]:
        print(f"  rejected {line}", file=sys.stderr)
    if not dry_run:
        print(f"revision {report.revision}")
