"""The auth process's end of Envoy's gRPC access-log service: finished requests become usage rows.

Envoy (deploy/envoy/envoy.yaml.tmpl, `envoy.access_loggers.http_grpc`) streams one
`HTTPAccessLogEntry` per finished request to `envoy.service.accesslog.v3.AccessLogService/
StreamAccessLogs` on the auth cluster. The entry carries what only Envoy knows once the upstream
has answered: the final HTTP status, the gRPC status (trailer or header), the timings. The
gateway config asks Envoy to log the request headers `x-kotadb-key-id`, `x-kotadb-tenant` and
`x-request-id` (plus `x-envoy-original-method`, the REST method the transcoder replaced with
POST; without it a REST call is recorded as POST) and the response header and trailer
`grpc-status`.

An entry is metered when `Check` admitted its request, which shows as a tenant header (Check adds
it, and removes a client's copy, on every request it allows) on a request that ext_authz did not
answer itself (`response_code_details` of a denial starts with `ext_authz`). Requests on the routes
that bypass ext_authz (the GitHub webhook, `/health`) are never metered, because a client could put
any header on those. `services/auth/metering.py` then checks that the key belongs to the tenant
before writing, so headers a client sent on a refused request cannot charge anyone.

Delivery is at most once: Envoy's access-log stream has no acknowledgements (the proto says so:
"designed for high throughput with the expectation that it might be lossy"), so Envoy never resends
an entry and there is nothing to deduplicate on reconnect; entries Envoy could not send while the
auth cluster was down are lost. See metering.py for what that means for `usage_count`.
"""

from __future__ import annotations

import datetime
import hmac
import logging
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from services.auth.metering import UsageRecord, UsageRecorder
from services.common.identity import ACCESS_LOG_TOKEN_HEADER, KEY_ID_HEADER, TENANT_HEADER, method_permission
from services.common.server import ServiceBinding, bind

log = logging.getLogger("kotadb.auth.accesslog")

GRPC_STATUS_HEADER = "grpc-status"
# The grpc_json_transcoder turns a REST call into a POST and keeps the client's method here.
ORIGINAL_METHOD_HEADER = "x-envoy-original-method"
# Envoy's own access-log entry kinds that describe a whole, finished HTTP request.
_FINAL_TYPES = frozenset({accesslog_pb2.AccessLogType.NotSet, accesslog_pb2.AccessLogType.DownstreamEnd})
# Paths Envoy answers or forwards without asking Check, so their headers are the client's own.
_UNCHECKED_PATHS = frozenset({"/health"})
# Longest endpoint text stored; gRPC method paths are far shorter, 404 paths can be anything.
MAX_ENDPOINT_CHARS = 512
_METHOD_NAMES: dict[int, str] = {
    number.number: number.name
    for number in accesslog_pb2.HTTPRequestProperties.DESCRIPTOR.fields_by_name[
        "request_method"
    ].enum_type.values
}


def usage_from_entry(entry: accesslog_pb2.HTTPAccessLogEntry) -> UsageRecord | None:
    """usage_from_entry turns one finished request into a UsageRecord, or None if it is not metered.

    Not metered: intermediate entries of long streams, requests Check did not admit (no tenant
    header, or answered by ext_authz itself), and requests on auth-exempt routes.
    """
    common = entry.common_properties
    if common.intermediate_log_entry or common.access_log_type not in _FINAL_TYPES:
        return None
    request, response = entry.request, entry.response
    headers = request.request_headers
    tenant = _uuid(headers.get(TENANT_HEADER, ""))
    if tenant is None:
        return None
    if response.response_code_details.startswith("ext_authz"):
        return None
    path = request.path.split("?", 1)[0]
    original = request.original_path.split("?", 1)[0]
    if path in _UNCHECKED_PATHS or original in _UNCHECKED_PATHS or method_permission(path) == "":
        return None
    key_id = _uuid(headers.get(KEY_ID_HEADER, ""))
    return UsageRecord(
        user_id=tenant,
        key_id=key_id,
        endpoint=(path or original or "/")[:MAX_ENDPOINT_CHARS],
        method=headers.get(ORIGINAL_METHOD_HEADER) or _METHOD_NAMES.get(request.request_method, "UNKNOWN"),
        status_code=response.response_code.value if response.HasField("response_code") else 0,
        grpc_status=_grpc_status(response),
        response_time_ms=_response_time_ms(common),
        request_id=request.request_id or None,
        occurred_at=common.start_time.ToDatetime(tzinfo=datetime.UTC),
    )


