"""Opaque pagination cursors: where the previous page ended, bound to a snapshot and a query.

Results are ordered by `rank_key` (score descending, then path, repository and external id),
which is total and deterministic within a snapshot, so "everything after the last file of
the previous page" is a stable definition of the next page. A cursor records that last
position, plus:

* the snapshot generation it was computed on: a cursor from another generation raises
  `CursorError` with reason `stale_generation` (documents may have moved between pages, and
  silently skipping or repeating files is worse than asking the caller to start over);
* a fingerprint of the query and its options, so a cursor cannot be replayed against a
  different query (reason `query_mismatch`);
* the digests of files already shown by an approximate first page. A FIRST_PAGE search that
  stopped early ranked only part of the candidates, so the exact order of later pages may put
  some of its files after the cursor position; excluding them by digest keeps pages disjoint
  and their union complete.

Layout (then base64url without padding), all integers little-endian:

    u8 version | u64 generation | 8B query fingerprint | u8 has_position
    [ f64 score | u16 len + path | u16 len + repository | u16 len + external id ]
    u16 n | n x 8B path digest | 8B keyed BLAKE2b tag over everything before it

The tag makes the cursor tamper-evident-ish: it detects accidental corruption and casual
edits. The key is a constant unless the caller supplies one (the search service passes a
secret), so it is not a security boundary on its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterable

from services.search.engine.errors import CursorError as CursorError
from services.search.engine.record import Record, field

VERSION = 1
_DEFAULT_KEY = b"kotadb-cursor-v1"
_TAG_BYTES = 8
DIGEST_BYTES = 8


RankKey = tuple[float, str, str, str]


def rank_key(score: float, path: str, repository: str, external_id: str) -> RankKey:
    """rank_key is the total order of results: higher score first, then path, repo, id."""
    return (-score, path, repository, external_id)


class Position(Record):
    """Position is the rank key of the last file a page returned."""

    score: float
    path: str
    repository: str
    external_id: str

    def key(self) -> RankKey:
        """key returns the position's rank key."""
        return rank_key(self.score, self.path, self.repository, self.external_id)


class Cursor(Record):
    """Cursor is a decoded pagination cursor (see the module docstring)."""

    generation: int
    fingerprint: bytes
    position: Position | None = None
    exclude: frozenset[bytes] = field(default_factory=frozenset)

    def check(self, *, generation: int, fingerprint: bytes) -> None:
        """check raises CursorError unless the cursor belongs to this snapshot and query."""
        if self.fingerprint != fingerprint:
            raise CursorError("cursor was issued for a different query", reason="query_mismatch")
        if self.generation != generation:
            raise CursorError(
                f"cursor is from index generation {self.generation}, the index is now at "
                f"{generation}; start the search again",
                reason="stale_generation",
            )

    def after(self, key: RankKey) -> bool:
        """after reports whether a result with this rank key belongs to a later page."""
        return self.position is None or key > self.position.key()


def query_fingerprint(*parts: str) -> bytes:
    """query_fingerprint hashes the query text and every option that changes the result set."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = part.encode("utf-8")
        h.update(struct.pack("<I", len(data)))
        h.update(data)
    return h.digest()


def path_digest(repository: str, path: str, external_id: str) -> bytes:
    """path_digest names one document compactly for a cursor's exclusion list."""
    return hashlib.blake2b(f"{repository}\0{path}\0{external_id}".encode(), digest_size=DIGEST_BYTES).digest()


def _tag(body: bytes, key: bytes) -> bytes:
    return hashlib.blake2b(body, key=key[:64], digest_size=_TAG_BYTES).digest()


def _pack_str(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError("cursor field longer than 65535 bytes")
    return struct.pack("<H", len(data)) + data


def encode_cursor(cursor: Cursor, *, key: bytes = _DEFAULT_KEY) -> str:
    """encode_cursor serialises a cursor into an opaque URL-safe token."""
    parts = [struct.pack("<BQ", VERSION, cursor.generation), cursor.fingerprint]
    if cursor.position is None:
        parts.append(b"\0")
    else:
        pos = cursor.position
        parts.append(b"\1" + struct.pack("<d", pos.score))
        parts += [_pack_str(pos.path), _pack_str(pos.repository), _pack_str(pos.external_id)]
    excluded = sorted(cursor.exclude)
    parts.append(struct.pack("<H", len(excluded)))
    parts += excluded
    body = b"".join(parts)
    return base64.urlsafe_b64encode(body + _tag(body, key)).rstrip(b"=").decode("ascii")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise CursorError("cursor is truncated", reason="malformed")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def text(self) -> str:
        (n,) = struct.unpack("<H", self.take(2))
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CursorError("cursor holds invalid text", reason="malformed") from exc


def decode_cursor(token: str, *, key: bytes = _DEFAULT_KEY) -> Cursor:
    """decode_cursor parses a token from encode_cursor, raising CursorError when it is bad."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError) as exc:
        raise CursorError("cursor is not valid base64", reason="malformed") from exc
    if len(raw) < 1 + 8 + 8 + 1 + 2 + _TAG_BYTES:
        raise CursorError("cursor is too short", reason="malformed")
    body, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
    if _tag(body, key) != tag:
        raise CursorError("cursor failed its integrity check", reason="tampered")
    reader = _Reader(body)
    version, generation = struct.unpack("<BQ", reader.take(9))
    if version != VERSION:
        raise CursorError(f"cursor version {version} is not supported", reason="unsupported_version")
    fingerprint = reader.take(8)
    position: Position | None = None
    has_position = reader.take(1)
    if has_position == b"\1":
        (score,) = struct.unpack("<d", reader.take(8))
        position = Position(score, reader.text(), reader.text(), reader.text())
    elif has_position != b"\0":
        raise CursorError("cursor has a bad position flag", reason="malformed")
    (count,) = struct.unpack("<H", reader.take(2))
    exclude = frozenset(reader.take(DIGEST_BYTES) for _ in range(count))
    if reader.at != len(body):
        raise CursorError("cursor has trailing bytes", reason="malformed")
    return Cursor(generation=generation, fingerprint=fingerprint, position=position, exclude=exclude)


def exclusion_digests(items: Iterable[tuple[str, str, str]]) -> frozenset[bytes]:
    """exclusion_digests digests (repository, path, external_id) triples for a cursor."""
    return frozenset(path_digest(repo, path, ext) for repo, path, ext in items)
