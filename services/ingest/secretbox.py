"""SecretBox: AES-GCM encryption of the secrets the ingest service must read back, with key ids.

A webhook HMAC cannot be verified from a hash of its secret and git needs the clear access token,
so both are stored encrypted (docs/design.md §2). Each blob names the key that sealed it, so keys
rotate without a flag day: put the new key first in `KOTADB_INGEST_SECRET_KEYS`, keep the old
ones after it until every row was re-encrypted (RotateWebhookSecret re-seals with the first key).

Blob layout (bytes)::

    0x01 | kid length (1) | kid (ASCII) | nonce (12) | ciphertext | tag (16)

The associated data (`context`, e.g. the repository id and the field name) is authenticated but
not stored: a ciphertext copied to another row, or from the token column to the secret column,
fails to decrypt instead of yielding a secret its new place was never given.

Nonces are 96 random bits; at 2^32 encryptions under one key the collision risk reaches the
2^-32 NIST bound, far beyond the secrets a deployment seals before its keys rotate.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.common.errors import FailedPrecondition

VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32
_KID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class SecretBoxError(Exception):
    """SecretBoxError says a blob cannot be opened: unknown key id, corrupt, or another context.

    Its message never contains the blob, the key or the plaintext.
    """


class SecretBox:
    """SecretBox seals secrets with the first of its keys and opens blobs sealed by any of them."""

    def __init__(self, keys: Mapping[str, bytes], primary: str) -> None:
        if primary not in keys:
            raise ValueError("the primary key id is not among the keys")
        for kid, key in keys.items():
            if not _KID.match(kid):
                raise ValueError(f"key id {kid!r} must be 1-64 characters of [A-Za-z0-9_.-]")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {kid!r} must be {KEY_BYTES} bytes, got {len(key)}")
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.items()}
        self.primary = primary

    @classmethod
    def parse(cls, spec: str) -> SecretBox:
        """parse builds a box from `kid:<base64 key>,kid:<base64 key>`; the first key encrypts."""
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for part in (piece.strip() for piece in spec.split(",")):
            if not part:
                continue
            kid, colon, encoded = part.partition(":")
            if not colon:
                raise ValueError("each secret key is `kid:<base64 32 bytes>`")
            try:
                key = base64.b64decode(encoded.strip() + "=" * (-len(encoded.strip()) % 4), validate=False)
            except (binascii.Error, ValueError):
                raise ValueError(f"secret key {kid!r} is not base64") from None
            if kid in keys:
                raise ValueError(f"secret key id {kid!r} appears twice")
            keys[kid] = key
            order.append(kid)
        if not order:
            raise ValueError("no secret keys given")
        return cls(keys, order[0])

    @classmethod
    def from_settings(cls, settings: object) -> SecretBox:
        """from_settings builds the box from `settings.secret_keys` (KOTADB_INGEST_SECRET_KEYS).

        It raises FailedPrecondition (SECRET_KEYS_MISSING / SECRET_KEYS_INVALID) when the
        setting is empty or malformed, without echoing it.
        """
        spec = str(getattr(settings, "secret_keys", "") or "")
        if not spec.strip():
            raise FailedPrecondition(
                "the ingest service has no secret key configured (KOTADB_INGEST_SECRET_KEYS)",
                reason="SECRET_KEYS_MISSING",
            )
        try:
            return cls.parse(spec)
        except ValueError as exc:
            raise FailedPrecondition(
                f"KOTADB_INGEST_SECRET_KEYS is not valid: {exc}",
                reason="SECRET_KEYS_INVALID",
            ) from None

    def encrypt(self, plaintext: bytes, *, context: bytes) -> bytes:
        """encrypt seals `plaintext` under the primary key, binding it to `context`."""
        kid = self.primary.encode("ascii")
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.primary].encrypt(nonce, plaintext, context)
        return bytes((VERSION, len(kid))) + kid + nonce + sealed

    def decrypt(self, blob: bytes, *, context: bytes) -> bytes:
        """decrypt opens a blob sealed by any known key for the same `context`, or raises SecretBoxError."""
        kid, nonce, sealed = self._split(blob)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise SecretBoxError(f"the secret was sealed with key {kid!r}, which is not configured")
        try:
            return cipher.decrypt(nonce, sealed, context)
        except InvalidTag:
            raise SecretBoxError("the secret does not decrypt with its key and context") from None

    def key_id(self, blob: bytes) -> str:
        """key_id is the id of the key that sealed `blob` (to find rows still under an old key)."""
        return self._split(blob)[0]

    @staticmethod
    def _split(blob: bytes) -> tuple[str, bytes, bytes]:
        if len(blob) < 2 or blob[0] != VERSION:
            raise SecretBoxError("the secret blob has an unknown format")
        size = blob[1]
        start = 2 + size
        if size == 0 or len(blob) < start + NONCE_BYTES + 16:
            raise SecretBoxError("the secret blob is truncated")
        try:
            kid = blob[2:start].decode("ascii")
        except UnicodeDecodeError:
            raise SecretBoxError("the secret blob has an unknown format") from None
        return kid, blob[start : start + NONCE_BYTES], blob[start + NONCE_BYTES :]


def generate_key_spec(kid: str | None = None) -> str:
    """generate_key_spec returns a fresh `kid:<base64 32 bytes>` for KOTADB_INGEST_SECRET_KEYS.

    `kotadb dev` calls it once per data dir; operators can run
    `python -c 'from services.ingest.secretbox import generate_key_spec; print(generate_key_spec())'`.
    """
    chosen = kid or f"k{secrets.token_hex(4)}"
    if not _KID.match(chosen):
        raise ValueError(f"key id {chosen!r} must be 1-64 characters of [A-Za-z0-9_.-]")
    return f"{chosen}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode('ascii')}"
