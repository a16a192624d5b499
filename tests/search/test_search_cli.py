"""`kotadb search` through the real gateway prints what ripgrep prints over the same files.

Auth, ingest and search run as `kotadb serve` processes with Envoy in front
(tests/gatewayhttp.py); one tenant writes tests/ripgrep.py's tree through the REST route, and
`kotadb search` (a gRPC client of the gateway) is run as a user runs it, for one page and for
the stream (`--all`), plain, with context and with `--json`. ripgrep runs over a copy of the
tree on disk, over the files the command printed in its order; the outputs must be the same
bytes but for elapsed times and the counts of work (files and bytes searched) that the
service and ripgrep do differently.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import ripgrep
from tests.gatewayhttp import GatewayStack, http_json, two_tenants

IDENTITY_KEY = "search-cli-tests-identity-key-0123456789abcd"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Tree:
    """Tree is the gateway, the tree's copy on disk and the revision that wrote it."""

    stack: GatewayStack
    root: Path
    revision: int

    def kotadb(self, *args: str, key: str | None = None) -> subprocess.CompletedProcess[bytes]:
        """kotadb runs one `kotadb` command against the gateway as alice (or `key`), output as bytes."""
        env = dict(os.environ, KOTADB_URL=self.stack.envoy.url, KOTADB_API_KEY=key or self.stack.alice)
        env["KOTADB_DEV_DATA_DIR"] = str(self.stack.workdir / "no-dev-stack")
        env.pop("KOTADB_DATABASE_URL", None)
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            capture_output=True,
            env=env,
            cwd=REPO,
            check=False,
            timeout=300,
        )


@pytest.fixture(scope="module")
def tree(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    workdir = tmp_path_factory.mktemp("search-cli")
    env = {"KOTADB_INGEST_SYMBOL_WORKERS": "1", "KOTADB_SEARCH_LISTEN_URL": database_url}
    with two_tenants(database_url, workdir, IDENTITY_KEY, "search-cli", **env) as stack:
        root = ripgrep.write_tree(workdir / "tree")
        body = {"documents": [{"path": p, "text": t} for p, t in sorted(ripgrep.TREE.items())]}
        code, answer = http_json("POST", f"{stack.envoy.url}/v1/documents:batchUpsert", stack.alice, body)
        assert code == 200, answer
        yield Tree(stack, root, int(answer["revision"]))


FLAGS = [[], ["--context", "2"], ["--json"], ["--json", "--context", "2"]]


@pytest.mark.parametrize("flags", FLAGS, ids=["plain", "context", "json", "json-context"])
@pytest.mark.parametrize("mode", ["page", "all"])
def test_kotadb_search_prints_ripgrep_s_bytes(tree: Tree, flags: list[str], mode: str) -> None:
    extra = ["--all"] if mode == "all" else []
    proc = tree.kotadb(
        "search", ripgrep.PATTERN, "--regex", "--color", "never", "--min-revision", str(tree.revision),
        *extra, *flags,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    as_json = "--json" in flags
    paths = ripgrep.printed_paths(proc.stdout, as_json)
    assert set(paths) == ripgrep.matching_paths(tree.root) and len(paths) == len(set(paths))
    expected = ripgrep.ripgrep(tree.root, flags, paths)
    # The service does not send file sizes (ripgrep's per-file bytes_searched).
    ours = ripgrep.comparable(proc.stdout, sizes_known=False)
    assert ours == ripgrep.comparable(expected, sizes_known=False)
    if as_json:
        types = ripgrep.record_types(proc.stdout)
        assert types[0] == "begin" and types[-1] == "summary" and types.count("begin") == len(paths)


def test_kotadb_search_highlights_for_a_terminal_and_finds_nothing_of_another_tenant(tree: Tree) -> None:
    found = tree.kotadb("search", "Parsing", "--regex", "--color", "always", "--context", "1")
    assert found.returncode == 0, found.stderr
    assert (
        b"\x1b[35msrc/cafe.py\x1b[0m:\x1b[32m3\x1b[0m:\treturn 'na\xc3\xafve \x1b[1;31mParsing\x1b[0m'"
        in (found.stdout)
    )
    assert b"\x1b[35msrc/cafe.py\x1b[0m-\x1b[32m2\x1b[0m-def caf\xc3\xa9_Parser():\n" in found.stdout
    nothing = tree.kotadb("search", ripgrep.PATTERN, "--regex", "--json", key=tree.stack.bob)
    assert nothing.returncode == 1, nothing.stderr
    assert ripgrep.record_types(nothing.stdout) == ["summary"]
