"""Check: Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`).

Envoy calls `Check` once per external request before anything reaches a service (the
ext_authz filter in deploy/envoy/envoy.yaml.tmpl, `failure_mode_allow: false`). For each:

1. Resolve the route (services/auth/routes.py): REST path or gRPC path → method → permission.
   An unknown route is answered 404 here, the same answer the gateway would give.
2. Read the credential: `authorization: Bearer <token>` or `x-api-key`. A JWT is a Supabase
   session (services/auth/sessions.py), accepted for key management and index rebuilds only
   (or the service role, anywhere). Anything else must be an API key: shape and checksum are
   checked without the database (services/auth/keys.py), then the key is looked up by hash
   through the cache (services/auth/keycache.py).
3. Refuse revoked keys, expired keys and rotated keys past their grace period (401, in the
   one order of services/auth/store.py `key_state`), and keys without the route's permission
   (403).
4. Admit the request against the key's per-minute rate limit and monthly quota, exactly
   (services/auth/ratelimit.py); refuse with 429 and `Retry-After` when either is spent.
5. Allow: add the signed identity (services/common/identity.py), bound to the route's gRPC
   method and valid a few seconds, the tenant header for consistent-hash routing and the key
   id header for the access log; remove the raw credential headers; add
   `RateLimit-Limit`/`-Remaining`/`-Reset` to the response.

Denials carry the one JSON error body (`code`, `message`, `reason`, `details`; built by
services.common.errors.error_json from the same google.rpc.Status a service would send),
`WWW-Authenticate: Bearer` on 401, `Retry-After` on 429 and 503, and `grpc-status`/
`grpc-message` so native gRPC clients see UNAUTHENTICATED, PERMISSION_DENIED or
RESOURCE_EXHAUSTED rather than Envoy's HTTP-derived guess (429 would become UNAVAILABLE).
When the database cannot be reached, or does not answer within `check_deadline` (a hung
server), every check that needs it fails closed with 503 and reason `DATABASE_UNAVAILABLE`
and `Retry-After`, well inside Envoy's 2 s ext_authz timeout; checks a cached key and a live
leased block can answer keep being answered. It recovers by itself when the database returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import urllib.parse
from collections.abc import Awaitable, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from services.auth import keys, quota
from services.auth.keycache import KeyCache
from services.auth.ratelimit import Admission, Admitter
from services.auth.routes import Route, RouteTable
from services.auth.sessions import SessionVerifier, looks_like_jwt
from services.auth.store import ApiKeyRecord, bounded, check_usable
from services.common.errors import (
    KotaError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    error_json,
    http_status,
)
from services.common.h2unary import RpcError
from services.common.identity import (
    IDENTITY_HEADER,
    KEY_ID_HEADER,
    SERVICE_ONLY,
    TENANT_HEADER,
    TRUSTED_HEADERS,
    Identity,
    IdentityCodec,
    bearer_credential,
)

log = logging.getLogger("kotadb.auth.check")

# Credential headers never forwarded upstream: services get the signed identity instead.
CREDENTIAL_HEADERS: tuple[str, ...] = ("authorization", "x-api-key")

ROUTE_NOT_FOUND = "ROUTE_NOT_FOUND"
# Seconds Check may spend on one request's database work: under the gateway's 2 s ext_authz
# timeout (deploy/envoy/envoy.yaml.tmpl), so the client gets Check's JSON 503, not Envoy's.
DEFAULT_DEADLINE = 1.5
# Most identities (and well-formed key hashes) Check remembers between clears.
_TOKEN_CACHE_SIZE = 100_000


class _CheckFailed(KotaError):
    """_CheckFailed is an unexpected failure inside Check, answered 500 (never an allow)."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "AUTHORIZATION_FAILED"


class Later:
    """Later is Authorizer.authorize_now's answer when the decision needs the database."""


LATER = Later()


@dataclasses.dataclass(frozen=True)
class Grant:
    """Grant is an allowed request: the identity to forward and the rate headers to return."""

    identity: Identity
    token: str
    admission: Admission | None = None


