"""Placeholder for the `kotadb migrate` command group; its owner replaces this module."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """register adds `kotadb migrate`, which is not built yet."""
    parser: argparse.ArgumentParser = subparsers.add_parser("migrate", help="(not built yet)")
    parser.set_defaults(func=_missing)


def _missing(args: argparse.Namespace) -> int:
    print("kotadb migrate: not built yet", flush=True)
    return 2
