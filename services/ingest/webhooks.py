"""GitHub webhooks: verify the signature, record the delivery, queue an incremental sync.

`POST /v1/webhooks/github/{repository_id}` carries no API key (the gateway route skips ext_authz
and the identity interceptor exempts the method): the HMAC is the credential. `WebhookReceiver`
handles one delivery, in this order:

1. Look the repository up as the service role (there is no user on this route). Unknown, or
   being deleted: NotFound (404). Nothing is stored.
2. Refuse a body over `max_webhook_bytes` (the gateway answers 413 before that; this bounds
   direct gRPC callers).
3. Verify `X-Hub-Signature-256` — `sha256=` + hex HMAC-SHA256 of the raw body bytes under the
   repository's webhook secret — with a constant-time compare, before the body is parsed.
   Missing or wrong: Unauthenticated (401), nothing stored, a warning logged without the body
   or the signature, and `kotadb_refusals_total{service="ingest",reason="WEBHOOK_SIGNATURE"}`
   counted.
4. Record the verified delivery in `webhook_deliveries`. A delivery id seen before (GitHub's
   redeliveries keep it) is answered `duplicate: true` with what the first one caused, and
   queues nothing.
5. `push` to the tracked branch queues an incremental job (`webhook_push`, folded into the
   repository's queued job if there is one) and the delivery becomes `queued`; its later states
   follow the job (migration 20261207000200). `ping` is `processed`. Pushes to other branches,
   tags and other events are `processed` with an `ignored_reason`. A push deleting the tracked
   branch puts the repository in state `error` (reason BRANCH_DELETED) and queues nothing.

The handler only records and enqueues — two short transactions — so it answers well within
GitHub's 10 s, and past `webhook_deadline` it answers UNAVAILABLE rather than hang; the worker
fetches and diffs (the webhook is a trigger, not the truth).

Anyone can call this route, so what a stranger can make it spend is bounded: bodies by the
gateway (413 over 25 MiB) and `max_webhook_bytes`; deliveries in progress by
`webhook_concurrency`; large bodies are hashed and parsed off the event loop; refusal log lines by a token
bucket (the refusal metric still counts every one); and nothing unsigned is ever stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qs

from services.common import db, metrics
from services.common.errors import FieldViolation, InvalidArgument, NotFound, Unauthenticated, Unavailable
from services.common.server import LazyPool
from services.ingest import events, queue, repostore
from services.ingest.queue import JobRecord
from services.ingest.repositories import RepositoryManager, not_found

logger = logging.getLogger("kotadb.ingest.webhooks")
T = TypeVar("T")

EVENT_HEADER = "x-github-event"
DELIVERY_HEADER = "x-github-delivery"
SIGNATURE_HEADER = "x-hub-signature-256"
_DELIVERY_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_EVENT = re.compile(r"^[a-z_]{1,64}$")
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_ZERO_SHA = re.compile(r"^0+$")
# Bodies hashed and parsed on the event loop; larger ones are handled in a thread.
INLINE_BODY_BYTES = 256 * 1024
REFUSAL_LOGS_PER_SECOND = 10.0

DELIVERIES = metrics.counter(
    "kotadb_ingest_webhook_deliveries_total",
    "Verified GitHub webhook deliveries, by event and outcome (queued, ignored, duplicate, ...).",
    ("event", "outcome"),
)


@dataclasses.dataclass(frozen=True)
class Delivery:
    """Delivery is one webhook request as received: headers (lower-case names), raw body, content type."""

    repository_id: str
    headers: Mapping[str, str]
    body: bytes
    content_type: str = "application/json"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Outcome is what a delivery caused: the job it queued (or folded into), or why it queued none."""

    delivery_id: str
    event: str
    duplicate: bool = False
    job: JobRecord | None = None
    ignored_reason: str = ""


