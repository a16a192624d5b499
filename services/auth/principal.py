"""Principal: who is calling — a user's session, an API key, or the service role — and what they may do.

Every credential the auth service accepts (a Supabase session JWT, an API key, a service-role
token, the signed identity Envoy's `Check` adds) ends up as one `Principal`; permission checks
and tenant scoping read only this value.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Literal

from services.common.errors import PermissionDenied

PrincipalKind = Literal["user", "api_key", "service"]

READ = "read"
WRITE = "write"
ADMIN = "admin"
PERMISSIONS: tuple[str, ...] = (READ, WRITE, ADMIN)

# A user's own session may do anything their keys could: it is how they manage those keys.
SESSION_PERMISSIONS: frozenset[str] = frozenset(PERMISSIONS)


@dataclasses.dataclass(frozen=True)
class Principal:
    """Principal is an authenticated caller.

    `user_id` is the tenant the caller acts for (None only for the service role, which names
    a user per request), `kind` says which credential proved it, `key_id` is set for API keys
    and `permissions` is the subset of `read`, `write`, `admin` the caller holds.
    """

    user_id: uuid.UUID | None
    kind: PrincipalKind
    key_id: uuid.UUID | None = None
    permissions: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = self.permissions - frozenset(PERMISSIONS)
        if unknown:
            raise ValueError(f"unknown permissions {sorted(unknown)}")
        if self.kind != "service" and self.user_id is None:
            raise ValueError(f"a {self.kind} principal needs a user id")
        if self.kind == "api_key" and self.key_id is None:
            raise ValueError("an api_key principal needs a key id")

    @classmethod
    def user(cls, user_id: uuid.UUID) -> Principal:
        """user is the principal of a signed-in user's Supabase session."""
        return cls(user_id=user_id, kind="user", permissions=SESSION_PERMISSIONS)

    @classmethod
    def api_key(cls, user_id: uuid.UUID, key_id: uuid.UUID, permissions: frozenset[str]) -> Principal:
        """api_key is the principal of a request authenticated by an API key."""
        return cls(user_id=user_id, kind="api_key", key_id=key_id, permissions=permissions)

    @classmethod
    def service(cls, user_id: uuid.UUID | None = None) -> Principal:
        """service is the service role, optionally acting for `user_id`."""
        return cls(user_id=user_id, kind="service", permissions=frozenset(PERMISSIONS))

    @property
    def is_service(self) -> bool:
        """is_service is true for the service role, which may act for any tenant."""
        return self.kind == "service"

    def has(self, permission: str) -> bool:
        """has tells whether the caller holds `permission`."""
        return permission in self.permissions

    def require(self, permission: str) -> None:
        """require raises PermissionDenied unless the caller holds `permission`."""
        if not self.has(permission):
            raise PermissionDenied(
                f"this call needs the {permission} permission",
                reason="MISSING_PERMISSION",
                metadata={"permission": permission},
            )

    def may_manage_keys(self) -> bool:
        """may_manage_keys is true for a session, an admin key or the service role."""
        return self.kind in ("user", "service") or self.has(ADMIN)