class Authorizer:
    """Authorizer decides one request; it raises KotaError subclasses for every refusal.

    `codec` signs identities (None: Check refuses everything with 503, since upstream services
    could not verify what it forwards); `sessions` verifies session JWTs; `clock` drives rate
    windows, quota months and key expiry. The key cache and the admitter bound each database
    statement Check waits for (their `db_timeout`) and AuthorizationServicer bounds the whole
    wait, so a hung database is refused with 503 DATABASE_UNAVAILABLE inside Envoy's 2 s
    ext_authz timeout.
    """

    def __init__(
        self,
        *,
        routes: RouteTable,
        cache: KeyCache,
        admitter: Admitter,
        sessions: SessionVerifier,
        codec: IdentityCodec | None,
        clock: quota.Clock,
    ) -> None:
        self.routes = routes
        self.cache = cache
        self.admitter = admitter
        self.sessions = sessions
        self.codec = codec
        self.clock = clock
        # Signed tokens carry whole-second times, so one identity's token for one method is the
        # same all second long: sign it once per second (bounded; cleared when it grows).
        self._tokens: dict[tuple[Identity, str], tuple[int, str]] = {}
        # SHA-256 of credentials whose shape and checksum already passed (hashes only, never
        # the secrets themselves).
        self._well_formed: set[str] = set()

    def authorize_now(self, http_method: str, path: str, headers: Mapping[str, str]) -> Grant | Later | None:
        """authorize_now decides from memory alone, or returns LATER when only `authorize` can.

        Memory suffices for a cached key whose block of leased tokens has one left (or whose
        window is known to be spent), and for every refusal that needs no lookup. Session JWTs,
        cache misses and empty blocks go the asynchronous way.
        """
        route = self.routes.resolve(http_method, path)
        if route is None:
            raise NotFound(f"no route for {http_method} {_plain_path(path)}", reason=ROUTE_NOT_FOUND)
        if route.permission == "":
            return None
        credential = bearer_credential(headers)
        if self.codec is None or credential is None or looks_like_jwt(credential):
            return LATER
        hit, record = self.cache.peek(self._key_hash(credential))
        if not hit:
            return LATER
        if record is None:
            raise Unauthenticated("the API key is not known", reason="UNKNOWN_API_KEY")
        identity = self._key_identity(route, record)
        admission = self.admitter.try_admit(record.id)
        if admission is None:
            return LATER
        if not admission.admitted:
            raise limit_error(admission, record)
        return Grant(identity=identity, token=self._sign(identity, route), admission=admission)

    async def authorize(self, http_method: str, path: str, headers: Mapping[str, str]) -> Grant | None:
        """authorize returns the Grant for an allowed request, or None for a credential-free route."""
        route = self.routes.resolve(http_method, path)
        if route is None:
            raise NotFound(f"no route for {http_method} {_plain_path(path)}", reason=ROUTE_NOT_FOUND)
        if route.permission == "":
            return None
        if self.codec is None:
            raise Unavailable(
                "the auth service has no identity key (KOTADB_IDENTITY_KEY) and cannot admit requests",
                reason="IDENTITY_KEY_MISSING",
                retry_after=30.0,
            )
        credential = bearer_credential(headers)
        if credential is None:
            raise Unauthenticated(
                "this request needs an API key: send `Authorization: Bearer <key>`",
                reason="MISSING_CREDENTIALS",
            )
        if looks_like_jwt(credential):
            return await self._authorize_session(route, credential)
        return await self._authorize_key(route, credential)

    async def _authorize_session(self, route: Route, token: str) -> Grant:
        if not self.sessions.configured:
            raise Unauthenticated(
                "session tokens are not accepted by this deployment", reason="SESSIONS_DISABLED"
            )
        identity: Identity = await asyncio.to_thread(self.sessions.verify, token)
        if identity.kind == "user" and not route.sessions_allowed:
            raise PermissionDenied(
                "a session token manages keys; use an API key for this call",
                reason="SESSION_NOT_ACCEPTED",
                metadata={"method": route.grpc_method},
            )
        identity.require(route.permission)
        return Grant(identity=identity, token=self._sign(identity, route))

    async def _authorize_key(self, route: Route, credential: str) -> Grant:
        parsed = keys.parse_key(credential)  # MalformedKey / BadChecksum: 401 without a lookup
        record = await self.cache.lookup(parsed.key_hash)
        if record is None:
            raise Unauthenticated("the API key is not known", reason="UNKNOWN_API_KEY")
        identity = self._key_identity(route, record)
        # The admitter bounds each of its statements (a hung database fails the batch in its
        # db_timeout) and decide_later the whole wait; a live database may keep checks
        # waiting for other replicas' tokens (reclaim_wait) up to that deadline.
        admission = await self.admitter.admit(record.id)
        if not admission.found:
            self.cache.evict(record.id)
            raise Unauthenticated("the API key is not known", reason="UNKNOWN_API_KEY")
        if admission.revoked:
            self.cache.evict(record.id)
            raise Unauthenticated("the API key has been revoked", reason="API_KEY_REVOKED")
        if not admission.admitted:
            raise limit_error(admission, record)
        return Grant(identity=identity, token=self._sign(identity, route), admission=admission)

    def _key_identity(self, route: Route, record: ApiKeyRecord) -> Identity:
        """_key_identity refuses an unusable key (`check_usable`) or one without the route's permission."""
        check_usable(record, self.clock.now())
        identity = Identity.api_key(record.user_id, record.id, record.permissions)
        if route.permission == SERVICE_ONLY or not identity.has(route.permission):
            raise PermissionDenied(
                f"this API key lacks the {route.permission} permission this call needs",
                reason="MISSING_PERMISSION",
                metadata={"permission": route.permission, "method": route.grpc_method},
            )
        return identity

    def _sign(self, identity: Identity, route: Route) -> str:
        """_sign is the signed identity for a call to the route's gRPC method (cached per second)."""
        assert self.codec is not None  # authorize refuses earlier without one
        second = int(self.codec.clock())
        cache_key = (identity, route.grpc_method)
        cached = self._tokens.get(cache_key)
        if cached is not None and cached[0] == second:
            return cached[1]
        token = self.codec.sign(
            user_id=identity.user_id,
            kind=identity.kind,
            permissions=identity.permissions,
            key_id=identity.key_id,
            method=route.grpc_method,
        )
        if len(self._tokens) >= _TOKEN_CACHE_SIZE:
            self._tokens.clear()
        self._tokens[cache_key] = (second, token)
        return token

    def _key_hash(self, credential: str) -> str:
        """_key_hash is the stored hash of a presented key, after checking its shape and checksum."""
        key_hash = keys.hash_key(credential)
        if key_hash not in self._well_formed:
            keys.parse_key(credential)  # MalformedKey / BadChecksum: 401 without a lookup
            if len(self._well_formed) >= _TOKEN_CACHE_SIZE:
                self._well_formed.clear()
            self._well_formed.add(key_hash)
        return key_hash


