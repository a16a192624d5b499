"""Tests for merging: deletions dropped, results preserved, bounded segment count, pinned snapshots."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.search.engine.index.index import Index, Snapshot
from services.search.engine.index.merge import SegmentSize, TieredMergePolicy
from services.search.engine.index.trigrams import query_trigrams
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SourceDocument, Symbol


def doc(external_id: str, text: str, symbols: tuple[Symbol, ...] = ()) -> SourceDocument:
    return SourceDocument(external_id, f"src/{external_id}.py", text.encode(), symbols=symbols)


def state(snap: Snapshot) -> dict[str, tuple[bytes, tuple[Symbol, ...], str]]:
    """state captures everything a search can observe about a snapshot's live documents."""
    out = {}
    for seg in snap.segments:
        for ordinal in seg.live:
            rec = seg.doc(ordinal)
            out[rec.external_id] = (bytes(seg.content(ordinal)), seg.symbols(ordinal), rec.content_hash)
    return out


def hits(snap: Snapshot, literal: bytes) -> set[str]:
    out: set[str] = set()
    for seg in snap.segments:
        found = seg.live.copy()
        for tri in query_trigrams(literal):
            found &= seg.postings(tri)
        out |= {seg.doc(o).external_id for o in found}
    return out


WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def text_for(i: int, version: int = 0) -> str:
    return f"def f{i}():\n    return '{WORDS[i % 8]} {WORDS[(i * 3 + version) % 8]} v{version}'\n"


