"""The bodies and headers of the replies Envoy writes itself, as local_reply_config mappers.

Errors reach clients from three places: the services (through the transcoder's
convert_grpc_status), auth's Check (ext_authz denials) and Envoy itself (unknown path, malformed
JSON, oversize body or headers, overload, Check unreachable, timeouts). This module gives the
third the shape of the other two, so a REST client reads every error one way:

    {"code": <gRPC code number>, "message": "...", "reason": "REQUEST_TOO_LARGE",
     "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": ...,
                  "domain": "kotadb.dev", "metadata": {"request_id": ..., "envoy_details": ...}}]}

with the reason also in the `x-kotadb-error-reason` header, as Check sets it. gRPC clients keep
Envoy's grpc-status and plain grpc-message, plus that header. services/cli/gateway.py renders
`local_reply_mappers()` into deploy/envoy/envoy.yaml.tmpl.
"""

from __future__ import annotations

import json
from typing import Any

from services.common.errors import ERROR_DOMAIN

# HTTP status of a reply Envoy writes itself → (gRPC code, reason) for its JSON body. The codes
# follow the HTTP↔gRPC mapping in google/rpc/code.proto, so REST clients see one error shape
# whether the error came from a service (via convert_grpc_status), Check or the gateway. Where
# the status alone names the cause the reason says it; otherwise it is GATEWAY_<code name> and
# the ErrorInfo's `envoy_details` metadata carries Envoy's own account.
LOCAL_REPLY_CODES: tuple[tuple[int, int, str], ...] = (
    (400, 3, "GATEWAY_INVALID_ARGUMENT"),
    (401, 16, "GATEWAY_UNAUTHENTICATED"),
    (403, 7, "GATEWAY_PERMISSION_DENIED"),
    (404, 5, "GATEWAY_NOT_FOUND"),
    (405, 12, "GATEWAY_UNIMPLEMENTED"),
    (408, 4, "GATEWAY_DEADLINE_EXCEEDED"),
    # Google's APIs answer an oversize payload with INVALID_ARGUMENT; the HTTP status is 413.
    (413, 3, "REQUEST_TOO_LARGE"),
    (429, 8, "GATEWAY_RESOURCE_EXHAUSTED"),
    (431, 3, "HEADERS_TOO_LARGE"),
    (500, 13, "GATEWAY_INTERNAL"),
    (501, 12, "GATEWAY_UNIMPLEMENTED"),
    (502, 14, "GATEWAY_UNAVAILABLE"),
    (503, 14, "GATEWAY_UNAVAILABLE"),
    (504, 4, "GATEWAY_DEADLINE_EXCEEDED"),
)

# Statuses whose gRPC code for native gRPC clients comes from the table above rather than from
# Envoy's HTTP-to-gRPC mapping (which has no entry for them and says UNKNOWN).
GRPC_CODE_FROM_TABLE: frozenset[int] = frozenset({413, 431})

# Reasons of gateway errors that no HTTP status names: Check could not be asked (503), the
# overload manager shed the request (503), and /health's 503 when a backend is not serving.
AUTH_UNAVAILABLE = "AUTH_UNAVAILABLE"
GATEWAY_OVERLOADED = "GATEWAY_OVERLOADED"
BACKENDS_NOT_SERVING = "BACKENDS_NOT_SERVING"

CEL_FILTER_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"


def _header_is(name: str, value: str) -> dict[str, Any]:
    """_header_is builds an access-log header filter matching one exact request header."""
    return {"header_filter": {"header": {"name": name, "string_match": {"exact": value}}}}


