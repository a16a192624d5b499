"""Tests for the index directory: generations, pinned snapshots, file cleanup, stats, orphans."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.search.engine.index.format import IndexCorruptError, IndexNotFoundError
from services.search.engine.index.index import Index, IndexLockedError, list_generations
from services.search.engine.index.merge import TieredMergePolicy
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SkipReason, SourceDocument


def add(index: Index, *docs: tuple[str, bytes], delete: tuple[str, ...] = ()) -> int:
    with IndexWriter(index, merge_policy=None) as writer:
        for external_id, content in docs:
            writer.add(SourceDocument(external_id, f"{external_id}.txt", content))
        for external_id in delete:
            writer.delete(external_id)
        return writer.commit(merge=False)


def ids(index: Index) -> set[str]:
    with index.snapshot() as snap:
        return {seg.doc(o).external_id for seg in snap.segments for o in seg.live}


def test_open_requires_an_index(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError) as err:
        Index.open(tmp_path / "absent")
    assert err.value.path == str(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError):
        Index.open(tmp_path / "empty")
    index = Index.create(tmp_path / "empty")
    with index.snapshot() as snap:
        assert snap.generation == 0 and list(snap.segments) == []
    assert Index.open(tmp_path / "empty").manifest.generation == 0


def test_snapshot_pins_its_generation_and_files(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    index = Index.create(root)
    add(index, ("a", b"first alpha"), ("b", b"first bravo"))
    old = index.snapshot()
    add(index, ("a", b"second alpha"), delete=("b",))
    assert ids(index) == {"a"}
    # The old snapshot still sees generation 1 in full, including its deleted document.
    assert old.generation == 1
    assert {bytes(s.content(o)) for s in old.segments for o in s.live} == {b"first alpha", b"first bravo"}
    first = old.segments[0].name
    assert (root / first).is_dir()
    # The newest generation deleted both documents of the first segment, so closing the
    # last snapshot on it removes it, and the stale manifest goes with it.
    old.close()
    assert not (root / first).exists()
    assert list_generations(root) == [2]


def test_a_closed_index_never_deletes_files_a_late_snapshot_releases(tmp_path: Path) -> None:
    # A rebuild swaps a new index in under the same path while a search may still hold a
    # snapshot of the old one; segment names repeat across indexes, so the old index, once
    # closed, must not unlink what its snapshot releases: it could be the new index's file.
    root = tmp_path / "idx"
    index = Index.create(root)
    add(index, ("a", b"first alpha"), ("b", b"first bravo"))
    old = index.snapshot()
    add(index, ("a", b"second alpha"), delete=("b",))
    first = old.segments[0].name
    index.close()
    old.close()
    assert (root / first).is_dir()
    # The next writer collects it as an orphan.
    reopened = Index.open(root)
    with IndexWriter(reopened, merge_policy=None):
        pass
    assert not (root / first).exists()
    assert ids(reopened) == {"a"}


def test_deletion_files_are_replaced_and_collected(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    index = Index.create(root)
    add(index, *[(f"d{i}", f"document number {i}".encode()) for i in range(5)])
    seg = index.manifest.segments[0].name
    add(index, delete=("d1",))
    add(index, delete=("d2",))
    assert sorted(p.name for p in (root / seg).glob("deleted-*")) == ["deleted-000000000003.roar"]
    with index.snapshot() as snap:
        assert snap.segments[0].live_count == 3
        assert snap.manifest.segments[0].deleted_count == 2
    assert ids(index) == {"d0", "d3", "d4"}


def test_other_processes_see_commits_and_cannot_write_concurrently(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    index = Index.create(root)
    add(index, ("a", b"from the parent"))
    script = (
        "import sys\n"
        "from services.search.engine.index.index import Index, IndexLockedError\n"
        "from services.search.engine.index.writer import IndexWriter\n"
        "from services.search.engine.model import SourceDocument\n"
        "index = Index.open(sys.argv[1])\n"
        "try:\n"
        "    w = IndexWriter(index)\n"
        "except IndexLockedError:\n"
        "    print('locked'); sys.exit(0)\n"
        "w.add(SourceDocument('b', 'b.txt', b'from the child')); w.commit(); w.close(); print('wrote')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def child() -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, str(root)], capture_output=True, env=env, check=True
        )
        return done.stdout.decode().strip()

    with IndexWriter(index):
        assert child() == "locked"
    assert child() == "wrote"
    assert ids(index) == {"a", "b"}
    with pytest.raises(IndexLockedError), IndexWriter(index), IndexWriter(Index.open(root)):
        pass


def test_orphans_of_a_crashed_writer_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    index = Index.create(root)
    add(index, ("a", b"kept document"))
    (root / ".tmp-seg-00000009").mkdir()
    (root / "seg-00000042").mkdir()
    (root / "manifest-000000000000.json").write_bytes(b"stale")
    (root / index.manifest.segments[0].name / "deleted-000000000099.roar").write_bytes(b"x")
    with IndexWriter(index):
        pass
    names = sorted(p.name for p in root.iterdir())
    assert names == ["LOCK", "manifest-000000000001.json", index.manifest.segments[0].name]
    assert list((root / index.manifest.segments[0].name).glob("deleted-*")) == []
    assert ids(index) == {"a"}


def test_stats_report_documents_parts_and_skips(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    add(index, ("a", b"some text here"), ("b", b"more text"), ("bin", b"\0\1\2"))
    add(index, delete=("b",))
    stats = Index.open(tmp_path / "idx").stats()
    assert (stats.generation, stats.segments, stats.documents, stats.deleted) == (2, 1, 1, 1)
    assert stats.content_bytes == len(b"some text here") + len(b"more text")
    assert set(stats.bytes_by_part) == {
        "dict",
        "postings",
        "docs",
        "content",
        "symbols",
        "meta",
        "deletions",
        "manifest",
        "skipped",
    }
    assert stats.bytes_by_part["content"] == 16 + stats.content_bytes
    on_disk = sum(p.stat().st_size for p in (tmp_path / "idx").rglob("*") if p.is_file() and p.name != "LOCK")
    assert stats.total_bytes == on_disk
    assert [(s.external_id, s.reason) for s in stats.skipped] == [("bin", SkipReason.BINARY)]


def test_verify_reads_every_checksum(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    index = Index.create(root)
    add(index, ("a", b"alpha " * 50000), ("b", b"bravo " * 50000))
    with index.snapshot() as snap:
        snap.verify()
        seg = snap.segments[0].name
    content = root / seg / "content.bin"
    raw = bytearray(content.read_bytes())
    raw[len(raw) // 2] ^= 1
    content.write_bytes(bytes(raw))
    fresh = Index.open(root)
    # Opening does not read content.bin; verify does.
    with fresh.snapshot() as snap, pytest.raises(IndexCorruptError) as err:
        snap.verify()
    assert err.value.path == str(content)


def test_writer_lists_live_external_ids(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    add(index, ("a", b"one"), ("b", b"two"), ("c", b"three"))
    add(index, delete=("b",))
    with IndexWriter(index) as writer:
        assert writer.external_ids() == {"a", "c"}
        for stale in writer.external_ids() - {"a"}:
            writer.delete(stale)
        writer.commit()
    assert ids(index) == {"a"}


READER = """
import os, sys, pathlib
from services.search.engine.index.index import Index
root, stop, seen_file = (pathlib.Path(a) for a in sys.argv[1:4])
index = Index.open(root)
seen = set()
while not stop.exists():
    with index.snapshot() as snap:
        contents = [bytes(s.content(o)) for s in snap.segments for o in s.live]
        versions = {c.split(b" ")[1] for c in contents}
        assert len(contents) == 10 and len(versions) == 1, (snap.generation, versions, len(contents))
        assert all(s.postings(b"ver") & s.live == s.live for s in snap.segments)
    if not versions <= seen:
        seen |= versions
        tmp = seen_file.with_suffix(".tmp")
        tmp.write_text(str(max(int(v) for v in seen)))
        os.replace(tmp, seen_file)
