"""`kotadb keys create|list|revoke|rotate`: operators manage API keys as the service role.

The commands talk to Postgres directly and go through the same `KeyManager` as the AuthService
RPCs, so validation, idempotency and rotation rules are identical; they act as the service role,
which may manage any tenant's keys. The database is `--database-url`, else `KOTADB_DATABASE_URL`,
else the running `kotadb dev` stack's (from its stack.json in `--data-dir`, by default the dev
stack's default data dir), so the commands work as written next to `make dev`.

`kotadb keys create` prints the secret once, with the key id. Without `--user` the key belongs
to the dev stack's demo user (deploy/supabase/seed.sql); a `--user` with no `auth.users` row gets
one — for development and tests only: on Supabase, users come from its auth service.

`create_key` is the same operation for Python callers (the dev stack's demo key).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from services.auth.config import AuthSettings
from services.auth.management import IssuedKey, KeyManager, KeySpec
from services.auth.store import ApiKeyRecord, AuthStore
from services.cli.status import default_data_dir
from services.common.db import create_pool, translate_error
from services.common.errors import InvalidArgument, KotaError
from services.common.identity import PERMISSIONS, Identity
from services.common.settings import SettingsError, env_settings
from services.common.stack import STACK_FILE, StackInfo

DEMO_USER_ID = uuid.UUID("00000000-0000-4000-8000-00000000d3e0")
_RELATIVE = re.compile(r"^\+?(\d+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

T = TypeVar("T")


async def create_key(
    database_url: str,
    *,
    name: str,
    permissions: frozenset[str],
    rate_limit: int = 0,
    monthly_quota: int = 0,
    user_id: uuid.UUID = DEMO_USER_ID,
    expires_at: dt.datetime | None = None,
    environment: str = "live",
    request_id: str | None = None,
    settings: AuthSettings | None = None,
) -> IssuedKey:
    """create_key creates a key for `user_id` as the service role (creating the user if missing).

    A `request_id` makes it idempotent: a repeat returns the first key with an empty secret.
    """
    spec = KeySpec(
        name=name,
        permissions=permissions,
        rate_limit=rate_limit,
        monthly_quota=monthly_quota,
        expires_at=expires_at,
        environment=environment,
    )

    async def run(manager: KeyManager) -> IssuedKey:
        await manager.ensure_user(user_id)
        return await manager.create(Identity.service(), spec, user_id=user_id, request_id=request_id)

    return await _with_manager(database_url, settings, run)


async def _with_manager(
    database_url: str, settings: AuthSettings | None, run: Callable[[KeyManager], Awaitable[T]]
) -> T:
    policy = settings if settings is not None else env_settings(AuthSettings)
    try:
        pool = await create_pool(database_url, min_size=1, max_size=2, statement_cache_size=0)
    except (asyncpg.PostgresError, OSError) as exc:
        translated = translate_error(exc)
        raise translated if translated is not None else exc from exc
    try:
        return await run(KeyManager(AuthStore(pool), policy))
    finally:
        await pool.close()


def register(subparsers: Any) -> None:
    """register adds `kotadb keys` and its create, list, revoke and rotate sub-commands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "keys", help="manage API keys as the service role (KOTADB_DATABASE_URL or the dev stack's database)"
    )
    commands = parser.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    commands.required = True

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--database-url",
            default=None,
            help="PostgreSQL URL (default: KOTADB_DATABASE_URL, else the running dev stack's database)",
        )
        sub.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="the dev stack whose database to use when no URL is given (default: kotadb dev's)",
        )
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")

    create = commands.add_parser("create", help="create a key and print its secret (shown once)")
    create.add_argument("--name", required=True, help="a label for the key")
    create.add_argument(
        "--permissions", default="read", help="comma-separated subset of read,write,admin (default: read)"
    )
    create.add_argument(
        "--rate-limit", type=int, default=0, help="requests per minute (default: server default)"
    )
    create.add_argument(
        "--monthly-quota", type=int, default=0, help="requests per calendar month (default: server default)"
    )
    create.add_argument(
        "--expires-at", default=None, help="ISO 8601 time (UTC if no offset) or a relative +30d / 12h / 90m"
    )
    create.add_argument(
        "--user", type=uuid.UUID, default=None, help="owner's user id (default: the demo user)"
    )
    create.add_argument(
        "--env", choices=("live", "test"), default="live", help="secret prefix kdb_live_ or kdb_test_"
    )
    create.add_argument("--request-id", default=None, help="idempotency key: a repeat returns the first key")
    common(create)
    create.set_defaults(func=_create_command)

    listing = commands.add_parser("list", help="list keys, newest first (never secrets)")
    listing.add_argument("--user", type=uuid.UUID, default=None, help="only this user's keys (default: all)")
    listing.add_argument("--all", action="store_true", help="include revoked, expired and rotated-out keys")
    listing.add_argument("--limit", type=int, default=100, help="most keys to print (default 100, max 1000)")
    common(listing)
    listing.set_defaults(func=_list_command)

    revoke = commands.add_parser("revoke", help="revoke a key on every auth replica")
    revoke.add_argument("key_id", type=uuid.UUID, help="the key's id")
    common(revoke)
    revoke.set_defaults(func=_revoke_command)

    rotate = commands.add_parser("rotate", help="issue a new secret; the old one works for a grace period")
    rotate.add_argument("key_id", type=uuid.UUID, help="the key's id")
    rotate.add_argument(
        "--grace",
        type=float,
        default=None,
        help="seconds the old secret keeps working (default: the server's)",
    )
    common(rotate)
    rotate.set_defaults(func=_rotate_command)


