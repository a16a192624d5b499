"""KeyManager: API key management rules — who may do what, validation, idempotency, rotation.

The servicer (gRPC) and `kotadb keys` (CLI) both call these methods, so the rules hold however a
key is managed. Decisions worth knowing:

* Who: the key owner's session, a key holding `admin` (acting for its owner's tenant) or the
  service role (any tenant; it must name the user when creating). Everything else is
  PERMISSION_DENIED. Every read and write runs under RLS as the owner (AuthStore.transaction),
  so another tenant's key is simply NOT_FOUND.
* No escalation: an API key may only grant (on create or update) permissions it holds itself.
* Limits: users and admin keys may choose `rate_limit` and `monthly_quota` up to the configured
  maxima (`KOTADB_AUTH_MAX_RATE_LIMIT`, `KOTADB_AUTH_MAX_MONTHLY_QUOTA`) at creation; afterwards
  only an admin key or the service role may change them, and only the service role may exceed
  the maxima. 0 means the server default.
* Idempotency (AIP-155): a create or rotate carrying a `request_id` already used by the same
  user returns the first call's key with an empty secret — the plaintext is shown once, never
  again — and `replayed=True`. The same request_id with a different name or permissions is
  ALREADY_EXISTS (`REQUEST_ID_REUSED`). A unique index makes this hold under concurrency.
* Rotation inserts a new key (new id, `rotated_from` = the old id) carrying the old one's name,
  permissions, limits, expiry and this month's usage (so rotating never resets a quota), and
  sets the old key's `grace_until` to now + grace. Grace defaults to
  `KOTADB_AUTH_ROTATION_GRACE`; a request may ask for less (0 stops the old key at once), never
  more. Only an ACTIVE key can be rotated: rotate the newest key of a chain.
* Validation (`validate`) applies exactly Check's rules — shape, checksum, hash lookup, revocation,
  rotation grace, expiry, permission — and counts the request against the rate limit and quota
  only when the caller asks for it and a `RequestMeter` is configured.

The request and result types, and the checks of single fields, are in keyrequests.py; their
public names are importable from here too.
"""

from __future__ import annotations

import datetime as dt
import uuid

from services.auth.keyrequests import (
    DEFAULT_PAGE_SIZE,
    HARD_MAX_MONTHLY_QUOTA,
    HARD_MAX_RATE_LIMIT,
    MAX_NAME_LENGTH,
    MAX_PAGE_SIZE,
    MAX_REQUEST_ID_LENGTH,
    Clock,
    IssuedKey,
    KeyPolicy,
    KeySpec,
    KeyUpdate,
    RequestMeter,
    UsageReport,
    ValidatedKey,
    check_name,
    check_permissions,
    check_request_id,
    decode_page_token,
    encode_page_token,
    invalid_field,
    minute_start,
    raise_violations,
    utcnow,
)
from services.auth.keys import generate_key, parse_key
from services.auth.ratelimit import Admission
from services.auth.store import (
    REQUEST_ID_INDEX,
    ApiKeyRecord,
    AuthStore,
    NewKey,
    PageCursor,
    check_usable,
    month_start,
)
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    PermissionDenied,
    Unauthenticated,
    Unimplemented,
)
from services.common.identity import ADMIN, Identity

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "HARD_MAX_MONTHLY_QUOTA",
    "HARD_MAX_RATE_LIMIT",
    "MAX_NAME_LENGTH",
    "MAX_PAGE_SIZE",
    "MAX_REQUEST_ID_LENGTH",
    "Admission",
    "Clock",
    "IssuedKey",
    "KeyManager",
    "KeyPolicy",
    "KeySpec",
    "KeyUpdate",
    "RequestMeter",
    "UsageReport",
    "ValidatedKey",
    "check_usable",
    "minute_start",
    "utcnow",
]


