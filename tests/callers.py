"""Test callers: gRPC channels that present a gateway-signed identity, signed per call.

The gateway's Check signs an identity for one method and a few seconds (services/common/
identity.py), so a test cannot sign once and reuse the token. Tests name the caller in a call's
metadata (`caller(user_id, permissions)`) and call through `signing_channel`, which signs it for
exactly the method being called, as Check would (services/common/delegation.py does the signing).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import grpc

from services.common.delegation import delegating_interceptors, on_behalf
from services.common.identity import Identity, IdentityCodec


def caller(
    user_id: uuid.UUID | None,
    permissions: Sequence[str] = ("read", "write"),
    kind: str = "user",
    key_id: uuid.UUID | None = None,
) -> tuple[tuple[str, str], ...]:
    """caller is metadata naming who makes a call; a signing channel turns it into an identity.

    The default caller is a user's session limited to `permissions`: an `api_key` caller must name
    a real key (`key_id`), since what it does is recorded against that key.
    """
    identity = Identity(
        user_id=user_id,
        kind=kind,  # type: ignore[arg-type]
        permissions=frozenset(permissions),
        key_id=key_id,
    )
    return on_behalf(identity)


def signing_channel(
    address: str, codec: IdentityCodec, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """signing_channel is an asyncio channel that signs each named caller's identity for its method."""
    return grpc.aio.insecure_channel(
        address, options=list(options), interceptors=delegating_interceptors(codec)
    )
