"""h2limits bounds what a stranger can make the lean HTTP/2 server (h2unary.py) hold, and counts refusals.

Whoever reaches a listener's port can open connections, start a handshake and never finish it,
announce a large message and trickle it in 2-byte DATA frames, or send header blocks as long as
we accept. Each of those is bounded here, in one place:

* Connections: at most `max_connections` are open. When a new one arrives at the cap, the oldest
  connection still in its handshake (preface and first SETTINGS not received) is dropped to make
  room; if every connection has finished its handshake, the new one is closed at once (an abort:
  no read, no write, no log line of its own). A handshake must finish within
  `handshake_timeout` seconds and a connection that opens no stream for `idle_timeout` seconds
  (and has no call running) is closed, so held slots come back.
* Memory: every request byte held (message bytes waiting for the end of their stream) is charged
  to its connection and to the server, together with `FRAME_COST` per DATA frame and
  `STREAM_COST` plus the decoded header list per open stream, because a flood of tiny frames or
  empty streams costs objects, not payload. A stream whose charge would take its connection past
  `max_connection_bytes`, or the server past `max_total_bytes`, is refused with
  RESOURCE_EXHAUSTED and forgotten at once. A message is refused as soon as its 5-byte gRPC
  prefix announces more than `max_message` bytes, before any of it is kept.
* Header blocks: `max_header_list` is advertised as SETTINGS_MAX_HEADER_LIST_SIZE. A decoded
  header list above it refuses its stream (HTTP 431); an encoded block (HEADERS plus
  CONTINUATION, charged `FRAME_COST` per frame) above it, or a decoded list above twice it,
  ends the connection with ENHANCE_YOUR_CALM, since its HPACK state cannot be trusted after an
  unread block.
* Output: one read is processed in batches of frames; when the client does not read what we
  answer, reading stops until the transport's buffer drains (see h2unary.py).

What remains per connection beyond the charged bytes is the last partial frame (at most 16 KiB
plus one socket read) and the transport's write buffer (about `WRITE_HIGH_WATER` plus one batch).

Every refusal is counted in `kotadb_refusals_total{service, reason}` (services/common/metrics.py)
and logged at most once per `log_interval` seconds with the counts since the last line, so a
flood costs a counter increment per refusal, not a log line.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from collections import Counter
from typing import Generic, Protocol, TypeVar

from services.common import metrics

log = logging.getLogger("kotadb.h2unary")

# Bytes charged per DATA or CONTINUATION frame held or counted against a stream: a bytes object
# (33 bytes of header on CPython) plus its list slot, rounded up.
FRAME_COST = 64
# Bytes charged per open stream: the _Stream object and its dict entries.
STREAM_COST = 512

# Refusal reasons, as recorded in kotadb_refusals_total.
CONNECTION_LIMIT = "CONNECTION_LIMIT"
HANDSHAKE_TIMEOUT = "HANDSHAKE_TIMEOUT"
IDLE_TIMEOUT = "IDLE_TIMEOUT"
MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
HEADER_LIST_TOO_LARGE = "HEADER_LIST_TOO_LARGE"
BUFFER_LIMIT = "BUFFER_LIMIT"
# A connection closed for breaking the protocol (GOAWAY with an error code).
PROTOCOL_ERROR_REASON = "PROTOCOL_ERROR"

OPEN_CONNECTIONS = metrics.gauge(
    "kotadb_h2_open_connections", "Client connections open on a lean HTTP/2 listener.", ("service",)
)
BUFFERED_BYTES = metrics.gauge(
    "kotadb_h2_buffered_bytes",
    "Request bytes (with per-frame and per-stream overhead) held by a lean HTTP/2 listener.",
    ("service",),
)


@dataclasses.dataclass(frozen=True)
class H2Limits:
    """H2Limits is every bound of one h2unary listener; the defaults suit ext_authz Check.

    A Check request is the HTTP request's method, path and headers (Envoy sends no body to
    Check): a few KiB, so 64 KiB refuses nothing real.
    """

    max_message: int = 64 << 10
    max_streams: int = 1000
    max_connection_bytes: int = 4 << 20
    max_total_bytes: int = 64 << 20
    max_connections: int = 1024
    handshake_timeout: float = 5.0
    idle_timeout: float = 60.0
    max_header_list: int = 16 << 10
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_message", "max_streams", "max_connections", "max_header_list"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("handshake_timeout", "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        # One largest message sent in frames of 1 KiB or more must always fit a connection.
        floor = self.message_cost
        if self.max_connection_bytes < floor:
            object.__setattr__(self, "max_connection_bytes", floor)
        if self.max_total_bytes < self.max_connection_bytes:
            object.__setattr__(self, "max_total_bytes", self.max_connection_bytes)

    @property
    def message_cost(self) -> int:
        """message_cost is the charge of one largest message in 1 KiB frames, with its stream."""
        size = self.max_message + 5
        return size + FRAME_COST * (size // 1024 + 2) + STREAM_COST + self.max_header_list

    @property
    def max_header_block(self) -> int:
        """max_header_block is the most encoded header block bytes (frame costs included) accepted."""
        return self.max_header_list + 4 * FRAME_COST

    def connection_cap(self) -> int:
        """connection_cap is max_connections, lowered to half the process's file descriptor limit.

        Refusing at a cap we can still accept under keeps the accept loop (and every other port
        of the process) away from EMFILE.
        """
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, soft // 2))


class Refusals:
    """Refusals counts refusals by reason (metric and `counts`) and logs them at most once per interval."""

    def __init__(self, name: str, service: str, interval: float) -> None:
        self.name = name
        self.service = service
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._logged_at = -interval
        self._latest = ""

    def refuse(self, reason: str, detail: str) -> None:
        """refuse records one refusal of `reason`; detail is logged only in the next summary line."""
        metrics.refused(self.service, reason)
        self.counts[reason] += 1
        self._pending[reason] += 1
        self._latest = detail
        now = time.monotonic()
        if now - self._logged_at >= self.interval:
            self._logged_at = now
            summary = ", ".join(f"{reason} {n}" for reason, n in sorted(self._pending.items()))
            self._pending.clear()
            log.warning(
                "%s: refused %s (at most one such line per %.0f s); latest: %s",
                self.name,
                summary,
                self.interval,
                self._latest,
            )


class Evictable(Protocol):
    """Evictable is a connection Slots can drop to make room."""

    def evict(self, reason: str, detail: str) -> None:
        """evict drops the connection at once and counts it as a refusal of `reason`."""
        ...


C = TypeVar("C", bound=Evictable)


class Slots(Generic[C]):
    """Slots holds a listener's open connections under its cap, the ones in their handshake first in line.

    At the cap, the oldest connection still in its handshake is dropped to make room: a real
    client finishes its handshake within a round trip, so the slots that go are the ones held
    by clients that never finish it. With every slot past its handshake, a new connection is
    refused.
    """

    def __init__(self, cap: int, refusals: Refusals) -> None:
        self.cap = cap
        self.refusals = refusals
        self.open: set[C] = set()
        # Connections still in their handshake, oldest first.
        self.handshaking: dict[C, None] = {}

    def admit(self, connection: C) -> bool:
        """admit takes a slot for a new connection, or refuses it (False)."""
        if len(self.open) >= self.cap:
            victim = next(iter(self.handshaking), None)
            if victim is None:
                self.refusals.refuse(CONNECTION_LIMIT, f"{self.cap} connections open")
                return False
            victim.evict(CONNECTION_LIMIT, "dropped a connection still in its handshake to make room")
        self.open.add(connection)
        self.handshaking[connection] = None
        return True

    def handshake_done(self, connection: C) -> None:
        """handshake_done takes a connection out of the line of those that may be dropped."""
        self.handshaking.pop(connection, None)

    def release(self, connection: C) -> None:
        """release gives back a closed connection's slot (any number of times)."""
        self.open.discard(connection)
        self.handshaking.pop(connection, None)