def local_reply_mappers() -> list[dict[str, Any]]:
    """local_reply_mappers builds the JSON bodies for replies Envoy writes itself.

    Order matters: the first matching mapper wins. ext_authz's own failure (Check unreachable
    or erring) gets the error shape; Check's denials pass unchanged (Check wrote them); /health
    gets its status bodies. The rest rewrite bodies for REST requests only: gRPC clients
    already get grpc-status/grpc-message from Envoy, and a JSON grpc-message would only make
    their errors harder to read, so they get just the reason header. A request is gRPC when it
    arrived with a gRPC content type; transcoded REST requests carry x-envoy-original-path,
    which the transcoder sets.
    """
    # Access-log filters have no "not", so "not a native gRPC request" is spelled out:
    # the content type is not gRPC, or the transcoder rewrote the request.
    not_grpc = {
        "or_filter": {
            "filters": [
                {
                    "header_filter": {
                        "header": {
                            "name": "content-type",
                            "string_match": {"prefix": "application/grpc"},
                            "invert_match": True,
                            "treat_missing_header_as_empty": True,
                        }
                    }
                },
                {"header_filter": {"header": {"name": "x-envoy-original-path", "present_match": True}}},
            ]
        }
    }
    health_path = _header_is(":path", "/health")
    check_failed = _details_are("ext_authz_error")
    # Streams the overload manager reset (Envoy says 500) and requests it refused (503).
    overloaded = _details_are("overload")
    retry = _header("retry-after", "1")
    mappers: list[dict[str, Any]] = [
        {
            "filter": {"and_filter": {"filters": [overloaded, not_grpc]}},
            "status_code": 503,
            "body_format_override": _error_body(
                14,
                GATEWAY_OVERLOADED,
                "the gateway is shedding load to stay within its memory; retry shortly",
            ),
            "headers_to_add": [_reason_header(GATEWAY_OVERLOADED), retry],
        },
        {
            "filter": overloaded,
            "status_code": 503,
            "headers_to_add": [_reason_header(GATEWAY_OVERLOADED), retry],
        },
        {
            "filter": {"and_filter": {"filters": [check_failed, not_grpc]}},
            "body_format_override": _error_body(
                14, AUTH_UNAVAILABLE, "the authorization service could not be reached; retry shortly"
            ),
            "headers_to_add": [_reason_header(AUTH_UNAVAILABLE), retry],
        },
        {"filter": check_failed, "headers_to_add": [_reason_header(AUTH_UNAVAILABLE), retry]},
        # Denials written by auth's Check (response flag UAEX) already carry the API's error
        # shape with the denial's reason; this mapper changes nothing, so they reach the client
        # as Check wrote them.
        {"filter": {"response_flag_filter": {"flags": ["UAEX"]}}},
        # /health's bodies carry each service's own GetHealth answer, which the health Lua
        # filter (services/cli/gateway.py) put in a request header: JSON, spliced in as is.
        {
            "filter": {"and_filter": {"filters": [health_path, _status_is(200)]}},
            "body_format_override": _health_body({"status": "SERVING"}),
        },
        {
            "filter": {"and_filter": {"filters": [health_path, _status_is(503)]}},
            "body_format_override": _health_body(
                {
                    "status": "NOT_SERVING",
                    "code": 14,
                    "message": "one or more backend services are not healthy",
                    "reason": BACKENDS_NOT_SERVING,
                    "details": [_error_info(BACKENDS_NOT_SERVING)],
                }
            ),
        },
    ]
    for http_status, grpc_code, reason in LOCAL_REPLY_CODES:
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [_status_is(http_status), not_grpc]}},
                "body_format_override": _error_body(grpc_code, reason),
                "headers_to_add": [_reason_header(reason)],
            }
        )
    # gRPC clients keep Envoy's plain grpc-message; the reason travels in the header Check uses.
    # Envoy would turn a 413 or 431 into UNKNOWN; they get the code REST clients see instead.
    for http_status, grpc_code, reason in LOCAL_REPLY_CODES:
        headers = [_reason_header(reason)]
        if http_status in GRPC_CODE_FROM_TABLE:
            headers.append(_header("grpc-status", str(grpc_code)))
        mappers.append({"filter": _status_is(http_status), "headers_to_add": headers})
    return mappers


def _details_are(details: str) -> dict[str, Any]:
    """_details_are is an access-log filter matching one response-code-details value (a CEL test)."""
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {"@type": CEL_FILTER_TYPE, "expression": f"response.code_details == '{details}'"},
        }
    }


def _header(name: str, value: str) -> dict[str, Any]:
    """_header is one response header a local-reply mapper sets, replacing any of that name."""
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _reason_header(reason: str) -> dict[str, Any]:
    """_reason_header is the x-kotadb-error-reason response header (as Check sets it) for a mapper."""
    return _header("x-kotadb-error-reason", reason)


def _status_is(code: int) -> dict[str, Any]:
    """_status_is builds an access-log filter matching one response status."""
    return {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": code, "runtime_key": f"kotadb.lr.{code}"}}
        }
    }


# The request header the health Lua filter fills with every service's GetHealth (JSON).
HEALTH_DETAIL_HEADER = "x-kotadb-health-detail"


def _health_body(fields: dict[str, Any]) -> dict[str, Any]:
    """_health_body is /health's JSON: `fields`, then `services` (each service's GetHealth answer).

    A text format, because the services' answers are JSON already and must not be quoted. The
    filter sets the header on every GET /health before this reply is written.
    """
    head = json.dumps(fields, separators=(",", ":"))[:-1]
    services = f"%REQ({HEALTH_DETAIL_HEADER})%"
    return {
        "text_format_source": {"inline_string": f'{head},"services":{services}}}'},
        "content_type": "application/json",
    }


def _json_body(fields: dict[str, Any]) -> dict[str, Any]:
    """_json_body wraps a JSON object as an Envoy SubstitutionFormatString."""
    return {"json_format": fields, "content_type": "application/json"}


def _error_body(grpc_code: int, reason: str, message: str = "%LOCAL_REPLY_BODY%") -> dict[str, Any]:
    """_error_body is the API's error JSON for one gateway-generated error.

    It has the shape Check and the services use (`code`, `message`, `reason`, `details` with an
    ErrorInfo), so a client reads every error the same way whoever produced it.
    """
    return _json_body(
        {
            "code": grpc_code,
            "message": message,
            "reason": reason,
            "details": [_error_info(reason)],
        }
    )


def _error_info(reason: str) -> dict[str, Any]:
    """_error_info is the google.rpc.ErrorInfo detail of a gateway error, in its JSON form."""
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": ERROR_DOMAIN,
        "metadata": {"request_id": "%REQ(X-REQUEST-ID)%", "envoy_details": "%RESPONSE_CODE_DETAILS%"},
    }