def limit_error(admission: Admission, record: ApiKeyRecord) -> ResourceExhausted:
    """limit_error is the 429 for a refused admission: quota when the month is spent, else rate."""
    if admission.quota_exhausted:
        return ResourceExhausted(
            f"the API key's monthly quota of {admission.monthly_quota} requests is used up",
            reason="QUOTA_EXHAUSTED",
            retry_after=float(admission.retry_after),
            metadata={"key_id": str(record.id), "monthly_quota": str(admission.monthly_quota)},
        )
    return ResourceExhausted(
        f"the API key's rate limit of {admission.rate_limit} requests per minute is reached",
        reason="RATE_LIMITED",
        retry_after=float(admission.retry_after),
        metadata={"key_id": str(record.id), "rate_limit": str(admission.rate_limit)},
    )


def _plain_path(path: str) -> str:
    return urllib.parse.unquote(path.split("?", 1)[0])[:200]


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """AuthorizationServicer answers Envoy's `Check` from an Authorizer's decision.

    It serves two transports: the grpc.aio server (`Check`) and the lean HTTP/2 listener Envoy's
    ext_authz uses (`check_bytes`, services/common/h2unary.py). Both try the in-memory decision
    first and await the database only when it cannot decide, for at most `deadline` seconds
    (then 503 DATABASE_UNAVAILABLE: Envoy's own timeout would answer an empty 503 instead).
    """

    def __init__(self, authorizer: Authorizer, *, deadline: float = DEFAULT_DEADLINE) -> None:
        self.authorizer = authorizer
        self.deadline = deadline
        self._prefixes: dict[str, bytes] = {}

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        """Check allows or denies one HTTP request Envoy is about to route."""
        response = self.decide_now(request)
        if response is None:
            response = await self.decide_later(request)
        return response

    def check_bytes(self, message: bytes, metadata: Mapping[str, str]) -> bytes | Awaitable[bytes]:
        """check_bytes is Check on serialized messages: bytes now, or an awaitable of them."""
        try:
            request = external_auth_pb2.CheckRequest.FromString(message)
        except DecodeError as exc:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "the CheckRequest could not be parsed") from exc
        decision = self._decide_from_memory(request)
        if isinstance(decision, Later):
            return self._later_bytes(request)
        if isinstance(decision, Grant):
            return self._allowed_bytes(decision)
        response = decision if decision is not None else allowed(None)
        return bytes(response.SerializeToString())

    def _allowed_bytes(self, grant: Grant) -> bytes:
        """_allowed_bytes is `allowed(grant)` serialized, built from a per-token cached prefix.

        Everything but the RateLimit headers depends only on the signed token, so that part is
        serialized once per token; the rate headers are appended as a second serialized
        CheckResponse, which protobuf parsers merge into the first (repeated fields append).
        """
        prefix = self._prefixes.get(grant.token)
        if prefix is None:
            if len(self._prefixes) >= _TOKEN_CACHE_SIZE:
                self._prefixes.clear()
            bare = Grant(identity=grant.identity, token=grant.token, admission=None)
            prefix = self._prefixes[grant.token] = bytes(allowed(bare).SerializeToString())
        if grant.admission is None:
            return prefix
        rates = external_auth_pb2.OkHttpResponse(
            response_headers_to_add=[header_option(k, v) for k, v in rate_headers(grant.admission)]
        )
        return prefix + bytes(external_auth_pb2.CheckResponse(ok_response=rates).SerializeToString())

    async def _later_bytes(self, request: external_auth_pb2.CheckRequest) -> bytes:
        response = await self.decide_later(request)
        return bytes(response.SerializeToString())

    def decide_now(self, request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse | None:
        """decide_now answers from memory, or returns None when the database must be asked."""
        decision = self._decide_from_memory(request)
        if isinstance(decision, Later):
            return None
        if isinstance(decision, external_auth_pb2.CheckResponse):
            return decision
        return allowed(decision)

    def _decide_from_memory(
        self, request: external_auth_pb2.CheckRequest
    ) -> Grant | Later | external_auth_pb2.CheckResponse | None:
        """_decide_from_memory is a Grant, None (no credential needed), LATER, or a refusal."""
        http = request.attributes.request.http
        headers = _headers(http)
        try:
            return self.authorizer.authorize_now(http.method, http.path, headers)
        except Exception as exc:
            return _refusal(exc, headers)

    async def decide_later(self, request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
        """decide_later answers with every lookup and admission the decision needs."""
        http = request.attributes.request.http
        headers = _headers(http)
        try:
            grant = await bounded(self.authorizer.authorize(http.method, http.path, headers), self.deadline)
        except Exception as exc:
            return _refusal(exc, headers)
        return allowed(grant)


def _headers(http: Any) -> dict[str, str]:
    """_headers are the request's headers with lower-case names, as Check reads them."""
    return {key.lower(): value for key, value in http.headers.items()}


def _refusal(exc: Exception, headers: Mapping[str, str]) -> external_auth_pb2.CheckResponse:
    """_refusal answers a failed decision: the error's denial, or 500 for an unexpected one.

    Fail closed: an unexpected error is logged and must never let a request through.
    """
    if not isinstance(exc, KotaError):
        log.error("Check failed unexpectedly", exc_info=exc)
        exc = _CheckFailed("the request could not be authorized")
    return denied(exc, request_id=headers.get("x-request-id", ""), grpc_client=_is_grpc(headers))


def _is_grpc(headers: Mapping[str, str]) -> bool:
    return headers.get("content-type", "").startswith("application/grpc")


def header_option(key: str, value: str) -> Any:
    """header_option is one header for Envoy to set, replacing any value already there."""
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def rate_headers(admission: Admission) -> list[tuple[str, str]]:
    """rate_headers are the IETF draft RateLimit fields describing the key's current window."""
    return [
        ("ratelimit-limit", str(admission.rate_limit)),
        ("ratelimit-remaining", str(admission.window_remaining)),
        ("ratelimit-reset", str(quota.seconds_until(admission.now, admission.window_reset))),
    ]


def allowed(grant: Grant | None) -> external_auth_pb2.CheckResponse:
    """allowed builds the OK answer: identity headers in, credentials and client copies out."""
    ok = external_auth_pb2.OkHttpResponse()
    remove: list[str] = list(CREDENTIAL_HEADERS)
    if grant is None:
        remove.extend(TRUSTED_HEADERS)
    else:
        identity = grant.identity
        ok.headers.append(header_option(IDENTITY_HEADER, grant.token))
        if identity.user_id is not None:
            ok.headers.append(header_option(TENANT_HEADER, str(identity.user_id)))
        else:
            remove.append(TENANT_HEADER)
        if identity.key_id is not None:
            ok.headers.append(header_option(KEY_ID_HEADER, str(identity.key_id)))
        else:
            remove.append(KEY_ID_HEADER)
        if grant.admission is not None:
            ok.response_headers_to_add.extend(header_option(k, v) for k, v in rate_headers(grant.admission))
    ok.headers_to_remove.extend(remove)
    return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)


def denied(
    error: KotaError, *, request_id: str, grpc_client: bool = False
) -> external_auth_pb2.CheckResponse:
    """denied builds the refusal for `error`: status, body and the headers clients need.

    REST clients get the JSON error body every service error has (services.common.errors.
    error_json: the same google.rpc.Status a service would send, rendered as the gateway renders
    it, plus `reason`). Native gRPC clients get no body, because Envoy turns
    a local reply's body into `grpc-message`; they read `grpc-status` and `grpc-message` (and
    the same reason in `x-kotadb-error-reason`) instead.
    """
    status_code = http_status(error.code)
    grpc_code = int(error.code.value[0])
    headers: list[tuple[str, str]] = [("x-kotadb-error-reason", error.reason)]
    if grpc_client:
        # A path that names no method is UNIMPLEMENTED in gRPC terms (what a server would say).
        status = grpc.StatusCode.UNIMPLEMENTED.value[0] if error.reason == ROUTE_NOT_FOUND else grpc_code
        # grpc-message is percent-encoded (gRPC over HTTP/2 spec); spaces may stay as they are.
        headers.append(("grpc-status", str(status)))
        headers.append(("grpc-message", urllib.parse.quote(error.message, safe=" ")))
    else:
        headers.append(("content-type", "application/json"))
    if status_code == 401:
        # RFC 6750 §3: no error attribute when the request carried no credential at all.
        challenge = 'Bearer realm="kotadb"'
        if error.reason != "MISSING_CREDENTIALS":
            challenge += ', error="invalid_token"'
        headers.append(("www-authenticate", challenge))
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None and status_code in (429, 503):
        seconds = str(max(1, math.ceil(retry_after)))
        headers.append(("retry-after", seconds))
        if error.reason == "RATE_LIMITED" and "rate_limit" in error.metadata:
            headers.extend(
                [
                    ("ratelimit-limit", error.metadata["rate_limit"]),
                    ("ratelimit-remaining", "0"),
                    ("ratelimit-reset", seconds),
                ]
            )
    response = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=status_code),
        body="" if grpc_client else error_json(error, request_id),
    )
    response.headers.extend(header_option(k, v) for k, v in headers)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=grpc_code, message=error.message), denied_response=response
    )
