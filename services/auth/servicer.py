"""AuthServicer: the thin gRPC layer of the auth service (proto in, domain call, proto out).

Every rule lives in `KeyManager` (services/auth/management.py); this module only finds out who
is calling and translates messages.

Who is calling (`CallerResolver`), in order:

1. the identity the shared identity interceptor verified (`services.common.identity.
   current_identity()`): through Envoy that is the signed identity `Check` added;
2. otherwise `authorization: Bearer <session JWT or API key>` (or `x-api-key`) on the call
   itself, checked here in-process — the auth service needs no round trip to itself;
3. otherwise UNAUTHENTICATED.

ValidateApiKey needs no caller: the secret it is given is the credential. It accepts an API key
(checked exactly as Check does) or a session JWT (answered with the user id and no key id, or
neither for the service role), because services hand it whatever a direct caller presented.
It counts against the rate limit and quota, with Check's own admitter, and writes the call's
usage row, when the request sets `meter`: the shared identity interceptor sets it on every call
that presents an API key directly, so a key is admitted exactly once per call whichever way
it arrives (gateway: Check; directly: ValidateApiKey). A key presented directly to the auth
service itself is admitted the same way, in process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from kotadb.v1 import auth_pb2, auth_pb2_grpc

from services.auth import convert
from services.auth.config import AuthSettings
from services.auth.management import Clock, KeyManager, RequestMeter, utcnow
from services.auth.sessions import SessionVerifier, looks_like_jwt
from services.auth.store import AuthStore
from services.common.errors import Unauthenticated
from services.common.identity import Identity, bearer_credential, current_identity
from services.common.settings import env_settings

Authenticator = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[Identity]]


class CallerResolver:
    """CallerResolver finds the Identity of an AuthService call (see the module docstring)."""

    def __init__(self, manager: KeyManager, verifier: SessionVerifier) -> None:
        self._manager = manager
        self._verifier = verifier

    async def __call__(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        """__call__ returns the caller of the call `context` belongs to, or raises Unauthenticated."""
        identity = current_identity()
        if identity is not None:
            return identity
        metadata = {
            key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)
        }
        credential = bearer_credential(metadata)
        if credential is None:
            raise Unauthenticated(
                "this call needs credentials: a session JWT or API key (authorization: Bearer ...)",
                reason="MISSING_CREDENTIALS",
            )
        # Only a servicer run without the identity interceptor (tests) gets here; the server's
        # interceptor has already authenticated and admitted every call.
        return await self.identity_for(credential, endpoint=None)

    async def identity_for(self, credential: str, *, endpoint: str | None) -> Identity:
        """identity_for checks a session JWT or an API key and returns whom it proves.

        With an `endpoint` (the gRPC method called) an API key is also admitted against its
        limits, as the gateway would admit it: a key presented directly is no way around them.
        """
        if looks_like_jwt(credential):
            return self._verifier.verify(credential)
        if endpoint is None:
            return (await self._manager.validate(credential)).principal
        validated = await self._manager.validate(credential, meter=True, endpoint=endpoint)
        return validated.principal


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """AuthServicer answers `kotadb.v1.AuthService`; it translates and delegates, nothing more.

    `settings` default to the environment; `now` is the clock (tests inject one); `meter` is
    Check's limiter, used by ValidateApiKey when a request asks to be metered; `authenticate`
    replaces the default CallerResolver (tests call the servicer as a caller they choose).
    """

    def __init__(
        self,
        store: AuthStore,
        settings: AuthSettings | None = None,
        *,
        now: Clock = utcnow,
        meter: RequestMeter | None = None,
        verifier: SessionVerifier | None = None,
        authenticate: Authenticator | None = None,
    ) -> None:
        settings = settings if settings is not None else env_settings(AuthSettings)
        self._now = now
        self.manager = KeyManager(store, settings, now=now, meter=meter)
        self.verifier = verifier if verifier is not None else SessionVerifier(settings)
        self.resolver = CallerResolver(self.manager, self.verifier)
        self._authenticate: Authenticator = authenticate if authenticate is not None else self.resolver

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.CreateApiKeyResponse:
        """CreateApiKey issues a key; a retry with the same request_id returns it without the secret."""
        principal = await self._authenticate(context)
        spec = convert.key_spec_from_proto(request)
        user_id = convert.uuid_from_proto(request.user_id, "user_id") if request.user_id else None
        issued = await self.manager.create(
            principal, spec, user_id=user_id, request_id=request.request_id or None
        )
        return convert.issued_key_to_proto(issued, self._now())

    async def ListApiKeys(
        self, request: auth_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ListApiKeysResponse:
        """ListApiKeys pages through the caller's keys, newest first."""
        principal = await self._authenticate(context)
        records, token = await self.manager.list(
            principal,
            page_size=request.page_size,
            page_token=request.page_token,
            include_inactive=request.show_revoked,
        )
        now = self._now()
        return auth_pb2.ListApiKeysResponse(
            api_keys=[convert.api_key_to_proto(record, now) for record in records], next_page_token=token
        )

    async def GetApiKey(
        self, request: auth_pb2.GetApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ApiKey:
        """GetApiKey returns one key without its secret."""
        principal = await self._authenticate(context)
        record = await self.manager.get(principal, convert.uuid_from_proto(request.id, "id"))
        return convert.api_key_to_proto(record, self._now())

    async def UpdateApiKey(
        self, request: auth_pb2.UpdateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ApiKey:
        """UpdateApiKey changes the fields named by the update mask."""
        principal = await self._authenticate(context)
        key_id, update = convert.key_update_from_proto(request)
        record = await self.manager.update(principal, key_id, update)
        return convert.api_key_to_proto(record, self._now())

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ApiKey:
        """RevokeApiKey stops a key on every auth replica."""
        principal = await self._authenticate(context)
        record = await self.manager.revoke(principal, convert.uuid_from_proto(request.id, "id"))
        return convert.api_key_to_proto(record, self._now())

    async def RotateApiKey(
        self, request: auth_pb2.RotateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.RotateApiKeyResponse:
        """RotateApiKey issues a new secret; the old one works until its grace period ends."""
        principal = await self._authenticate(context)
        key_id = convert.uuid_from_proto(request.id, "id")
        grace = (
            convert.duration_from_proto(request.grace_period, "grace_period")
            if request.HasField("grace_period")
            else None
        )
        issued = await self.manager.rotate(
            principal, key_id, grace=grace, request_id=request.request_id or None
        )
        return convert.rotated_key_to_proto(issued, self._now())

    async def GetUsage(
        self, request: auth_pb2.GetUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.Usage:
        """GetUsage reports the rate window, the month and per-endpoint totals of one key."""
        principal = await self._authenticate(context)
        key_id = convert.uuid_from_proto(request.api_key_id, "api_key_id") if request.api_key_id else None
        report = await self.manager.usage(
            principal,
            key_id,
            start=convert.timestamp_from_proto(request.start_time, "start_time")
            if request.HasField("start_time")
            else None,
            end=convert.timestamp_from_proto(request.end_time, "end_time")
            if request.HasField("end_time")
            else None,
        )
        return convert.usage_to_proto(report)

    async def ValidateApiKey(
        self, request: auth_pb2.ValidateApiKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> auth_pb2.ValidateApiKeyResponse:
        """ValidateApiKey checks a presented API key (or session JWT) and returns its identity."""
        if not request.secret:
            raise Unauthenticated("no credential was presented", reason="MISSING_CREDENTIALS")
        required = convert.permission_from_proto(request.required_permission)
        if looks_like_jwt(request.secret):
            principal = self.verifier.verify(request.secret)
            if required:
                principal.require(required)
            return auth_pb2.ValidateApiKeyResponse(
                user_id=str(principal.user_id) if principal.user_id else "",
                permissions=convert.permissions_to_proto(principal.permissions),
            )
        validated = await self.manager.validate(
            request.secret, required_permission=required, meter=request.meter, endpoint=request.endpoint
        )
        return convert.validated_to_proto(validated)
