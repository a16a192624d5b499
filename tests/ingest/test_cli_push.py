"""`kotadb push` end to end, through the real gateway, as a user runs it.

A tree is pushed, one file edited and pushed again (exactly one file sent: by the summary and by
the revisions in Postgres, where only that document's revision moved and one change-feed row was
added), a file deleted and pushed with `--prune` (its document becomes a tombstone in the feed).
The walk's refusals are reported with reasons and never sent; errors are one line with a
non-zero exit: a bad key is UNAUTHENTICATED, a read-only key's push PERMISSION_DENIED, and
neither writes anything.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ingest.clistack import CliStack, query, start_cli_stack, user_of_key


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliStack]:
    with start_cli_stack(database_url, tmp_path_factory.mktemp("cli-push"), "cli-push") as started:
        yield started


def _tree(root: Path) -> Path:
    files = {
        "main.py": "def main() -> int:\n    return helper()\n",
        "pkg/helper.py": "def helper() -> int:\n    return 41 + 1\n",
        "pkg/util.go": "package pkg\n\nfunc Util() int { return 1 }\n",
        "docs/readme.md": "# a tree pushed by a test\n",
        "node_modules/dep/index.js": "module.exports = 1;\n",  # a skipped directory
        "package-lock.json": "{}\n",  # generated
    }
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "link.py").symlink_to(root / "main.py")
    return root


def _summary(output: str) -> dict[str, int]:
    match = re.search(
        r"sent (\d+) files \(.*?; (\d+) new, (\d+) updated\), (\d+) unchanged, (\d+) skipped, "
        r"(\d+) rejected, (\d+) deleted",
        output,
    )
    assert match, output
    names = ("sent", "new", "updated", "unchanged", "skipped", "rejected", "deleted")
    counts = dict(zip(names, map(int, match.groups()), strict=True))
    revision = re.search(r"^revision (\d+)$", output, re.MULTILINE)
    assert revision, output
    counts["revision"] = int(revision.group(1))
    return counts


def _documents(database_url: str, user_id: uuid.UUID, prefix: str) -> dict[str, tuple[int, bool]]:
    rows = query(
        database_url,
        "select path, revision, deleted_at is not null as deleted from public.documents"
        " where user_id = $1 and repository_id is null and path like $2",
        user_id,
        f"{prefix}/%",
    )
    return {row["path"]: (row["revision"], row["deleted"]) for row in rows}


def _changes(database_url: str, user_id: uuid.UUID, prefix: str) -> list[tuple[str, str]]:
    rows = query(
        database_url,
        "select path, op from public.document_changes where user_id = $1 and path like $2 order by revision",
        user_id,
        f"{prefix}/%",
    )
    return [(row["path"], row["op"]) for row in rows]


def test_push_edit_push_prune(stack: CliStack, database_url: str, tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree")
    user = user_of_key(database_url, stack.writer)

    first = stack.run("push", str(root), "--prefix", "proj")
    assert first.returncode == 0, first.stdout + first.stderr
    counts = _summary(first.stdout)
    assert (counts["sent"], counts["new"], counts["unchanged"], counts["deleted"]) == (4, 4, 0, 0)
    # node_modules/, package-lock.json, logo.png (binary), latin1.txt (not UTF-8), link.py (symlink)
    assert counts["skipped"] == 5
    for reason in ("skipped_dir", "generated", "binary", "not_utf8", "symlink"):
        assert reason in first.stdout, first.stdout
    stored = _documents(database_url, user, "proj")
    assert sorted(stored) == ["proj/docs/readme.md", "proj/main.py", "proj/pkg/helper.py", "proj/pkg/util.go"]
    assert counts["revision"] == max(revision for revision, _ in stored.values())
    symbols = query(
        database_url,
        "select s.name from public.symbols s join public.documents d on d.id = s.document_id"
        " where d.user_id = $1 and d.path = 'proj/pkg/helper.py'",
        user,
    )
    assert [row["name"] for row in symbols] == ["helper"]

    # Nothing changed: nothing is sent and nothing is written.
    again = stack.run("push", str(root), "--prefix", "proj")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (_summary(again.stdout)["sent"], _summary(again.stdout)["unchanged"]) == (0, 4)
    assert _documents(database_url, user, "proj") == stored

    # One file edited: exactly that one is sent, only its revision moves, one feed row is added.
    feed_before = _changes(database_url, user, "proj")
    (root / "pkg/helper.py").write_text("def helper() -> int:\n    return 42\n")
    edited = stack.run("push", str(root), "--prefix", "proj")
    assert edited.returncode == 0, edited.stdout + edited.stderr
    counts = _summary(edited.stdout)
    assert (counts["sent"], counts["updated"], counts["new"], counts["unchanged"]) == (1, 1, 0, 3)
    after = _documents(database_url, user, "proj")
    moved = {path for path in after if after[path] != stored[path]}
    assert moved == {"proj/pkg/helper.py"}
    assert counts["revision"] == after["proj/pkg/helper.py"][0] > stored["proj/pkg/helper.py"][0]
    assert _changes(database_url, user, "proj") == [*feed_before, ("proj/pkg/helper.py", "upsert")]

    # A deleted file stays stored without --prune, and becomes a tombstone with it.
    (root / "pkg/util.go").unlink()
    kept = stack.run("push", str(root), "--prefix", "proj")
    assert kept.returncode == 0 and _summary(kept.stdout)["deleted"] == 0, kept.stdout + kept.stderr
    assert _documents(database_url, user, "proj")["proj/pkg/util.go"][1] is False
    pruned = stack.run("push", str(root), "--prefix", "proj", "--prune")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    counts = _summary(pruned.stdout)
    assert (counts["sent"], counts["deleted"], counts["unchanged"]) == (0, 1, 3)
    final = _documents(database_url, user, "proj")
    assert final["proj/pkg/util.go"][1] is True
    assert counts["revision"] == final["proj/pkg/util.go"][0]
    assert _changes(database_url, user, "proj")[-1] == ("proj/pkg/util.go", "delete")
    assert sorted(path for path, (_, deleted) in final.items() if not deleted) == [
        "proj/docs/readme.md",
        "proj/main.py",
        "proj/pkg/helper.py",
    ]


def test_prefixes_do_not_prune_each_other(stack: CliStack, database_url: str, tmp_path: Path) -> None:
    one = _tree(tmp_path / "one")
    two = tmp_path / "two"
    two.mkdir()
    (two / "other.py").write_text("x = 1\n")
    user = user_of_key(database_url, stack.writer)
    assert stack.run("push", str(one), "--prefix", "a").returncode == 0
    result = stack.run("push", str(two), "--prefix", "b", "--prune")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _summary(result.stdout)["deleted"] == 0
    assert all(not deleted for _, deleted in _documents(database_url, user, "a").values())


def test_dry_run_sends_nothing(stack: CliStack, database_url: str, tmp_path: Path) -> None:
    root = _tree(tmp_path / "dry")
    user = user_of_key(database_url, stack.writer)
    result = stack.run("push", str(root), "--prefix", "dry", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would send 4 files" in result.stdout
    assert _documents(database_url, user, "dry") == {}


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_bad_key_is_one_unauthenticated_line(stack: CliStack, tmp_path: Path) -> None:
    root = _tree(tmp_path / "badkey")
    forged = stack.writer[:-4] + ("AAAA" if not stack.writer.endswith("AAAA") else "BBBB")
    result = stack.run("push", str(root), "--prefix", "bad", key=forged)
    assert result.returncode == 1
    line = _one_error_line(result.stderr)
    assert line.startswith("kotadb: UNAUTHENTICATED BAD_API_KEY"), line
    assert forged not in result.stderr + result.stdout


def test_read_only_key_push_is_permission_denied(stack: CliStack, database_url: str, tmp_path: Path) -> None:
    root = _tree(tmp_path / "readonly")
    result = stack.run("push", str(root), "--prefix", "ro", key=stack.reader)
    assert result.returncode == 1
    line = _one_error_line(result.stderr)
    assert line.startswith("kotadb: PERMISSION_DENIED MISSING_PERMISSION:"), line
    assert _documents(database_url, user_of_key(database_url, stack.reader), "ro") == {}


def test_missing_directory_and_unknown_repository(stack: CliStack, tmp_path: Path) -> None:
    missing = stack.run("push", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "not a directory" in _one_error_line(missing.stderr)
    unknown = stack.run("push", str(_tree(tmp_path / "t")), "--repository", "no/such-repo")
    assert unknown.returncode == 1 and "no repository named 'no/such-repo'" in _one_error_line(unknown.stderr)


def test_push_into_a_repository(stack: CliStack, database_url: str, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=origin, check=True)
    name = f"octo/pushed-{uuid.uuid4().hex[:6]}"
    added = stack.run("repos", "add", name, origin.as_uri(), "--no-sync")
    assert added.returncode == 0, added.stdout + added.stderr
    root = _tree(tmp_path / "into-repo")
    pushed = stack.run("push", str(root), "--repository", name)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert _summary(pushed.stdout)["new"] == 4
    rows = query(
        database_url,
        "select d.path from public.documents d join public.repositories r on r.id = d.repository_id"
        " where r.full_name = $1 and d.deleted_at is null order by d.path",
        name,
    )
    assert [row["path"] for row in rows] == ["docs/readme.md", "main.py", "pkg/helper.py", "pkg/util.go"]
    # Pushed again into the repository: its own hash map says nothing changed.
    again = stack.run("push", str(root), "--repository", name)
    assert _summary(again.stdout)["unchanged"] == 4, again.stdout
