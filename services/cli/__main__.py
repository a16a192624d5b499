"""Allows `python -m services.cli`."""

from services.cli.main import run

run()
