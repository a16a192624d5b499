"""Runs the search service: `python -m services.search [--host H] [--port N] [--port-file PATH]`."""

import sys

from services.cli.serve import main

sys.exit(main(["search", *sys.argv[1:]]))
