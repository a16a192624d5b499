"""`kotadb serve auth|ingest|search`: run one service in the foreground (what a container runs).

Settings come from the environment (see services/common/settings.py); `--host` and `--port`
override the service's `KOTADB_<SERVICE>_HOST`/`_PORT`. The bound port is logged as JSON
(`"msg": "listening"`) and, with `--port-file`, written to a file for supervisors that passed
port 0. SIGTERM or SIGINT drains in-flight calls within `KOTADB_<SERVICE>_SHUTDOWN_GRACE`
seconds and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Imported before anything imports grpc: it sets gRPC's fork switch (see the module).
from services.common import forksafety
from services.common.server import ServiceServer, run
from services.common.settings import ServiceSettings, SettingsError, env_settings

# Service name → (settings class path, server module); imported lazily so `kotadb --help` stays fast.
SERVICES: dict[str, tuple[str, str]] = {
    "auth": ("services.auth.config:AuthSettings", "services.auth.server"),
    "ingest": ("services.ingest.config:IngestSettings", "services.ingest.server"),
    # Indexing workers alone (services/ingest/worker.py), health only.
    "ingest-worker": ("services.ingest.config:IngestWorkerSettings", "services.ingest.workerserver"),
    "search": ("services.search.config:SearchSettings", "services.search.server"),
}


def register(subparsers: Any) -> None:
    """register adds `kotadb serve SERVICE [--host H] [--port N] [--port-file PATH]`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="run one gRPC service (auth, ingest or search) in the foreground"
    )
    _add_arguments(parser)
    parser.set_defaults(func=_run_from_args)


def main(argv: Sequence[str] | None = None) -> int:
    """main is the entry point of `python -m services.<name>`; argv starts with the service name."""
    parser = argparse.ArgumentParser(prog="kotadb serve")
    _add_arguments(parser)
    return _run_from_args(parser.parse_args(argv))


def load_settings(service: str, *, host: str | None = None, port: int | None = None) -> ServiceSettings:
    """load_settings reads `service`'s settings from the environment and applies the overrides."""
    settings_path, _ = SERVICES[service]
    module_name, class_name = settings_path.split(":")
    settings_class: type[ServiceSettings] = getattr(importlib.import_module(module_name), class_name)
    settings = env_settings(settings_class)
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
        # Port 0 means free ports for every listener of the process (the auth service's Check
        # listener, the metrics listener), unless that listener's port is configured explicitly.
        for field in ("check_port", "metrics_port"):
            variable = f"{settings_class.env_prefix}{field.upper()}"
            if port == 0 and hasattr(settings, field) and variable not in os.environ:
                overrides[field] = 0
    return dataclasses.replace(settings, **overrides) if overrides else settings


def build_server(service: str, settings: ServiceSettings) -> ServiceServer:
    """build_server assembles `service`'s server from `settings` without starting it."""
    _, server_module = SERVICES[service]
    build: Callable[[Any], ServiceServer] = importlib.import_module(server_module).build
    return build(settings)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("service", choices=sorted(SERVICES), help="which service to run")
    parser.add_argument("--host", help="bind address (default: KOTADB_<SERVICE>_HOST)")
    parser.add_argument(
        "--port",
        type=int,
        help="port; 0 picks a free one, for the Check and metrics listeners too"
        " (default: KOTADB_<SERVICE>_PORT)",
    )
    parser.add_argument("--port-file", type=Path, help="write the bound port to this file once listening")


def _run_from_args(args: argparse.Namespace) -> int:
    if args.port is not None and not 0 <= args.port <= 65535:
        print(f"kotadb serve: --port must be between 0 and 65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.service, host=args.host, port=args.port)
    except SettingsError as exc:
        print(f"kotadb serve {args.service}: {exc}", file=sys.stderr)
        return 2
    if not settings.database_url:
        print(f"kotadb serve {args.service}: KOTADB_DATABASE_URL is not set", file=sys.stderr)
        return 2
    forksafety.guard_forks(args.service)
    return run(build_server(args.service, settings), port_file=args.port_file)
