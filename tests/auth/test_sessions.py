"""Session JWT verification: HS256 and JWKS-signed tokens pass; forged, expired and odd ones are refused."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import http.server
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from services.auth.sessions import SessionVerifier, looks_like_jwt
from services.common.errors import Unauthenticated
from services.common.identity import Identity

SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
USER = uuid.UUID("6a1f3c1e-1111-4222-8333-944455556666")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Settings is the slice of AuthSettings the verifier reads."""

    jwt_secret: str = SECRET
    jwks: str = ""
    jwt_audience: str = "authenticated"
    jwt_leeway: float = 0.0


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": str(USER),
        "role": "authenticated",
        "aud": "authenticated",
        "iat": now,
        "exp": now + 3600,
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_hs256_session_is_the_user() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert SessionVerifier(Settings()).verify(token) == Identity.user(USER)


def test_service_role_token_without_audience_is_the_service() -> None:
    token = jwt.encode(claims(sub=None, aud=None, role="service_role"), SECRET, algorithm="HS256")
    principal = SessionVerifier(Settings()).verify(token)
    assert principal.is_service and principal.user_id is None


@pytest.mark.parametrize(
    ("token_claims", "key", "reason"),
    [
        (claims(), "another-secret-another-secret-another!!", "INVALID_SESSION_TOKEN"),
        (claims(exp=int(time.time()) - 60), SECRET, "SESSION_EXPIRED"),
        (claims(aud="someone-else"), SECRET, "WRONG_TOKEN_AUDIENCE"),
        (claims(aud=None), SECRET, "WRONG_TOKEN_AUDIENCE"),
        (claims(exp=None), SECRET, "INVALID_SESSION_TOKEN"),
        (claims(role="anon"), SECRET, "INVALID_SESSION_TOKEN"),
        (claims(sub="not-a-uuid"), SECRET, "INVALID_SESSION_TOKEN"),
        (claims(nbf=int(time.time()) + 600), SECRET, "INVALID_SESSION_TOKEN"),
    ],
    ids=["wrong-signature", "expired", "wrong-audience", "no-audience", "no-exp", "anon", "bad-sub", "nbf"],
)
def test_bad_hs256_tokens_are_unauthenticated(token_claims: dict[str, Any], key: str, reason: str) -> None:
    token = jwt.encode(token_claims, key, algorithm="HS256")
    with pytest.raises(Unauthenticated) as caught:
        SessionVerifier(Settings()).verify(token)
    assert caught.value.reason == reason
    assert token not in caught.value.message


def test_alg_none_is_refused() -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}."
    with pytest.raises(Unauthenticated) as caught:
        SessionVerifier(Settings()).verify(token)
    assert caught.value.reason == "INVALID_SESSION_TOKEN"


def test_tampered_payload_is_refused() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    header, _, signature = token.split(".")
    forged = b64(json.dumps(claims(sub=str(uuid.uuid4()))).encode())
    with pytest.raises(Unauthenticated):
        SessionVerifier(Settings()).verify(f"{header}.{forged}.{signature}")


@pytest.mark.parametrize("text", ["", "abc", "a.b", "a.b.c", "kdb_live_x.y.z"])
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(Unauthenticated):
        SessionVerifier(Settings()).verify(text)


def test_hs256_refused_without_a_secret() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    with pytest.raises(Unauthenticated):
        SessionVerifier(Settings(jwt_secret="")).verify(token)


def _jwks_file(tmp_path: Path, entries: list[dict[str, Any]]) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": entries}), encoding="utf-8")
    return path


def _public_jwk(algorithm: Any, private_key: Any, kid: str, alg: str) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(algorithm.to_jwk(private_key.public_key()))
    entry.update({"kid": kid, "alg": alg, "use": "sig"})
    return entry


@pytest.fixture(scope="module")
def signing_keys() -> dict[str, Any]:
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }


def _jwks_for(signing_keys: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _public_jwk(RSAAlgorithm(RSAAlgorithm.SHA256), signing_keys["RS256"], "rsa-1", "RS256"),
        _public_jwk(ECAlgorithm(ECAlgorithm.SHA256), signing_keys["ES256"], "ec-1", "ES256"),
        _public_jwk(OKPAlgorithm(), signing_keys["EdDSA"], "ed-1", "EdDSA"),
    ]


@pytest.mark.parametrize(("alg", "kid"), [("RS256", "rsa-1"), ("ES256", "ec-1"), ("EdDSA", "ed-1")])
def test_asymmetric_tokens_from_a_jwks_file(
    tmp_path: Path, signing_keys: dict[str, Any], alg: str, kid: str
) -> None:
    path = _jwks_file(tmp_path, _jwks_for(signing_keys))
    verifier = SessionVerifier(Settings(jwt_secret="", jwks=str(path)))
    token = jwt.encode(claims(), signing_keys[alg], algorithm=alg, headers={"kid": kid})
    assert verifier.verify(token) == Identity.user(USER)


