"""Runs the auth service: `python -m services.auth [--host H] [--port N] [--port-file PATH]`."""

import sys

from services.cli.serve import main

sys.exit(main(["auth", *sys.argv[1:]]))
