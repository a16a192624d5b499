"""h2headers is the header side of the lean HTTP/2 server (h2unary.py): HPACK output and request checks.

Responses are encoded here with static table indices and literals without indexing, never
touching the dynamic table, so the peer's SETTINGS_HEADER_TABLE_SIZE is honoured whatever its
value. Requests are decoded by the `hpack` package in h2unary.py; `parse_request` checks the
decoded fields against the gRPC over HTTP/2 protocol and picks the handler: `:method` must be
POST (else HTTP 405), content-type must start with application/grpc (else HTTP 415), an unknown
`:path` or a grpc-encoding other than identity is UNIMPLEMENTED, a header list over the limit is
RESOURCE_EXHAUSTED (HTTP 431). `table_neutral` tells whether a block may be cached (see
`_Connection._decode` in h2unary.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Final

import grpc

UnaryResult = bytes | Awaitable[bytes]
# (request message bytes, request headers: lower-case names, pseudo-headers left out) -> response.
UnaryMethod = Callable[[bytes, Mapping[str, str]], UnaryResult]

# The longest grpc-message we send (bytes before percent-encoding).
MAX_STATUS_MESSAGE: Final = 1024

_CONNECTION_HEADERS: Final = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade")
)


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """_hpack_int encodes value as an HPACK integer with an N-bit prefix OR-ed into `first`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(raw: bytes) -> bytes:
    """_hpack_string is a string literal without Huffman coding."""
    return _hpack_int(len(raw), 7, 0) + raw


def _literal(name: bytes, value: bytes) -> bytes:
    """_literal is a header field 'literal without indexing' with a literal name."""
    return b"\x00" + _hpack_string(name) + _hpack_string(value)


def _literal_indexed_name(index: int, value: bytes) -> bytes:
    """_literal is a 'literal without indexing' whose name is static-table entry `index`."""
    return _hpack_int(index, 4, 0) + _hpack_string(value)


# Static table: 8 is ":status: 200", 31 is "content-type".
_STATUS_200: Final = b"\x88"
_CONTENT_TYPE: Final = _literal_indexed_name(31, b"application/grpc")
RESPONSE_HEADERS: Final = _STATUS_200 + _CONTENT_TYPE
OK_TRAILERS: Final = _literal(b"grpc-status", b"0")
_ACCEPT_IDENTITY: Final = _literal(b"grpc-accept-encoding", b"identity")


def _percent_encode(message: str) -> bytes:
    """_percent_encode applies gRPC's grpc-message encoding: UTF-8, then %XX outside 0x20-0x7E and '%'."""
    raw = message.encode("utf-8", "replace")[:MAX_STATUS_MESSAGE]
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def trailers_only_block(code: int, message: str, http_status: int = 200, extra: bytes = b"") -> bytes:
    """trailers_only_block is the header block of a trailers-only response."""
    status = _STATUS_200 if http_status == 200 else _literal_indexed_name(8, str(http_status).encode())
    block = status + _CONTENT_TYPE + _literal(b"grpc-status", str(code).encode())
    if message:
        block += _literal(b"grpc-message", _percent_encode(message))
    return block + extra


# What a request header block asks for: the handler and the headers it gets, or (handler None) the
# trailers-only refusal: status code, message, HTTP status, extra header fields; then the header
# list's decoded size (RFC 7541 accounting), charged to the stream while it is open; last the
# :path (the method's name in the call metrics).
Refusal = tuple[grpc.StatusCode, str, int, bytes]
Request = tuple[UnaryMethod | None, Mapping[str, str], Refusal | None, int, str]
HEADER_LIST_TOO_LARGE_STATUS: Final = 431


def _skip_int(block: bytes, i: int) -> int:
    """_skip_int returns the offset after the continuation bytes of an HPACK integer starting at i."""
    while block[i] & 0x80:
        i += 1
    return i + 1


def _skip_string(block: bytes, i: int) -> int:
    """_skip_string returns the offset after the HPACK string literal starting at i."""
    length = block[i] & 0x7F
    i += 1
    if length == 0x7F:
        shift = 0
        while True:
            c = block[i]
            i += 1
            length += (c & 0x7F) << shift
            shift += 7
            if not c & 0x80:
                break
    return i + length


def table_neutral(block: bytes) -> bool:
    """table_neutral reports whether a header block leaves the HPACK dynamic table unchanged.

    Indexed fields, literals without indexing and never-indexed literals do not touch the table;
    literals with incremental indexing and table size updates do.
    """
    i = 0
    n = len(block)
    try:
        while i < n:
            b = block[i]
            i += 1
            if b & 0x80:
                if b == 0xFF:
                    i = _skip_int(block, i)
                continue
            if b & 0x60:
                return False
            index = b & 0x0F
            if index == 0x0F:
                i = _skip_int(block, i)
            elif not index:
                i = _skip_string(block, i)
            i = _skip_string(block, i)
    except IndexError:
        return False
    return i == n


def parse_request(
    fields: list[tuple[str, str]], methods: Mapping[str, UnaryMethod], max_header_list: int
) -> Request | None:
    """parse_request checks a request's header fields (None: malformed) and picks its handler."""
    method = path = content_type = scheme = ""
    headers: dict[str, str] = {}
    size = 0
    for name, value in fields:
        size += len(name) + len(value) + 32
        if name[:1] == ":":
            if headers:
                return None
            if name == ":path" and not path:
                path = value
            elif name == ":method" and not method:
                method = value
            elif name == ":scheme" and not scheme:
                scheme = value
            elif name != ":authority":
                return None
            continue
        if name in headers:
            headers[name] += "," + value
        else:
            headers[name] = value
        if name == "content-type":
            content_type = value
        elif name in _CONNECTION_HEADERS or name != name.lower() or (name == "te" and value != "trailers"):
            return None
    if not (method and path and scheme):
        return None
    refusal: Refusal | None = None
    handler = None
    if size > max_header_list:
        refusal = (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"header list larger than {max_header_list} bytes",
            HEADER_LIST_TOO_LARGE_STATUS,
            b"",
        )
    elif method != "POST":
        refusal = (grpc.StatusCode.UNIMPLEMENTED, "method must be POST", 405, b"")
    elif not content_type.startswith("application/grpc"):
        refusal = (grpc.StatusCode.INTERNAL, "unsupported content-type", 415, b"")
    elif headers.get("grpc-encoding", "identity") != "identity":
        refusal = (
            grpc.StatusCode.UNIMPLEMENTED,
            "only the identity grpc-encoding is supported",
            200,
            _ACCEPT_IDENTITY,
        )
    else:
        handler = methods.get(path)
        if handler is None:
            refusal = (grpc.StatusCode.UNIMPLEMENTED, f"unknown method {path}", 200, b"")
    # Read-only: the same mapping is handed to every call whose header block is cached.
    return handler, MappingProxyType(headers), refusal, size, path
