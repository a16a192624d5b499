"""The `kotadb` entry point: lazy command groups whose help lines match their modules."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import main as cli_main


def _registered_help(module: str, name: str) -> str:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    __import__(f"services.cli.{module}", fromlist=["register"]).register(subparsers)
    # argparse keeps each sub-command's help on the choices actions of the subparsers object.
    (action,) = [a for a in subparsers._choices_actions if a.dest == name]
    return str(action.help)


@pytest.mark.parametrize("name", list(cli_main.COMMANDS))
def test_help_table_matches_each_module(name: str) -> None:
    module, help_text = cli_main.COMMANDS[name]
    assert help_text == _registered_help(module, name)


# Runs `kotadb ARGS` in a fresh interpreter and prints which command modules and heavy libraries
# it imported.
_PROBE = """
import sys
from pathlib import Path
from services.cli import main
try:
    main.main(sys.argv[1:])
except SystemExit:
    pass
cli = sorted(m for m in sys.modules if m.startswith("services.cli.") and m != "services.cli.main")
heavy = sorted(m for m in ("numpy", "asyncpg", "grpc") if m in sys.modules)
print("LOADED", cli, heavy)
"""


def _loaded(*args: str) -> str:
    run = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True)
    return run.stdout


def test_help_imports_no_command_module() -> None:
    out = _loaded("--help")
    assert "LOADED [] []" in out
    for name in cli_main.COMMANDS:
        assert name in out


def test_chosen_command_imports_only_its_module() -> None:
    assert "LOADED ['services.cli.migrate']" in _loaded("migrate", "--help")


def test_index_commands_load_no_grpc() -> None:
    # `kotadb index` also registers `index status` (a gateway client): its flags must not pull
    # gRPC, protobuf or the dev stack into every local `kotadb index search`.
    out = _loaded("index", "search", "--help")
    assert "'services.cli.index'" in out
    assert out.rstrip().endswith("[]"), out


def test_push_loads_no_database_driver_and_no_numpy() -> None:
    # `kotadb push` checks paths with the service's rule (services/ingest/paths.py), not through
    # the module that writes documents (asyncpg, the symbol extractor, numpy: ~0.1 s per push).
    out = _loaded("push", "--help")
    assert "'services.cli.push'" in out
    assert out.rstrip().endswith("['grpc']"), out


def test_a_sub_command_builds_only_its_own_parser() -> None:
    # `kotadb index search` builds neither the other groups nor `index status` (whose flags
    # import the gateway client); `kotadb index --help` still lists every sub-command.
    assert "LOADED ['services.cli.index'] []" in _loaded("index", "search", "--help")
    listing = _loaded("index", "--help")
    for sub in ("build", "stats", "search", "symbols", "status"):
        assert sub in listing
    probe = [sys.executable, "-c", _PROBE, "index", "serch"]
    misspelt = subprocess.run(probe, capture_output=True, text=True, check=False)
    assert "choose from 'build', 'stats', 'search', 'symbols', 'status'" in misspelt.stderr


@pytest.mark.parametrize("columns", ["50", "not a number", "0", None])
def test_help_width_is_what_argparse_would_use(monkeypatch: pytest.MonkeyPatch, columns: str | None) -> None:
    # The CLI's parsers skip importing shutil, but must wrap help exactly as argparse does.
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert cli_main.help_width() == shutil.get_terminal_size().columns - 2


def test_unknown_command_is_an_error() -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["no-such-command"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "command",
    [
        ["search", "{idx}", "needle"],  # the ranked first page
        ["search", "{idx}", "needle", "--json"],
        ["search", "{idx}", "needle", "--all"],
        ["search", "{idx}", "needle", "--count"],
        ["symbols", "{idx}", "Needle"],
    ],
    ids=["page", "json", "all", "count", "symbols"],
)
def test_searches_from_the_cli_load_no_numpy(tmp_path: Path, command: list[str]) -> None:
    # numpy's import was ~50 ms of a ~100 ms ranked search from a fresh process; ranking,
    # candidate order and definition checks are native instead (rank.py, candidates.py).
    from services.search.engine.index.index import Index
    from services.search.engine.index.writer import IndexWriter
    from services.search.engine.model import SourceDocument, Symbol

    source = b"class Needle:\n    needle = 1\n"
    with IndexWriter(Index.create(tmp_path / "idx")) as writer:
        writer.add(
            SourceDocument("a", "a.py", source, symbols=(Symbol("Needle", "class", "Needle", 1, 2, 6, 12),))
        )
        writer.add(SourceDocument("b", "tests/b.txt", b"needle\n"))
        writer.commit()
    out = _loaded("index", *(part.format(idx=tmp_path / "idx") for part in command))
    assert "a.py" in out or "matching symbol" in out or "2 files" in out, out
    assert out.rstrip().endswith("[]"), out
