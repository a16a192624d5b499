"""Test callers: gRPC channels that present a gateway-signed identity, signed per call.

The gateway's Check signs an identity for one method and a few seconds (services/common/
identity.py), so a test cannot sign once and reuse the token. Tests instead put a marker in a
call's metadata (`caller(user_id, permissions)`), and `signing_channel` replaces it, at call time,
with a token signed for exactly the method being called, as Check would.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from services.common.identity import IDENTITY_HEADER, IdentityCodec

CALLER_MARKER = "x-kotadb-test-caller"

# grpc's interceptor bases are generic only in its stubs.
if TYPE_CHECKING:
    _UnaryUnaryBase = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStreamBase = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnaryBase = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStreamBase = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnaryBase = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStreamBase = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnaryBase = grpc.aio.StreamUnaryClientInterceptor
    _StreamStreamBase = grpc.aio.StreamStreamClientInterceptor


def caller(
    user_id: uuid.UUID | None,
    permissions: Sequence[str] = ("read", "write"),
    kind: str = "user",
    key_id: uuid.UUID | None = None,
) -> tuple[tuple[str, str], ...]:
    """caller is metadata naming who makes a call; a signing channel turns it into an identity.

    The default caller is a user's session limited to `permissions`: an `api_key` caller must name
    a real key (`key_id`), since what it does is recorded against that key.
    """
    who = {
        "user": str(user_id) if user_id is not None else "",
        "perm": list(permissions),
        "kind": kind,
        "key": str(key_id) if key_id is not None else "",
    }
    return ((CALLER_MARKER, json.dumps(who)),)


class _Signer:
    def __init__(self, codec: IdentityCodec) -> None:
        self._codec = codec

    def details(self, call_details: Any) -> Any:
        metadata = list(call_details.metadata or ())
        marked = [value for key, value in metadata if key == CALLER_MARKER]
        if not marked:
            return call_details
        who = json.loads(marked[-1])
        method = (
            call_details.method.decode() if isinstance(call_details.method, bytes) else call_details.method
        )
        token = self._codec.sign(
            user_id=uuid.UUID(who["user"]) if who["user"] else None,
            kind=who["kind"],
            permissions=who["perm"],
            key_id=uuid.UUID(who["key"]) if who["key"] else None,
            method=method,
        )
        kept = [(key, value) for key, value in metadata if key != CALLER_MARKER]
        return grpc.aio.ClientCallDetails(
            call_details.method,
            call_details.timeout,
            grpc.aio.Metadata(*kept, (IDENTITY_HEADER, token)),
            call_details.credentials,
            call_details.wait_for_ready,
        )


class _UnaryUnary(_Signer, _UnaryUnaryBase):
    async def intercept_unary_unary(self, continuation: Any, call_details: Any, request: Any) -> Any:
        return await continuation(self.details(call_details), request)


class _UnaryStream(_Signer, _UnaryStreamBase):
    async def intercept_unary_stream(self, continuation: Any, call_details: Any, request: Any) -> Any:
        return await continuation(self.details(call_details), request)


class _StreamUnary(_Signer, _StreamUnaryBase):
    async def intercept_stream_unary(self, continuation: Any, call_details: Any, requests: Any) -> Any:
        return await continuation(self.details(call_details), requests)


class _StreamStream(_Signer, _StreamStreamBase):
    async def intercept_stream_stream(self, continuation: Any, call_details: Any, requests: Any) -> Any:
        return await continuation(self.details(call_details), requests)


def signing_channel(
    address: str, codec: IdentityCodec, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """signing_channel is an asyncio channel that signs each marked call's identity for its method."""
    interceptors: list[Any] = [cls(codec) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
