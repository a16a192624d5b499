"""Runs the ingest service: `python -m services.ingest [--host H] [--port N] [--port-file PATH]`."""

import sys

from services.cli.serve import main

sys.exit(main(["ingest", *sys.argv[1:]]))
