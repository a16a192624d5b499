"""`kotadb repos` and `kotadb jobs` end to end, through the real gateway, on a git repository made here.

`repos add` registers a `file://` repository (the services allow local URLs, as the dev stack
does) with include/exclude globs and a size limit, prints its webhook secret once and, with
`--watch`, follows the first sync to SUCCEEDED; the documents are then in Postgres with the
globs applied. `repos list`, `repos sync --watch` after a new commit, `jobs list` and `jobs
watch` show what happened; `repos rm` tombstones the documents. Refusals are one line with a
non-zero exit: a read-only key adding a repository, an unknown repository, an unknown job.
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
    with start_cli_stack(database_url, tmp_path_factory.mktemp("cli-repos"), "cli-repos") as started:
        yield started


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=t@example.test", "-c", "user.name=t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def _repository(root: Path) -> Path:
    root.mkdir()
    _git(root, "init", "-q", "-b", "main")
    (root / "src").mkdir()
    (root / "src/app.py").write_text("def app() -> None:\n    pass\n")
    (root / "src/big.py").write_text("x = 1\n" * 400)  # 2,400 bytes: over --max-file-bytes
    (root / "docs").mkdir()
    (root / "docs/guide.md").write_text("# guide\n")
    (root / "src/notes.txt").write_text("excluded by a glob\n")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "first")
    return root


def _live_paths(database_url: str, repository_id: str) -> list[str]:
    rows = query(
        database_url,
        "select path from public.documents where repository_id = $1 and deleted_at is null order by path",
        uuid.UUID(repository_id),
    )
    return [row["path"] for row in rows]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_add_watch_list_sync_rm(stack: CliStack, database_url: str, tmp_path: Path) -> None:
    origin = _repository(tmp_path / "origin")
    name = f"octo/cli-{uuid.uuid4().hex[:6]}"
    added = stack.run(
        "repos",
        "add",
        name,
        origin.as_uri(),
        "--include",
        "src/**",
        "--include",
        "docs/**",
        "--exclude",
        "*.txt",
        "--max-file-bytes",
        "1000",
        "--watch",
    )
    assert added.returncode == 0, added.stdout + added.stderr
    match = re.search(rf"registered {name} \(([0-9a-f-]{{36}})\)", added.stdout)
    assert match, added.stdout
    repository_id = match.group(1)
    assert re.search(r"webhook secret  \S{20,}", added.stdout), added.stdout
    finished = re.search(r"job ([0-9a-f-]{36}) SUCCEEDED: 2 indexed, 2 skipped", added.stdout)
    assert finished, added.stdout
    first_job = finished.group(1)
    assert _live_paths(database_url, repository_id) == ["docs/guide.md", "src/app.py"]
    symbols = query(
        database_url,
        "select s.name from public.symbols s join public.documents d on d.id = s.document_id"
        " where d.repository_id = $1 and d.path = 'src/app.py'",
        uuid.UUID(repository_id),
    )
    assert [row["name"] for row in symbols] == ["app"]

    listed = stack.run("repos", "list")
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if repository_id in line]
    assert name in row and "READY" in row and "main" in row and "2 docs" in row

    # A new commit: sync (incremental) and watch it; the removed file is gone, the new one there.
    (origin / "src/new.py").write_text("def new() -> int:\n    return 2\n")
    (origin / "docs/guide.md").unlink()
    _git(origin, "add", "-A")
    _git(origin, "commit", "-q", "-m", "second")
    synced = stack.run("repos", "sync", name, "--watch")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    queued = re.search(r"queued job ([0-9a-f-]{36})", synced.stdout)
    assert queued and f"job {queued.group(1)} SUCCEEDED" in synced.stdout, synced.stdout
    assert _live_paths(database_url, repository_id) == ["src/app.py", "src/new.py"]

    jobs = stack.run("jobs", "list", "--repository", name)
    assert jobs.returncode == 0, jobs.stderr
    lines = jobs.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [queued.group(1), first_job]  # newest first
    assert all("SUCCEEDED" in line for line in lines)
    watched = stack.run("jobs", "watch", first_job)
    assert watched.returncode == 0 and f"job {first_job} SUCCEEDED" in watched.stdout, watched.stderr

    removed = stack.run("repos", "rm", repository_id)
    assert removed.returncode == 0 and f"deleted {name}" in removed.stdout, removed.stderr
    assert repository_id not in stack.run("repos", "list").stdout


def test_refusals_are_one_line(stack: CliStack, database_url: str, tmp_path: Path) -> None:
    origin = _repository(tmp_path / "refused")
    read_only = stack.run("repos", "add", "octo/ro", origin.as_uri(), key=stack.reader)
    assert read_only.returncode == 1
    assert _one_error_line(read_only.stderr).startswith("kotadb: PERMISSION_DENIED MISSING_PERMISSION:")
    reader = user_of_key(database_url, stack.reader)
    assert query(database_url, "select 1 from public.repositories where user_id = $1", reader) == []

    unknown = stack.run("repos", "sync", "octo/no-such-repository")
    assert unknown.returncode == 1
    assert "no repository named 'octo/no-such-repository'" in _one_error_line(unknown.stderr)

    job = stack.run("jobs", "watch", str(uuid.uuid4()))
    assert job.returncode == 1
    assert _one_error_line(job.stderr).startswith("kotadb: NOT_FOUND "), job.stderr

    bad_url = stack.run("repos", "add", "octo/bad", "ftp://example.com/x.git")
    assert bad_url.returncode == 1
    line = _one_error_line(bad_url.stderr)
    assert line.startswith("kotadb: INVALID_ARGUMENT ") and "repository.url" in line, line
