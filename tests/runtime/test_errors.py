"""The error model: each KotaError maps to its code, reason and google.rpc details, and one JSON body."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import json_format

from services.auth.check import denied
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
    error_body,
    error_json,
    http_status,
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


ONE_SHAPE_CASES = [
    Unauthenticated("the API key has expired", reason="API_KEY_EXPIRED"),
    PermissionDenied("needs write", reason="MISSING_PERMISSION", metadata={"permission": "write"}),
    ResourceExhausted("spent", reason="RATE_LIMITED", retry_after=12.0, metadata={"rate_limit": "20"}),
    Unavailable("down", reason="DATABASE_UNAVAILABLE", retry_after=1.0),
    NotFound("no route", reason="ROUTE_NOT_FOUND"),
]


@pytest.mark.parametrize("error", ONE_SHAPE_CASES, ids=lambda e: e.reason)
def test_the_json_error_body_is_the_status_plus_its_reason(error: KotaError) -> None:
    body = json.loads(error_json(error, "rid-7"))
    assert list(body) == ["code", "message", "reason", "details"]
    status = to_rpc_status(error, "rid-7")
    assert (body["code"], body["message"], body["reason"]) == (status.code, error.message, error.reason)
    # details are the Status's own, in proto3 JSON, ErrorInfo first and RequestInfo second.
    assert body["details"] == [json_format.MessageToDict(detail) for detail in status.details]
    assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert body["details"][0]["reason"] == error.reason
    assert body["details"][0]["metadata"]["request_id"] == "rid-7"
    assert body["details"][1] == {"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": "rid-7"}
    assert error_body(status) == body


@pytest.mark.parametrize("error", ONE_SHAPE_CASES, ids=lambda e: e.reason)
def test_checks_denials_are_the_same_body_a_service_error_has(error: KotaError) -> None:
    # Check's denials were built by hand (no RequestInfo, no RetryInfo); now they are this body.
    answer = denied(error, request_id="rid-8")
    assert answer.denied_response.status.code == http_status(error.code)
    assert json.loads(answer.denied_response.body) == json.loads(error_json(error, "rid-8"))


def test_http_status_follows_the_gateways_mapping() -> None:
    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.INTERNAL: 500,
        grpc.StatusCode.UNIMPLEMENTED: 501,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    }
    assert {code: http_status(code) for code in expected} == expected
