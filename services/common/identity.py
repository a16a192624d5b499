"""The signed caller identity every KotaDB service trusts, and the interceptor that checks it.

Envoy asks the auth service's `Check` about every external request; on success `Check` adds
three request headers, which reach the services as gRPC metadata:

* `x-kotadb-identity` — the caller, signed so no one but auth can mint it::

      base64url(JSON {"sub", "kid", "perm", "kind", "mth", "iat", "exp"}) "." base64url(HMAC-SHA256)

  keyed with `KOTADB_IDENTITY_KEY`, a secret the auth service and every service share. It is
  bound to the one request it was issued for: `mth` is the gRPC method Check admitted
  (`/kotadb.v1.SearchService/Search`), and a service accepts the token only on a call to that
  method. It lives `KOTADB_IDENTITY_TTL` seconds (default 5; `exp`), which covers the hop from
  Envoy to the service (the token is checked once, when the call starts, so long streams are
  not affected), so a replayed header is worth one method for a few seconds — and since a
  directly presented key is admitted against the same limits (below), replaying buys nothing
  a key would not. Verification is one HMAC-SHA256 and a JSON parse.
* `x-kotadb-tenant` — the user id in plain text, for Envoy's consistent-hash routing only.
  Services never trust it; the tenant comes from the verified identity.
* `x-kotadb-key-id` — the key id in plain text, for the gateway's access log (metering).

`IdentityInterceptor` runs in every service's identity slot (services/common/interceptors.py).
It accepts a valid signed identity, or else an API key or session JWT presented directly
(`authorization: Bearer ...` or `x-api-key`, e.g. grpcurl or another service), which it checks
through the auth service's `ValidateApiKey` RPC. A directly presented API key is admitted exactly
like a request through the gateway: every call asks `ValidateApiKey` with `meter` set, which
counts it against the key's per-minute limit and monthly quota with Check's own admitter and
writes its usage row, so answers for API keys are never cached; session JWTs (no limits) are
cached for `KOTADB_CREDENTIAL_CACHE_TTL`. Unsigned, forged, wrongly keyed, expired or
other-method identities are ignored; with nothing valid the call fails UNAUTHENTICATED.
Health, reflection and the two services Envoy itself calls on the auth process (ext_authz
`Check`, access-log stream) are exempt. Servicers read the caller with
`current_identity()`.

`Identity` is the one model of a caller everywhere (Check, the auth servicer, key management,
the services), with one rule for what it may do (`Identity.has`). `method_permission` is the
one table of which permission each kotadb.v1 method needs (search → read, ingest → write, key
management and index rebuilds → admin); auth's `Check` and this interceptor both enforce it.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import dataclasses
import hashlib
import hmac
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from kotadb.v1 import auth_pb2, auth_pb2_grpc

from services.common.errors import (
    KotaError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.common.interceptors import CallInterceptor, StreamInvoke, UnaryInvoke
from services.common.settings import setting

IDENTITY_HEADER = "x-kotadb-identity"
TENANT_HEADER = "x-kotadb-tenant"
KEY_ID_HEADER = "x-kotadb-key-id"
# Headers a client could use to pose as someone; Check removes client copies of all of them.
TRUSTED_HEADERS: tuple[str, ...] = (IDENTITY_HEADER, TENANT_HEADER, KEY_ID_HEADER)

Kind = Literal["user", "api_key", "service"]
KINDS: tuple[str, ...] = ("user", "api_key", "service")
READ, WRITE, ADMIN = "read", "write", "admin"
PERMISSIONS: tuple[str, ...] = (READ, WRITE, ADMIN)
# A user's own session may do anything their keys could: it is how they manage those keys.
SESSION_PERMISSIONS: frozenset[str] = frozenset(PERMISSIONS)
# SERVICE_ONLY marks methods no API key or user session may call from outside (internal RPCs).
SERVICE_ONLY = "service"

# Methods that need no credentials: probes, tooling, and what Envoy calls on the auth process.
EXEMPT_METHODS: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/kotadb.v1.HealthService/",
    "/envoy.service.auth.v3.Authorization/",
    "/envoy.service.accesslog.v3.AccessLogService/",
    # ValidateApiKey is itself the credential check a service makes for a direct caller.
    "/kotadb.v1.AuthService/ValidateApiKey",
)

# Exceptions to the per-service default permission (SERVICE_PERMISSIONS below).
_METHOD_PERMISSIONS: dict[str, str] = {
    "/kotadb.v1.SearchService/RebuildIndex": ADMIN,
    "/kotadb.v1.AuthService/GetUsage": READ,
    "/kotadb.v1.AuthService/ValidateApiKey": SERVICE_ONLY,
    # Reading documents and repositories is a read (auth.proto: READ allows search and reading documents).
    "/kotadb.v1.IngestService/GetDocument": READ,
    "/kotadb.v1.IngestService/ListDocuments": READ,
    "/kotadb.v1.IngestService/GetRepository": READ,
    "/kotadb.v1.IngestService/ListRepositories": READ,
    # GitHub signs webhooks with the repository's secret; the ingest service checks that HMAC.
    "/kotadb.v1.IngestService/ReceiveGithubWebhook": "",
}
SERVICE_PERMISSIONS: dict[str, str] = {
    "kotadb.v1.SearchService": READ,
    "kotadb.v1.IngestService": WRITE,
    "kotadb.v1.AuthService": ADMIN,
}

# Seconds of clock difference between auth and a service that a token's iat/exp tolerate.
DEFAULT_LEEWAY = 1.0
# Seconds a signed identity lives: the hop from Envoy to the service, with room for a slow one.
DEFAULT_TTL = 5.0
_MIN_KEY_BYTES = 32


def method_permission(method: str) -> str | None:
    """method_permission is the permission gRPC `method` (`/pkg.Service/Method`) needs.

    It returns `read`, `write`, `admin`, `service` (internal: service role only), `""` for a
    method that needs no credential, or None for a path outside the kotadb.v1 services.
    """
    if method in _METHOD_PERMISSIONS:
        return _METHOD_PERMISSIONS[method]
    service = method.strip("/").split("/", 1)[0]
    return SERVICE_PERMISSIONS.get(service)


@dataclasses.dataclass(frozen=True)
class Identity:
    """Identity is a verified caller: tenant (`user_id`), credential kind, key id and permissions.

    `user_id` is None only for the service role acting for no particular tenant; `key_id` is
    set when an API key authenticated the request; `issued_at`/`expires_at` are a signed
    token's `iat`/`exp` (0 for callers proved some other way). Every credential the system
    accepts (session JWT, API key, service-role token, signed identity) ends up as one.
    """

    user_id: uuid.UUID | None
    kind: Kind
    permissions: frozenset[str]
    key_id: uuid.UUID | None = None
    issued_at: int = 0
    expires_at: int = 0

    def __post_init__(self) -> None:
        unknown = self.permissions - SESSION_PERMISSIONS
        if unknown:
            raise ValueError(f"unknown permissions {sorted(unknown)}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.kind != "service" and self.user_id is None:
            raise ValueError(f"a {self.kind} identity needs a user id")
        if self.kind == "api_key" and self.key_id is None:
            raise ValueError("an api_key identity needs a key id")

    @classmethod
    def user(cls, user_id: uuid.UUID) -> Identity:
        """user is the identity of a signed-in user's Supabase session."""
        return cls(user_id=user_id, kind="user", permissions=SESSION_PERMISSIONS)

    @classmethod
    def api_key(cls, user_id: uuid.UUID, key_id: uuid.UUID, permissions: frozenset[str]) -> Identity:
        """api_key is the identity of a request authenticated by an API key."""
        return cls(user_id=user_id, kind="api_key", key_id=key_id, permissions=frozenset(permissions))

    @classmethod
    def service(cls, user_id: uuid.UUID | None = None) -> Identity:
        """service is the service role, optionally acting for `user_id`."""
        return cls(user_id=user_id, kind="service", permissions=SESSION_PERMISSIONS)

    @property
    def is_service(self) -> bool:
        """is_service is true for the service role, which may act for any tenant."""
        return self.kind == "service"

    def has(self, permission: str) -> bool:
        """has tells whether the caller may use a method that needs `permission`.

        The one rule: nothing needed (`""`) is always allowed; the service role may do
        everything; internal methods (`service`) are the service role's alone; a user's own
        session may administer (it manages that user's keys); otherwise the permission must
        be among the caller's.
        """
        if permission == "":
            return True
        if self.kind == "service":
            return True
        if permission == SERVICE_ONLY:
            return False
        if self.kind == "user" and permission == ADMIN:
            return True
        return permission in self.permissions

    def require(self, permission: str) -> None:
        """require raises PermissionDenied unless the caller may use a method needing `permission`."""
        if not self.has(permission):
            raise PermissionDenied(
                f"this call needs the {permission} permission",
                reason="MISSING_PERMISSION",
                metadata={"permission": permission},
            )

    def may_manage_keys(self) -> bool:
        """may_manage_keys is true for a session, an admin key or the service role."""
        return self.has(ADMIN)