def test_asymmetric_token_signed_by_an_unlisted_key_is_refused(
    tmp_path: Path, signing_keys: dict[str, Any]
) -> None:
    path = _jwks_file(tmp_path, _jwks_for(signing_keys))
    verifier = SessionVerifier(Settings(jwt_secret="", jwks=str(path)))
    stranger = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(claims(), stranger, algorithm="ES256", headers={"kid": "ec-1"})
    with pytest.raises(Unauthenticated, match="signature"):
        verifier.verify(forged)
    unknown_kid = jwt.encode(claims(), stranger, algorithm="ES256", headers={"kid": "ec-9"})
    with pytest.raises(Unauthenticated, match="kid"):
        verifier.verify(unknown_kid)


def test_algorithm_must_match_the_key(tmp_path: Path, signing_keys: dict[str, Any]) -> None:
    path = _jwks_file(tmp_path, _jwks_for(signing_keys))
    verifier = SessionVerifier(Settings(jwt_secret="", jwks=str(path)))
    # An RS384 token naming the RS256 key: the header's algorithm is not the key's.
    token = jwt.encode(claims(), signing_keys["RS256"], algorithm="RS384", headers={"kid": "rsa-1"})
    with pytest.raises(Unauthenticated, match="algorithm"):
        verifier.verify(token)


def test_expired_asymmetric_token_is_refused(tmp_path: Path, signing_keys: dict[str, Any]) -> None:
    path = _jwks_file(tmp_path, _jwks_for(signing_keys))
    verifier = SessionVerifier(Settings(jwt_secret="", jwks=str(path)))
    token = jwt.encode(
        claims(exp=int(time.time()) - 10), signing_keys["ES256"], algorithm="ES256", headers={"kid": "ec-1"}
    )
    with pytest.raises(Unauthenticated) as caught:
        verifier.verify(token)
    assert caught.value.reason == "SESSION_EXPIRED"


def test_jwks_file_is_reread_after_key_rotation(tmp_path: Path, signing_keys: dict[str, Any]) -> None:
    entries = _jwks_for(signing_keys)
    path = _jwks_file(tmp_path, entries[:1])
    verifier = SessionVerifier(Settings(jwt_secret="", jwks=str(path)))
    token = jwt.encode(claims(), signing_keys["ES256"], algorithm="ES256", headers={"kid": "ec-1"})
    with pytest.raises(Unauthenticated):
        verifier.verify(token)
    path.write_text(json.dumps({"keys": entries}), encoding="utf-8")
    # Make the change visible even on filesystems with coarse mtimes.
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))
    assert verifier.verify(token) == Identity.user(USER)


def test_looks_like_jwt() -> None:
    assert looks_like_jwt(jwt.encode(claims(), SECRET, algorithm="HS256"))
    assert not looks_like_jwt("kdb_live_" + "a" * 38)


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    """_JwksHandler serves the JWKS held by its server at any path, counting requests."""

    def do_GET(self) -> None:
        server: Any = self.server
        server.hits += 1
        body = json.dumps({"keys": server.keys}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def jwks_url(signing_keys: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JwksHandler)
    server.keys = _jwks_for(signing_keys)
    server.hits = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/auth/v1/.well-known/jwks.json", server
    finally:
        server.shutdown()
        server.server_close()


def test_asymmetric_tokens_from_a_jwks_url(signing_keys: dict[str, Any], jwks_url: tuple[str, Any]) -> None:
    url, server = jwks_url
    verifier = SessionVerifier(Settings(jwt_secret="", jwks=url))
    for alg, kid in (("ES256", "ec-1"), ("RS256", "rsa-1")):
        token = jwt.encode(claims(), signing_keys[alg], algorithm=alg, headers={"kid": kid})
        assert verifier.verify(token) == Identity.user(USER)
    assert server.hits == 1, "the key set is fetched once and cached"
    stranger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(Unauthenticated):
        verifier.verify(jwt.encode(claims(), stranger, algorithm="ES256", headers={"kid": "ec-1"}))
    # Algorithm confusion: an HS256 token "signed" with the published RSA key's PEM is refused,
    # because HS256 is only ever checked against the configured secret (none here).
    public_pem = (
        signing_keys["RS256"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    confused = _hs256_with_raw_key(claims(), public_pem, kid="rsa-1")
    with pytest.raises(Unauthenticated):
        verifier.verify(confused)


def _hs256_with_raw_key(payload: dict[str, Any], key: bytes, kid: str) -> str:
    """_hs256_with_raw_key signs as an attacker would: HMAC under any key bytes (PyJWT refuses PEM)."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(payload).encode())
    signature = hmac.new(key, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"
