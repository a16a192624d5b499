"""h2unary serves unary gRPC methods over prior-knowledge HTTP/2 (h2c) with a hand-rolled frame loop.

Why this exists: Envoy's ext_authz filter calls the auth service's
`envoy.service.auth.v3.Authorization/Check` once per external request. grpc.aio spends roughly
250-280 us of CPU per call before any handler code runs, which caps one auth process near 3,500
checks/s. This module answers unary calls from an `asyncio.Protocol` with no task, no
per-call context object and one socket write per read, so the framework's own cost per call
is small and the handler's cost dominates. The python-hyper `h2` package as the framing layer
costs 15-20x more per call (BENCHMARKS.md, "Check framing"): Check would fall below 5,000/s.

Measured on the 2-core dev machine (indicative), a method doing nothing, h2load
`-n 50000 -c 4 -m 32` with a 222-byte gRPC body, h2load on the same 2 cores, server CPU per call
as process_time delta / calls:

* about 7 us per call when request header blocks hit the per-connection request cache
  (nghttp2, like Envoy, sends the same table-neutral block for every call after a connection's
  first; see `_Connection._decode`); `hpack_decodes` against `calls` shows whether they do;
* about 49-55 us per call with the cache disabled: pure-Python HPACK is then most of the cost.

What it implements (RFC 9113 and the gRPC over HTTP/2 protocol), as a server for clients that
start with the HTTP/2 connection preface (Envoy, grpcio):

* Connection setup: the 24-byte client preface is checked; our SETTINGS go out first
  (MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_HEADER_LIST_SIZE) together with a
  connection WINDOW_UPDATE; the client's first frame must be SETTINGS; every SETTINGS is ACKed.
* Frames: HEADERS + CONTINUATION (padding and priority fields stripped), DATA (padding),
  PRIORITY (ignored), PING (answered), RST_STREAM (the stream is dropped and its pending handler
  task cancelled), GOAWAY (in-flight calls finish, then the connection closes), WINDOW_UPDATE,
  unknown types (ignored). PUSH_PROMISE from a client is a protocol error.
* Errors: connection errors send GOAWAY with the RFC's error code and close; stream errors send
  RST_STREAM. Header blocks are always decoded (even for refused streams): HPACK stays in step.
* Flow control: received DATA counts against our connection and stream windows (a peer that
  overruns them gets FLOW_CONTROL_ERROR) and both are replenished as data arrives. Sent DATA never
  exceeds the peer's connection and stream windows or its MAX_FRAME_SIZE; what does not fit waits
  for WINDOW_UPDATE (or a larger INITIAL_WINDOW_SIZE, which also adjusts open streams).
* HPACK: requests are decoded with the `hpack` package. Responses are encoded (h2headers.py)
  with static table indices and literals without indexing, never touching the dynamic table.
* gRPC: request headers are checked in h2headers.py (`parse_request`); a compressed message,
  zero or several messages are UNIMPLEMENTED, a truncated one INTERNAL, one over `max_message`
  RESOURCE_EXHAUSTED as soon as its length prefix arrives (none of it is kept). A reply is
  HEADERS(:status 200) + DATA(message) + HEADERS(grpc-status 0, END_STREAM); errors are
  trailers-only. grpc-timeout is not enforced (Envoy enforces its own deadline).
* Limits (h2limits.py): MAX_CONCURRENT_STREAMS (REFUSED_STREAM), the connection count,
  handshake and idle time, header blocks, the request bytes held per connection and in total;
  a full write buffer stops reading (and processing what was read) until it drains.

Handlers are called synchronously while the frames are processed. A handler that returns bytes
is answered at once; one that returns an awaitable runs as a task and is answered when done.
`RpcError` becomes its status; any other exception becomes INTERNAL with a generic message (the
traceback goes to the log). All output produced by one read is written with one
`transport.write`.

Every call whose handler ran is recorded in `kotadb_rpc_handled_total` (by method and status
code; a call dropped unanswered is CANCELLED) and `kotadb_rpc_duration_seconds` (from the
handler's call to its response), the series the grpc.aio interceptor keeps for the same method
on the gRPC port. The label children are looked up once per method and code; a counter
increment and a histogram observation measured 1.5 + 3.6 us on a loaded 2-core machine, against
the ~65 us a Check costs.

`stop(grace)` closes the listener, sends GOAWAY(last stream id) on every connection (streams the
client opens after that are refused with REFUSED_STREAM, which grpc clients retry elsewhere), lets
in-flight calls finish for up to `grace` seconds, then closes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import struct
import time
from collections.abc import Mapping
from typing import Final, cast

import grpc
from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError
from prometheus_client import Counter

from services.common import metrics
from services.common.h2headers import (
    HEADER_LIST_TOO_LARGE_STATUS,
    OK_TRAILERS,
    RESPONSE_HEADERS,
    Request,
    parse_request,
    table_neutral,
    trailers_only_block,
)
from services.common.h2headers import UnaryMethod as UnaryMethod
from services.common.h2headers import UnaryResult as UnaryResult
from services.common.h2limits import (
    BUFFER_LIMIT,
    BUFFERED_BYTES,
    FRAME_COST,
    HANDSHAKE_TIMEOUT,
    HEADER_LIST_TOO_LARGE,
    IDLE_TIMEOUT,
    MESSAGE_TOO_LARGE,
    OPEN_CONNECTIONS,
    PROTOCOL_ERROR_REASON,
    STREAM_COST,
    H2Limits,
    Refusals,
    Slots,
)

log = logging.getLogger("kotadb.h2unary")


PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 section 6).
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

# Frame flags.
FLAG_END_STREAM: Final = 0x1
FLAG_ACK: Final = 0x1
FLAG_END_HEADERS: Final = 0x4
FLAG_PADDED: Final = 0x8
FLAG_PRIORITY: Final = 0x20

# Error codes (RFC 9113 section 7).
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
ENHANCE_YOUR_CALM: Final = 0xB

# Settings identifiers.
SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
SETTINGS_ENABLE_PUSH: Final = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS: Final = 0x3
SETTINGS_INITIAL_WINDOW_SIZE: Final = 0x4
SETTINGS_MAX_FRAME_SIZE: Final = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE: Final = 0x6

MAX_WINDOW: Final = (1 << 31) - 1
DEFAULT_WINDOW: Final = 65535
DEFAULT_MAX_FRAME: Final = 16384
# We never raise SETTINGS_MAX_FRAME_SIZE: every frame we accept is at most this long.
RECV_MAX_FRAME: Final = DEFAULT_MAX_FRAME
# Our receive windows. The stream window is what we advertise as SETTINGS_INITIAL_WINDOW_SIZE;
# the connection window is raised to CONN_WINDOW by a WINDOW_UPDATE right after our SETTINGS.
# They only bound what a client may send before we answer; what we keep is bounded by H2Limits.
STREAM_WINDOW: Final = 1 << 24
CONN_WINDOW: Final = 1 << 24
# Distinct indexed-only request header blocks remembered per connection (see _Connection._decode).
REQUEST_CACHE_SIZE: Final = 64
CACHED_BLOCK_MAX: Final = 1024
# The transport's write buffer size at which the connection stops reading from its client.
WRITE_HIGH_WATER: Final = 64 << 10
# Output items (frames or frame parts) queued by one batch of received frames: past this, the
# rest of what was read waits until the batch is written, so a client that sends many small
# frames and reads nothing holds about one batch of answers, not one per frame it sent.
OUT_BATCH: Final = 512

_FRAME_HEAD: Final = struct.Struct(">HBBBL")
_U32: Final = struct.Struct(">L")


class RpcError(Exception):
    """RpcError ends a call with a non-OK gRPC status; the client sees `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _ConnectionError(Exception):
    """_ConnectionError aborts frame processing: the connection ends with GOAWAY(code)."""

    def __init__(self, code: int, debug: str) -> None:
        super().__init__(debug)
        self.code = code
        self.debug = debug


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """_frame is one HTTP/2 frame: the 9-byte header followed by payload."""
    n = len(payload)
    return _FRAME_HEAD.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _frame_head(n: int, ftype: int, flags: int, sid: int) -> bytes:
    """_frame_head is the 9-byte header of a frame whose payload is n bytes long."""
    return _FRAME_HEAD.pack(n >> 8, n & 0xFF, ftype, flags, sid)


class _CallMetrics:
    """_CallMetrics records one method's finished calls in the shared RPC metrics (metrics.py).

    The label children are looked up once per method (and once per status code), so a call
    costs a counter increment and a histogram observation: the same kotadb_rpc_handled_total
    and kotadb_rpc_duration_seconds series the grpc.aio interceptor records for the method on
    the service's gRPC port.
    """

    __slots__ = ("duration", "handled", "method", "service")

    def __init__(self, service: str, method: str) -> None:
        self.service = service
        self.method = method
        self.duration = metrics.RPC_DURATION.labels(service=service, method=method)
        self.handled: dict[grpc.StatusCode, Counter] = {}

    def finish(self, stream: _Stream, code: grpc.StatusCode) -> None:
        """finish records `stream`'s call as ended with `code` once, if its handler ran."""
        started = stream.started
        if not started:
            return
        stream.started = 0.0
        child = self.handled.get(code)
        if child is None:
            child = metrics.RPC_HANDLED.labels(service=self.service, method=self.method, code=code.name)
            self.handled[code] = child
        child.inc()
        self.duration.observe(time.perf_counter() - started)


class _Stream:
    """_Stream is one request stream from HEADERS until its response is fully written."""

    __slots__ = (
        "base_cost",
        "calls",
        "charged",
        "chunks",
        "declared",
        "handler",
        "headers",
        "pending",
        "received",
        "recv_window",
        "remote_closed",
        "send_window",
        "sid",
        "started",
        "task",
    )

    def __init__(
        self,
        sid: int,
        handler: UnaryMethod,
        headers: Mapping[str, str],
        send_window: int,
        base_cost: int,
        calls: _CallMetrics,
    ) -> None:
        self.sid = sid
        self.handler = handler
        self.headers = headers
        self.calls = calls
        # perf_counter() when the handler was called; 0.0 before, and again once the call is
        # recorded in the metrics (so it is recorded once).
        self.started = 0.0
        self.chunks: list[bytes] = []
        self.received = 0
        # What the stream is charged (h2limits.py): base_cost while it is open, `charged` for
        # its request bytes and DATA frames until they are handed to the handler.
        self.base_cost = base_cost
        self.charged = 0
        # The message length from the 5-byte prefix, once it has arrived; -1 before.
        self.declared = -1
        self.recv_window = STREAM_WINDOW
        self.send_window = send_window
        self.remote_closed = False
        self.task: asyncio.Future[bytes] | None = None
        # Response DATA not yet allowed by flow control (then the trailers follow).
        self.pending: memoryview | None = None


class _Connection(asyncio.Protocol):
    """_Connection is one client connection: frame parsing, streams, flow control, responses."""

    def __init__(self, server: H2UnaryServer) -> None:
        self.server = server
        self.methods = server.methods
        limits = server.limits
        self.max_message = limits.max_message
        self.max_streams = limits.max_streams
        self.max_buffered = limits.max_connection_bytes
        self.max_header_list = limits.max_header_list
        self.max_header_block = limits.max_header_block
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.preface_ok = False
        self.settings_seen = False
        self.decoder = Decoder(max_header_list_size=2 * limits.max_header_list)
        self.request_cache: dict[bytes, Request | None] = {}
        self.cache_cost = 0
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[int, _Stream] = {}
        self.last_sid = 0
        self.out: list[bytes | memoryview] = []
        self.flush_scheduled = False
        # Header block being continued by CONTINUATION frames: stream id (0: none), flags, fragments.
        self.cont_sid = 0
        self.cont_flags = 0
        self.cont_block: list[bytes] = []
        self.cont_size = 0
        # Flow control.
        self.recv_window = CONN_WINDOW
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        # Bytes charged to this connection (h2limits.py), also counted in server.buffered.
        self.buffered = 0
        # Reading: paused while the transport's write buffer is full (write_paused) or while
        # `buf` holds whole frames not processed yet (backlog, see OUT_BATCH).
        self.write_paused = False
        self.backlog = False
        # Timers: the handshake deadline, then the idle check; `opened` counts streams opened,
        # `opened_seen` is its value at the previous idle check.
        self.timer: asyncio.TimerHandle | None = None
        self.opened = 0
        self.opened_seen = 0
        # Shutdown.
        self.goaway_sent = False
        self.peer_goaway = False
        self.closed = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        if not server.slots.admit(self):
            self.closed = True
            transport.abort()
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        server.connections += 1
        self.timer = asyncio.get_running_loop().call_later(
            server.limits.handshake_timeout, self._handshake_expired
        )
        settings = struct.pack(
            ">HLHLHL",
            SETTINGS_MAX_CONCURRENT_STREAMS,
            self.max_streams,
            SETTINGS_INITIAL_WINDOW_SIZE,
            STREAM_WINDOW,
            SETTINGS_MAX_HEADER_LIST_SIZE,
            self.max_header_list,
        )
        transport.write(
            _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONN_WINDOW - DEFAULT_WINDOW))
        )
        if server.stopping:
            self.goaway()

    def _teardown(self) -> None:
        """_teardown marks the connection closed, cancels pending handlers and gives back its charge."""
        self.closed = True
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()
            stream.calls.finish(stream, grpc.StatusCode.CANCELLED)
        self.streams.clear()
        self.blocked.clear()
        self.cont_block = []
        self.buf = b""
        self._clear_cache()
        self.server.buffered -= self.buffered
        self.buffered = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.slots.release(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown()
        if not self.done.done():
            self.done.set_result(None)

    def evict(self, reason: str, detail: str) -> None:
        """evict drops the connection at once (no GOAWAY) and counts it as a refusal of `reason`."""
        if self.closed:
            return
        self.server.refusals.refuse(reason, detail)
        self._teardown()
        if self.transport is not None:
            self.transport.abort()

    def _handshake_expired(self) -> None:
        self.timer = None
        self.evict(HANDSHAKE_TIMEOUT, "connection preface and SETTINGS not received in time")

    def _handshake_done(self) -> None:
        """_handshake_done starts the idle checks once the preface and the client's SETTINGS are in."""
        self.server.slots.handshake_done(self)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.server.limits.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        """_idle_check closes a connection that opened no stream since the last check and runs no call.

        Neither a stream whose request is still arriving nor a response waiting for the
        client's flow control windows counts as work: a client trickling a request, or holding
        its windows shut, slower than one new stream per idle period loses the connection.
        """
        self.timer = None
        if self.closed:
            return
        busy = any(s.task is not None and not s.task.done() for s in self.streams.values())
        if self.opened == self.opened_seen and not busy:
            self.server.refusals.refuse(IDLE_TIMEOUT, "no stream opened within the idle timeout")
            self._fail(NO_ERROR, "idle timeout", quiet=True)
            return
        self.opened_seen = self.opened
        self.timer = asyncio.get_running_loop().call_later(self.server.limits.idle_timeout, self._idle_check)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is None or self.closed:
            return
        if self.backlog:
            self._continue()
        else:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        self._process(data)

    def _process(self, data: bytes) -> None:
        """_process handles what was read (up to one batch of output), writes the answers, and
        pauses reading while whole frames are left over."""
        try:
            if not self.preface_ok:
                if data[:24] != PREFACE[: len(data)]:
                    raise _ConnectionError(PROTOCOL_ERROR, "invalid connection preface")
                if len(data) < 24:
                    self.buf = data
                    return
                self.preface_ok = True
                data = data[24:]
            pos = self._frames(data)
            if pos < len(data):
                self.buf = data[pos:]
        except _ConnectionError as err:
            self._fail(err.code, err.debug)
            return
        self._flush()
        self._maybe_close()
        if self.backlog and not self.closed and self.transport is not None:
            self.transport.pause_reading()
            if not self.write_paused:
                asyncio.get_running_loop().call_soon(self._continue)

    def _continue(self) -> None:
        """_continue processes the frames left over by the last batch, then reads again when none are."""
        if self.closed or self.write_paused or not self.backlog or self.transport is None:
            return
        self.backlog = False
        data = self.buf
        self.buf = b""
        self._process(data)
        if not self.backlog and not self.closed and not self.write_paused:
            self.transport.resume_reading()

    # -- frames ------------------------------------------------------------------------------

    def _frames(self, data: bytes) -> int:
        """_frames handles every complete frame in data and returns the offset after the last."""
        unpack = _FRAME_HEAD.unpack_from
        n = len(data)
        pos = 0
        out = self.out
        while n - pos >= 9:
            if len(out) >= OUT_BATCH:
                self.backlog = True
                break
            hi, lo, ftype, flags, sid = unpack(data, pos)
            length = hi << 8 | lo
            if length > RECV_MAX_FRAME:
                raise _ConnectionError(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
            end = pos + 9 + length
            if end > n:
                break
            sid &= 0x7FFFFFFF
            payload = data[pos + 9 : end]
            pos = end
            if self.cont_sid:
                if ftype != CONTINUATION or sid != self.cont_sid:
                    raise _ConnectionError(PROTOCOL_ERROR, "expected CONTINUATION")
                self._continuation(flags, payload)
            elif not self.settings_seen:
                if ftype != SETTINGS or flags & FLAG_ACK:
                    raise _ConnectionError(PROTOCOL_ERROR, "the first frame must be SETTINGS")
                self.settings_seen = True
                self._settings(sid, flags, payload)
                self._handshake_done()
            elif ftype == DATA:
                self._data(sid, flags, payload)
            elif ftype == HEADERS:
                self._headers(sid, flags, payload)
            elif ftype == WINDOW_UPDATE:
                self._window_update(sid, payload)
            elif ftype == SETTINGS:
                self._settings(sid, flags, payload)
            elif ftype == PING:
                if sid:
                    raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
                if length != 8:
                    raise _ConnectionError(FRAME_SIZE_ERROR, "PING payload is not 8 bytes")
                if not flags & FLAG_ACK:
                    self.out.append(_frame(PING, FLAG_ACK, 0, payload))
            elif ftype == RST_STREAM:
                self._rst_stream(sid, payload)
            elif ftype == PRIORITY:
                if not sid:
                    raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
                if length != 5:
                    self._reset(sid, FRAME_SIZE_ERROR)
            elif ftype == GOAWAY:
                if sid:
                    raise _ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
                if length < 8:
                    raise _ConnectionError(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
                self.peer_goaway = True
            elif ftype == CONTINUATION:
                raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            elif ftype == PUSH_PROMISE:
                raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # Unknown frame types are ignored (RFC 9113 section 4.1).
        return pos

    def _settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        for ident, value in struct.iter_unpack(">HL", payload):
            if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise _ConnectionError(FLOW_CONTROL_ERROR, "stream window overflow")
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= (1 << 24) - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif ident == SETTINGS_ENABLE_PUSH and value > 1:
                raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
            # SETTINGS_HEADER_TABLE_SIZE: our encoder never uses the dynamic table, so any size is
            # honoured. MAX_CONCURRENT_STREAMS and MAX_HEADER_LIST_SIZE limit what we would
            # initiate or send in bulk; a server pushing nothing has nothing to adjust.
        self.out.append(_frame(SETTINGS, FLAG_ACK, 0))
        if self.blocked:
            self._drain()

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE with increment 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            stream = self.streams.get(sid)
            if stream is None:
                if sid > self.last_sid:
                    raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
                return
            if not increment:
                self._reset(sid, PROTOCOL_ERROR)
                return
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW:
                self._reset(sid, FLOW_CONTROL_ERROR)
                return
        if self.blocked:
            self._drain()

    def _rst_stream(self, sid: int, payload: bytes) -> None:
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM payload is not 4 bytes")
        if sid > self.last_sid:
            raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        self._drop(sid)

    def _headers(self, sid: int, flags: int, payload: bytes) -> None:
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        if not sid & 1:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on an even stream id")
        start = 0
        end = len(payload)
        if flags & FLAG_PADDED:
            if not end:
                raise _ConnectionError(FRAME_SIZE_ERROR, "padded HEADERS without a pad length")
            start = 1
            end -= payload[0]
        if flags & FLAG_PRIORITY:
            if end - start < 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            start += 5
        if end < start:
            raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the HEADERS payload")
        block = payload[start:end] if start or end != len(payload) else payload
        if len(block) + FRAME_COST > self.max_header_block:
            self.server.refusals.refuse(HEADER_LIST_TOO_LARGE, "header block over the limit")
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & FLAG_END_HEADERS:
            self._header_block(sid, flags, block)
        else:
            self.cont_sid = sid
            self.cont_flags = flags
            self.cont_block = [block]
            self.cont_size = len(block) + FRAME_COST

    def _continuation(self, flags: int, payload: bytes) -> None:
        # Every fragment is charged FRAME_COST: a flood of empty CONTINUATION frames ends here too.
        self.cont_block.append(payload)
        self.cont_size += len(payload) + FRAME_COST
        if self.cont_size > self.max_header_block:
            self.server.refusals.refuse(HEADER_LIST_TOO_LARGE, "header block over the limit")
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & FLAG_END_HEADERS:
            sid = self.cont_sid
            block = b"".join(self.cont_block)
            self.cont_sid = 0
            self.cont_block = []
            self._header_block(sid, self.cont_flags, block)

    def _decode(self, block: bytes) -> list[tuple[str, str]] | None:
        """_decode runs HPACK on a header block, or returns None when the block's request is cached.

        A block without table-changing fields (only indexed fields and literals without indexing)
        leaves the dynamic table as it was, so while the table does not change the same bytes
        mean the same headers. Clients that index their repeated headers (nghttp2, Envoy) send
        the same such block for every call after the first. Any other block may change the
        table, so it empties the cache.
        """
        if block in self.request_cache:
            return None
        self.server.hpack_decodes += 1
        try:
            # raw=False: names and values come back as str.
            fields = cast("list[tuple[str, str]]", self.decoder.decode(block))
        except OversizedHeaderListError as err:
            self.server.refusals.refuse(HEADER_LIST_TOO_LARGE, "decoded header list over twice the limit")
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header list too large") from err
        except HPACKError as err:
            raise _ConnectionError(COMPRESSION_ERROR, "invalid header block") from err
        if not table_neutral(block):
            self._clear_cache()
        return fields

    def _request(self, block: bytes, fields: list[tuple[str, str]] | None) -> Request | None:
        """_request is what a request header block asks for (None: malformed), from the cache if it can."""
        if fields is None:
            return self.request_cache[block]
        request = parse_request(fields, self.methods, self.max_header_list)
        if len(block) <= CACHED_BLOCK_MAX and table_neutral(block):
            self._cache(block, request)
        return request

    def _cache(self, block: bytes, request: Request | None) -> None:
        """_cache remembers what a block asked for, charged like a stream (not at all if there is no room).

        A small block may decode to a large header list (indexed references to a full dynamic
        table), so the entries are charged by their decoded size.
        """
        if len(self.request_cache) >= REQUEST_CACHE_SIZE:
            self._clear_cache()
        cost = STREAM_COST + len(block) + (request[3] if request is not None else 0)
        server = self.server
        if self.buffered + cost > self.max_buffered or server.buffered + cost > server.max_total:
            return
        self.request_cache[block] = request
        self.cache_cost += cost
        self.buffered += cost
        server.buffered += cost
        server.cached += cost

    def _clear_cache(self) -> None:
        self.request_cache.clear()
        cost = self.cache_cost
        if cost:
            self.cache_cost = 0
            self.buffered -= cost
            self.server.buffered -= cost
            self.server.cached -= cost

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        """_header_block decodes a complete header block and opens (or ends) its stream."""
        fields = self._decode(block)
        stream = self.streams.get(sid)
        if stream is not None:
            # Trailers from the client: they must end the stream.
            if stream.remote_closed:
                self._reset(sid, STREAM_CLOSED)
            elif not flags & FLAG_END_STREAM:
                raise _ConnectionError(PROTOCOL_ERROR, "second HEADERS without END_STREAM")
            else:
                stream.remote_closed = True
                self._dispatch(stream)
            return
        if sid <= self.last_sid:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on a closed stream")
        self.last_sid = sid
        if self.goaway_sent or len(self.streams) >= self.max_streams:
            self._rst(sid, REFUSED_STREAM)
            return
        request = self._request(block, fields)
        if request is None:
            self._rst(sid, PROTOCOL_ERROR)
            return
        self.opened += 1
        handler, headers, refusal, size, path = request
        end_stream = bool(flags & FLAG_END_STREAM)
        if handler is None:
            assert refusal is not None
            code, message, http_status, extra = refusal
            if http_status == HEADER_LIST_TOO_LARGE_STATUS:
                self.server.refusals.refuse(HEADER_LIST_TOO_LARGE, message)
            self._early(sid, end_stream, code, message, http_status, extra)
            return
        cost = STREAM_COST + size
        server = self.server
        if self.buffered + cost > self.max_buffered or server.buffered + cost > server.max_total:
            server.refusals.refuse(BUFFER_LIMIT, "no room for another stream")
            self._rst(sid, REFUSED_STREAM)
            return
        self.buffered += cost
        server.buffered += cost
        stream = _Stream(sid, handler, headers, self.peer_initial_window, cost, server.calls_by_method[path])
        self.streams[sid] = stream
        if end_stream:
            stream.remote_closed = True
            self._dispatch(stream)

    def _data(self, sid: int, flags: int, payload: bytes) -> None:
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        if length > self.recv_window:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= length
        if self.recv_window < CONN_WINDOW // 2:
            self.out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONN_WINDOW - self.recv_window)))
            self.recv_window = CONN_WINDOW
        if flags & FLAG_PADDED:
            if not length or payload[0] >= length:
                raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the DATA payload")
            payload = payload[1 : length - payload[0]]
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.last_sid:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            # A stream we answered early or reset: what the client had in flight is dropped.
            return
        if stream.remote_closed:
            self._reset(sid, STREAM_CLOSED)
            return
        if length > stream.recv_window:
            self._reset(sid, FLOW_CONTROL_ERROR)
            return
        stream.recv_window -= length
        # Every DATA frame is charged, empty ones too: a flood of tiny frames costs its
        # FRAME_COST each, so it hits the connection's cap long before its payload would.
        size = len(payload)
        cost = size + FRAME_COST
        server = self.server
        self.buffered += cost
        server.buffered += cost
        stream.charged += cost
        if payload:
            stream.chunks.append(payload)
            stream.received += size
            if stream.declared < 0 and stream.received >= 5:
                head = stream.chunks[0] if len(stream.chunks[0]) >= 5 else b"".join(stream.chunks)
                stream.declared = _U32.unpack_from(head, 1)[0]
                if stream.declared > self.max_message:
                    server.refusals.refuse(MESSAGE_TOO_LARGE, f"declared {stream.declared} bytes")
                    self._refuse(
                        stream,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"request message larger than {self.max_message} bytes",
                    )
                    return
            if stream.declared >= 0 and stream.received > stream.declared + 5:
                self._refuse(stream, grpc.StatusCode.UNIMPLEMENTED, "more than one request message")
                return
        if self.buffered > self.max_buffered or server.buffered > server.max_total:
            which = "connection" if self.buffered > self.max_buffered else "server"
            server.refusals.refuse(BUFFER_LIMIT, f"{which} request buffer full")
            self._refuse(
                stream, grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many request bytes held by this {which}"
            )
            return
        if flags & FLAG_END_STREAM:
            stream.remote_closed = True
            self._dispatch(stream)
        elif stream.recv_window < STREAM_WINDOW // 2:
            self.out.append(_frame(WINDOW_UPDATE, 0, sid, _U32.pack(STREAM_WINDOW - stream.recv_window)))
            stream.recv_window = STREAM_WINDOW

    # -- calls -------------------------------------------------------------------------------

    def _dispatch(self, stream: _Stream) -> None:
        """_dispatch checks the request body (exactly one uncompressed message) and calls the handler."""
        chunks = stream.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        stream.chunks = []
        if stream.charged:
            self.buffered -= stream.charged
            self.server.buffered -= stream.charged
            stream.charged = 0
        size = len(body)
        if size < 5:
            if size:
                self._refuse(stream, grpc.StatusCode.INTERNAL, "truncated request message")
            else:
                self._refuse(stream, grpc.StatusCode.UNIMPLEMENTED, "no request message")
            return
        if body[0]:
            if body[0] == 1:
                self._refuse(stream, grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not supported")
            else:
                self._refuse(stream, grpc.StatusCode.INTERNAL, "invalid message flags")
            return
        if size != stream.declared + 5:
            # received > declared + 5 was refused while buffering, so this is a short message.
            self._refuse(stream, grpc.StatusCode.INTERNAL, "truncated request message")
            return
        self.server.calls += 1
        stream.started = time.perf_counter()
        try:
            result = stream.handler(body[5:], stream.headers)
        except RpcError as err:
            self._refuse(stream, err.code, err.message)
            return
        except Exception:
            log.exception("%s: handler failed", self.server.name)
            self._refuse(stream, grpc.StatusCode.INTERNAL, "internal error")
            return
        if type(result) is bytes:
            self._respond(stream, result)
        elif inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            stream.task = task
            task.add_done_callback(functools.partial(self._task_done, stream))
        else:
            log.error("%s: handler returned %s, not bytes", self.server.name, type(result).__name__)
            self._refuse(stream, grpc.StatusCode.INTERNAL, "internal error")

    def _task_done(self, stream: _Stream, task: asyncio.Future[bytes]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if self.closed or self.streams.get(stream.sid) is not stream:
            return
        if exc is None:
            result = task.result()
            if isinstance(result, bytes):
                self._respond(stream, result)
            else:
                log.error("%s: handler returned %s, not bytes", self.server.name, type(result).__name__)
                self._refuse(stream, grpc.StatusCode.INTERNAL, "internal error")
        elif isinstance(exc, RpcError):
            self._refuse(stream, exc.code, exc.message)
        else:
            log.error("%s: handler failed", self.server.name, exc_info=exc)
            self._refuse(stream, grpc.StatusCode.INTERNAL, "internal error")
        self._schedule_flush()

    def _respond(self, stream: _Stream, message: bytes) -> None:
        """_respond writes HEADERS, the message as DATA and the OK trailers, as flow control allows."""
        stream.calls.finish(stream, grpc.StatusCode.OK)
        sid = stream.sid
        n = len(message) + 5
        out = self.out
        out.append(_frame(HEADERS, FLAG_END_HEADERS, sid, RESPONSE_HEADERS))
        if n <= self.send_window and n <= stream.send_window and n <= self.peer_max_frame:
            self.send_window -= n
            out.append(_frame_head(n, DATA, 0, sid) + b"\x00" + _U32.pack(n - 5))
            out.append(message)
            out.append(_frame(HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, sid, OK_TRAILERS))
            self._closed(stream)
            return
        stream.pending = memoryview(b"\x00" + _U32.pack(n - 5) + message)
        # A response waiting for the client's windows is held for the client: charge it.
        stream.charged += n
        self.buffered += n
        self.server.buffered += n
        self.blocked[sid] = stream
        self._drain()

    def _drain(self) -> None:
        """_drain sends queued response DATA, one frame per stream per round, within the windows."""
        out = self.out
        while self.blocked and self.send_window > 0:
            progress = False
            for stream in list(self.blocked.values()):
                pending = stream.pending
                assert pending is not None
                room = min(stream.send_window, self.send_window, self.peer_max_frame, len(pending))
                if room <= 0:
                    continue
                progress = True
                out.append(_frame_head(room, DATA, 0, stream.sid))
                out.append(pending[:room])
                stream.pending = pending[room:]
                stream.send_window -= room
                self.send_window -= room
                if not stream.pending:
                    stream.pending = None
                    del self.blocked[stream.sid]
                    out.append(_frame(HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, stream.sid, OK_TRAILERS))
                    self._closed(stream)
                if self.send_window <= 0:
                    break
            if not progress:
                break

    def _refuse(self, stream: _Stream, code: grpc.StatusCode, message: str) -> None:
        """_refuse ends an open stream with a trailers-only error response."""
        stream.calls.finish(stream, code)
        self._early(stream.sid, stream.remote_closed, code, message)
        self._drop(stream.sid)

    def _early(
        self,
        sid: int,
        remote_closed: bool,
        code: grpc.StatusCode,
        message: str,
        http_status: int = 200,
        extra: bytes = b"",
    ) -> None:
        """_early sends a trailers-only response (and RST_STREAM(NO_ERROR) if the client is still sending)."""
        self.server.errors += 1
        block = trailers_only_block(code.value[0], message, http_status, extra)
        self.out.append(_frame(HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, sid, block))
        if not remote_closed:
            self._rst(sid, NO_ERROR)

    def _closed(self, stream: _Stream) -> None:
        """_closed forgets a stream whose response has been fully queued."""
        if self.streams.pop(stream.sid, None) is not None:
            self._uncharge(stream)
        if not stream.remote_closed:
            self._rst(stream.sid, NO_ERROR)

    def _uncharge(self, stream: _Stream) -> None:
        """_uncharge gives back what a forgotten stream was charged."""
        cost = stream.base_cost + stream.charged
        stream.base_cost = stream.charged = 0
        self.buffered -= cost
        self.server.buffered -= cost

    def _reset(self, sid: int, code: int) -> None:
        """_reset is a stream error: RST_STREAM(code), and the stream is dropped."""
        self._rst(sid, code)
        self._drop(sid)

    def _rst(self, sid: int, code: int) -> None:
        self.out.append(_frame(RST_STREAM, 0, sid, _U32.pack(code)))

    def _drop(self, sid: int) -> None:
        """_drop forgets a stream: its buffered request, queued response and pending task."""
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        stream.chunks = []
        self._uncharge(stream)
        self.blocked.pop(sid, None)
        # A call whose handler ran and that is dropped unanswered was cancelled (reset by the
        # client or its connection closed), as grpc.aio records it.
        stream.calls.finish(stream, grpc.StatusCode.CANCELLED)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    # -- output and shutdown -----------------------------------------------------------------

    def _flush(self) -> None:
        out = self.out
        if out and self.transport is not None and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self.flush_scheduled = False
        self._flush()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if (self.goaway_sent or self.peer_goaway) and not self.streams and not self.closed:
            self._flush()
            self.closed = True
            self._close_transport()

    def _fail(self, code: int, debug: str, *, quiet: bool = False) -> None:
        """_fail is a connection error: GOAWAY(code), then the connection closes.

        The error is counted (and logged at a bounded rate) as a PROTOCOL_ERROR refusal unless
        `quiet` (the caller counted it already): any client can make them at will.
        """
        if not quiet:
            self.server.refusals.refuse(PROTOCOL_ERROR_REASON, debug)
        self.out.append(_frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_sid, code) + debug.encode()))
        self._flush()
        self._teardown()
        self._close_transport()

    def _close_transport(self) -> None:
        """_close_transport closes after the last write drains, or aborts if the client will not read it.

        `close` waits for the write buffer to drain; a client that reads nothing would keep the
        socket open forever, so what is still unwritten after the handshake timeout is dropped.
        """
        transport = self.transport
        if transport is None:
            return
        transport.close()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(self.server.limits.handshake_timeout, transport.abort)

    def goaway(self) -> None:
        """goaway starts a graceful close: no new streams; the connection closes once calls finish."""
        if self.closed or self.goaway_sent:
            return
        self.goaway_sent = True
        self.out.append(_frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_sid, NO_ERROR)))
        self._flush()
        self._maybe_close()

    def abort(self) -> None:
        """abort closes the connection now, cancelling whatever is still running."""
        self._teardown()
        if self.transport is not None:
            self.transport.abort()


class H2UnaryServer:
    """H2UnaryServer serves a fixed table of unary gRPC methods (by `/package.Service/Method` path) over h2c.

    `limits` bounds what clients can make it hold (h2limits.py); refusals are counted under
    `service` in kotadb_refusals_total and in `refusals.counts`. `calls` (handler invocations),
    `errors` (non-OK responses), `connections` (accepted connections) and `hpack_decodes`
    (header blocks that missed the per-connection request cache) are plain counters for
    benchmarks; `buffered` is the bytes charged across all connections right now, `cached` the
    part of it charged for the connections' request caches.
    """

    def __init__(
        self,
        methods: Mapping[str, UnaryMethod],
        *,
        limits: H2Limits | None = None,
        name: str = "h2unary",
        service: str = "",
    ) -> None:
        for path in methods:
            if not path.startswith("/") or path.count("/") != 2:
                raise ValueError(f"method path {path!r} is not /package.Service/Method")
        self.methods: dict[str, UnaryMethod] = dict(methods)
        self.limits = limits if limits is not None else H2Limits()
        self.max_total = self.limits.max_total_bytes
        self.name = name
        self.service = service or name
        self.calls_by_method = {path: _CallMetrics(self.service, path) for path in methods}
        self.refusals = Refusals(name, self.service, self.limits.log_interval)
        self.calls = 0
        self.errors = 0
        self.connections = 0
        self.hpack_decodes = 0
        self.buffered = 0
        self.cached = 0
        self.stopping = False
        self._server: asyncio.Server | None = None
        self.slots: Slots[_Connection] = Slots(self.limits.connection_cap(), self.refusals)
        OPEN_CONNECTIONS.labels(service=self.service).set_function(lambda: len(self.slots.open))
        BUFFERED_BYTES.labels(service=self.service).set_function(lambda: self.buffered)

    @property
    def open_connections(self) -> int:
        """open_connections is the number of client connections open right now."""
        return len(self.slots.open)

    async def start(self, host: str, port: int) -> int:
        """start listens on host:port (0 picks a free port) and returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        bound: int = self._server.sockets[0].getsockname()[1]
        log.info("%s: listening on %s:%d (at most %d connections)", self.name, host, bound, self.slots.cap)
        return bound

    async def stop(self, grace: float) -> None:
        """stop refuses new connections and streams, lets calls finish within grace seconds, then closes."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        connections = list(self.slots.open)
        for connection in connections:
            connection.goaway()
        pending = [c.done for c in connections if not c.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for connection in list(self.slots.open):
            connection.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1.0)
            self._server = None