# xds-protos ships no type stubs for its grpc modules, so the base class is Any to mypy.
class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """AccessLogServicer receives Envoy's access-log streams and hands metered requests to a recorder.

    Envoy keeps one stream open per worker thread and sends batches of entries on it; the
    servicer never answers until Envoy closes the stream (the protocol has no replies).
    """

    def __init__(self, recorder: UsageRecorder, token: str) -> None:
        self._recorder = recorder
        # The gateway's access-log token (services/common/identity.py); empty refuses every stream.
        self._token = token.encode("utf-8")
        self.entries = 0
        self.metered = 0
        self.refused = 0

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> als_pb2.StreamAccessLogsResponse:
        """StreamAccessLogs meters every admitted request in the stream until Envoy ends it.

        Only the gateway may write usage: a stream without its access-log token is refused
        before any entry is read, so nobody who merely reaches this port can bill a tenant.
        """
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == ACCESS_LOG_TOKEN_HEADER and isinstance(value, str):
                presented = value
        if not self._token or not hmac.compare_digest(presented.encode("utf-8"), self._token):
            self.refused += 1
            log.warning("access-log stream without the gateway's token refused")
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"access-log streams must carry the gateway's {ACCESS_LOG_TOKEN_HEADER}",
            )
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                self.entries += 1
                try:
                    record = usage_from_entry(entry)
                except (ValueError, OverflowError):
                    # One odd entry (a timestamp out of range) must not end the whole stream.
                    log.warning("unreadable access-log entry skipped", exc_info=True)
                    continue
                if record is not None:
                    self.metered += 1
                    self._recorder.submit(record)
            # Running totals, so an operator (or a test) can see entries arrive before any write.
            log.debug(
                "access-log entries received",
                extra={"fields": {"entries": self.entries, "metered": self.metered}},
            )
        return als_pb2.StreamAccessLogsResponse()


def access_log_binding(servicer: AccessLogServicer) -> ServiceBinding:
    """access_log_binding registers `servicer` as `envoy.service.accesslog.v3.AccessLogService`."""
    return bind(
        als_pb2.DESCRIPTOR,
        "AccessLogService",
        als_pb2_grpc.add_AccessLogServiceServicer_to_server,
        servicer,
    )


def _uuid(text: str) -> uuid.UUID | None:
    """_uuid parses a header value as a UUID; anything else (empty included) is None."""
    if not text:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _grpc_status(response: accesslog_pb2.HTTPResponseProperties) -> int | None:
    """_grpc_status reads grpc-status from the trailers, or the headers of a trailers-only reply."""
    for source in (response.response_trailers, response.response_headers):
        text = source.get(GRPC_STATUS_HEADER, "")
        if text.isdigit() and int(text) <= 16:
            return int(text)
    return None


def _response_time_ms(common: accesslog_pb2.AccessLogCommon) -> int:
    """_response_time_ms is first request byte to last response byte in whole ms, rounded up.

    Rounded up so that a request answered in 0.3 ms reads as 1 ms, not as "no time at all".
    Envoy fills `duration` on newer versions; `time_to_last_downstream_tx_byte` is the same
    instant measured from the start, and is what older versions send.
    """
    if common.HasField("duration"):
        spent = common.duration
    elif common.HasField("time_to_last_downstream_tx_byte"):
        spent = common.time_to_last_downstream_tx_byte
    else:
        return 0
    nanoseconds: int = spent.ToNanoseconds()
    return math.ceil(nanoseconds / 1_000_000)
