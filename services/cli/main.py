"""The `kotadb` console command.

Each command group lives in its own module under `services.cli` and exposes
`register(subparsers)`, which adds its sub-commands and sets `func` on each parser to a
callable taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Order is the order `kotadb --help` lists them in.
COMMAND_MODULES: tuple[str, ...] = (
    "dev",
    "status",
    "serve",
    "migrate",
    "gateway",
    "index",
    "bench",
    "keys",
)


def build_parser() -> argparse.ArgumentParser:
    """build_parser assembles the top-level parser from every command module."""
    parser = argparse.ArgumentParser(prog="kotadb", description="KotaDB code search: services and tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"services.cli.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """main parses argv and runs the chosen command, returning its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
