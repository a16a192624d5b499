"""Backend: the KotaDB calls an MCP tool makes, always as the caller, never as a privileged key.

Two ways to reach the services, one per transport:

* stdio (`kotadb mcp`) talks to the gateway with the caller's own API key, exactly like
  `kotadb push` (services/cli/client.py): every RPC passes the gateway's Check, so each is
  authorized, rate limited, counted against the quota and metered.
* Streamable HTTP (`kotadb mcp --http`) sits behind the gateway. Check has already authorized
  the `/mcp` request (one admitted request, metered) and, as on every route, replaced the
  `Authorization` header by the signed identity `x-kotadb-identity` (services/common/identity.py),
  bound to `/mcp` and valid for seconds. The server verifies it with the identity key every
  service holds, then calls the ingest and search services on that caller's behalf, each call
  signed for its own method (services/common/delegation.py). The services check permissions
  themselves, so a read-only key stays read-only; the process keeps no API key and no session.

Every gRPC failure becomes a `ToolError` whose text names the status, the reason and what to do
(a rate limit's retry time, a missing permission), so the agent sees a tool error, not a crash.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import grpc
from kotadb.v1 import (
    document_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    job_pb2,
    repository_pb2,
    search_pb2,
    search_pb2_grpc,
)
from mcp.server.mcpserver.exceptions import ToolError

from services.cli.client import MAX_MESSAGE_BYTES, describe_rpc_error

# Seconds one RPC may take; below the signed identity's one-minute life.
RPC_TIMEOUT = 30.0
# Repositories read when resolving a name to an id (one page; more is refused as ambiguous work).
REPOSITORY_PAGE = 1000

Message = TypeVar("Message")

# What an agent should do about each failure, by gRPC status.
_ADVICE: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "fix the arguments and call again",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate limited or over quota: wait the retry time, then call again",
    grpc.StatusCode.PERMISSION_DENIED: "this API key lacks the permission; use a key that has it",
    grpc.StatusCode.UNAUTHENTICATED: "the API key was refused; check KOTADB_API_KEY",
    grpc.StatusCode.NOT_FOUND: "nothing by that name for this key",
    grpc.StatusCode.UNAVAILABLE: "temporarily unavailable: call again in a moment",
    grpc.StatusCode.DEADLINE_EXCEEDED: "took too long: narrow the query",
    grpc.StatusCode.FAILED_PRECONDITION: "not possible in the current state",
}


def tool_error(error: grpc.aio.AioRpcError) -> ToolError:
    """tool_error turns a failed call into the ToolError the agent reads: status, reason, advice.

    A service's refusal carries its reason and retry time in `google.rpc.Status` details; the
    gateway's own refusals (Check: rate limit, quota, key) carry them in the headers
    `x-kotadb-error-reason` and `retry-after` instead, so both are read.
    """
    advice = _ADVICE.get(error.code())
    described = describe_rpc_error(error)
    headers = _headers(error)
    reason = headers.get("x-kotadb-error-reason", "")
    code = error.code().name if error.code() is not None else "UNKNOWN"
    if reason and described.startswith(f"{code}:"):
        described = f"{code} {reason}" + described[len(code) :]
    retry = headers.get("retry-after", "")
    if retry.isdigit() and "retry after" not in described:
        described += f" (retry after {retry}s)"
    return ToolError(f"{described} — {advice}" if advice else described)


def _headers(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """_headers collects a failed call's text metadata, initial and trailing."""
    found: dict[str, str] = {}
    for metadata in (error.initial_metadata(), error.trailing_metadata()):
        for key, value in cast(Iterable[tuple[str, str | bytes]], metadata or ()):
            if isinstance(value, str):
                found.setdefault(key, value)
    return found


