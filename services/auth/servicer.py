"""AuthServicer: the thin gRPC layer of the auth service (proto in, domain call, proto out).

No auth RPC is built yet. Each one raises `Unimplemented` naming its capability and the
auth and quota service issue that delivers it, so callers get UNIMPLEMENTED with an `ErrorInfo`, never a
made-up result.
"""

from __future__ import annotations

from typing import Any

import grpc
from kotadb.v1 import auth_pb2, auth_pb2_grpc

from services.auth.store import AuthStore
from services.common.errors import Unimplemented

DELIVERED_BY = "delivered by the auth and quota service issue"


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """AuthServicer answers `kotadb.v1.AuthService`; it translates and delegates, nothing more."""

    def __init__(self, store: AuthStore) -> None:
        self._store = store

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.CreateApiKeyResponse:
        """CreateApiKey issues a new API key and returns its secret once. Not built yet."""
        raise Unimplemented(f"API key creation (CreateApiKey), {DELIVERED_BY}")

    async def ListApiKeys(
        self, request: auth_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ListApiKeysResponse:
        """ListApiKeys pages through the caller's API keys. Not built yet."""
        raise Unimplemented(f"API key listing (ListApiKeys), {DELIVERED_BY}")

    async def GetApiKey(
        self, request: auth_pb2.GetApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ApiKey:
        """GetApiKey returns one API key without its secret. Not built yet."""
        raise Unimplemented(f"API key lookup (GetApiKey), {DELIVERED_BY}")

    async def UpdateApiKey(
        self, request: auth_pb2.UpdateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ApiKey:
        """UpdateApiKey changes an API key's fields named by the update mask. Not built yet."""
        raise Unimplemented(f"API key updates (UpdateApiKey), {DELIVERED_BY}")

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ApiKey:
        """RevokeApiKey disables an API key on every auth replica. Not built yet."""
        raise Unimplemented(f"API key revocation (RevokeApiKey), {DELIVERED_BY}")

    async def RotateApiKey(
        self, request: auth_pb2.RotateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.RotateApiKeyResponse:
        """RotateApiKey issues a new secret for an API key. Not built yet."""
        raise Unimplemented(f"API key rotation (RotateApiKey), {DELIVERED_BY}")

    async def GetUsage(
        self, request: auth_pb2.GetUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.Usage:
        """GetUsage reports rate-limit windows and month usage against quota. Not built yet."""
        raise Unimplemented(f"usage and quota reporting (GetUsage), {DELIVERED_BY}")

    async def ValidateApiKey(
        self, request: auth_pb2.ValidateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ValidateApiKeyResponse:
        """ValidateApiKey checks a key and returns the identity it carries. Not built yet."""
        raise Unimplemented(f"API key validation (ValidateApiKey), {DELIVERED_BY}")