def parse_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """parse_time reads an ISO 8601 time (UTC when it has no offset) or a relative `+30d`/`12h`."""
    relative = _RELATIVE.match(text.strip())
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return (now or dt.datetime.now(dt.UTC)) + dt.timedelta(seconds=amount * _UNIT_SECONDS[unit])
    parsed = dt.datetime.fromisoformat(text.strip())
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def record_to_json(record: ApiKeyRecord, now: dt.datetime) -> dict[str, Any]:
    """record_to_json renders a key for `--json` output: everything but secret and hash."""

    def stamp(value: dt.datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": str(record.id),
        "user_id": str(record.user_id),
        "name": record.name,
        "prefix": record.prefix,
        "permissions": [p for p in PERMISSIONS if p in record.permissions],
        "rate_limit": record.rate_limit,
        "monthly_quota": record.monthly_quota,
        "usage_count": record.month_usage(now),
        "state": record.state(now),
        "last_used_at": stamp(record.last_used_at),
        "expires_at": stamp(record.expires_at),
        "revoked_at": stamp(record.revoke_time(now)),
        "grace_until": stamp(record.grace_until),
        "rotated_from": str(record.rotated_from) if record.rotated_from else None,
        "rotated_to": str(record.rotated_to) if record.rotated_to else None,
        "created_at": stamp(record.created_at),
    }


def _database_url(args: argparse.Namespace) -> tuple[str, AuthSettings]:
    """_database_url picks the database: --database-url, KOTADB_DATABASE_URL, the dev stack's."""
    settings = env_settings(AuthSettings)
    url = args.database_url or settings.database_url or _dev_stack_database(args.data_dir)
    return url, settings


def _dev_stack_database(data_dir: Path | None) -> str:
    """_dev_stack_database is the database URL in the running dev stack's stack.json."""
    path = (data_dir or default_data_dir()) / STACK_FILE
    try:
        return StackInfo.load(path).database_url
    except FileNotFoundError:
        raise InvalidArgument(
            "no database: pass --database-url, set KOTADB_DATABASE_URL, or start `kotadb dev`"
            f" ({path} does not exist)",
            reason="NO_DATABASE_URL",
        ) from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read {path}: {exc}", reason="NO_DATABASE_URL") from None


def _run(args: argparse.Namespace, action: Callable[[str, AuthSettings], Coroutine[Any, Any, int]]) -> int:
    """_run executes one sub-command, printing domain errors as one line plus field problems."""
    try:
        url, settings = _database_url(args)
        return asyncio.run(action(url, settings))
    except KotaError as exc:
        _print_error(args, exc)
        return 1
    except SettingsError as exc:
        _print_error(args, InvalidArgument(str(exc), reason="BAD_SETTINGS"))
        return 2
    except asyncpg.PostgresError as exc:
        # Schema problems (migrations not applied) land here: say what the database said.
        _print_error(args, InvalidArgument(f"database error: {exc}", reason="DATABASE_ERROR"))
        return 1


