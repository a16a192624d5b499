"""Placeholder for the `kotadb dev` command group; its owner replaces this module."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """register adds `kotadb dev`, which is not built yet."""
    parser: argparse.ArgumentParser = subparsers.add_parser("dev", help="(not built yet)")
    parser.set_defaults(func=_missing)


def _missing(args: argparse.Namespace) -> int:
    print("kotadb dev: not built yet", flush=True)
    return 2
