"""Placeholder for the `kotadb gateway` command group; its owner replaces this module."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """register adds `kotadb gateway`, which is not built yet."""
    parser: argparse.ArgumentParser = subparsers.add_parser("gateway", help="(not built yet)")
    parser.set_defaults(func=_missing)


def _missing(args: argparse.Namespace) -> int:
    print("kotadb gateway: not built yet", flush=True)
    return 2
