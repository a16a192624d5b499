"""searches holds the rules of the search RPCs: request checks, time budgets, read-your-writes, pages.

Every call is scoped to one tenant, the verified caller's, and runs on that tenant's index only.

* Time: a search gets the request's `timeout` (default `default_timeout`), never more than
  `max_timeout` nor the gRPC deadline minus a small margin; waiting for `min_revision` spends
  the same budget. The engine stops at the deadline and reports `limit_hit` with DEADLINE.
* A tenant whose index is still being built (its first use on this replica) is waited for
  within the same budget; past it the call fails UNAVAILABLE (INDEX_BUILDING) with RetryInfo
  while the build goes on (tenants.py).
* `min_revision`: the call waits until the tenant's covered revision reaches it (tailer.py);
  past the budget it fails UNAVAILABLE with RetryInfo. A revision the database has never
  issued is refused as INVALID_ARGUMENT.
* Page tokens: code search uses the engine's cursor, keyed per tenant (tenants.py), so another
  tenant's token fails its integrity check and another query's fails its fingerprint; symbol
  search uses an offset token with the same keyed tag. A code search page with a next page
  pins its snapshot (pins.py), and the token's next page reads that same snapshot however the
  index changed meanwhile, until the pin is released (PAGE_TOKEN_EXPIRED after that).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from services.common import metrics
from services.common.errors import FieldViolation, InvalidArgument, KotaError
from services.search.config import SearchSettings
from services.search.engine import record
from services.search.engine.errors import EngineError, IndexFileError
from services.search.engine.search.candidates import symbol_candidates, symbol_search_screen
from services.search.engine.search.cursor import CursorError, decode_cursor
from services.search.engine.search.results import SearchMode, SearchResult
from services.search.engine.search.searcher import Searcher, SearchRequest
from services.search.engine.symbols.symsearch import (
    SymbolCandidate,
    SymbolMatch,
    search_symbols,
)
from services.search.engine_errors import domain_error
from services.search.streams import StreamBatch, queue_emitter, stream_files
from services.search.tenants import LOST_ERRORS, TenantIndex, TenantManager

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_CONTEXT_LINES = 10
MAX_QUERY_BYTES = 4096
MAX_TOKEN_CHARS = 8192
# Seconds kept back from the gRPC deadline so the answer can still be sent.
DEADLINE_MARGIN = 0.05
# Batches a stream's producer may run ahead of its client (streams.py: memory stays bounded).
STREAM_QUEUE_BATCHES = 2

T = TypeVar("T")
R = TypeVar("R")

# Where a SearchCode call's time goes, so a slow answer can be blamed on one part: `ready` (the
# tenant's index opened, min_revision waited for; on the event loop), `queue` (waiting for a
# search thread), `engine` (the search), `render` (the response built, in the search thread)
# and `resume` (from the thread's end until the loop runs the call again: the loop's lag).
PHASE_SECONDS = metrics.histogram(
    "kotadb_search_phase_seconds",
    "Seconds a SearchCode call spent in each phase: ready, queue, engine, render, resume.",
    ("phase",),
)


@dataclass(frozen=True, slots=True)
class CodeQuery:
    """CodeQuery is a checked code search: the engine's options plus the service's."""

    query: str
    page_size: int | None
    page_token: str
    context_lines: int
    min_revision: int
    mode: SearchMode
    max_matches_per_file: int
    regex: bool
    timeout: float | None


@dataclass(frozen=True, slots=True)
class CodeAnswer:
    """CodeAnswer is a search result with the revision the index covered and the time spent waiting."""

    result: SearchResult
    revision: int
    wait_seconds: float


@dataclass(frozen=True, slots=True)
class SymbolQuery:
    """SymbolQuery is a checked symbol search."""

    pattern: str
    page_size: int
    page_token: str
    kinds: tuple[str, ...]
    language: str
    repository: str
    path_prefix: str
    min_revision: int


@dataclass(frozen=True, slots=True)
class SymbolHit:
    """SymbolHit is one ranked symbol with its document id and the text of its first line."""

    match: SymbolMatch
    document_id: str
    line: str
    score: float


@dataclass(frozen=True, slots=True)
class SymbolAnswer:
    """SymbolAnswer is one page of symbols, the total count and the next page's token."""

    hits: tuple[SymbolHit, ...]
    total: int
    next_token: str
    revision: int