def test_merge_drops_deletions_and_preserves_results(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    sym = (Symbol("f1", "function", "f1", 1, 2, 4, 6),)
    with IndexWriter(index, merge_policy=TieredMergePolicy(segments_per_tier=100)) as writer:
        for i in range(12):
            writer.add(doc(f"d{i}", text_for(i), sym if i == 1 else ()))
            if i % 3 == 2:
                writer.commit()
        writer.delete("d4")
        writer.add(doc("d5", text_for(5, version=1)))
        writer.commit(merge=False)
        with index.snapshot() as before:
            expected = state(before)
            queries = [w.encode() for w in WORDS] + [b"v1", b"def f1"]
            expected_hits = {q: hits(before, q) for q in queries}
            assert len(before.segments) == 5
            assert sum(s.doc_count - s.live_count for s in before.segments) == 2
        writer.force_merge(1)
    with index.snapshot() as after:
        assert len(after.segments) == 1
        seg = after.segments[0]
        assert seg.doc_count == seg.live_count == 11
        assert state(after) == expected
        assert {q: hits(after, q) for q in queries} == expected_hits
        assert expected["d1"][1] == sym
    # The merged-away segments are gone from disk once no snapshot holds them.
    on_disk = sorted(p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith("seg-"))
    assert on_disk == [seg.name]


def test_segment_count_stays_bounded_under_small_commits(tmp_path: Path) -> None:
    # Not durable: 200 commits would otherwise spend their time in fsync on a shared disk.
    index = Index.create(tmp_path / "idx", durable=False)
    policy = TieredMergePolicy(segments_per_tier=4, floor_bytes=512)
    counts = []
    with IndexWriter(index, merge_policy=policy) as writer:
        for i in range(200):
            writer.add(doc(f"d{i % 150}", text_for(i, version=i // 150)))
            writer.commit()
            counts.append(len(index.manifest.segments))
    # 4 per tier, sizes from 60 bytes to 10 KB at a floor of 512 bytes: at most 3 tiers of 3.
    assert max(counts) <= 9
    with index.snapshot() as snap:
        assert len(state(snap)) == 150
        assert hits(snap, b"v1'") == {f"d{i}" for i in range(50)}
    segs = [p for p in (tmp_path / "idx").iterdir() if p.name.startswith("seg-")]
    assert len(segs) == len(index.manifest.segments)


def test_expunge_rewrites_a_mostly_deleted_segment() -> None:
    policy = TieredMergePolicy()
    sizes = [SegmentSize("seg-1", 100, 40, 10_000), SegmentSize("seg-2", 10, 10, 100)]
    assert policy.select(sizes) == ["seg-1"]
    assert policy.select([SegmentSize("seg-1", 100, 60, 10_000)]) is None
    # Flush-sized segments (past half the maximum) are final: a bulk build never re-merges.
    full = [SegmentSize(f"seg-{i}", 1, 1, 40 << 20) for i in range(20)]
    assert policy.select(full) is None
    # Merges stop short of the maximum size, and need at least two segments.
    mid = [SegmentSize(f"seg-{i}", 1, 1, 30 << 20) for i in range(8)]
    assert policy.select(mid) == ["seg-0", "seg-1"]
    small = [SegmentSize(f"seg-{i}", 1, 1, 1000 + i) for i in range(9)]
    assert policy.select(small) == [f"seg-{i}" for i in range(8)]


def test_snapshot_stays_consistent_while_merges_run(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx", durable=False)
    with IndexWriter(index, merge_policy=TieredMergePolicy(segments_per_tier=100)) as writer:
        for i in range(40):
            writer.add(doc(f"d{i}", text_for(i)))
            writer.commit()
    snap = index.snapshot()
    expected = state(snap)
    expected_hits = {w: hits(snap, w.encode()) for w in WORDS}
    pinned = {seg.name for seg in snap.segments}
    errors: list[BaseException] = []
    done = threading.Event()

    def churn() -> None:
        try:
            with IndexWriter(index, merge_policy=TieredMergePolicy(segments_per_tier=2)) as writer:
                for i in range(40):
                    writer.add(doc(f"d{i}", text_for(i, version=7)))
                    if i % 5 == 0 and i > 0:
                        writer.delete(f"d{i - 1}")
                    writer.commit()
                writer.force_merge(1)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=churn)
    thread.start()
    rounds = 0
    while not done.is_set() or rounds == 0:
        assert state(snap) == expected
        assert {w: hits(snap, w.encode()) for w in WORDS} == expected_hits
        rounds += 1
        # Yield the GIL so the writer thread makes progress between checks.
        done.wait(0.005)
    thread.join()
    assert not errors
    # Still pinned after the merges: the old segments exist until the snapshot closes.
    assert all((tmp_path / "idx" / name).is_dir() for name in pinned)
    assert state(snap) == expected
    snap.close()
    assert not any((tmp_path / "idx" / name).exists() for name in pinned)
    with index.snapshot() as now:
        assert len(now.segments) == 1
        assert len(state(now)) == 40 - 7
        assert all(content.endswith(b"v7'\n") for content, _, _ in state(now).values())


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 4), st.text("abcAB \n\u00e9", max_size=30)),
        st.tuples(st.just("delete"), st.integers(0, 4), st.just("")),
        st.tuples(st.just("commit"), st.integers(0, 0), st.just("")),
        st.tuples(st.just("merge"), st.integers(1, 3), st.just("")),
    ),
    min_size=5,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_postings_match_brute_force_under_random_writes(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, str]]
) -> None:
    index = Index.create(tmp_path_factory.mktemp("idx") / "idx", durable=False)
    model: dict[str, bytes] = {}
    pending: dict[str, bytes | None] = {}
    with IndexWriter(index, merge_policy=TieredMergePolicy(segments_per_tier=3, floor_bytes=64)) as writer:
        for op, key, text in [*ops, ("commit", 0, "")]:
            name = f"d{key}"
            if op == "add":
                content = text.encode()
                skipped = writer.add(doc(name, text))
                pending[name] = None if skipped else content
                assert (skipped is not None) == (content == b"")
            elif op == "delete":
                writer.delete(name)
                pending[name] = None
            elif op == "commit":
                writer.commit()
                for k, v in pending.items():
                    if v is None:
                        model.pop(k, None)
                    else:
                        model[k] = v
                pending.clear()
                check_against(index, model)
            else:
                writer.force_merge(key)
                check_against(index, model)


def check_against(index: Index, model: dict[str, bytes]) -> None:
    with index.snapshot() as snap:
        assert {k: v[0] for k, v in state(snap).items()} == model
        universe = {t for content in model.values() for t in query_trigrams(content)}
        for tri in universe:
            truth = {k for k, content in model.items() if tri in query_trigrams(content)}
            found: set[str] = set()
            for seg in snap.segments:
                found |= {seg.doc(o).external_id for o in seg.postings(tri) & seg.live}
            assert found == truth, tri