class LogBudget:
    """LogBudget allows up to `per_second` log lines a second, refilled continuously (a token bucket)."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self._clock = clock
        self._tokens = per_second
        self._at = clock()

    def allow(self) -> bool:
        """allow takes one token if there is one."""
        now = self._clock()
        self._tokens = min(self.per_second, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def _unsigned(reason: str) -> Unauthenticated:
    return Unauthenticated(
        "the webhook signature (X-Hub-Signature-256) is missing or does not match the secret", reason=reason
    )


def signature_for(secret: bytes, body: bytes) -> str:
    """signature_for is the `X-Hub-Signature-256` value GitHub sends for `body` under `secret`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookReceiver:
    """WebhookReceiver verifies and records GitHub deliveries for the servicer."""

    def __init__(self, pool: LazyPool, repositories: RepositoryManager, wakeups: events.Wakeups) -> None:
        self._pool = pool
        self._repositories = repositories
        self._wakeups = wakeups
        # Deliveries handled at once: each may hold a 25 MiB body and a database connection.
        self._slots = asyncio.Semaphore(repositories.settings.webhook_concurrency)
        # Refusals are counted always but logged at most this often: strangers choose their rate.
        self._refusal_log = LogBudget(per_second=REFUSAL_LOGS_PER_SECOND)

    async def receive(self, delivery: Delivery) -> Outcome:
        """receive handles one delivery (see the module docstring for the steps and errors).

        It answers within `webhook_deadline` seconds: past it (the database is slow or the pool
        exhausted) the transaction in flight rolls back and the caller gets UNAVAILABLE, which
        GitHub shows as a failed delivery to redeliver, instead of a timeout after 10 s.
        """
        deadline = self._repositories.settings.webhook_deadline
        try:
            async with asyncio.timeout(deadline), self._slots:
                outcome = await self._receive(delivery)
        except TimeoutError:
            metrics.refused("ingest", "WEBHOOK_DEADLINE")
            raise Unavailable(
                f"the delivery could not be recorded within {deadline:g} s; redeliver it",
                reason="WEBHOOK_DEADLINE",
                retry_after=1.0,
            ) from None
        logger.info(
            "webhook delivery %s",
            "queued a job" if outcome.job else "duplicate" if outcome.duplicate else "recorded",
            extra={
                "fields": {
                    "repository_id": delivery.repository_id,
                    "event": outcome.event,
                    "delivery_id": outcome.delivery_id,
                    "job_id": str(outcome.job.id) if outcome.job else "",
                    "ignored_reason": outcome.ignored_reason,
                }
            },
        )
        return outcome

    async def _receive(self, delivery: Delivery) -> Outcome:
        try:
            repository_id = uuid.UUID(delivery.repository_id)
        except ValueError:
            raise NotFound(
                "no such repository", reason="REPOSITORY_NOT_FOUND", resource_type="kotadb.v1.Repository"
            ) from None
        pool = self._pool.get()
        async with db.as_service(pool) as conn:
            record = await repostore.get(conn, repository_id, count=False)
        if record is None or record.state == "deleting":
            raise not_found(repository_id)
        limit = self._repositories.settings.max_webhook_bytes
        if len(delivery.body) > limit:
            metrics.refused("ingest", "WEBHOOK_TOO_LARGE")
            raise InvalidArgument(f"the webhook body exceeds {limit} bytes", reason="PAYLOAD_TOO_LARGE")
        await self._verify(record.id, self._repositories.webhook_secret(record), delivery)

        event = delivery.headers.get(EVENT_HEADER, "")
        delivery_id = delivery.headers.get(DELIVERY_HEADER, "")
        violations = []
        if not _EVENT.match(event):
            violations.append(
                FieldViolation("X-GitHub-Event", "a GitHub event name is required", "INVALID_EVENT")
            )
        if not _DELIVERY_ID.match(delivery_id):
            violations.append(
                FieldViolation("X-GitHub-Delivery", "a delivery id is required", "INVALID_DELIVERY")
            )
        if violations:
            raise InvalidArgument(
                "the delivery's GitHub headers are missing or malformed", field_violations=violations
            )
        try:
            payload = await _large_off_loop(delivery.body, _payload, delivery)
        except ValueError as exc:
            payload_error: str | None = str(exc)
            payload = {}
        else:
            payload_error = None
        ref = payload.get("ref") if event == "push" and isinstance(payload.get("ref"), str) else None
        after = payload.get("after") if event == "push" and isinstance(payload.get("after"), str) else None

        async with db.as_service(pool) as conn:
            stored = await repostore.record_delivery(
                conn,
                repository_id=record.id,
                user_id=record.user_id,
                delivery_id=delivery_id,
                event=event,
                payload_sha256=await _large_off_loop(delivery.body, _sha256, delivery.body),
                ref=ref[:1024] if ref else None,
                after=after[:128] if after else None,
            )
            if stored is None:
                return await self._duplicate(conn, record.id, delivery_id, event)
            if payload_error is not None:
                await repostore.fail_delivery(
                    conn, stored.id, reason="PAYLOAD_INVALID", message=payload_error
                )
                outcome = None
            else:
                outcome = await self._act(conn, record, stored, event, payload)
        if outcome is None:
            DELIVERIES.labels(event=event, outcome="invalid").inc()
            message = f"the delivery's payload is not valid: {payload_error}"
            raise InvalidArgument(message, reason="PAYLOAD_INVALID")
        if outcome.job is not None:
            # This process's workers pick the job up now rather than at their next poll.
            self._wakeups.nudge()
        DELIVERIES.labels(event=event, outcome="queued" if outcome.job else "ignored").inc()
        return outcome

    async def _verify(self, repository_id: uuid.UUID, secret: bytes, delivery: Delivery) -> None:
        presented = delivery.headers.get(SIGNATURE_HEADER, "")
        expected = await _large_off_loop(delivery.body, signature_for, secret, delivery.body)
        if presented and hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode("ascii")):
            return
        reason = "WEBHOOK_SIGNATURE_INVALID" if presented else "WEBHOOK_SIGNATURE_MISSING"
        metrics.refused("ingest", "WEBHOOK_SIGNATURE")
        if not self._refusal_log.allow():
            raise _unsigned(reason)
        # Never the body nor the signature: either could help someone forge the next one.
        logger.warning(
            "webhook delivery refused: %s",
            "wrong signature" if presented else "no signature",
            extra={
                "fields": {
                    "repository_id": str(repository_id),
                    "reason": reason,
                    "event": _printable(delivery.headers.get(EVENT_HEADER, "")),
                    "delivery_id": _printable(delivery.headers.get(DELIVERY_HEADER, "")),
                    "body_bytes": len(delivery.body),
                }
            },
        )
        raise _unsigned(reason)

    async def _duplicate(
        self, conn: db.Connection, repository_id: uuid.UUID, delivery_id: str, event: str
    ) -> Outcome:
        earlier = await repostore.get_delivery(conn, repository_id, delivery_id)
        job = None
        if earlier is not None and earlier.job_id is not None:
            try:
                job = await queue.get_job(conn, earlier.job_id)
            except NotFound:
                job = None
        DELIVERIES.labels(event=event, outcome="duplicate").inc()
        return Outcome(
            delivery_id=delivery_id,
            event=event,
            duplicate=True,
            job=job,
            ignored_reason=(earlier.ignored_reason or "") if earlier is not None else "",
        )

    async def _act(
        self,
        conn: db.Connection,
        record: repostore.RepositoryRecord,
        stored: repostore.DeliveryRecord,
        event: str,
        payload: Mapping[str, Any],
    ) -> Outcome:
        ignored = _ignored_reason(record, event, payload)
        if ignored is not None:
            if ignored == BRANCH_DELETED:
                await repostore.mark_error(
                    conn,
                    record.id,
                    "BRANCH_DELETED",
                    f"the tracked branch {_tracked(record, payload)} was deleted",
                )
            await repostore.finish_delivery(
                conn, stored.id, status="processed", ignored_reason=ignored or None
            )
            return Outcome(delivery_id=stored.delivery_id, event=event, ignored_reason=ignored)
        after = str(payload.get("after", ""))
        job = await queue.enqueue(
            conn,
            user_id=record.user_id,
            repository_id=record.id,
            kind="webhook_push",
            params={
                "commit_sha": after,
                "ref": str(payload.get("ref", "")),
                "delivery_id": stored.delivery_id,
                "trigger": "webhook",
            },
            max_attempts=self._repositories.settings.job_max_attempts,
        )
        await repostore.finish_delivery(conn, stored.id, status="queued", job_id=job.id)
        return Outcome(delivery_id=stored.delivery_id, event=event, job=job)


