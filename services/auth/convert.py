"""Conversions between auth protos and domain values, as paired `x_from_proto` / `x_to_proto` functions.

Request fields that cannot be converted (an unknown permission, an id that is not a UUID, a
timestamp out of range) become `InvalidArgument` with a field violation naming the request field
(AIP-161 path), so a bad request is refused before anything touches the database.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable

from google.protobuf import duration_pb2, timestamp_pb2
from kotadb.v1 import auth_pb2

from services.auth.management import IssuedKey, KeySpec, KeyUpdate, UsageReport, ValidatedKey
from services.auth.store import ApiKeyRecord
from services.common.errors import FieldViolation, InvalidArgument
from services.common.identity import ADMIN, READ, WRITE

Permission = auth_pb2.ApiKey.Permission

PERMISSION_TO_PROTO: dict[str, auth_pb2.ApiKey.Permission.ValueType] = {
    READ: auth_pb2.ApiKey.READ,
    WRITE: auth_pb2.ApiKey.WRITE,
    ADMIN: auth_pb2.ApiKey.ADMIN,
}
PERMISSION_FROM_PROTO: dict[auth_pb2.ApiKey.Permission.ValueType, str] = {
    value: name for name, value in PERMISSION_TO_PROTO.items()
}
STATE_TO_PROTO: dict[str, auth_pb2.ApiKey.State.ValueType] = {
    "ACTIVE": auth_pb2.ApiKey.ACTIVE,
    "ROTATING": auth_pb2.ApiKey.ROTATING,
    "REVOKED": auth_pb2.ApiKey.REVOKED,
    "EXPIRED": auth_pb2.ApiKey.EXPIRED,
}


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {description}", field_violations=[FieldViolation(field, description)])


def timestamp_to_proto(value: dt.datetime) -> timestamp_pb2.Timestamp:
    """timestamp_to_proto converts an aware datetime to a Timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def timestamp_from_proto(value: timestamp_pb2.Timestamp, field: str) -> dt.datetime:
    """timestamp_from_proto converts a Timestamp to an aware UTC datetime, refusing absurd values."""
    try:
        return value.ToDatetime(tzinfo=dt.UTC)
    except (ValueError, OverflowError):
        raise _invalid(field, "not a valid timestamp") from None


def duration_from_proto(value: duration_pb2.Duration, field: str) -> dt.timedelta:
    """duration_from_proto converts a Duration to a timedelta, refusing values out of range."""
    try:
        return value.ToTimedelta()
    except (ValueError, OverflowError):
        raise _invalid(field, "not a valid duration") from None


def uuid_from_proto(text: str, field: str) -> uuid.UUID:
    """uuid_from_proto parses an id field, raising InvalidArgument naming `field` when it is not a UUID."""
    if not text:
        raise _invalid(field, "required")
    try:
        return uuid.UUID(text)
    except ValueError:
        raise _invalid(field, "not a valid id (a UUID)") from None


def permissions_from_proto(
    values: Iterable[auth_pb2.ApiKey.Permission.ValueType], field: str
) -> frozenset[str]:
    """permissions_from_proto maps proto permissions to names; UNSPECIFIED or unknown values are invalid."""
    names: set[str] = set()
    for value in values:
        name = PERMISSION_FROM_PROTO.get(value)
        if name is None:
            raise _invalid(field, "each permission must be READ, WRITE or ADMIN")
        names.add(name)
    return frozenset(names)


def permissions_to_proto(names: Iterable[str]) -> list[auth_pb2.ApiKey.Permission.ValueType]:
    """permissions_to_proto maps permission names to proto values in read, write, admin order."""
    present = set(names)
    return [PERMISSION_TO_PROTO[name] for name in (READ, WRITE, ADMIN) if name in present]


def permission_from_proto(value: auth_pb2.ApiKey.Permission.ValueType) -> str | None:
    """permission_from_proto maps one permission; UNSPECIFIED means none (None)."""
    return PERMISSION_FROM_PROTO.get(value)


def api_key_to_proto(record: ApiKeyRecord, now: dt.datetime) -> auth_pb2.ApiKey:
    """api_key_to_proto renders a key as its owner sees it at `now`: never the secret or its hash."""
    message = auth_pb2.ApiKey(
        id=str(record.id),
        name=record.name,
        prefix=record.prefix,
        permissions=permissions_to_proto(record.permissions),
        rate_limit=record.rate_limit,
        monthly_quota=record.monthly_quota,
        usage_count=record.month_usage(now),
        state=STATE_TO_PROTO[record.state(now)],
        rotated_from_id=str(record.rotated_from) if record.rotated_from else "",
        rotated_to_id=str(record.rotated_to) if record.rotated_to else "",
        user_id=str(record.user_id),
        create_time=timestamp_to_proto(record.created_at),
        update_time=timestamp_to_proto(record.updated_at),
    )
    if record.last_used_at is not None:
        message.last_used_time.CopyFrom(timestamp_to_proto(record.last_used_at))
    if record.expires_at is not None:
        message.expire_time.CopyFrom(timestamp_to_proto(record.expires_at))
    revoked = record.revoke_time(now)
    if revoked is not None:
        message.revoke_time.CopyFrom(timestamp_to_proto(revoked))
    if record.grace_until is not None and record.state(now) == "ROTATING":
        message.grace_expire_time.CopyFrom(timestamp_to_proto(record.grace_until))
    return message


