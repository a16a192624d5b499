"""The one error model: domain exceptions carrying a gRPC code and a machine-readable reason.

Domain and store code raise the subclasses below and never touch grpc status helpers; the error
interceptor (services/common/interceptors.py) turns them into `google.rpc.Status` via
`to_rpc_status`. Every status carries an `ErrorInfo` (domain `kotadb.dev`, an UPPER_SNAKE reason,
metadata including the request id) and a `RequestInfo`, following Google AIP-193; `BadRequest`,
`QuotaFailure`, `RetryInfo` and `ResourceInfo` are added when the exception has them.

Over HTTP every error a client can receive — from a service (through Envoy's transcoder), from
auth's Check, or from Envoy itself — has one JSON shape, `error_body`::

    {
      "code": 16,                      # google.rpc.Code as a number (UNAUTHENTICATED)
      "message": "the API key has expired",
      "reason": "API_KEY_EXPIRED",     # the ErrorInfo's reason, repeated for easy branching
      "details": [                     # google.rpc.Status.details in proto3 JSON (camelCase)
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_EXPIRED",
         "domain": "kotadb.dev", "metadata": {"request_id": "…", …}},
        {"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": "…"},
        …                              # BadRequest, QuotaFailure, RetryInfo ({"retryDelay": "30s"}),
      ]                                #   ResourceInfo where they apply
    }

The ErrorInfo is always the first detail and the RequestInfo the second; `reason` equals the
ErrorInfo's reason. The HTTP status is `http_status(code)` (AIP-193's mapping).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, json_format
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "kotadb.dev"
ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,62}[A-Z0-9]$")


@dataclass(frozen=True)
class FieldViolation:
    """FieldViolation names one request field (AIP-161 path, e.g. `documents[2].path`) and its problem."""

    field: str
    description: str
    reason: str = ""


@dataclass(frozen=True)
class QuotaViolation:
    """QuotaViolation names the exhausted quota: `subject` (e.g. `api_key:abc`) and what ran out."""

    subject: str
    description: str


class KotaError(Exception):
    """KotaError is the base of every error a caller may see; subclasses fix `code` and a default reason.

    `message` is for the developer calling the API (it reaches the client verbatim, so it must
    never hold secrets or internals); `reason` is a stable UPPER_SNAKE identifier clients may
    branch on; `metadata` adds string facts to the `ErrorInfo`.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason: str = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        if not _REASON.match(self.reason):
            raise ValueError(f"error reason must be UPPER_SNAKE_CASE, got {self.reason!r}")
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(KotaError):
    """InvalidArgument rejects a malformed request; `field_violations` become a `BadRequest` detail."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        field_violations: Iterable[FieldViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)


class _ResourceError(KotaError):
    """_ResourceError is a KotaError about one named resource, reported as a `ResourceInfo` detail."""

    def __init__(
        self,
        message: str,
        *,
        resource_type: str = "",
        resource_name: str = "",
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.resource_type = resource_type
        self.resource_name = resource_name


class NotFound(_ResourceError):
    """NotFound reports a resource that does not exist or that the caller may not see."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(_ResourceError):
    """AlreadyExists reports a create that collides with an existing resource."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(KotaError):
    """FailedPrecondition reports a request that cannot run in the system's current state."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(KotaError):
    """PermissionDenied reports an authenticated caller lacking the permission the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(KotaError):
    """Unauthenticated reports missing, invalid, expired or revoked credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class _RetryableError(KotaError):
    """_RetryableError is a KotaError that may advise when to retry, reported as `RetryInfo`."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        if retry_after is not None and (retry_after < 0 or not math.isfinite(retry_after)):
            raise ValueError(f"retry_after must be a finite non-negative number, got {retry_after!r}")
        self.retry_after = retry_after


class ResourceExhausted(_RetryableError):
    """ResourceExhausted reports a rate limit or quota; `quota_violations` become a `QuotaFailure`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        quota_violations: Iterable[QuotaViolation] = (),
        retry_after: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after, reason=reason, metadata=metadata)
        self.quota_violations: tuple[QuotaViolation, ...] = tuple(quota_violations)


class Unavailable(_RetryableError):
    """Unavailable reports a transient condition (database down, index still catching up)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(_RetryableError):
    """DeadlineExceeded reports work that could not finish before the caller's deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Aborted(_RetryableError):
    """Aborted reports a concurrency conflict (e.g. a stale etag); the caller may retry the sequence."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Unimplemented(KotaError):
    """Unimplemented reports a capability that is not built yet; the message names the capability."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"

    def __init__(self, capability: str, *, metadata: Mapping[str, str] | None = None) -> None:
        merged = {"capability": capability, **(metadata or {})}
        super().__init__(f"not implemented yet: {capability}", metadata=merged)
        self.capability = capability


class Internal(KotaError):
    """Internal is what every unexpected exception becomes; its message only points at the request id."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


def internal_error(request_id: str) -> Internal:
    """internal_error is the client-facing replacement for an unexpected exception (no traceback)."""
    return Internal(f"internal error; quote request id {request_id} when reporting it")


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = math.floor(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9) % 1_000_000_000)


def to_rpc_status(exc: BaseException, request_id: str) -> status_pb2.Status:
    """to_rpc_status maps `exc` to a `google.rpc.Status`; non-KotaError exceptions become INTERNAL.

    The caller logs unexpected exceptions; nothing of their text or traceback reaches the status.
    """
    error = exc if isinstance(exc, KotaError) else internal_error(request_id)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason,
        domain=ERROR_DOMAIN,
        metadata={**error.metadata, "request_id": request_id},
    )
    details = [_pack(info), _pack(error_details_pb2.RequestInfo(request_id=request_id))]
    if isinstance(error, InvalidArgument) and error.field_violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description, reason=v.reason
                )
                for v in error.field_violations
            ]
        )
        details.append(_pack(bad))
    if isinstance(error, ResourceExhausted) and error.quota_violations:
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
                for v in error.quota_violations
            ]
        )
        details.append(_pack(quota))
    if isinstance(error, _RetryableError) and error.retry_after is not None:
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=_duration(error.retry_after))))
    if isinstance(error, _ResourceError) and (error.resource_type or error.resource_name):
        resource = error_details_pb2.ResourceInfo(
            resource_type=error.resource_type, resource_name=error.resource_name
        )
        details.append(_pack(resource))
    # grpc.StatusCode values are (int, name) pairs whose ints are google.rpc.Code's.
    code_value: int = error.code.value[0]
    return status_pb2.Status(code=code_value, message=error.message, details=details)


# google.rpc.Code → HTTP status, as AIP-193 and Envoy's grpc_json_transcoder map them.
_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def http_status(code: grpc.StatusCode) -> int:
    """http_status is the HTTP status an error with gRPC `code` is sent with."""
    return _HTTP_STATUS.get(code, 500)


def error_body(status: status_pb2.Status) -> dict[str, Any]:
    """error_body is the one JSON error shape (see the module docstring) of a google.rpc.Status."""
    details: list[dict[str, Any]] = [
        json_format.MessageToDict(detail, preserving_proto_field_name=False) for detail in status.details
    ]
    reason = next((str(d.get("reason", "")) for d in details if d.get("@type") == ERROR_INFO_TYPE), "")
    return {"code": int(status.code), "message": status.message, "reason": reason, "details": details}


def error_json(exc: BaseException, request_id: str) -> str:
    """error_json is `exc` as the JSON error body a client receives (compact, UTF-8 safe)."""
    return json.dumps(error_body(to_rpc_status(exc, request_id)), separators=(",", ":"))
