"""The `kotadb` console command.

Each command group lives in its own module under `services.cli` and exposes
`register(subparsers)`, which adds its sub-commands and sets `func` on each parser to a
callable taking the parsed namespace and returning an exit code. A module may also expose
`register_for(subparsers, words)`, which adds only what the words after the group's name
need (`kotadb index search …` builds the `search` parser alone).

Only the chosen command's module is imported: `kotadb --help` lists the groups from `COMMANDS`
without importing any of them, and `kotadb index search …` never imports the dev stack, key
management or the benchmarks. Importing every module cost 0.6 s before the first byte of output
(the engine's numpy, asyncpg, grpc, the auth service); the help table costs nothing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

# Command group → (module under services.cli, one-line help), in the order `kotadb --help` lists
# them. Each module's own `register` repeats the line as the parser's help
# (tests/foundation/test_cli_main.py keeps them equal).
COMMANDS: dict[str, tuple[str, str]] = {
    "dev": ("dev", "run Postgres, the three services and Envoy locally until Ctrl-C"),
    "status": ("status", "health of each component of the running `kotadb dev` stack"),
    "serve": ("serve", "run one gRPC service (auth, ingest or search) in the foreground"),
    "migrate": ("migrate", "apply the Supabase compat bootstrap and pending migrations"),
    "gateway": ("gateway", "render and validate the Envoy gateway configuration"),
    "index": ("index", "build, inspect and search an offline index"),
    "bench": ("bench", "benchmarks against peer tools"),
    "keys": ("keys", "manage API keys as the service role (KOTADB_DATABASE_URL or the dev stack's database)"),
    "push": ("push", "send a directory's changed text files to KotaDB"),
    "repos": ("repos", "register, list, sync and remove repositories"),
    "jobs": ("repos", "list indexing jobs and watch their progress"),
    "search": ("search", "search the code stored in KotaDB (through the gateway)"),
    "symbols": ("search", "search symbol definitions stored in KotaDB (through the gateway)"),
    "mcp": ("mcp", "MCP server for coding agents: stdio, or Streamable HTTP behind the gateway"),
}


class Parser(argparse.ArgumentParser):
    """Parser is an ArgumentParser whose help formatter finds the terminal width without `shutil`.

    argparse makes a formatter for every argument it adds (to check its metavar) and each one
    asks `shutil.get_terminal_size()`: importing `shutil` (with bz2 and lzma) was ~3 ms of every
    `kotadb` command. Sub-command parsers are Parsers too (argparse makes them of the parent's
    class).
    """

    def _get_formatter(self) -> argparse.HelpFormatter:
        # Every HelpFormatter takes `width`; typeshed's protocol for formatter_class names only `prog`.
        return self.formatter_class(prog=self.prog, width=help_width())  # type: ignore[call-arg]


def help_width() -> int:
    """help_width is the width argparse would wrap help to: as shutil.get_terminal_size, minus 2.

    COLUMNS when set and positive, else the width of the terminal on stdout, else 80.
    """
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


def chosen_command(argv: Sequence[str]) -> str | None:
    """chosen_command returns the command group named by `argv`'s first positional word, if known."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


# Groups whose process talks gRPC and also starts child processes (the dev stack, benchmarks).
_FORK_SENSITIVE = frozenset({"dev", "bench", "serve"})


def build_parser(chosen: str | None = None, rest: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """build_parser assembles the top-level parser, importing only the `chosen` group's module.

    With `chosen=None` every group's module is imported (documentation and tests use that).
    `rest`, the words after a `chosen` that is the first word, narrows the group to what they
    name (its module's `register_for`) and leaves out the other groups' one-line parsers: with
    no top-level option before the group, only the group's own parser prints help or errors.
    Each parser left out saves its help strings' gettext look-ups.
    """
    if chosen is None or chosen in _FORK_SENSITIVE:
        # Before gRPC is first imported (services/common/forksafety.py): these processes use
        # gRPC and start children, and as root `EmbeddedPostgres` runs pg_ctl through fork().
        importlib.import_module("services.common.forksafety")
    parser = Parser(prog="kotadb", description="KotaDB code search: services and tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    modules = [module for name, (module, _) in COMMANDS.items() if chosen is None or name == chosen]
    for name in dict.fromkeys(modules):  # one module may register several groups
        module = importlib.import_module(f"services.cli.{name}")
        narrow = getattr(module, "register_for", None)
        if rest is not None and narrow is not None:
            narrow(subparsers, rest)
        else:
            module.register(subparsers)
    if rest is None:
        for name, (_, help_text) in COMMANDS.items():
            if name not in subparsers.choices:
                subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """main parses argv and runs the chosen command, returning its exit code."""
    code, _ = _dispatch(argv)
    return code


def run() -> NoReturn:
    """run is the `kotadb` console command (and `python -m services.cli`): main, then exit.

    A command whose parser sets `quick_exit` (`kotadb index search`, which starts no thread,
    child or atexit hook that outlives it) ends the process with `os._exit` once stdout and
    stderr are flushed: the interpreter's teardown, freeing every module and the index's
    tables, was ~7 ms of CPU of every search, with nothing left to clean up.
    """
    code, quick = _dispatch(None)
    if quick:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # the reader went away (a broken pipe): nothing more can be written
            pass
        os._exit(code)
    sys.exit(code)


def _dispatch(argv: Sequence[str] | None) -> tuple[int, bool]:
    """_dispatch runs the command `argv` names; it returns the exit code and the command's quick_exit."""
    words = list(sys.argv[1:] if argv is None else argv)
    chosen = chosen_command(words)
    # An unknown or missing command still needs a parser that lists the groups: import none.
    if chosen is None:
        parser = build_parser("")
    elif words[0] == chosen:
        parser = build_parser(chosen, words[1:])
    else:  # a top-level option comes first (`kotadb --help index`): the whole table
        parser = build_parser(chosen)
    args = parser.parse_args(words)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130, False
    return code, bool(getattr(args, "quick_exit", False))


if __name__ == "__main__":
    run()
