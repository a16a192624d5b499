"""RevisionRule, the covered-revision rule of tailer.py, on hand-made watermarks and snapshots.

Each case is one poll sequence: the lower bound a writer gets is the sequence value of the
poll before it was first seen (0 at the first poll), finished writers never block, and a writer
blocks only the tenants whose key it holds — or every tenant while it holds the documents lock
without having announced a tenant yet.
"""

from __future__ import annotations

from services.search.store import Snapshot, Watermark, Writer
from services.search.tailer import RevisionRule

A, B = 11, 22
NOTHING_RUNNING = Snapshot(xmax=1000, xip=frozenset())


def writer(
    vxid: str, *, xid: int | None = None, keys: tuple[int, ...] = (), documents: bool = True
) -> Writer:
    return Writer(vxid, xid, frozenset(keys), documents)


def test_without_writers_the_sequence_value_is_safe() -> None:
    rule = RevisionRule()
    mark = Watermark(40, ())
    rule.observe(mark)
    assert rule.safe(mark, NOTHING_RUNNING, A) == 40


def test_a_writer_seen_at_the_first_poll_holds_its_tenant_at_zero() -> None:
    rule = RevisionRule()
    mark = Watermark(40, (writer("3/7", xid=500, keys=(A,)),))
    rule.observe(mark)
    running = Snapshot(xmax=1000, xip=frozenset({500}))
    assert rule.safe(mark, running, A) == 0
    assert rule.safe(mark, running, B) == 40  # another tenant is not held back


def test_a_new_writer_is_bounded_by_the_previous_poll() -> None:
    rule = RevisionRule()
    rule.observe(Watermark(40, ()))
    mark = Watermark(55, (writer("3/8", xid=501, keys=(A,)),))
    rule.observe(mark)
    running = Snapshot(xmax=1000, xip=frozenset({501}))
    assert rule.safe(mark, running, A) == 40
    # Its bound stays while it runs, however far the sequence moves.
    later = Watermark(90, (writer("3/8", xid=501, keys=(A,)),))
    rule.observe(later)
    assert rule.safe(later, running, A) == 40
    assert rule.safe(later, running, B) == 90


def test_a_writer_finished_before_the_snapshot_does_not_block() -> None:
    rule = RevisionRule()
    rule.observe(Watermark(40, ()))
    mark = Watermark(55, (writer("3/8", xid=501, keys=(A,)),))
    rule.observe(mark)
    assert rule.safe(mark, NOTHING_RUNNING, A) == 55


def test_a_writer_without_an_xid_blocks_until_seen_finished() -> None:
    rule = RevisionRule()
    rule.observe(Watermark(40, ()))
    mark = Watermark(55, (writer("3/9", keys=(A,)),))
    rule.observe(mark)
    assert rule.safe(mark, NOTHING_RUNNING, A) == 40


def test_an_unannounced_documents_writer_blocks_every_tenant() -> None:
    rule = RevisionRule()
    rule.observe(Watermark(40, ()))
    mark = Watermark(55, (writer("4/1", xid=600),))
    rule.observe(mark)
    running = Snapshot(xmax=1000, xip=frozenset({600}))
    assert rule.safe(mark, running, A) == rule.safe(mark, running, B) == 40


def test_a_writer_that_announces_another_tenant_later_gets_a_later_bound() -> None:
    rule = RevisionRule()
    rule.observe(Watermark(40, (writer("5/1", xid=700, keys=(B,)),)))
    mark = Watermark(60, (writer("5/1", xid=700, keys=(A, B)),))
    rule.observe(mark)
    running = Snapshot(xmax=1000, xip=frozenset({700}))
    assert rule.safe(mark, running, B) == 0  # seen with B since the first poll
    assert rule.safe(mark, running, A) == 40  # took A's key after the first poll


def test_a_writer_that_leaves_and_a_new_one_with_its_vxid_restart_the_bound() -> None:
    rule = RevisionRule()
    rule.observe(Watermark(40, (writer("6/1", xid=800, keys=(A,)),)))
    rule.observe(Watermark(50, ()))
    mark = Watermark(70, (writer("6/1", xid=801, keys=(A,)),))
    rule.observe(mark)
    assert rule.safe(mark, Snapshot(xmax=1000, xip=frozenset({801})), A) == 50