def _bad(field: str, message: str, reason: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field_violations=[FieldViolation(field, message, reason)])


def check_page_size(value: int, field: str = "page_size") -> int:
    """check_page_size maps 0 to the default and refuses negative or huge sizes."""
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if value < 0 or value > MAX_PAGE_SIZE:
        raise _bad(field, f"{field} must be between 0 and {MAX_PAGE_SIZE}", "INVALID_PAGE_SIZE")
    return value


def check_common(
    query: str,
    context_lines: int,
    min_revision: int,
    max_matches: int,
    token: str,
    *,
    query_field: str = "query",
) -> None:
    """check_common refuses the fields every code search shares when they are out of range."""
    if not query.strip():
        raise _bad(query_field, f"{query_field} must not be empty", "EMPTY_QUERY")
    if len(query.encode("utf-8")) > MAX_QUERY_BYTES:
        raise _bad(query_field, f"{query_field} is longer than {MAX_QUERY_BYTES} bytes", "QUERY_TOO_LONG")
    if not 0 <= context_lines <= MAX_CONTEXT_LINES:
        raise _bad(
            "context_lines", f"context_lines must be between 0 and {MAX_CONTEXT_LINES}", "OUT_OF_RANGE"
        )
    if min_revision < 0:
        raise _bad("min_revision", "min_revision must not be negative", "OUT_OF_RANGE")
    if not 0 <= max_matches <= MAX_PAGE_SIZE:
        raise _bad(
            "max_matches_per_file",
            f"max_matches_per_file must be between 0 and {MAX_PAGE_SIZE}",
            "OUT_OF_RANGE",
        )
    if len(token) > MAX_TOKEN_CHARS:
        raise _bad("page_token", "page_token is too long", "INVALID_PAGE_TOKEN")


