"""Placeholder for the `kotadb index` command group; its owner replaces this module."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """register adds `kotadb index`, which is not built yet."""
    parser: argparse.ArgumentParser = subparsers.add_parser("index", help="(not built yet)")
    parser.set_defaults(func=_missing)


def _missing(args: argparse.Namespace) -> int:
    print("kotadb index: not built yet", flush=True)
    return 2
