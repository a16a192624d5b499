"""Fixtures shared by the auth tests: connected pools, as an auth process holds them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.common.server import LazyPool
from services.common.settings import CommonSettings


async def open_lazy_pool(database_url: str, size: int = 4) -> LazyPool:
    """open_lazy_pool is a connected LazyPool on `database_url`, as a service would hold."""
    lazy = LazyPool(CommonSettings(database_url=database_url, db_pool_min=1, db_pool_max=size))
    await lazy.connect()
    return lazy


@pytest.fixture
async def lazy(database_url: str) -> AsyncIterator[LazyPool]:
    """lazy is one connected pool, closed after the test."""
    opened = await open_lazy_pool(database_url)
    try:
        yield opened
    finally:
        await opened.close(wait=5)


@pytest.fixture
async def two_pools(database_url: str) -> AsyncIterator[tuple[LazyPool, LazyPool]]:
    """two_pools are two connected pools, one per stand-in replica, closed after the test."""
    pools = (await open_lazy_pool(database_url), await open_lazy_pool(database_url))
    try:
        yield pools
    finally:
        for opened in pools:
            await opened.close(wait=5)
