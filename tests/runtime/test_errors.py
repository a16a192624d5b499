"""The error model: each KotaError maps to its code, reason and google.rpc details."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    KotaError,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    to_rpc_status,
)
from tests.runtime.rpc import unpack_details


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("gone"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("twice"), grpc.StatusCode.ALREADY_EXISTS),
        (FailedPrecondition("not now"), grpc.StatusCode.FAILED_PRECONDITION),
        (PermissionDenied("no"), grpc.StatusCode.PERMISSION_DENIED),
        (Unauthenticated("who"), grpc.StatusCode.UNAUTHENTICATED),
        (ResourceExhausted("slow down"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable("later"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Aborted("conflict"), grpc.StatusCode.ABORTED),
        (Unimplemented("teleportation"), grpc.StatusCode.UNIMPLEMENTED),
    ],
)
def test_each_error_maps_to_its_code_with_error_info(error: KotaError, code: grpc.StatusCode) -> None:
    status = to_rpc_status(error, "rid-1")
    assert status.code == code.value[0]
    assert status.message == error.message
    details = unpack_details(status)
    assert details["ErrorInfo"].domain == "kotadb.dev"
    assert details["ErrorInfo"].reason == code.name
    assert details["ErrorInfo"].metadata["request_id"] == "rid-1"
    assert details["RequestInfo"].request_id == "rid-1"
    assert set(details) == {"ErrorInfo", "RequestInfo"}


def test_optional_details_appear_when_set() -> None:
    invalid = InvalidArgument(
        "two problems",
        field_violations=[FieldViolation("page_size", "must be positive"), FieldViolation("query", "empty")],
        reason="BAD_PAGE",
        metadata={"limit": "1000"},
    )
    details = unpack_details(to_rpc_status(invalid, "r"))
    assert [v.field for v in details["BadRequest"].field_violations] == ["page_size", "query"]
    assert details["ErrorInfo"].reason == "BAD_PAGE"
    assert details["ErrorInfo"].metadata["limit"] == "1000"

    exhausted = ResourceExhausted(
        "rate limited", quota_violations=[QuotaViolation("api_key:k", "60/min")], retry_after=0.25
    )
    details = unpack_details(to_rpc_status(exhausted, "r"))
    assert details["QuotaFailure"].violations[0].description == "60/min"
    assert (details["RetryInfo"].retry_delay.seconds, details["RetryInfo"].retry_delay.nanos) == (
        0,
        250_000_000,
    )

    details = unpack_details(to_rpc_status(NotFound("gone", resource_type="t", resource_name="n"), "r"))
    assert (details["ResourceInfo"].resource_type, details["ResourceInfo"].resource_name) == ("t", "n")


def test_unimplemented_names_the_capability() -> None:
    status = to_rpc_status(Unimplemented("symbol search, delivered by the search service issue"), "r")
    assert "symbol search" in status.message
    info = unpack_details(status)["ErrorInfo"]
    assert info.reason == "UNIMPLEMENTED"
    assert info.metadata["capability"] == "symbol search, delivered by the search service issue"


def test_unknown_exceptions_become_internal_without_their_text() -> None:
    status = to_rpc_status(ValueError("password=hunter2"), "rid-9")
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    assert "rid-9" in status.message
    assert "hunter2" not in str(status)
    assert unpack_details(status)["ErrorInfo"].reason == "INTERNAL"


def test_invalid_construction_is_refused() -> None:
    with pytest.raises(ValueError, match="UPPER_SNAKE"):
        NotFound("x", reason="not-found")
    with pytest.raises(ValueError, match="retry_after"):
        Unavailable("x", retry_after=-1)
