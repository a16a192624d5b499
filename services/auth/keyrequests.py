"""What key management takes and returns, and the field-level checks of its requests.

services/auth/management.py holds the rules (`KeyManager`: who may do what, idempotency,
rotation); this module holds the values crossing its boundary — requests (`KeySpec`,
`KeyUpdate`), results (`IssuedKey`, `UsageReport`, `ValidatedKey`; `Admission` is ratelimit.py's), the policy
and meter it is given (`KeyPolicy`, `RequestMeter`) — and the checks that need no database or
principal: field limits, names, permissions, request ids and page tokens. management.py
re-exports the public names, so callers import them from there.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from services.auth.ratelimit import Admission
from services.auth.store import ApiKeyRecord, EndpointTotals, PageCursor
from services.common.errors import FieldViolation, InvalidArgument
from services.common.identity import PERMISSIONS, Identity

Clock = Callable[[], dt.datetime]

MAX_NAME_LENGTH = 200
MAX_REQUEST_ID_LENGTH = 128
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# The service role is exempt from the plan maxima but not from sanity: rate_limit is an int32
# in the proto and a per-minute count; 10 million a minute is far beyond any real client.
HARD_MAX_RATE_LIMIT = 10_000_000
HARD_MAX_MONTHLY_QUOTA = 10**15


def utcnow() -> dt.datetime:
    """utcnow is the real clock: the current time as an aware UTC datetime."""
    return dt.datetime.now(dt.UTC)


class KeyPolicy(Protocol):
    """KeyPolicy is the part of AuthSettings that governs keys."""

    @property
    def rotation_grace(self) -> float: ...

    @property
    def default_rate_limit(self) -> int: ...

    @property
    def default_monthly_quota(self) -> int: ...

    @property
    def max_rate_limit(self) -> int: ...

    @property
    def max_monthly_quota(self) -> int: ...


class RequestMeter(Protocol):
    """RequestMeter counts one request against a key's rate limit and quota (Check's Admitter).

    It returns the admitted request's Admission and records its usage row; it raises
    ResourceExhausted when the window or the month is spent.
    """

    async def admit(self, record: ApiKeyRecord, endpoint: str) -> Admission: ...


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """KeySpec is what a caller asks for when creating a key; 0 limits mean the server default."""

    name: str
    permissions: frozenset[str]
    rate_limit: int = 0
    monthly_quota: int = 0
    expires_at: dt.datetime | None = None
    environment: str = "live"


@dataclasses.dataclass(frozen=True)
class KeyUpdate:
    """KeyUpdate names the fields to change (`fields`) and carries their new values."""

    fields: frozenset[str]
    name: str = ""
    permissions: frozenset[str] = frozenset()
    rate_limit: int = 0
    monthly_quota: int = 0
    expires_at: dt.datetime | None = None

    UPDATABLE = frozenset({"name", "permissions", "rate_limit", "monthly_quota", "expire_time"})


@dataclasses.dataclass(frozen=True)
class IssuedKey:
    """IssuedKey is a created or rotated key with its secret ("" when the call was a replay)."""

    record: ApiKeyRecord
    secret: str
    replayed: bool = False
    previous: ApiKeyRecord | None = None


@dataclasses.dataclass(frozen=True)
class UsageReport:
    """UsageReport is one key's current window, month and per-endpoint totals (GetUsage)."""

    key_id: uuid.UUID
    window_start: dt.datetime
    window_count: int
    window_remaining: int
    rate_limit: int
    month_start: dt.datetime
    month_usage: int
    monthly_quota: int
    start: dt.datetime
    end: dt.datetime
    endpoints: Sequence[EndpointTotals]


@dataclasses.dataclass(frozen=True)
class ValidatedKey:
    """ValidatedKey is a key that passed validation, the principal it carries and its window."""

    record: ApiKeyRecord
    principal: Identity
    window_remaining: int
    window_reset: dt.datetime


def minute_start(now: dt.datetime) -> dt.datetime:
    """minute_start is the start of `now`'s UTC minute: the current rate-limit window."""
    return now.astimezone(dt.UTC).replace(second=0, microsecond=0)


def invalid_field(field: str, description: str) -> InvalidArgument:
    """invalid_field is the InvalidArgument for one bad request field."""
    return InvalidArgument(
        f"{field}: {description}", field_violations=[FieldViolation(field=field, description=description)]
    )


def raise_violations(violations: list[FieldViolation]) -> None:
    """raise_violations raises one InvalidArgument naming every violation collected, if any."""
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(f"the request is invalid: {summary}", field_violations=violations)


def check_name(name: str, violations: list[FieldViolation]) -> None:
    """check_name adds a violation unless `name` is a non-blank, short, printable key name."""
    stripped = name.strip()
    if not stripped:
        violations.append(FieldViolation("api_key.name", "a key needs a non-blank name"))
    elif len(name) > MAX_NAME_LENGTH:
        violations.append(FieldViolation("api_key.name", f"at most {MAX_NAME_LENGTH} characters"))
    elif any(ord(char) < 32 or ord(char) == 127 for char in name):
        violations.append(FieldViolation("api_key.name", "control characters are not allowed"))


def check_permissions(permissions: frozenset[str], violations: list[FieldViolation]) -> None:
    """check_permissions adds a violation unless `permissions` is a non-empty set of known ones."""
    if not permissions:
        violations.append(FieldViolation("api_key.permissions", "name at least one of read, write, admin"))
    elif not permissions <= frozenset(PERMISSIONS):
        violations.append(FieldViolation("api_key.permissions", "only read, write and admin exist"))


def check_request_id(request_id: str | None, violations: list[FieldViolation]) -> None:
    """check_request_id adds a violation when an idempotency `request_id` is empty, long or unprintable."""
    if request_id is not None and not (
        0 < len(request_id) <= MAX_REQUEST_ID_LENGTH and request_id.isprintable()
    ):
        violations.append(
            FieldViolation(
                "request_id", f"1 to {MAX_REQUEST_ID_LENGTH} printable characters (a UUID is best)"
            )
        )


def encode_page_token(cursor: PageCursor, include_inactive: bool, owner: uuid.UUID | None) -> str:
    """encode_page_token makes the opaque token for the page after `cursor` of one list query."""
    payload = {
        "t": cursor.created_at.isoformat(),
        "i": str(cursor.id),
        "r": include_inactive,
        "u": str(owner) if owner else "",
    }
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_page_token(token: str, include_inactive: bool, owner: uuid.UUID | None) -> PageCursor:
    """decode_page_token reads a page token back, refusing one made for other list parameters."""
    try:
        padded = token + "=" * (-len(token) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode()))
        cursor = PageCursor(dt.datetime.fromisoformat(payload["t"]), uuid.UUID(payload["i"]))
        same_query = payload["r"] == include_inactive and payload["u"] == (str(owner) if owner else "")
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise invalid_field("page_token", "not a token returned by this list") from None
    if not same_query:
        raise invalid_field("page_token", "the token belongs to a list with other parameters")
    return cursor
