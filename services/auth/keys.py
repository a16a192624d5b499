"""API key format: generation, parsing with checksum, hashing and the display prefix.

A key reads `kdb_live_` (or `kdb_test_`) + 32 base62 characters of randomness + 6 base62
characters of checksum, 47 characters in all::

    kdb_live_ 3fA9xQ0b...(32 body chars)... Zk81Pq
    └prefix─┘ └──────── body ───────────┘ └check┘

The checksum is the CRC32 of prefix + body, written in base62 and zero-padded to 6 characters
(62**6 > 2**32), as GitHub's tokens carry a CRC32 tail: secret scanners and the service reject a
truncated or mistyped key without a database lookup.

The body holds 32 * log2(62) ≈ 190 bits from `secrets`, so the stored hash is a single
SHA-256: slow password hashes (bcrypt, argon2) exist to stretch low-entropy human passwords,
and against 190 random bits brute force is hopeless at any hash speed, while a fast hash keeps
`Check` cheap (one hash per request, microseconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import zlib
from typing import Literal

from services.common.errors import Unauthenticated

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_SET = frozenset(BASE62)

KEY_NAMESPACE = "kdb"
ENVIRONMENTS: tuple[str, ...] = ("live", "test")
BODY_LENGTH = 32
CHECKSUM_LENGTH = 6
# DISPLAY_BODY_CHARS is how much of the random body the display prefix reveals: 6 base62 chars
# (~36 bits) tell a user's keys apart and leave ~154 secret bits.
DISPLAY_BODY_CHARS = 6
PREFIX_LENGTH = len(KEY_NAMESPACE) + len("_live_")
KEY_LENGTH = PREFIX_LENGTH + BODY_LENGTH + CHECKSUM_LENGTH

Environment = Literal["live", "test"]


class MalformedKey(Unauthenticated):
    """MalformedKey rejects text that does not have the shape of a KotaDB API key."""

    default_reason = "MALFORMED_API_KEY"


class BadChecksum(Unauthenticated):
    """BadChecksum rejects a well-shaped key whose checksum tail does not match its body."""

    default_reason = "BAD_API_KEY_CHECKSUM"


@dataclasses.dataclass(frozen=True)
class GeneratedKey:
    """GeneratedKey is a fresh key: the plaintext (shown once), its display prefix and its hash."""

    plaintext: str
    display_prefix: str
    key_hash: str

    def __repr__(self) -> str:
        # Keep the secret out of logs and tracebacks that print the object.
        return f"GeneratedKey(display_prefix={self.display_prefix!r}, key_hash={self.key_hash!r})"


@dataclasses.dataclass(frozen=True)
class ParsedKey:
    """ParsedKey is a key whose shape and checksum are valid: its parts and the whole text."""

    plaintext: str
    environment: Environment
    body: str
    checksum: str

    @property
    def display_prefix(self) -> str:
        """display_prefix is the non-secret start of the key stored and shown in listings."""
        return display_prefix(self.plaintext)

    @property
    def key_hash(self) -> str:
        """key_hash is the SHA-256 hex digest of the whole key, as stored in `api_keys.key_hash`."""
        return hash_key(self.plaintext)

    def __repr__(self) -> str:
        return f"ParsedKey(display_prefix={self.display_prefix!r}, environment={self.environment!r})"


def base62_encode(value: int, width: int) -> str:
    """base62_encode writes a non-negative integer in base62, zero-padded to `width` characters."""
    if value < 0:
        raise ValueError("base62_encode needs a non-negative integer")
    digits: list[str] = []
    rest = value
    while rest:
        rest, remainder = divmod(rest, 62)
        digits.append(BASE62[remainder])
    text = "".join(reversed(digits)).rjust(width, BASE62[0])
    if len(text) > width:
        raise ValueError(f"{value} does not fit in {width} base62 characters")
    return text


def checksum(prefix_and_body: str) -> str:
    """checksum is the 6-character base62 CRC32 of the key's prefix and body."""
    return base62_encode(zlib.crc32(prefix_and_body.encode("ascii")), CHECKSUM_LENGTH)


def key_prefix(environment: str) -> str:
    """key_prefix is the readable start of a key for `environment` ("live" or "test")."""
    if environment not in ENVIRONMENTS:
        raise ValueError(f"unknown key environment {environment!r}; expected one of {ENVIRONMENTS}")
    return f"{KEY_NAMESPACE}_{environment}_"


def generate_key(env: str = "live") -> GeneratedKey:
    """generate_key makes a new random key for environment `env` ("live" or "test")."""
    prefix = key_prefix(env)
    body = "".join(secrets.choice(BASE62) for _ in range(BODY_LENGTH))
    plaintext = prefix + body + checksum(prefix + body)
    return GeneratedKey(
        plaintext=plaintext, display_prefix=display_prefix(plaintext), key_hash=hash_key(plaintext)
    )


def parse_key(text: str) -> ParsedKey:
    """parse_key checks a presented key's shape and checksum without touching the database.

    It raises `MalformedKey` for anything that is not a KotaDB key (wrong prefix, length or
    alphabet — a truncated key lands here) and `BadChecksum` when one character was mistyped.
    Messages never echo the presented text: it may be someone's real secret.
    """
    if not text.startswith(f"{KEY_NAMESPACE}_"):
        raise MalformedKey("the API key does not start with the kdb_live_ or kdb_test_ prefix")
    environment: Environment
    if text.startswith(key_prefix("live")):
        environment = "live"
    elif text.startswith(key_prefix("test")):
        environment = "test"
    else:
        raise MalformedKey("the API key does not start with the kdb_live_ or kdb_test_ prefix")
    if len(text) != KEY_LENGTH:
        raise MalformedKey(f"the API key has {len(text)} characters; KotaDB keys have {KEY_LENGTH}")
    rest = text[PREFIX_LENGTH:]
    if not _BASE62_SET.issuperset(rest):
        raise MalformedKey("the API key contains characters outside [0-9A-Za-z] after its prefix")
    body, tail = rest[:BODY_LENGTH], rest[BODY_LENGTH:]
    if not secrets.compare_digest(checksum(text[:PREFIX_LENGTH] + body), tail):
        raise BadChecksum("the API key's checksum does not match; it was mistyped or altered")
    return ParsedKey(plaintext=text, environment=environment, body=body, checksum=tail)


def hash_key(plaintext: str) -> str:
    """hash_key is the SHA-256 hex digest of a key (see the module docstring for why a fast hash)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def display_prefix(plaintext: str) -> str:
    """display_prefix is `kdb_live_` (or `kdb_test_`) plus the first 6 body characters of a key."""
    return plaintext[: PREFIX_LENGTH + DISPLAY_BODY_CHARS]
