"""Placeholder for the `kotadb serve` command group; its owner replaces this module."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """register adds `kotadb serve`, which is not built yet."""
    parser: argparse.ArgumentParser = subparsers.add_parser("serve", help="(not built yet)")
    parser.set_defaults(func=_missing)


def _missing(args: argparse.Namespace) -> int:
    print("kotadb serve: not built yet", flush=True)
    return 2