def key_spec_from_proto(request: auth_pb2.CreateApiKeyRequest) -> KeySpec:
    """key_spec_from_proto reads what a CreateApiKeyRequest asks for."""
    if not request.HasField("api_key"):
        raise _invalid("api_key", "required")
    key = request.api_key
    return KeySpec(
        name=key.name,
        permissions=permissions_from_proto(key.permissions, "api_key.permissions"),
        rate_limit=key.rate_limit,
        monthly_quota=key.monthly_quota,
        expires_at=timestamp_from_proto(key.expire_time, "api_key.expire_time")
        if key.HasField("expire_time")
        else None,
        environment=request.environment or "live",
    )


def key_update_from_proto(request: auth_pb2.UpdateApiKeyRequest) -> tuple[uuid.UUID, KeyUpdate]:
    """key_update_from_proto reads the key id and the masked fields of an UpdateApiKeyRequest."""
    if not request.HasField("api_key"):
        raise _invalid("api_key", "required")
    key = request.api_key
    key_id = uuid_from_proto(key.id, "api_key.id")
    fields = frozenset(request.update_mask.paths)
    return key_id, KeyUpdate(
        fields=fields,
        name=key.name,
        permissions=permissions_from_proto(key.permissions, "api_key.permissions")
        if "permissions" in fields
        else frozenset(),
        rate_limit=key.rate_limit,
        monthly_quota=key.monthly_quota,
        # An expire_time named in the mask but unset clears the expiry (AIP-134).
        expires_at=timestamp_from_proto(key.expire_time, "api_key.expire_time")
        if key.HasField("expire_time")
        else None,
    )


def issued_key_to_proto(issued: IssuedKey, now: dt.datetime) -> auth_pb2.CreateApiKeyResponse:
    """issued_key_to_proto renders a created key; `secret` is empty when the call was a replay."""
    return auth_pb2.CreateApiKeyResponse(api_key=api_key_to_proto(issued.record, now), secret=issued.secret)


def rotated_key_to_proto(issued: IssuedKey, now: dt.datetime) -> auth_pb2.RotateApiKeyResponse:
    """rotated_key_to_proto renders a rotation: the new key, its secret (once) and the previous key."""
    response = auth_pb2.RotateApiKeyResponse(
        api_key=api_key_to_proto(issued.record, now), secret=issued.secret
    )
    if issued.previous is not None:
        response.previous_api_key.CopyFrom(api_key_to_proto(issued.previous, now))
    return response


def usage_to_proto(report: UsageReport) -> auth_pb2.Usage:
    """usage_to_proto renders a UsageReport."""
    message = auth_pb2.Usage(
        api_key_id=str(report.key_id),
        window_start_time=timestamp_to_proto(report.window_start),
        window_count=report.window_count,
        window_remaining=report.window_remaining,
        rate_limit=report.rate_limit,
        month_start_time=timestamp_to_proto(report.month_start),
        month_usage=report.month_usage,
        monthly_quota=report.monthly_quota,
        start_time=timestamp_to_proto(report.start),
        end_time=timestamp_to_proto(report.end),
    )
    for totals in report.endpoints:
        mean = duration_pb2.Duration()
        mean.FromTimedelta(dt.timedelta(milliseconds=totals.mean_response_ms))
        message.endpoints.append(
            auth_pb2.Usage.EndpointUsage(
                endpoint=totals.endpoint,
                method=totals.method,
                request_count=totals.request_count,
                error_count=totals.error_count,
                mean_response_time=mean,
            )
        )
    return message


def validated_to_proto(validated: ValidatedKey) -> auth_pb2.ValidateApiKeyResponse:
    """validated_to_proto renders the identity a valid key carries."""
    record = validated.record
    response = auth_pb2.ValidateApiKeyResponse(
        api_key_id=str(record.id),
        user_id=str(record.user_id),
        permissions=permissions_to_proto(record.permissions),
        rate_limit=record.rate_limit,
        window_remaining=validated.window_remaining,
        window_reset_time=timestamp_to_proto(validated.window_reset),
    )
    if record.expires_at is not None:
        response.expire_time.CopyFrom(timestamp_to_proto(record.expires_at))
    return response
