"""Delegation: calling services on behalf of a caller the gateway already verified.

The gateway's `Check` signs each request's identity for exactly one method and a few seconds
(services/common/identity.py), so a token cannot be replayed on another method. A component
behind the gateway that serves one request by making several RPCs — the MCP server's Streamable
HTTP endpoint turns one `/mcp` request into searches, reads and writes — verifies the identity
Check signed for its own request once, then has each downstream call signed afresh for that
call's method. Signing needs the identity key, which every service already holds to verify
identities (HMAC is symmetric), so delegation grants no process a power it did not have.

A call names its caller with `on_behalf(identity)` in its metadata; channels built with
`delegating_interceptors(codec)` replace that marker, at call time, by a token signed for the
method being called. The marker never leaves the process.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import grpc

from services.common.identity import IDENTITY_HEADER, Identity, IdentityCodec

ON_BEHALF = "x-kotadb-on-behalf"

# grpc's interceptor bases are generic only in its type stubs.
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


def on_behalf(identity: Identity) -> tuple[tuple[str, str], ...]:
    """on_behalf is call metadata naming `identity` as the caller, for a delegating channel to sign."""
    who = {
        "sub": str(identity.user_id) if identity.user_id is not None else "",
        "kid": str(identity.key_id) if identity.key_id is not None else "",
        "kind": identity.kind,
        "perm": sorted(identity.permissions),
    }
    return ((ON_BEHALF, json.dumps(who)),)


class _Signer:
    def __init__(self, codec: IdentityCodec) -> None:
        self._codec = codec

    def details(self, call_details: Any) -> Any:
        metadata = list(call_details.metadata or ())
        named = [value for key, value in metadata if key == ON_BEHALF]
        if not named:
            return call_details
        who = json.loads(named[-1])
        method = call_details.method
        token = self._codec.sign(
            user_id=uuid.UUID(who["sub"]) if who["sub"] else None,
            kind=who["kind"],
            permissions=who["perm"],
            key_id=uuid.UUID(who["kid"]) if who["kid"] else None,
            method=method.decode() if isinstance(method, bytes) else method,
        )
        kept = [(key, value) for key, value in metadata if key not in (ON_BEHALF, IDENTITY_HEADER)]
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


def delegating_interceptors(codec: IdentityCodec) -> list[Any]:
    """delegating_interceptors sign each `on_behalf` call for its own method (all four call shapes)."""
    return [kind(codec) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
