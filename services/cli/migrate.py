"""The `kotadb migrate` command: bootstrap, migrate and optionally seed a database.

    kotadb migrate [--database-url URL] [--seed] [--bootstrap | --no-bootstrap] [--migrations-dir DIR]

The database defaults to KOTADB_DATABASE_URL. The Supabase compatibility bootstrap runs first
unless `--no-bootstrap` is given (it only creates what is missing, so it is safe on Supabase);
then pending migrations are applied in order, and with `--seed` the demo data is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from services.common import migrate


def register(subparsers: Any) -> None:
    """register adds `kotadb migrate` to the command line."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "migrate",
        help="apply the Supabase compat bootstrap and pending migrations",
        description="Apply the Supabase compatibility bootstrap and pending migrations, in order.",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("KOTADB_DATABASE_URL", ""),
        help="PostgreSQL DSN (default: $KOTADB_DATABASE_URL)",
    )
    parser.add_argument(
        "--bootstrap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run deploy/supabase/bootstrap.sql first (default: yes; a no-op on Supabase)",
    )
    parser.add_argument("--seed", action="store_true", help="load deploy/supabase/seed.sql (demo data)")
    parser.add_argument(
        "--migrations-dir",
        type=Path,
        default=migrate.MIGRATIONS_DIR,
        help="directory of <YYYYMMDDHHMMSS>_<name>.sql files (default: deploy/supabase/migrations)",
    )
    parser.set_defaults(func=run)


def redact(url: str) -> str:
    """redact hides the password of a DSN for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def run(args: argparse.Namespace) -> int:
    """run executes `kotadb migrate` and returns its exit code."""
    url: str = args.database_url
    if not url:
        print("kotadb migrate: no database: pass --database-url or set KOTADB_DATABASE_URL", file=sys.stderr)
        return 2
    print(f"database: {redact(url)}", flush=True)
    try:
        if args.bootstrap:
            migrate.apply_bootstrap(url)
            print("bootstrap: done (created only what was missing)", flush=True)
        pending = {m.version: m for m in migrate.discover_migrations(args.migrations_dir)}
        applied = migrate.apply_migrations(url, args.migrations_dir)
        for version in applied:
            print(f"applied {version}_{pending[version].name}", flush=True)
        if not applied:
            print("migrations: up to date", flush=True)
        else:
            print(f"migrations: {len(applied)} applied", flush=True)
        if args.seed:
            migrate.seed(url)
            print("seed: done", flush=True)
    except (migrate.MigrationError, asyncpg.PostgresError, OSError) as exc:
        print(f"kotadb migrate: {exc}", file=sys.stderr)
        return 1
    return 0