@dataclasses.dataclass(frozen=True)
class Backend:
    """Backend is one caller's view of KotaDB: service stubs and the metadata that says who calls."""

    ingest: ingest_pb2_grpc.IngestServiceAsyncStub
    search: search_pb2_grpc.SearchServiceAsyncStub
    metadata: tuple[tuple[str, str], ...]

    async def call(self, method: Callable[..., Awaitable[Message]], request: Any) -> Message:
        """call runs one unary RPC as the caller, turning a failure into a ToolError."""
        try:
            return await method(request, metadata=self.metadata, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            raise tool_error(error) from None

    async def search_code(self, request: search_pb2.SearchCodeRequest) -> search_pb2.SearchCodeResponse:
        """search_code runs SearchCode."""
        return await self.call(self.search.SearchCode, request)

    async def search_symbols(
        self, request: search_pb2.SearchSymbolsRequest
    ) -> search_pb2.SearchSymbolsResponse:
        """search_symbols runs SearchSymbols."""
        return await self.call(self.search.SearchSymbols, request)

    async def index_status(self) -> search_pb2.IndexStatus:
        """index_status runs GetIndexStatus for the caller's tenant."""
        return await self.call(self.search.GetIndexStatus, search_pb2.GetIndexStatusRequest())

    async def repositories(self) -> list[repository_pb2.Repository]:
        """repositories lists the caller's repositories (every page)."""
        found: list[repository_pb2.Repository] = []
        token = ""
        while True:
            page = await self.call(
                self.ingest.ListRepositories,
                ingest_pb2.ListRepositoriesRequest(page_size=REPOSITORY_PAGE, page_token=token),
            )
            found.extend(page.repositories)
            token = page.next_page_token
            if not token or len(found) >= 10 * REPOSITORY_PAGE:
                return found

    async def repository(self, name_or_id: str) -> repository_pb2.Repository:
        """repository finds one of the caller's repositories by id or full name (`org/repo`)."""
        wanted = name_or_id.strip()
        if not wanted:
            raise ToolError("INVALID_ARGUMENT: repository is empty — give its full name or id")
        if _is_uuid(wanted):
            return await self.call(self.ingest.GetRepository, ingest_pb2.GetRepositoryRequest(id=wanted))
        matches = [r for r in await self.repositories() if r.full_name.lower() == wanted.lower()]
        if not matches:
            raise ToolError(
                f"NOT_FOUND: no repository named {wanted!r} for this key — list_repositories shows the names"
            )
        return matches[0]

    async def find_document(self, path: str, repository: str | None) -> document_pb2.Document:
        """find_document reads the document at exactly `path` (in `repository`, if given), with content."""
        repository_id = (await self.repository(repository)).id if repository else ""
        listed = await self.call(
            self.ingest.ListDocuments,
            ingest_pb2.ListDocumentsRequest(
                path_prefix=path,
                repository_id=repository_id,
                page_size=100,
                view=ingest_pb2.DOCUMENT_VIEW_BASIC,
            ),
        )
        exact = [d for d in listed.documents if d.path == path]
        if not exact:
            where = f" in {repository}" if repository else ""
            raise ToolError(f"NOT_FOUND: no document at {path!r}{where} — search_code with file: finds paths")
        if len(exact) > 1:
            names = ", ".join(sorted(d.repository_name or d.repository_id or "(pushed)" for d in exact))
            raise ToolError(
                f"INVALID_ARGUMENT: {path!r} exists in several repositories ({names}) — pass repository"
            )
        return await self.call(
            self.ingest.GetDocument,
            ingest_pb2.GetDocumentRequest(id=exact[0].id, view=ingest_pb2.DOCUMENT_VIEW_FULL),
        )

    async def upsert(self, documents: list[document_pb2.Document]) -> ingest_pb2.UpsertDocumentsResponse:
        """upsert writes documents with one UpsertDocuments call, idempotent under retries."""
        request = ingest_pb2.UpsertDocumentsRequest(documents=documents, request_id=f"mcp-{uuid.uuid4()}")
        return await self.call(self.ingest.UpsertDocuments, request)

    async def sync(self, repository_id: str) -> job_pb2.Job:
        """sync queues a sync of one repository and returns its job."""
        return await self.call(
            self.ingest.SyncRepository,
            ingest_pb2.SyncRepositoryRequest(id=repository_id, request_id=f"mcp-{uuid.uuid4()}"),
        )

    async def watch(self, job_id: str, seconds: float) -> job_pb2.Job.State.ValueType:
        """watch follows a job's events for at most `seconds`; returns the last state seen."""
        state: job_pb2.Job.State.ValueType = job_pb2.Job.QUEUED
        stream = self.ingest.WatchJob(
            ingest_pb2.WatchJobRequest(id=job_id), metadata=self.metadata, timeout=seconds
        )
        try:
            async for event in stream:
                state = event.state
                if state in TERMINAL_STATES:
                    break
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise tool_error(error) from None
        finally:
            stream.cancel()
        return state

    async def job(self, job_id: str) -> job_pb2.Job:
        """job reads one job."""
        return await self.call(self.ingest.GetJob, ingest_pb2.GetJobRequest(id=job_id))


TERMINAL_STATES = (job_pb2.Job.SUCCEEDED, job_pb2.Job.FAILED, job_pb2.Job.CANCELLED)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def channel_options() -> list[tuple[str, int]]:
    """channel_options are the message size bounds every channel of the MCP server uses."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


class Channels:
    """Channels opens the gRPC channels lazily (grpc.aio binds them to the running event loop).

    `ingest` and `search` are the addresses to call; for stdio both are the gateway.
    """

    def __init__(
        self, ingest: str, search: str, *, secure: bool = False, interceptors: Sequence[Any] = ()
    ) -> None:
        self._addresses = (ingest, search)
        self._secure = secure
        self._interceptors = list(interceptors)
        self._stubs: (
            tuple[ingest_pb2_grpc.IngestServiceAsyncStub, search_pb2_grpc.SearchServiceAsyncStub] | None
        ) = None
        self._opened: list[grpc.aio.Channel] = []

    def stubs(self) -> tuple[ingest_pb2_grpc.IngestServiceAsyncStub, search_pb2_grpc.SearchServiceAsyncStub]:
        """stubs returns the two service stubs, opening the channels on first use."""
        if self._stubs is None:
            ingest_address, search_address = self._addresses
            ingest = self._open(ingest_address)
            search = ingest if search_address == ingest_address else self._open(search_address)
            self._stubs = (
                ingest_pb2_grpc.IngestServiceStub(ingest),
                search_pb2_grpc.SearchServiceStub(search),
            )
        return self._stubs

    def backend(self, metadata: tuple[tuple[str, str], ...]) -> Backend:
        """backend is a Backend calling as whoever `metadata` names."""
        ingest, search = self.stubs()
        return Backend(ingest=ingest, search=search, metadata=metadata)

    def _open(self, address: str) -> grpc.aio.Channel:
        if self._secure:
            channel = grpc.aio.secure_channel(
                address,
                grpc.ssl_channel_credentials(),
                options=channel_options(),
                interceptors=self._interceptors,
            )
        else:
            channel = grpc.aio.insecure_channel(
                address, options=channel_options(), interceptors=self._interceptors
            )
        self._opened.append(channel)
        return channel

    async def close(self) -> None:
        """close closes every channel opened."""
        for channel in self._opened:
            await channel.close(None)
        self._opened.clear()
        self._stubs = None