def _print_error(args: argparse.Namespace, exc: KotaError) -> None:
    violations = [dataclasses.asdict(v) for v in getattr(exc, "field_violations", ())]
    if getattr(args, "json", False):
        print(json.dumps({"error": exc.message, "reason": exc.reason, "field_violations": violations}))
        return
    print(f"kotadb keys: {exc.message} ({exc.reason})", file=sys.stderr)


def _create_command(args: argparse.Namespace) -> int:
    names = frozenset(part.strip() for part in args.permissions.split(",") if part.strip())

    async def action(url: str, settings: AuthSettings) -> int:
        try:
            expires_at = parse_time(args.expires_at) if args.expires_at else None
        except ValueError:
            raise InvalidArgument(
                "--expires-at: not an ISO 8601 time or a relative +30d/12h/90m", reason="INVALID_ARGUMENT"
            ) from None
        issued = await create_key(
            url,
            name=args.name,
            permissions=names,
            rate_limit=args.rate_limit,
            monthly_quota=args.monthly_quota,
            user_id=args.user or DEMO_USER_ID,
            expires_at=expires_at,
            environment=args.env,
            request_id=args.request_id,
            settings=settings,
        )
        now = dt.datetime.now(dt.UTC)
        if args.json:
            print(json.dumps({"secret": issued.secret, **record_to_json(issued.record, now)}, indent=2))
        elif issued.secret:
            print(f"secret: {issued.secret}")
            print(f"id:     {issued.record.id}")
            print("The secret is shown once; store it now.", file=sys.stderr)
        else:
            print(f"id:     {issued.record.id}")
            print(
                "This request id was used before; the secret was shown then and cannot be shown again.",
                file=sys.stderr,
            )
        return 0

    return _run(args, action)


def _list_command(args: argparse.Namespace) -> int:
    async def action(url: str, settings: AuthSettings) -> int:
        async def run(manager: KeyManager) -> list[ApiKeyRecord]:
            records, _ = await manager.list(
                Identity.service(), page_size=args.limit, include_inactive=args.all, user_id=args.user
            )
            return records

        records = await _with_manager(url, settings, run)
        now = dt.datetime.now(dt.UTC)
        if args.json:
            print(json.dumps([record_to_json(record, now) for record in records], indent=2))
            return 0
        for record in records:
            permissions = ",".join(p for p in PERMISSIONS if p in record.permissions)
            print(
                f"{record.id}  {record.prefix}…  {record.state(now):<8}  {permissions:<16}  "
                f"{record.rate_limit}/min  {record.month_usage(now)}/{record.monthly_quota}  "
                f"user={record.user_id}  {record.name}"
            )
        return 0

    return _run(args, action)


def _revoke_command(args: argparse.Namespace) -> int:
    async def action(url: str, settings: AuthSettings) -> int:
        record = await _with_manager(
            url, settings, lambda manager: manager.revoke(Identity.service(), args.key_id)
        )
        now = dt.datetime.now(dt.UTC)
        if args.json:
            print(json.dumps(record_to_json(record, now), indent=2))
        else:
            print(f"revoked {record.id} ({record.prefix}…, {record.name})")
        return 0

    return _run(args, action)


def _rotate_command(args: argparse.Namespace) -> int:
    async def action(url: str, settings: AuthSettings) -> int:
        grace = dt.timedelta(seconds=args.grace) if args.grace is not None else None
        issued = await _with_manager(
            url, settings, lambda manager: manager.rotate(Identity.service(), args.key_id, grace=grace)
        )
        now = dt.datetime.now(dt.UTC)
        previous = issued.previous
        if args.json:
            body = {"secret": issued.secret, **record_to_json(issued.record, now)}
            body["previous"] = record_to_json(previous, now) if previous else None
            print(json.dumps(body, indent=2))
            return 0
        print(f"secret: {issued.secret}")
        print(f"id:     {issued.record.id}")
        if previous is not None and previous.grace_until is not None:
            print(
                f"the old key {previous.id} works until {previous.grace_until.isoformat()}", file=sys.stderr
            )
        print("The secret is shown once; store it now.", file=sys.stderr)
        return 0

    return _run(args, action)
