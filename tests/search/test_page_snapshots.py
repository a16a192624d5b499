"""Page tokens read the snapshot their first page read, however the tenant's index changes meanwhile.

A first page with a next page pins its index snapshot (services/search/pins.py): writes applied
by the tailer and merges of the tenant's segments between pages change nothing the next pages
see, and pages 1..n equal the pages of the same search on the old state. A pin is released
after its TTL (the registry's clock is replaced), past the per-tenant bound (least recently used
first) and when its tenant is closed; only then does the token expire (FAILED_PRECONDITION,
PAGE_TOKEN_EXPIRED). Another tenant's token stays refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.search.rebuild import INDEX_DIR
from tests.conftest import UserFactory
from tests.runtime.rpc import status_details, unpack_details
from tests.search.conftest import Services, paths, start_search_server

EXHAUSTIVE = 2


class FakeClock:
    """FakeClock is a monotonic clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(services: Services) -> Iterator[FakeClock]:
    """clock replaces the page pins' clock for one test (the module's server is this module's own)."""
    fake = FakeClock()
    pins = services.manager.pins
    saved = pins.clock
    pins.clock = fake
    try:
        yield fake
    finally:
        pins.clock = saved


async def _tenant(services: Services, user_factory: UserFactory, count: int = 9) -> tuple[uuid.UUID, int]:
    user = await user_factory()
    files = {f"p{i:02d}.txt": f"pageword {i}\n" + "pageword again\n" * (i % 3) for i in range(count)}
    written = await services.write(user, files)
    return user, written.revision


async def _applied(services: Services, user: uuid.UUID, files: dict[str, str]) -> int:
    """_applied writes `files` and waits until the tailer has applied them to the index."""
    revision = (await services.write(user, files)).revision
    await services.search(user, "nothing_matches_this", min_revision=revision)
    return revision


async def _expired(services: Services, user: uuid.UUID, query: str, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await services.search(user, query, page_size=3, mode=EXHAUSTIVE, page_token=token)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = unpack_details(status_details(raised.value))
    assert details["ErrorInfo"].reason == "PAGE_TOKEN_EXPIRED"
    assert "start the search again" in (raised.value.details() or "")


def _segment_dirs(services: Services, user: uuid.UUID) -> set[str]:
    root = Path(services.manager.data_dir) / str(user) / INDEX_DIR
    return {p.name for p in root.iterdir() if p.name.startswith("seg-")}


async def test_next_pages_read_the_first_pages_snapshot_across_writes_and_merges(
    services: Services, user_factory: UserFactory
) -> None:
    user, revision = await _tenant(services, user_factory)
    old = await services.search(user, "pageword", page_size=100, mode=EXHAUSTIVE, min_revision=revision)
    expected = paths(old)
    assert len(expected) == 9

    first = await services.search(user, "pageword", page_size=3, mode=EXHAUSTIVE)
    assert paths(first) == expected[:3] and first.next_page_token
    # Changes in every part of the ranking: new files, a rewritten one, a deleted one.
    await _applied(services, user, {f"new{i}.txt": "pageword new\n" * 5 for i in range(3)})
    await _applied(services, user, {"p04.txt": "no longer matching\n"})
    opened = await services.manager.get(user)
    before = opened.index.manifest.generation
    async with opened.lock:
        await services.manager._in(services.manager.write_pool, opened.writer.force_merge, 1)
    assert opened.index.manifest.generation > before
    assert len(opened.index.manifest.segments) == 1
    # The merged-away segments stay on disk while the pinned snapshot names them.
    merged_away = _segment_dirs(services, user) - {s.name for s in opened.index.manifest.segments}
    assert merged_away

    seen = paths(first)
    token = first.next_page_token
    while token:
        page = await services.search(user, "pageword", page_size=3, mode=EXHAUSTIVE, page_token=token)
        seen += paths(page)
        token = page.next_page_token
    assert seen == expected

    now = await services.search(user, "pageword", page_size=100, mode=EXHAUSTIVE)
    assert "new0.txt" in paths(now) and "p04.txt" not in paths(now)
    # Released pins free the merged-away segments.
    services.manager.pins.drop(user)
    assert not (_segment_dirs(services, user) & merged_away)


async def test_a_pin_expires_after_its_ttl(
    services: Services, user_factory: UserFactory, clock: FakeClock
) -> None:
    user, revision = await _tenant(services, user_factory)
    first = await services.search(user, "pageword", page_size=3, mode=EXHAUSTIVE, min_revision=revision)
    await _applied(services, user, {"later.txt": "pageword later\n"})
    ttl = services.manager.settings.page_snapshot_ttl
    clock.now += ttl / 2
    second = await services.search(
        user, "pageword", page_size=3, mode=EXHAUSTIVE, page_token=first.next_page_token
    )
    assert second.next_page_token
    clock.now += ttl + 1  # measured from the last use
    await _expired(services, user, "pageword", second.next_page_token)
    assert services.manager.pins.count(user) == 0


async def test_pins_are_bounded_per_tenant_least_recently_used_first(
    services: Services, user_factory: UserFactory
) -> None:
    pins = services.manager.pins
    user, revision = await _tenant(services, user_factory)
    tokens = []
    for i in range(pins.per_tenant + 1):
        page = await services.search(user, "pageword", page_size=3, mode=EXHAUSTIVE, min_revision=revision)
        tokens.append(page.next_page_token)
        revision = await _applied(services, user, {f"gen{i}.txt": "another generation\n"})
    assert pins.count(user) == pins.per_tenant
    await _expired(services, user, "pageword", tokens[0])
    last = await services.search(user, "pageword", page_size=3, mode=EXHAUSTIVE, page_token=tokens[-1])
    assert len(paths(last)) == 3


async def test_another_tenants_token_is_refused_while_pinned(
    services: Services, user_factory: UserFactory
) -> None:
    alice, revision = await _tenant(services, user_factory)
    bob, other = await _tenant(services, user_factory)
    await services.search(bob, "pageword", min_revision=other)
    first = await services.search(alice, "pageword", page_size=3, mode=EXHAUSTIVE, min_revision=revision)
    assert services.manager.pins.count(alice) == 1
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await services.search(bob, "pageword", page_size=3, mode=EXHAUSTIVE, page_token=first.next_page_token)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = unpack_details(status_details(raised.value))
    assert details["ErrorInfo"].reason == "INVALID_PAGE_TOKEN"


async def test_an_evicted_tenant_drops_its_pins(
    services: Services, user_factory: UserFactory, database_url: str, tmp_path: Path
) -> None:
    server, manager, address = await start_search_server(database_url, tmp_path, max_open_tenants=1)
    handle = Services(services.ingest_address, address, manager)
    try:
        alice, revision = await _tenant(handle, user_factory)
        bob, other = await _tenant(handle, user_factory)
        first = await handle.search(alice, "pageword", page_size=3, mode=EXHAUSTIVE, min_revision=revision)
        assert manager.pins.count(alice) == 1
        await handle.search(bob, "pageword", min_revision=other)  # evicts alice (cap 1)
        assert not manager.is_open(alice) and manager.pins.count(alice) == 0
        await _applied(handle, alice, {"after.txt": "pageword after\n"})
        await _expired(handle, alice, "pageword", first.next_page_token)
    finally:
        for channel in handle.channels:
            await channel.close(None)
        await server.stop(0)
