"""Server interceptors every KotaDB service runs: request ids, JSON access logs, error mapping.

The chain, outermost first, is what `server_interceptors` returns:

1. `RequestContextInterceptor` takes `x-request-id` from the call's metadata (Envoy sets one on
   every request) or makes one, exposes it to logs through context variables, returns it in the
   trailing metadata of every call and in the initial metadata of successful unary calls and
   async-generator streams, writes one access-log line per call (code, reason, duration) and
   records the call in the Prometheus metrics (method, code, duration; services/common/metrics.py).
2. `ErrorInterceptor` turns `KotaError` into its `google.rpc.Status` (`grpc-status-details-bin`)
   and any other exception into INTERNAL with the request id; the traceback is logged, never sent.
3. The identity slot: interceptors passed as `identity` (`ServiceServer(..., identity=[...])`)
   run inside the error mapping, after the request id is known. An identity interceptor (the
   auth issue adds one) subclasses `CallInterceptor` and raises `Unauthenticated` or
   `PermissionDenied` from `around_unary`/`around_stream`, so it gets the same status mapping
   and access log as a servicer would; it may store the verified caller in a context variable
   for servicers to read. (Raising from `intercept_service` itself would bypass the mapping.)

Interceptors here wrap the method handler's behaviour rather than the handler lookup, because
grpc.aio calls `intercept_service` before the call runs; `CallInterceptor` does that wrapping for
all four RPC shapes, so a subclass writes only `around_unary` and `around_stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc
from grpc_status import rpc_status

from services.common import metrics
from services.common.errors import KotaError, to_rpc_status
from services.common.logs import log_context

REQUEST_ID_KEY = "x-request-id"
# Ids longer than this or with other characters are replaced, so a caller cannot inject log noise.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Probes and tooling that would drown the access log at INFO (Envoy checks health every few seconds).
# Successful calls on these log at DEBUG: health and reflection are noise, and Envoy's per-request
# Check and access-log calls would otherwise double the log volume of every request through the gateway.
_ENVOY_PREFIXES = ("/envoy.service.auth.v3.Authorization/", "/envoy.service.accesslog.v3.")
_QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.", *_ENVOY_PREFIXES)

access_log = logging.getLogger("kotadb.access")
error_log = logging.getLogger("kotadb.errors")

UnaryInvoke = Callable[[], Awaitable[Any]]
StreamInvoke = Callable[[], AsyncIterator[Any]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]"


@dataclasses.dataclass
class CallRecord:
    """CallRecord is what the interceptors learn about one call: its id, method and outcome."""

    request_id: str
    method: str
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str | None = None
    messages_sent: int = 0
    # The client's address, read while the call is alive: grpc.aio's context.peer() reads the
    # C call, which a client's cancellation of a stream may already have released by the time
    # the handler's `finally` runs (a NULL dereference in cygrpc that killed the process).
    peer: str = ""


_call_var: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("kotadb_call", default=None)


def current_call() -> CallRecord | None:
    """current_call is the record of the RPC being served in this context, if any."""
    return _call_var.get()


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """CallInterceptor wraps every method handler's behaviour with `around_unary`/`around_stream`.

    Unary responses, and streaming handlers written as coroutines that call `context.write`,
    go through `around_unary`; streaming handlers written as async generators go through
    `around_stream`.
    """

    async def around_unary(
        self, invoke: UnaryInvoke, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        """around_unary runs `invoke` (the rest of the chain) and returns its response."""
        return await invoke()

    async def around_stream(
        self, invoke: StreamInvoke, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        """around_stream yields the responses of `invoke` (the rest of the chain)."""
        async for response in invoke():
            yield response

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        """intercept_service returns the next handler with its behaviour wrapped by this interceptor."""
        handler: Handler | None = await continuation(handler_call_details)
        if handler is None:
            # grpc passes None for a method no servicer registered; it answers UNIMPLEMENTED itself.
            return handler  # type: ignore[return-value]
        return self._wrap(handler, str(handler_call_details.method))

    def _wrap(self, handler: Handler, method: str) -> Handler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_behaviour(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_behaviour(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream_behaviour(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_behaviour(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary_behaviour(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async def invoke() -> Any:
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result

            return await self.around_unary(invoke, context, method)

        return unary

    def _stream_behaviour(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        # grpc.aio picks how to drive a streaming handler by its kind (async generator function
        # versus coroutine function using context.write), so the wrapper must keep that kind.
        if not inspect.isasyncgenfunction(behaviour):
            return self._unary_behaviour(behaviour, method)

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            def invoke() -> AsyncIterator[Any]:
                result: AsyncIterator[Any] = behaviour(request, context)
                return result

            async for response in self.around_stream(invoke, context, method):
                yield response

        return stream


class RequestContextInterceptor(CallInterceptor):
    """RequestContextInterceptor assigns the request id, returns it to the caller and logs the call.

    It also records every call in the Prometheus metrics of `service` (services/common/metrics.py):
    `kotadb_rpc_handled_total` by method and code, `kotadb_rpc_duration_seconds` by method. Only
    registered methods reach an interceptor, so the method label cannot grow without bound.
    """

    def __init__(self, service: str = "kotadb") -> None:
        self.service = service

    async def around_unary(
        self, invoke: UnaryInvoke, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        """around_unary serves one unary-response call inside its request context."""
        record = self._begin(context, method)
        token = _call_var.set(record)
        started = time.monotonic()
        with log_context(request_id=record.request_id, method=method):
            try:
                response = await invoke()
                # Envoy ignores the id on its own Check calls; the trailers still carry it, and an extra
                # initial-metadata write measured ~65 us of the ~600 us CPU a Check costs.
                if not method.startswith(_ENVOY_PREFIXES):
                    await _send_request_id(context, record.request_id)
                return response
            except BaseException as exc:
                _settle(record, exc, context)
                raise
            finally:
                _finish(self.service, record, started)
                _call_var.reset(token)

    async def around_stream(
        self, invoke: StreamInvoke, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        """around_stream serves one async-generator streaming call inside its request context."""
        record = self._begin(context, method)
        token = _call_var.set(record)
        started = time.monotonic()
        with log_context(request_id=record.request_id, method=method):
            try:
                sent_metadata = False
                async for response in invoke():
                    if not sent_metadata:
                        await _send_request_id(context, record.request_id)
                        sent_metadata = True
                    record.messages_sent += 1
                    yield response
            except BaseException as exc:
                _settle(record, exc, context)
                raise
            finally:
                _finish(self.service, record, started)
                _call_var.reset(token)

    def _begin(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> CallRecord:
        request_id = _incoming_request_id(context) or uuid.uuid4().hex
        # Set first, so the id rides on every outcome, including aborts from code we do not own.
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        return CallRecord(request_id=request_id, method=method, peer=context.peer())


class ErrorInterceptor(CallInterceptor):
    """ErrorInterceptor maps exceptions to `google.rpc.Status`; unknown ones become INTERNAL."""

    async def around_unary(
        self, invoke: UnaryInvoke, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        """around_unary returns the response or aborts the call with the mapped status."""
        try:
            return await invoke()
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort_with(context, exc, method)

    async def around_stream(
        self, invoke: StreamInvoke, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        """around_stream yields the responses, then aborts with the mapped status if one fails."""
        try:
            async for response in invoke():
                yield response
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort_with(context, exc, method)


def server_interceptors(
    identity: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
    *,
    service: str = "kotadb",
) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """server_interceptors is the chain every service installs; `identity` fills the auth slot.

    `service` labels the calls' metrics.
    """
    return [RequestContextInterceptor(service), ErrorInterceptor(), *identity]


async def _abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    record = _call_var.get()
    request_id = record.request_id if record is not None else uuid.uuid4().hex
    if isinstance(exc, KotaError):
        if record is not None:
            record.code, record.reason = exc.code, exc.reason
    else:
        # The only place an unexpected exception's traceback goes: our log, keyed by request id.
        error_log.error(
            "unhandled exception in %s", method, exc_info=exc, extra={"fields": {"request_id": request_id}}
        )
        if record is not None:
            record.code, record.reason = grpc.StatusCode.INTERNAL, "INTERNAL"
    status = rpc_status.to_status(to_rpc_status(exc, request_id))
    trailing = (*tuple(status.trailing_metadata), (REQUEST_ID_KEY, request_id))
    await context.abort(status.code, status.details, trailing_metadata=trailing)


async def _send_request_id(context: grpc.aio.ServicerContext[Any, Any], request_id: str) -> None:
    # UsageError: the handler already sent its own initial metadata; the trailers carry the id.
    with contextlib.suppress(grpc.aio.UsageError):
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))


def _incoming_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return None


def _settle(record: CallRecord, exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """_settle fills in the record's code when the call ended by an exception."""
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        record.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    elif record.code is grpc.StatusCode.OK:
        # An abort by code outside the error interceptor (e.g. the health servicer's NOT_FOUND).
        code = _context_code(context)
        record.code = code if code is not None else grpc.StatusCode.UNKNOWN


def _context_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return None


def _finish(service: str, record: CallRecord, started: float) -> None:
    """_finish records a finished call in the metrics and the access log."""
    elapsed = time.monotonic() - started
    metrics.observe_rpc(service, record.method, record.code.name, elapsed)
    _log_call(record, elapsed)


def _log_call(record: CallRecord, elapsed: float) -> None:
    # A cancelled health Watch is how watchers normally leave, so it stays quiet too.
    quiet = record.method.startswith(_QUIET_PREFIXES) and record.code in (
        grpc.StatusCode.OK,
        grpc.StatusCode.CANCELLED,
    )
    level = logging.DEBUG if quiet else logging.INFO
    if record.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        level = logging.ERROR
    if not access_log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "code": record.code.name,
        "duration_ms": round(elapsed * 1000, 3),
        "peer": record.peer,
    }
    if record.reason:
        fields["reason"] = record.reason
    if record.messages_sent:
        fields["messages_sent"] = record.messages_sent
    access_log.log(level, "rpc %s %s", record.method, record.code.name, extra={"fields": fields})
