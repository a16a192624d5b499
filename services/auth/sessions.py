"""SessionVerifier: checks Supabase session JWTs (and service-role tokens) and returns their Identity.

Supabase signs session tokens either with the project's shared JWT secret (HS256) or with
asymmetric signing keys published as a JWKS (RS256, ES256, EdDSA). The verifier accepts both:

* HS256 only when `KOTADB_AUTH_JWT_SECRET` is set;
* RS*/PS*/ES*/EdDSA only with a key from `KOTADB_AUTH_JWKS` (a file path, or an http(s) URL
  fetched and cached by PyJWT's `PyJWKClient`), chosen by the token's `kid`;
* never `alg: none`, and never an algorithm whose key family differs from the key's (the header
  picks the algorithm but the algorithm list passed to PyJWT always holds exactly that one,
  matched against what the chosen key supports, which closes the HS256-with-public-key trick).

Claims: `exp` is required; a user token needs `sub` (a UUID), `role: authenticated` and the
configured audience (`authenticated` by default). A token with `role: service_role` is the
service role's credential: Supabase's service-role key carries no `aud`, so for it the audience
is checked only when present. Every failure is `Unauthenticated` with a reason naming it; the
message never echoes the token.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any, Protocol

import jwt
from jwt.api_jwk import PyJWK, PyJWKSet

from services.common.errors import Unauthenticated
from services.common.identity import Identity

HMAC_ALGORITHMS = frozenset({"HS256"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
SERVICE_ROLE = "service_role"
USER_ROLE = "authenticated"


class SessionSettings(Protocol):
    """SessionSettings is the part of AuthSettings the verifier reads."""

    @property
    def jwt_secret(self) -> str: ...

    @property
    def jwks(self) -> str: ...

    @property
    def jwt_audience(self) -> str: ...

    @property
    def jwt_leeway(self) -> float: ...


class InvalidSession(Unauthenticated):
    """InvalidSession rejects a session token that is malformed, unsigned or wrongly signed."""

    default_reason = "INVALID_SESSION_TOKEN"


class ExpiredSession(Unauthenticated):
    """ExpiredSession rejects a session token past its `exp`."""

    default_reason = "SESSION_EXPIRED"


def looks_like_jwt(token: str) -> bool:
    """looks_like_jwt tells a JWT (three dot-separated parts) from an API key, without verifying it."""
    return token.count(".") == 2 and not token.startswith("kdb_")


class _JwksSource:
    """_JwksSource finds verification keys by `kid` in a JWKS file (re-read when it changes) or URL."""

    def __init__(self, location: str) -> None:
        self._location = location
        self._lock = threading.Lock()
        self._client: jwt.PyJWKClient | None = None
        self._file_keys: list[PyJWK] = []
        self._file_mtime: float | None = None
        if location.startswith(("http://", "https://")):
            # PyJWKClient caches the set and refetches when an unknown kid appears (key rotation).
            self._client = jwt.PyJWKClient(location, cache_jwk_set=True, lifespan=300, timeout=5)

    def key_for(self, header: dict[str, Any]) -> PyJWK:
        """key_for returns the key the token's header names, or raises InvalidSession."""
        kid = header.get("kid")
        alg = header.get("alg")
        if self._client is not None:
            try:
                if kid:
                    return self._client.get_signing_key(str(kid))
                keys = self._client.get_signing_keys()
            except jwt.PyJWKClientError as exc:
                raise InvalidSession(f"no JWKS key verifies this token ({exc})") from None
        else:
            keys = self._load_file()
            if kid:
                for key in keys:
                    if key.key_id == kid:
                        return key
                raise InvalidSession("no JWKS key has the token's kid")
        # Without a kid, the token is only verifiable when exactly one key fits its algorithm.
        fitting = [key for key in keys if key.algorithm_name == alg]
        if len(fitting) != 1:
            raise InvalidSession("the token has no kid and the JWKS does not single out a key for it")
        return fitting[0]

    def _load_file(self) -> list[PyJWK]:
        path = Path(self._location)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            raise InvalidSession("the configured JWKS file cannot be read") from None
        with self._lock:
            if self._file_mtime != mtime:
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                    jwk_set = PyJWKSet.from_dict(data)
                except (OSError, ValueError, jwt.PyJWTError) as exc:
                    raise InvalidSession(f"the configured JWKS file is not a valid JWKS ({exc})") from None
                self._file_keys = list(jwk_set.keys)
                self._file_mtime = mtime
            return self._file_keys


class SessionVerifier:
    """SessionVerifier turns a Supabase session or service-role JWT into an Identity, or refuses it."""

    def __init__(self, settings: SessionSettings) -> None:
        self._secret = settings.jwt_secret
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway
        self._jwks = _JwksSource(settings.jwks) if settings.jwks else None

    @property
    def configured(self) -> bool:
        """configured is true when at least one way of verifying sessions (secret or JWKS) is set."""
        return bool(self._secret) or self._jwks is not None

    def verify(self, token: str) -> Identity:
        """verify checks `token`'s signature, algorithm, expiry and audience and returns its Identity.

        It blocks only when a JWKS URL must be (re)fetched; the result is cached for minutes.
        """
        claims = self.claims(token)
        role = claims.get("role")
        if role == SERVICE_ROLE:
            if "aud" in claims:
                self._check_audience(claims["aud"], allow=(self._audience, SERVICE_ROLE))
            return Identity.service()
        if role != USER_ROLE:
            raise InvalidSession(f"the token's role must be {USER_ROLE} or {SERVICE_ROLE}")
        self._check_audience(claims.get("aud"), allow=(self._audience,))
        try:
            user_id = uuid.UUID(str(claims.get("sub", "")))
        except ValueError:
            raise InvalidSession("the token's sub claim is not a user id") from None
        return Identity.user(user_id)

    def claims(self, token: str) -> dict[str, Any]:
        """claims returns the verified claims of `token`; the audience is left to `verify`."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidSession("the session token is not a well-formed JWT") from None
        alg = header.get("alg")
        key: Any
        if alg in HMAC_ALGORITHMS:
            if not self._secret:
                raise InvalidSession("HS256 session tokens are not accepted: no JWT secret is configured")
            key = self._secret
        elif alg in ASYMMETRIC_ALGORITHMS:
            if self._jwks is None:
                raise InvalidSession(f"{alg} session tokens are not accepted: no JWKS is configured")
            jwk = self._jwks.key_for(header)
            if jwk.algorithm_name != alg:
                raise InvalidSession("the token's algorithm does not match its key")
            key = jwk.key
        else:
            # Covers "none" and anything unexpected: refuse before any decoding.
            raise InvalidSession(f"session tokens signed with {alg!r} are not accepted")
        try:
            decoded: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[str(alg)],
                leeway=self._leeway,
                options={"require": ["exp"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise ExpiredSession("the session token has expired") from None
        except jwt.InvalidSignatureError:
            raise InvalidSession("the session token's signature is not valid") from None
        except jwt.PyJWTError as exc:
            raise InvalidSession(f"the session token is not valid ({type(exc).__name__})") from None
        return decoded

    def _check_audience(self, aud: object, *, allow: tuple[str, ...]) -> None:
        audiences = [aud] if isinstance(aud, str) else list(aud) if isinstance(aud, list) else []
        if not any(isinstance(item, str) and item in allow for item in audiences):
            raise InvalidSession(
                f"the session token's audience is not {allow[0]}", reason="WRONG_TOKEN_AUDIENCE"
            )