BRANCH_DELETED = "the tracked branch was deleted; the repository is marked and nothing was queued"


def _tracked(record: repostore.RepositoryRecord, payload: Mapping[str, Any]) -> str:
    """_tracked is the branch the repository follows: its own, else the payload's default branch."""
    if record.branch:
        return record.branch
    repository = payload.get("repository")
    default = repository.get("default_branch") if isinstance(repository, dict) else None
    return default if isinstance(default, str) else ""


def _ignored_reason(record: repostore.RepositoryRecord, event: str, payload: Mapping[str, Any]) -> str | None:
    """_ignored_reason says why a delivery queues nothing: "" for ping, None when it queues a job."""
    if event == "ping":
        return ""
    if event != "push":
        return f"event {event} is not handled; only push queues a sync"
    ref = payload.get("ref")
    if not isinstance(ref, str):
        return "the push names no ref"
    if ref.startswith("refs/tags/"):
        return f"push to tag {ref.removeprefix('refs/tags/')[:200]}; only the tracked branch is indexed"
    if not ref.startswith("refs/heads/"):
        return f"push to {ref[:200]}, which is not a branch"
    branch = ref.removeprefix("refs/heads/")
    tracked = _tracked(record, payload)
    if branch != tracked:
        return f"push to branch {branch[:200]}, not the tracked branch {tracked or '(unknown)'}"
    after = payload.get("after")
    if payload.get("deleted") is True or (isinstance(after, str) and _ZERO_SHA.match(after)):
        return BRANCH_DELETED
    if not isinstance(after, str) or not _SHA.match(after):
        return "the push carries no valid head commit (after)"
    return None