class KeyManager:
    """KeyManager applies the key-management rules on top of AuthStore; see the module docstring."""

    def __init__(
        self,
        store: AuthStore,
        policy: KeyPolicy,
        *,
        now: Clock = utcnow,
        meter: RequestMeter | None = None,
    ) -> None:
        self._store = store
        self._policy = policy
        self._now = now
        self._meter = meter

    @property
    def store(self) -> AuthStore:
        """store is the AuthStore the manager runs its queries on."""
        return self._store

    # Rules -------------------------------------------------------------------------------

    @staticmethod
    def require_manager(principal: Identity) -> None:
        """require_manager raises PermissionDenied unless `principal` may manage keys."""
        if not principal.may_manage_keys():
            raise PermissionDenied(
                "managing API keys needs the owner's session, an admin key or the service role",
                reason="MISSING_PERMISSION",
                metadata={"permission": ADMIN},
            )

    @staticmethod
    def _check_grant(principal: Identity, permissions: frozenset[str]) -> None:
        if principal.kind == "api_key" and not permissions <= principal.permissions:
            missing = ",".join(sorted(permissions - principal.permissions))
            raise PermissionDenied(
                f"an API key cannot grant permissions it does not hold ({missing})",
                reason="PERMISSION_ESCALATION",
                metadata={"permissions": missing},
            )

    def _check_limits(
        self, principal: Identity, rate_limit: int, monthly_quota: int, violations: list[FieldViolation]
    ) -> None:
        rate_cap = HARD_MAX_RATE_LIMIT if principal.is_service else self._policy.max_rate_limit
        quota_cap = HARD_MAX_MONTHLY_QUOTA if principal.is_service else self._policy.max_monthly_quota
        if rate_limit < 0 or rate_limit > rate_cap:
            violations.append(FieldViolation("api_key.rate_limit", f"requests per minute, 1 to {rate_cap}"))
        if monthly_quota < 0 or monthly_quota > quota_cap:
            violations.append(
                FieldViolation("api_key.monthly_quota", f"requests per month, 1 to {quota_cap}")
            )

    def _check_expiry(self, expires_at: dt.datetime | None, violations: list[FieldViolation]) -> None:
        if expires_at is not None and expires_at <= self._now():
            violations.append(FieldViolation("api_key.expire_time", "must be in the future"))

    def _owner_for_create(self, principal: Identity, user_id: uuid.UUID | None) -> uuid.UUID:
        if principal.is_service:
            if user_id is None:
                raise invalid_field("user_id", "the service role must name the user the key is for")
            return user_id
        assert principal.user_id is not None
        if user_id is not None and user_id != principal.user_id:
            raise PermissionDenied(
                "only the service role may create keys for another user", reason="CROSS_TENANT_DENIED"
            )
        return principal.user_id

    # Operations --------------------------------------------------------------------------

    async def create(
        self,
        principal: Identity,
        spec: KeySpec,
        *,
        user_id: uuid.UUID | None = None,
        request_id: str | None = None,
    ) -> IssuedKey:
        """create issues a key for the caller (or, for the service role, for `user_id`)."""
        self.require_manager(principal)
        violations: list[FieldViolation] = []
        check_name(spec.name, violations)
        check_permissions(spec.permissions, violations)
        self._check_limits(principal, spec.rate_limit, spec.monthly_quota, violations)
        self._check_expiry(spec.expires_at, violations)
        check_request_id(request_id, violations)
        if spec.environment not in ("live", "test"):
            violations.append(FieldViolation("environment", "live or test"))
        raise_violations(violations)
        self._check_grant(principal, spec.permissions)
        owner = self._owner_for_create(principal, user_id)
        acting = principal if not principal.is_service else Identity.service(owner)
        if request_id is not None:
            replay = await self._replay(acting, owner, request_id, spec, rotated_from=None)
            if replay is not None:
                return replay
        generated = generate_key(spec.environment)
        new = NewKey(
            user_id=owner,
            name=spec.name.strip(),
            prefix=generated.display_prefix,
            key_hash=generated.key_hash,
            permissions=spec.permissions,
            rate_limit=spec.rate_limit or self._policy.default_rate_limit,
            monthly_quota=spec.monthly_quota or self._policy.default_monthly_quota,
            expires_at=spec.expires_at,
            request_id=request_id,
        )
        try:
            async with self._store.transaction(acting) as conn:
                key_id = await self._store.insert(conn, new)
                record = await self._store.get(conn, key_id)
        except AlreadyExists as exc:
            if request_id is None or exc.metadata.get("constraint") != REQUEST_ID_INDEX:
                raise
            # A concurrent call with the same request_id won the insert: answer as its retry.
            replay = await self._replay(acting, owner, request_id, spec, rotated_from=None)
            if replay is None:
                raise
            return replay
        return IssuedKey(record=record, secret=generated.plaintext)

    async def _replay(
        self,
        principal: Identity,
        owner: uuid.UUID,
        request_id: str,
        spec: KeySpec | None,
        *,
        rotated_from: uuid.UUID | None,
    ) -> IssuedKey | None:
        async with self._store.transaction(principal) as conn:
            found = await self._store.find_by_request_id(conn, owner, request_id)
            previous = await self._store.get(conn, rotated_from) if found and rotated_from else None
        if found is None:
            return None
        same = found.rotated_from == rotated_from and (
            spec is None or (found.name == spec.name.strip() and found.permissions == spec.permissions)
        )
        if not same:
            raise AlreadyExists(
                "request_id was already used for a different request",
                resource_type="kotadb.v1.ApiKey",
                resource_name=str(found.id),
                reason="REQUEST_ID_REUSED",
                metadata={"api_key_id": str(found.id)},
            )
        return IssuedKey(record=found, secret="", replayed=True, previous=previous)

    async def get(self, principal: Identity, key_id: uuid.UUID) -> ApiKeyRecord:
        """get returns one key the caller may manage."""
        self.require_manager(principal)
        async with self._store.transaction(principal) as conn:
            return await self._store.get(conn, key_id)

    async def list(
        self,
        principal: Identity,
        *,
        page_size: int = 0,
        page_token: str = "",
        include_inactive: bool = False,
        user_id: uuid.UUID | None = None,
    ) -> tuple[list[ApiKeyRecord], str]:
        """list returns one page of keys, newest first, and the token of the next page ("" at the end).

        Users and admin keys see their own tenant's keys; the service role sees every tenant's
        unless `user_id` narrows it.
        """
        self.require_manager(principal)
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise invalid_field("page_size", f"0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        owner = user_id if principal.is_service else principal.user_id
        after = decode_page_token(page_token, include_inactive, owner) if page_token else None
        async with self._store.transaction(principal) as conn:
            records = await self._store.list(
                conn,
                user_id=owner,
                now=self._now(),
                include_inactive=include_inactive,
                after=after,
                limit=size + 1,
            )
        if len(records) <= size:
            return records, ""
        page = records[:size]
        last = page[-1]
        return page, encode_page_token(PageCursor(last.created_at, last.id), include_inactive, owner)

    async def update(self, principal: Identity, key_id: uuid.UUID, update: KeyUpdate) -> ApiKeyRecord:
        """update changes the fields `update.fields` names (see the module docstring for who may)."""
        self.require_manager(principal)
        violations: list[FieldViolation] = []
        unknown = update.fields - KeyUpdate.UPDATABLE
        if not update.fields:
            violations.append(
                FieldViolation("update_mask", f"name at least one of {sorted(KeyUpdate.UPDATABLE)}")
            )
        for field in sorted(unknown):
            violations.append(FieldViolation("update_mask", f"{field} cannot be updated"))
        changes: dict[str, object] = {}
        if "name" in update.fields:
            check_name(update.name, violations)
            changes["name"] = update.name.strip()
        if "permissions" in update.fields:
            check_permissions(update.permissions, violations)
            changes["permissions"] = update.permissions
        limits = {"rate_limit", "monthly_quota"} & update.fields
        if limits:
            self._check_limits(
                principal,
                update.rate_limit if "rate_limit" in limits else 1,
                update.monthly_quota if "monthly_quota" in limits else 1,
                violations,
            )
            if "rate_limit" in limits:
                changes["rate_limit"] = update.rate_limit or self._policy.default_rate_limit
            if "monthly_quota" in limits:
                changes["monthly_quota"] = update.monthly_quota or self._policy.default_monthly_quota
        if "expire_time" in update.fields:
            self._check_expiry(update.expires_at, violations)
            changes["expires_at"] = update.expires_at
        raise_violations(violations)
        if limits and principal.kind == "user":
            raise PermissionDenied(
                "changing a key's limits needs a key with the admin permission or the service role",
                reason="MISSING_PERMISSION",
                metadata={"permission": ADMIN},
            )
        if "permissions" in update.fields:
            self._check_grant(principal, update.permissions)
        async with self._store.transaction(principal) as conn:
            current = await self._store.get(conn, key_id, lock=True)
            if current.state(self._now()) == "REVOKED":
                raise FailedPrecondition("a revoked key cannot be changed", reason="API_KEY_REVOKED")
            await self._store.update(conn, key_id, changes)
            return await self._store.get(conn, key_id)

    async def revoke(self, principal: Identity, key_id: uuid.UUID) -> ApiKeyRecord:
        """revoke stops a key for good, on every replica once the transaction commits; repeats are no-ops."""
        self.require_manager(principal)
        async with self._store.transaction(principal) as conn:
            await self._store.get(conn, key_id, lock=True)
            await self._store.revoke(conn, key_id, self._now())
            return await self._store.get(conn, key_id)

    async def rotate(
        self,
        principal: Identity,
        key_id: uuid.UUID,
        *,
        grace: dt.timedelta | None = None,
        request_id: str | None = None,
    ) -> IssuedKey:
        """rotate issues a new secret replacing key `key_id`, which keeps working for the grace period."""
        self.require_manager(principal)
        violations: list[FieldViolation] = []
        check_request_id(request_id, violations)
        default_grace = dt.timedelta(seconds=self._policy.rotation_grace)
        if grace is not None and (grace < dt.timedelta(0) or grace > default_grace):
            violations.append(
                FieldViolation(
                    "grace_period", f"0 to {int(default_grace.total_seconds())} seconds (the default)"
                )
            )
        raise_violations(violations)
        async with self._store.transaction(principal) as conn:
            old = await self._store.get(conn, key_id)
        if request_id is not None:
            replay = await self._replay(principal, old.user_id, request_id, None, rotated_from=key_id)
            if replay is not None:
                return replay
        try:
            return await self._rotate_locked(
                principal, key_id, grace if grace is not None else default_grace, request_id
            )
        except (FailedPrecondition, AlreadyExists):
            if request_id is None:
                raise
            # A concurrent retry of this very rotation committed first: answer as its replay.
            replay = await self._replay(principal, old.user_id, request_id, None, rotated_from=key_id)
            if replay is None:
                raise
            return replay

    async def _rotate_locked(
        self, principal: Identity, key_id: uuid.UUID, grace: dt.timedelta, request_id: str | None
    ) -> IssuedKey:
        """_rotate_locked rotates under the old key's row lock, so only one rotation of a key wins."""
        now = self._now()
        async with self._store.transaction(principal) as conn:
            old = await self._store.get(conn, key_id, lock=True)
            generated = generate_key("test" if old.prefix.startswith("kdb_test_") else "live")
            state = old.state(now)
            if state != "ACTIVE":
                metadata = {"state": state}
                if old.rotated_to is not None:
                    metadata["rotated_to_id"] = str(old.rotated_to)
                raise FailedPrecondition(
                    f"only an active key can be rotated; this one is {state.lower()}",
                    reason="API_KEY_NOT_ACTIVE",
                    metadata=metadata,
                )
            self._check_grant(principal, old.permissions)
            new_id = await self._store.insert(
                conn,
                NewKey(
                    user_id=old.user_id,
                    name=old.name,
                    prefix=generated.display_prefix,
                    key_hash=generated.key_hash,
                    permissions=old.permissions,
                    rate_limit=old.rate_limit,
                    monthly_quota=old.monthly_quota,
                    expires_at=old.expires_at,
                    request_id=request_id,
                    rotated_from=old.id,
                    usage_count=old.month_usage(now),
                    usage_period=month_start(now).date(),
                ),
            )
            await self._store.set_grace(conn, old.id, now + grace)
            record = await self._store.get(conn, new_id)
            previous = await self._store.get(conn, old.id)
        return IssuedKey(record=record, secret=generated.plaintext, previous=previous)

    async def usage(
        self,
        principal: Identity,
        key_id: uuid.UUID | None,
        *,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
    ) -> UsageReport:
        """usage reports a key's window, month and per-endpoint totals in [start, end).

        Without `key_id` it reports on the key that authenticated the call. Any key may read
        its own usage; other keys need the rights to manage keys.
        """
        if key_id is None:
            if principal.key_id is None:
                raise invalid_field("api_key_id", "name the key (the caller did not authenticate with one)")
            key_id = principal.key_id
        if key_id != principal.key_id:
            self.require_manager(principal)
        now = self._now()
        month = month_start(now)
        range_start = start if start is not None else month
        range_end = end if end is not None else now
        if range_start >= range_end:
            raise invalid_field("start_time", "must be before end_time")
        window = minute_start(now)
        async with self._store.transaction(principal) as conn:
            record = await self._store.get(conn, key_id)
            count = await self._store.window_count(conn, key_id, window)
            endpoints = await self._store.endpoint_totals(conn, key_id, range_start, range_end)
        return UsageReport(
            key_id=key_id,
            window_start=window,
            window_count=count,
            window_remaining=max(0, record.rate_limit - count),
            rate_limit=record.rate_limit,
            month_start=month,
            month_usage=record.month_usage(now),
            monthly_quota=record.monthly_quota,
            start=range_start,
            end=range_end,
            endpoints=endpoints,
        )

    async def validate(
        self, secret: str, *, required_permission: str | None = None, meter: bool = False, endpoint: str = ""
    ) -> ValidatedKey:
        """validate checks a presented secret exactly as Check does and returns its principal.

        Failures: UNAUTHENTICATED (malformed, bad checksum, unknown, revoked, rotated out,
        expired), PERMISSION_DENIED (permission missing), RESOURCE_EXHAUSTED (from the meter).
        """
        parsed = parse_key(secret)
        async with self._store.transaction(Identity.service()) as conn:
            record = await self._store.find_by_hash(conn, parsed.key_hash)
            if record is None:
                raise Unauthenticated("the API key is not known", reason="UNKNOWN_API_KEY")
            now = self._now()
            window = minute_start(now)
            count = await self._store.window_count(conn, record.id, window)
        check_usable(record, now)
        principal = Identity.api_key(record.user_id, record.id, record.permissions)
        if required_permission:
            principal.require(required_permission)
        if meter:
            if self._meter is None:
                raise Unimplemented("metering in ValidateApiKey (no request meter is configured)")
            admission = await self._meter.admit(record, endpoint)
            return ValidatedKey(record, principal, admission.window_remaining, admission.window_reset)
        remaining = max(0, record.rate_limit - count)
        return ValidatedKey(record, principal, remaining, window + dt.timedelta(minutes=1))

    async def ensure_user(self, user_id: uuid.UUID) -> bool:
        """ensure_user creates `user_id` in auth.users when missing (dev and tests only)."""
        return await self._store.ensure_user(user_id)
