"""Tests for IndexWriter: round trips, guardrails and skip lists, replace and delete across segments."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.search.engine.index.builder import Limits
from services.search.engine.index.index import Index, IndexLockedError, Snapshot
from services.search.engine.index.trigrams import query_trigrams
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SkipReason, SourceDocument, Symbol

SYMS = (
    Symbol("Greeter", "class", "Greeter", 1, 3, 6, 13),
    Symbol("hello", "method", "Greeter.hello", 2, 3, 20, 25, parent="Greeter"),
)


def doc(external_id: str, text: str | bytes, **kw: object) -> SourceDocument:
    content = text.encode() if isinstance(text, str) else text
    return SourceDocument(external_id, kw.pop("path", f"src/{external_id}"), content, **kw)  # type: ignore[arg-type]


def live_docs(snap: Snapshot) -> dict[str, bytes]:
    """live_docs maps external id to content over every live document of a snapshot."""
    out: dict[str, bytes] = {}
    for seg in snap.segments:
        for ordinal in seg.live:
            out[seg.doc(ordinal).external_id] = bytes(seg.content(ordinal))
    return out


def matching(snap: Snapshot, literal: bytes) -> set[str]:
    """matching returns the live documents whose postings contain every trigram of `literal`."""
    out: set[str] = set()
    for seg in snap.segments:
        hits = seg.live.copy()
        for tri in query_trigrams(literal):
            hits &= seg.postings(tri)
        out |= {seg.doc(o).external_id for o in hits}
    return out


def test_round_trip_postings_docs_content_symbols(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index) as writer:
        assert (
            writer.add(
                doc("a", "class Greeter:\n    def hello(self): pass\n", symbols=SYMS, language="python")
            )
            is None
        )
        assert writer.add(doc("b", "print('HELLO world')\n", repository="acme/web")) is None
        generation = writer.commit()
    with index.snapshot() as snap:
        assert snap.generation == generation
        assert len(snap.segments) == 1
        seg = snap.segments[0]
        assert seg.doc_count == 2 and snap.doc_count == 2
        by_id = {seg.doc(o).external_id: o for o in range(seg.doc_count)}
        a, b = by_id["a"], by_id["b"]
        rec = seg.doc(a)
        assert (rec.path, rec.language, rec.repository) == ("src/a", "python", "")
        content = b"class Greeter:\n    def hello(self): pass\n"
        assert rec.size == len(content)
        assert rec.content_hash == hashlib.sha256(content).hexdigest()
        assert bytes(seg.content(a)) == content
        assert seg.symbols(a) == SYMS
        assert seg.symbols(b) == ()
        assert seg.doc(b).repository == "acme/web"
        # Folded trigrams: "hello" in a, "HELLO" in b both hit.
        assert set(seg.postings(b"hel")) == {a, b}
        assert set(seg.postings(b"HEL")) == set()
        assert seg.postings(b"zzz") == type(seg.postings(b"zzz"))()
        assert matching(snap, b"greeter") == {"a"}
        assert seg.paths == ("src/a", "src/b")


def test_every_skip_reason_is_returned_and_persisted(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    limits = Limits(max_file_size=64, max_trigrams=20)
    with IndexWriter(index, limits=limits) as writer:
        skips = {
            "empty": writer.add(doc("empty", b"")),
            "big": writer.add(doc("big", b"x" * 65)),
            "bin": writer.add(doc("bin", b"abc\0def")),
            "utf": writer.add(doc("utf", b"ok \xff\xfe")),
            "tri": writer.add(doc("tri", "the quick brown fox jumps")),
        }
        assert writer.add(doc("ok", "aaaa bbbb")) is None
        writer.commit()
    expected = {
        "empty": SkipReason.EMPTY,
        "big": SkipReason.TOO_LARGE,
        "bin": SkipReason.BINARY,
        "utf": SkipReason.INVALID_UTF8,
        "tri": SkipReason.TOO_MANY_TRIGRAMS,
    }
    assert {k: s.reason for k, s in skips.items() if s} == expected
    assert skips["tri"] is not None and "limit 20" in skips["tri"].detail
    stored = {s.external_id: s for s in Index.open(tmp_path / "idx").skipped()}
    assert {k: s.reason for k, s in stored.items()} == expected
    assert stored["bin"].path == "src/bin"
    with index.snapshot() as snap:
        assert set(live_docs(snap)) == {"ok"}
    # Fixing a skipped file removes it from the skip list; deleting another removes it too.
    with IndexWriter(index, limits=limits) as writer:
        writer.add(doc("bin", "now text"))
        writer.delete("utf")
        writer.commit()
    assert {s.external_id for s in index.skipped()} == {"empty", "big", "tri"}


def test_skipped_replacement_removes_the_old_version(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index) as writer:
        writer.add(doc("a", "first version"))
        writer.commit()
        assert writer.add(doc("a", b"\0binary now")) is not None
        writer.commit()
    with index.snapshot() as snap:
        assert live_docs(snap) == {}
    assert [s.reason for s in index.skipped()] == [SkipReason.BINARY]


def test_replace_and_delete_across_segments(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index, merge_policy=None) as writer:
        for i in range(3):
            writer.add(doc(f"d{i}", f"version one of document {i}"))
            writer.commit(merge=False)
        with index.snapshot() as snap:
            assert len(snap.segments) == 3
        writer.add(doc("d0", "version two of document 0"))
        writer.delete("d1")
        writer.delete("missing")
        # Replacing twice within one session (across a flush) keeps only the newest.
        writer.add(doc("d2", "version two of document 2"))
        writer.flush()
        writer.add(doc("d2", "version three of document 2"))
        writer.commit(merge=False)
    with index.snapshot() as snap:
        assert live_docs(snap) == {
            "d0": b"version two of document 0",
            "d2": b"version three of document 2",
        }
        assert matching(snap, b"version one") == set()
        assert matching(snap, b"version three") == {"d2"}
        # Segments whose documents are all deleted leave the manifest.
        assert all(seg.live_count > 0 for seg in snap.segments)


def test_uncommitted_work_is_invisible_and_rolled_back(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index) as writer:
        writer.add(doc("a", "committed text"))
        writer.commit()
        writer.add(doc("b", "pending text"))
        writer.flush()
        with index.snapshot() as snap:
            assert set(live_docs(snap)) == {"a"}
    # close() without commit discards "b" and its flushed segment directory.
    with index.snapshot() as snap:
        assert set(live_docs(snap)) == {"a"}
    assert not [p for p in (tmp_path / "idx").iterdir() if p.name.startswith(".tmp-")]


def test_process_pool_build_defers_trigram_skips(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    limits = Limits(max_trigrams=20)
    with IndexWriter(index, workers=1, flush_bytes=20, limits=limits) as writer:
        for i in range(6):
            assert writer.add(doc(f"d{i}", f"file number {i} body")) is None
        assert writer.add(doc("wide", "abcdefghijklmnopqrstuvwxyz")) is None
        assert writer.add(doc("short", "tiny")) is None
        writer.commit()
        assert [s.external_id for s in writer.skipped] == ["wide"]
    with index.snapshot() as snap:
        assert set(live_docs(snap)) == {f"d{i}" for i in range(6)} | {"short"}
        assert matching(snap, b"number 3") == {"d3"}
    assert [(s.external_id, s.reason) for s in index.skipped()] == [("wide", SkipReason.TOO_MANY_TRIGRAMS)]


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    other = Index.open(tmp_path / "idx")
    with IndexWriter(index), pytest.raises(IndexLockedError) as err:
        IndexWriter(other)
    assert err.value.path.endswith("LOCK") and "holds the lock" in err.value.detail
    with IndexWriter(index), pytest.raises(IndexLockedError) as err:
        IndexWriter(index)
    assert "this process" in err.value.detail
    with IndexWriter(other) as writer:
        writer.add(doc("a", "after the first writer closed"))
        writer.commit()
    # The first Index instance sees the other instance's commit on its next snapshot.
    with index.snapshot() as snap:
        assert set(live_docs(snap)) == {"a"}


def test_nul_in_identifiers_is_rejected(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index) as writer, pytest.raises(ValueError):
        writer.add(doc("a\0b", "text"))


def test_failed_commit_publishes_nothing_and_the_writer_recovers(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index) as writer:
        writer.add(doc("a", "first document"))
        before = writer.commit()
        # Occupy the next segment's build directory so the flush fails for real.
        blocker = tmp_path / "idx" / f".tmp-seg-{index.manifest.next_segment:08d}"
        blocker.mkdir()
        writer.add(doc("b", "second document"))
        writer.delete("a")
        with pytest.raises(FileExistsError):
            writer.commit()
        assert index.manifest.generation == before
        with index.snapshot() as snap:
            assert set(live_docs(snap)) == {"a"}
        writer.add(doc("c", "third document"))
        writer.commit()
    with index.snapshot() as snap:
        assert set(live_docs(snap)) == {"a", "c"}
    assert blocker.exists()
    with IndexWriter(index):
        assert not blocker.exists()  # a new writer sweeps build leftovers


def test_empty_commit_keeps_the_generation(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index) as writer:
        writer.add(doc("a", "text"))
        first = writer.commit()
        assert writer.commit() == first
        writer.delete("missing")  # a delete is a change even when it finds nothing
        assert writer.commit() == first + 1
    assert index.manifest.generation == first + 1