def _payload(delivery: Delivery) -> dict[str, Any]:
    """_payload parses the body: JSON, or GitHub's form encoding (`payload=<json>`)."""
    body = delivery.body
    if delivery.content_type.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded":
        try:
            fields = parse_qs(body.decode("utf-8"), max_num_fields=16)
        except (UnicodeDecodeError, ValueError):
            raise ValueError("the form body is not valid") from None
        values = fields.get("payload")
        if not values:
            raise ValueError("the form body has no payload field")
        text = values[0]
    else:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("the body is not UTF-8") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(document, dict):
        raise ValueError("the body is not a JSON object")
    return document


async def _large_off_loop(body: bytes, work: Callable[..., T], *args: Any) -> T:
    """_large_off_loop runs `work(*args)` in a thread when `body` is large, else right here.

    hashlib releases the GIL on large inputs and json parses at ~100 MB/s, so a 25 MiB body costs
    the event loop ~50-250 ms if handled inline; in a thread the loop keeps serving other calls.
    """
    if len(body) > INLINE_BODY_BYTES:
        return await asyncio.to_thread(work, *args)
    return work(*args)


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _printable(value: str) -> str:
    """_printable bounds a header value for a log line (attackers choose these)."""
    return re.sub(r"[^\x21-\x7e]", "?", value[:128])