print(len(seen))
"""


def wait_until_seen(seen_file: Path, version: int, reader: subprocess.Popen[bytes]) -> None:
    """wait_until_seen blocks until the reader process reports a snapshot of `version`."""
    while reader.poll() is None:
        if seen_file.exists() and int(seen_file.read_text() or -1) >= version:
            return
        time.sleep(0.01)
    raise AssertionError(reader.communicate()[1].decode())


def test_reader_process_sees_only_whole_generations_while_writes_and_merges_run(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    stop, seen = tmp_path / "stop", tmp_path / "seen"
    index = Index.create(root, durable=False)
    add(index, *[(f"d{i}", f"version 0 doc {i}".encode()) for i in range(10)])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [sys.executable, "-c", READER, str(root), str(stop), str(seen)]
    reader = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until_seen(seen, 0, reader)
        policy = TieredMergePolicy(segments_per_tier=2, floor_bytes=64)
        with IndexWriter(index, merge_policy=policy) as writer:
            for version in range(1, 40):
                for i in range(10):
                    writer.add(SourceDocument(f"d{i}", f"d{i}.txt", f"version {version} doc {i}".encode()))
                    if i == 4:
                        writer.flush()  # two segments per commit, so merges have work
                writer.commit()
                if version % 5 == 0:
                    # Lockstep now and then, so the reader provably overlaps many generations.
                    wait_until_seen(seen, version, reader)
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err.decode()
    assert int(out) >= 8
    with index.snapshot() as snap:
        assert {bytes(s.content(o)).split(b" ")[1] for s in snap.segments for o in s.live} == {b"39"}
