"""Placeholder for the `kotadb keys` command group; the auth work replaces this module."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """register adds `kotadb keys`, which is not built yet."""
    parser: argparse.ArgumentParser = subparsers.add_parser("keys", help="(not built yet)")
    parser.set_defaults(func=_missing)


def _missing(args: argparse.Namespace) -> int:
    print("kotadb keys: not built yet", flush=True)
    return 2