class IdentityCodec:
    """IdentityCodec signs and verifies identity tokens with HMAC-SHA256 under one shared key.

    `ttl` is the lifetime of a signed token in seconds, `leeway` the clock skew tolerated when
    checking `iat` and `exp`, `clock` returns Unix seconds (injected in tests).
    """

    def __init__(
        self,
        key: str | bytes,
        *,
        ttl: float = DEFAULT_TTL,
        leeway: float = DEFAULT_LEEWAY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        raw = key.encode("utf-8") if isinstance(key, str) else key
        if len(raw) < _MIN_KEY_BYTES:
            raise ValueError(f"the identity key needs at least {_MIN_KEY_BYTES} bytes, got {len(raw)}")
        self._key = raw
        self.ttl = ttl
        self.leeway = leeway
        self.clock = clock

    def sign(
        self,
        *,
        user_id: uuid.UUID | None,
        kind: Kind,
        permissions: frozenset[str] | Sequence[str],
        key_id: uuid.UUID | None = None,
        method: str,
    ) -> str:
        """sign returns the token for one caller's call to gRPC `method`, valid for `ttl` seconds."""
        now = int(self.clock())
        payload = {
            "sub": str(user_id) if user_id is not None else "",
            "kid": str(key_id) if key_id is not None else "",
            "perm": sorted(set(permissions)),
            "kind": kind,
            "mth": method,
            "iat": now,
            "exp": now + int(self.ttl),
        }
        body = _b64encode(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8"))
        return f"{body}.{_b64encode(self._mac(body))}"

    def verify(self, token: str, *, method: str) -> Identity:
        """verify returns the identity a token carries for a call to `method`, or raises Unauthenticated.

        The signature is compared in constant time before anything in the payload is read; a
        token issued for another method is refused (IDENTITY_WRONG_METHOD), as is an expired one.
        """
        body, dot, signature = token.partition(".")
        if not dot or not body or not signature:
            raise Unauthenticated("the identity token is malformed", reason="IDENTITY_INVALID")
        try:
            presented = _b64decode(signature)
        except ValueError:
            raise Unauthenticated("the identity token is malformed", reason="IDENTITY_INVALID") from None
        if not hmac.compare_digest(presented, self._mac(body)):
            raise Unauthenticated("the identity token's signature is not valid", reason="IDENTITY_INVALID")
        try:
            claims = json.loads(_b64decode(body))
            identity = _identity_from_claims(claims)
            bound = claims["mth"]
        except (ValueError, TypeError, KeyError):
            raise Unauthenticated("the identity token is malformed", reason="IDENTITY_INVALID") from None
        if bound != method:
            raise Unauthenticated(
                "the identity token was issued for another method", reason="IDENTITY_WRONG_METHOD"
            )
        now = self.clock()
        if identity.expires_at + self.leeway <= now:
            raise Unauthenticated("the identity token has expired", reason="IDENTITY_EXPIRED")
        if identity.issued_at - self.leeway > now:
            raise Unauthenticated("the identity token is not valid yet", reason="IDENTITY_INVALID")
        return identity

    def _mac(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()


def _identity_from_claims(claims: Any) -> Identity:
    if not isinstance(claims, dict):
        raise ValueError("claims are not an object")
    kind = claims["kind"]
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    permissions = claims["perm"]
    if not isinstance(permissions, list) or not all(isinstance(p, str) for p in permissions):
        raise ValueError("perm is not a list of strings")
    issued, expires = claims["iat"], claims["exp"]
    if not isinstance(issued, int) or not isinstance(expires, int):
        raise ValueError("iat/exp are not integers")
    return Identity(
        user_id=uuid.UUID(claims["sub"]) if claims["sub"] else None,
        kind=kind,
        permissions=frozenset(permissions),
        key_id=uuid.UUID(claims["kid"]) if claims["kid"] else None,
        issued_at=issued,
        expires_at=expires,
    )


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


# Envoy sends this on its access-log stream to the auth service (deploy/envoy/envoy.yaml.tmpl).
ACCESS_LOG_TOKEN_HEADER = "x-kotadb-access-log-token"


def access_log_token(identity_key: str) -> str:
    """access_log_token is the credential Envoy's access-log stream presents to the auth service.

    It is derived from the identity key (HMAC-SHA256 of a fixed label), so the gateway config
    carries a secret that is good for nothing but metering, never the key itself. An empty key
    gives an empty token, which the auth service never accepts.
    """
    if not identity_key:
        return ""
    return hmac.new(identity_key.encode("utf-8"), b"kotadb access log v1", hashlib.sha256).hexdigest()


@dataclasses.dataclass(frozen=True)
class IdentitySettings:
    """IdentitySettings is what every service reads to verify callers (shared, unprefixed names)."""

    env_prefix: ClassVar[str] = "KOTADB_"

    identity_key: str = setting(
        "",
        env="KOTADB_IDENTITY_KEY",
        help="Shared secret (32+ bytes) signing the identity auth's Check gives each request; "
        "empty rejects every signed identity. `kotadb dev` generates one per data dir.",
    )
    identity_ttl: float = setting(
        DEFAULT_TTL,
        env="KOTADB_IDENTITY_TTL",
        minimum=1.0,
        help="Seconds a signed identity stays valid (it is checked once, when the call starts).",
    )
    auth_address: str = setting(
        "",
        env="KOTADB_AUTH_ADDRESS",
        help="host:port of the auth service, which checks API keys presented directly to a service "
        "(grpcurl, service to service); empty accepts only signed identities.",
    )
    credential_cache_ttl: float = setting(
        1.0,
        env="KOTADB_CREDENTIAL_CACHE_TTL",
        minimum=0.0,
        help="Seconds a service caches auth's answer for a directly presented session JWT; API keys are "
        "checked and admitted on every call.",
    )

    def codec(self) -> IdentityCodec | None:
        """codec is the verifier for these settings, or None when no key is configured."""
        if not self.identity_key:
            return None
        return IdentityCodec(self.identity_key, ttl=self.identity_ttl)


class CredentialValidator(Protocol):
    """CredentialValidator turns a presented API key or session JWT into an Identity, or raises."""

    async def validate(self, credential: str, permission: str, method: str) -> Identity:
        """validate checks `credential` for a call to `method` needing `permission`."""
        ...


_PERMISSION_ENUM: dict[str, auth_pb2.ApiKey.Permission.ValueType] = {
    READ: auth_pb2.ApiKey.READ,
    WRITE: auth_pb2.ApiKey.WRITE,
    ADMIN: auth_pb2.ApiKey.ADMIN,
}
_PERMISSION_NAMES: dict[auth_pb2.ApiKey.Permission.ValueType, str] = {
    value: name for name, value in _PERMISSION_ENUM.items()
}


class AuthServiceValidator:
    """AuthServiceValidator asks the auth service's `ValidateApiKey` about directly presented credentials.

    Every call with an API key is a metered `ValidateApiKey` (admitted against the key's rate
    limit and quota, with a usage row, exactly as through the gateway), so those answers are
    never cached. Session JWTs carry no limits: their answers are cached per (credential hash,
    permission) for `cache_ttl` seconds, at most `max_entries` of them; failures are not cached.
    """

    def __init__(
        self,
        address: str,
        *,
        cache_ttl: float = 1.0,
        timeout: float = 5.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.cache_ttl = cache_ttl
        self.timeout = timeout
        self.max_entries = max_entries
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._cache: OrderedDict[tuple[str, str], tuple[float, Identity]] = OrderedDict()

    def _stub(self) -> auth_pb2_grpc.AuthServiceAsyncStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        return auth_pb2_grpc.AuthServiceStub(self._channel)

    async def validate(self, credential: str, permission: str, method: str) -> Identity:
        """validate returns the identity `credential` carries, checked (and admitted) by the auth service."""
        cache_key = (hashlib.sha256(credential.encode("utf-8")).hexdigest(), permission)
        now = self._clock()
        cached = self._cache.get(cache_key)
        if cached is not None and cached[0] > now:
            return cached[1]
        request = auth_pb2.ValidateApiKeyRequest(
            secret=credential,
            required_permission=_PERMISSION_ENUM.get(permission, auth_pb2.ApiKey.PERMISSION_UNSPECIFIED),
            endpoint=method,
            meter=True,
        )
        try:
            response = await self._stub().ValidateApiKey(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error_from_auth(exc) from None
        identity = _identity_from_validation(response)
        if self.cache_ttl > 0 and identity.key_id is None:
            self._cache[cache_key] = (now + self.cache_ttl, identity)
            self._cache.move_to_end(cache_key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return identity

    async def close(self) -> None:
        """close shuts the channel to the auth service."""
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None


def _identity_from_validation(response: auth_pb2.ValidateApiKeyResponse) -> Identity:
    permissions = frozenset(_PERMISSION_NAMES[p] for p in response.permissions if p in _PERMISSION_NAMES)
    user_id = uuid.UUID(response.user_id) if response.user_id else None
    kind: Kind
    if response.api_key_id:
        kind = "api_key"
    elif user_id is not None:
        kind = "user"
    else:
        kind = "service"
    return Identity(
        user_id=user_id,
        kind=kind,
        permissions=permissions,
        key_id=uuid.UUID(response.api_key_id) if response.api_key_id else None,
    )


def _error_from_auth(exc: grpc.aio.AioRpcError) -> KotaError:
    """_error_from_auth turns auth's refusal into the same error for our caller (same reason)."""
    message = exc.details() or "the credential was refused"
    code = exc.code()
    info = _error_info(exc)
    reason = info.reason if info is not None and info.reason else None
    metadata = {k: v for k, v in (info.metadata if info is not None else {}).items() if k != "request_id"}
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(message, reason=reason or "INVALID_CREDENTIALS", metadata=metadata)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(message, reason=reason or "MISSING_PERMISSION", metadata=metadata)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(
            message, reason=reason or "RATE_LIMITED", retry_after=_retry_delay(exc), metadata=metadata
        )
    if code == grpc.StatusCode.UNAVAILABLE and reason is not None:
        # The auth service answered, unable to decide (its database, typically): same reason.
        return Unavailable(message, reason=reason, retry_after=_retry_delay(exc) or 1.0, metadata=metadata)
    return Unavailable(
        "the auth service could not check the credential; retry shortly",
        reason="AUTH_UNAVAILABLE",
        retry_after=1.0,
    )


def _status_details(exc: grpc.aio.AioRpcError) -> list[Any]:
    """_status_details are the google.rpc.Status details auth's refusal carried (may be none)."""
    trailers: Any = exc.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            try:
                return list(status_pb2.Status.FromString(value).details)
            except DecodeError:
                return []
    return []


def _error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    for detail in _status_details(exc):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def _retry_delay(exc: grpc.aio.AioRpcError) -> float | None:
    for detail in _status_details(exc):
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            return float(retry.retry_delay.seconds) + float(retry.retry_delay.nanos) / 1e9
    return None


_identity_var: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "kotadb_identity", default=None
)


def current_identity() -> Identity | None:
    """current_identity is the verified caller of the RPC being served, or None (exempt methods)."""
    return _identity_var.get()


def require_identity() -> Identity:
    """require_identity is current_identity for code that must not run without a caller."""
    identity = _identity_var.get()
    if identity is None:
        raise Unauthenticated("this call needs credentials", reason="MISSING_CREDENTIALS")
    return identity


def bearer_credential(metadata: Mapping[str, str]) -> str | None:
    """bearer_credential is the API key or JWT in `authorization: Bearer ...` or `x-api-key`."""
    authorization = metadata.get("authorization", "").strip()
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = metadata.get("x-api-key", "").strip()
    return api_key or None


class IdentityInterceptor(CallInterceptor):
    """IdentityInterceptor authenticates every non-exempt call and exposes `current_identity()`.

    `codec` verifies signed identities (None: none are accepted); `validator` checks directly
    presented credentials (None: none are accepted). The permission a method needs comes from
    `method_permission`; methods outside kotadb.v1 that are not exempt need a valid caller.
    """

    def __init__(
        self,
        codec: IdentityCodec | None,
        validator: CredentialValidator | None = None,
        *,
        exempt: Sequence[str] = EXEMPT_METHODS,
    ) -> None:
        self._codec = codec
        self._validator = validator
        self._exempt = tuple(exempt)

    async def around_unary(
        self, invoke: UnaryInvoke, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> Any:
        """around_unary authenticates the caller, then runs the call with its identity set."""
        if self._exempted(method):
            return await invoke()
        identity = await self.authenticate(context, method)
        token = _identity_var.set(identity)
        try:
            return await invoke()
        finally:
            _identity_var.reset(token)

    async def around_stream(
        self, invoke: StreamInvoke, context: grpc.aio.ServicerContext[Any, Any], method: str
    ) -> AsyncIterator[Any]:
        """around_stream authenticates the caller, then streams with its identity set."""
        if self._exempted(method):
            async for response in invoke():
                yield response
            return
        identity = await self.authenticate(context, method)
        _identity_var.set(identity)
        async for response in invoke():
            yield response

    def _exempted(self, method: str) -> bool:
        # Methods needing no credential (the GitHub webhook, which ingest verifies by HMAC) get
        # no identity either: whatever identity headers came with them are not looked at.
        return method.startswith(self._exempt) or method_permission(method) == ""

    async def authenticate(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> Identity:
        """authenticate returns the caller of one call, or raises Unauthenticated/PermissionDenied."""
        metadata = _metadata(context)
        permission = method_permission(method)
        required = ADMIN if permission is None else permission
        rejected: Unauthenticated | None = None
        signed = metadata.get(IDENTITY_HEADER)
        if signed and self._codec is not None:
            try:
                identity = self._codec.verify(signed, method=method)
            except Unauthenticated as exc:
                # A forged or stale identity is ignored; a presented key may still authenticate.
                rejected = exc
            else:
                identity.require(required)
                return identity
        credential = bearer_credential(metadata)
        if credential is not None:
            if self._validator is None:
                raise Unauthenticated(
                    "this service cannot check API keys directly; call it through the gateway",
                    reason="DIRECT_CREDENTIALS_UNSUPPORTED",
                )
            identity = await self._validator.validate(credential, required, method)
            identity.require(required)
            return identity
        if rejected is not None:
            raise rejected
        raise Unauthenticated(
            "this call needs credentials: an API key (authorization: Bearer ...) or a signed identity",
            reason="MISSING_CREDENTIALS",
        )


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str) and key not in found:
            found[key] = value
    return found


def identity_interceptors(
    settings: IdentitySettings,
) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """identity_interceptors is what a service passes as `ServiceServer(..., identity=...)`."""
    validator = (
        AuthServiceValidator(settings.auth_address, cache_ttl=settings.credential_cache_ttl)
        if settings.auth_address
        else None
    )
    return [IdentityInterceptor(settings.codec(), validator)]