class Searches:
    """Searches runs the search RPCs for a tenant over the TenantManager's indexes."""

    def __init__(self, settings: SearchSettings, manager: TenantManager) -> None:
        self.settings = settings
        self.manager = manager

    def deadline(self, timeout: float | None, time_remaining: float | None) -> float:
        """deadline is the monotonic instant the call's work must end by."""
        if timeout is not None and timeout < 0:
            raise _bad("timeout", "timeout must not be negative", "OUT_OF_RANGE")
        budget = min(timeout or self.settings.default_timeout, self.settings.max_timeout)
        if time_remaining is not None:
            budget = min(budget, max(0.0, time_remaining - DEADLINE_MARGIN))
        return time.monotonic() + budget

    async def ready(self, tenant: uuid.UUID, min_revision: int, deadline: float) -> tuple[TenantIndex, float]:
        """ready returns the tenant's index once it covers `min_revision`, and the seconds waited."""
        started = time.monotonic()
        opened = await self.manager.get(tenant, deadline)
        if opened.covered < min_revision:
            head = await self.manager.store.head_revision()
            if min_revision > head:
                raise _bad(
                    "min_revision",
                    f"revision {min_revision} has not been issued (the latest is {head})",
                    "REVISION_IN_FUTURE",
                )
            opened = await self.manager.wait_covered(opened, min_revision, deadline)
        return opened, time.monotonic() - started

    async def code(self, tenant: uuid.UUID, query: CodeQuery, time_remaining: float | None) -> CodeAnswer:
        """code runs one page of a code search."""
        return await self.code_rendered(tenant, query, time_remaining, _same)

    async def code_rendered(
        self,
        tenant: uuid.UUID,
        query: CodeQuery,
        time_remaining: float | None,
        render: Callable[[CodeAnswer], R],
    ) -> R:
        """code_rendered runs one page of a code search and returns `render(answer)`.

        `render` (the servicer's proto conversion) runs in the search thread right after the
        engine, not on the event loop: building a page of thousands of line messages is Python
        work that would otherwise delay every other call the loop serves, health checks included.
        """
        started = time.monotonic()
        deadline = self.deadline(query.timeout, time_remaining)
        opened, waited = await self.ready(tenant, query.min_revision, deadline)
        request = SearchRequest(
            query=query.query,
            limit_files=query.page_size,
            context_lines=query.context_lines,
            mode=query.mode,
            cursor=query.page_token or None,
            deadline=deadline,
            regex=query.regex,
        )
        revision = opened.covered
        searcher = opened.searcher
        generation = self._token_generation(tenant, query.page_token) if query.page_token else None
        submitted = time.monotonic()
        PHASE_SECONDS.labels(phase="ready").observe(submitted - started)

        finished = [0.0]

        def run(cancel: threading.Event) -> R:
            begun = time.monotonic()
            result = self._paged(tenant, searcher, record.replace(request, cancel=cancel), generation)
            searched = time.monotonic()
            rendered = render(CodeAnswer(result, revision, waited))
            finished[0] = time.monotonic()
            PHASE_SECONDS.labels(phase="queue").observe(begun - submitted)
            PHASE_SECONDS.labels(phase="engine").observe(searched - begun)
            PHASE_SECONDS.labels(phase="render").observe(finished[0] - searched)
            return rendered

        answer = await self._engine(opened, self.manager.run_search(run))
        PHASE_SECONDS.labels(phase="resume").observe(time.monotonic() - finished[0])
        return answer

    def _token_generation(self, tenant: uuid.UUID, token: str) -> int:
        """_token_generation is the snapshot generation a page token was issued on (its tag checked)."""
        try:
            return decode_cursor(token, key=self.manager.cursor_key(tenant)).generation
        except CursorError as exc:
            raise domain_error(exc) from exc

    def _paged(
        self, tenant: uuid.UUID, searcher: Searcher, request: SearchRequest, generation: int | None
    ) -> SearchResult:
        """_paged runs one page (in a search thread) on the snapshot its token's first page pinned.

        Without a token, or when that pin is gone, the page runs on a fresh snapshot (the engine
        then refuses a token of another generation as stale); a page with a next page leaves
        its snapshot pinned for the token it returns (pins.py).
        """
        pins = self.manager.pins
        with pins.lease(tenant, searcher.index, generation) as pinned:
            if pinned is not None:
                return searcher.run(request, snapshot=pinned)
        snapshot = searcher.index.snapshot()
        kept = False
        try:
            result = searcher.run(request, snapshot=snapshot)
            kept = result.next_cursor is not None and pins.pin(tenant, snapshot)
            return result
        finally:
            if not kept:
                snapshot.close()

    async def stream(
        self,
        tenant: uuid.UUID,
        query: CodeQuery,
        max_files: int,
        time_remaining: float | None,
        batch_files: int,
        render: Callable[[StreamBatch], R],
    ) -> AsyncGenerator[R | CodeAnswer, None]:
        """stream yields batches of matching files as they are verified, then the totals as a CodeAnswer.

        Each batch is yielded as `render(batch)`, built in the search thread (the servicer's
        proto conversion stays off the event loop, as in `code_rendered`). At most `max_files`
        files are sent (capped by max_stream_files); the totals stay exact. Files come in index
        order (streams.py). If the caller stops iterating (the client went away), the engine's
        work is cancelled.
        """
        if max_files < 0:
            raise _bad("max_file_count", "max_file_count must not be negative", "OUT_OF_RANGE")
        cap = self.settings.max_stream_files
        limit = min(max_files, cap) if max_files else cap
        deadline = self.deadline(query.timeout, time_remaining)
        opened, waited = await self.ready(tenant, query.min_revision, deadline)
        request = SearchRequest(
            query=query.query,
            limit_files=None,
            context_lines=query.context_lines,
            mode=SearchMode.EXHAUSTIVE,
            deadline=deadline,
            regex=query.regex,
        )
        revision = opened.covered
        searcher = opened.searcher
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[R] = asyncio.Queue(maxsize=STREAM_QUEUE_BATCHES)

        def run(cancel: threading.Event) -> SearchResult:
            return stream_files(
                searcher,
                record.replace(request, cancel=cancel),
                limit=limit,
                batch_files=batch_files,
                max_lines=query.max_matches_per_file,
                emit=queue_emitter(queue, loop, revision, cancel, render),
                cancel=cancel,
            )

        work = asyncio.ensure_future(self.manager.run_search(run))
        getter: asyncio.Future[R] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait((getter, work), return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                # The producer put every batch before it returned: what is queued is the rest.
                while not queue.empty():
                    yield queue.get_nowait()
                result = await self._engine(opened, work)
                yield CodeAnswer(result, revision, waited)
                return
        finally:
            if getter is not None:
                getter.cancel()
            if not work.done():
                # run_search then sets the cancellation event the producer checks between files.
                work.cancel()
            elif not work.cancelled():
                work.exception()  # retrieved: a client gone mid-stream leaves no warning behind

    async def _engine(self, opened: TenantIndex, work: Awaitable[T]) -> T:
        """_engine awaits engine work and raises its errors as domain errors (engine_errors.py).

        A file of the index that fails a check starts a rebuild (TenantManager.corrupt); a
        tenant directory deleted or made unreadable under the process drops the tenant, which
        is built again from Postgres (TenantManager.lost).
        """
        try:
            return await work
        except IndexFileError as exc:
            raise await self.manager.corrupt(opened, exc) from exc
        except LOST_ERRORS as exc:
            raise await self.manager.lost(opened, exc) from exc
        except EngineError as exc:
            raise domain_error(exc) from exc

    async def symbols(
        self, tenant: uuid.UUID, query: SymbolQuery, time_remaining: float | None
    ) -> SymbolAnswer:
        """symbols ranks the tenant's symbol definitions against the pattern; one page."""
        deadline = self.deadline(None, time_remaining)
        opened, _ = await self.ready(tenant, query.min_revision, deadline)
        key = self.manager.cursor_key(tenant)
        fingerprint = _fingerprint(query)
        offset = _decode_offset(query.page_token, key, fingerprint) if query.page_token else 0
        if offset + query.page_size > self.settings.max_page_offset + MAX_PAGE_SIZE:
            raise _bad("page_token", "pages this deep are not served; narrow the pattern", "PAGE_TOO_DEEP")
        revision = opened.covered
        index = opened.index

        screen = symbol_search_screen(query.pattern)

        def run(cancel: threading.Event) -> tuple[list[SymbolHit], int]:
            with index.snapshot() as snap:
                where: dict[tuple[str, str], tuple[int, int, str]] = {}
                candidates: list[SymbolCandidate] = []
                for position, segment in enumerate(snap.segments):
                    if cancel.is_set():
                        return [], 0
                    for ordinal, found in symbol_candidates(segment, screen):
                        doc = segment.doc(ordinal)
                        if not _keep(query, doc.path, doc.repository, doc.language):
                            continue
                        where[(doc.repository, doc.path)] = (position, ordinal, doc.external_id)
                        candidates.extend(
                            SymbolCandidate(s, doc.path, doc.repository, doc.language) for s in found
                        )
                result = search_symbols(
                    query.pattern, candidates, kind=query.kinds or None, limit=offset + query.page_size
                )
                hits = []
                for match in result.matches[offset:]:
                    position, ordinal, external_id = where[(match.repository, match.path)]
                    content = bytes(snap.segments[position].content(ordinal))
                    line = _line(content, match.symbol.start_line)
                    hits.append(SymbolHit(match, external_id, line, _symbol_score(match)))
                return hits, result.total

        hits, total = await self._engine(opened, self.manager.run_search(run))
        next_offset = offset + len(hits)
        token = _encode_offset(next_offset, key, fingerprint) if next_offset < total else ""
        return SymbolAnswer(tuple(hits), total, token, revision)

    async def status(self, tenant: uuid.UUID, time_remaining: float | None = None) -> StatusAnswer:
        """status reports the tenant's index (opening or building it first, within the call's budget)."""
        opened = await self.manager.get(tenant, self.deadline(None, time_remaining))
        return await self._engine(opened, index_status(self.manager, tenant, opened))

    async def rebuild(self, tenant: uuid.UUID) -> StatusAnswer:
        """rebuild starts a rebuild from Postgres and reports the index as it serves meanwhile."""
        opened = await self.manager.rebuild(tenant)
        return await self._engine(opened, index_status(self.manager, tenant, opened))


@dataclass(frozen=True, slots=True)
class StatusAnswer:
    """StatusAnswer is a tenant index's condition: coverage, sizes and skipped documents by reason."""

    state: str
    revision: int
    latest_revision: int
    document_count: int
    skipped: dict[str, int]
    segment_count: int
    index_bytes: int
    content_bytes: int
    symbol_count: int
    update_time: float | None
    message: str


async def index_status(manager: TenantManager, tenant: uuid.UUID, opened: TenantIndex) -> StatusAnswer:
    """index_status measures the tenant's index and compares it with Postgres."""
    index = opened.index
    stats = await manager.run_search(lambda _cancel: index.stats())
    counts = await manager.store.tenant_counts(tenant)
    skipped = dict(counts.skipped)
    for skip in stats.skipped:
        skipped[str(skip.reason)] = skipped.get(str(skip.reason), 0) + 1
    content = stats.bytes_by_part.get("content", 0)
    return StatusAnswer(
        state=opened.state,
        revision=opened.covered,
        latest_revision=counts.head_revision,
        document_count=stats.documents,
        skipped=skipped,
        segment_count=stats.segments,
        index_bytes=stats.total_bytes - content,
        content_bytes=content,
        symbol_count=counts.symbols,
        update_time=opened.update_time or opened.rebuilt_at,
        message=opened.message,
    )


def _same(answer: CodeAnswer) -> CodeAnswer:
    return answer


def _symbol_score(match: SymbolMatch) -> float:
    """_symbol_score orders like the engine's ranking: better tiers higher, demoted files half a tier down."""
    return float(5 - int(match.tier)) - (0.5 if match.demoted else 0.0)


def _keep(query: SymbolQuery, path: str, repository: str, language: str) -> bool:
    if query.language and language.lower() != query.language.lower():
        return False
    if query.repository and repository != query.repository:
        return False
    return not (query.path_prefix and not path.startswith(query.path_prefix))


def _line(content: bytes, line_number: int) -> str:
    start = 0
    for _ in range(max(0, line_number - 1)):
        found = content.find(b"\n", start)
        if found < 0:
            return ""
        start = found + 1
    end = content.find(b"\n", start)
    return content[start : end if end >= 0 else len(content)].decode("utf-8", "replace")


def _fingerprint(query: SymbolQuery) -> str:
    parts: Sequence[str] = (
        query.pattern,
        ",".join(query.kinds),
        query.language,
        query.repository,
        query.path_prefix,
    )
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=8).hexdigest()


def _encode_offset(offset: int, key: bytes, fingerprint: str) -> str:
    body = json.dumps({"o": offset, "f": fingerprint}, separators=(",", ":")).encode()
    tag = hmac.new(key, body, hashlib.sha256).digest()[:12]
    return base64.urlsafe_b64encode(body + tag).rstrip(b"=").decode()


def _decode_offset(token: str, key: bytes, fingerprint: str) -> int:
    refused: KotaError = _bad(
        "page_token", "page_token was not issued for this query and caller", "INVALID_PAGE_TOKEN"
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise refused from None
    body, tag = raw[:-12], raw[-12:]
    if len(raw) <= 12 or not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest()[:12], tag):
        raise refused
    try:
        parsed = json.loads(body)
        offset = int(parsed["o"])
        same = parsed["f"] == fingerprint
    except (ValueError, KeyError, TypeError):
        raise refused from None
    if not same or offset < 0:
        raise refused
    return offset
