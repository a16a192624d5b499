"""What workers read of a repository: `repository_for_worker` and `decrypt_access_token`.

The worker runs as the service role, so it sees any tenant's repository; the sealed token opens
only with the key and the row it was sealed for.
"""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from services.common import db
from services.common.errors import FailedPrecondition, NotFound
from services.ingest.repositories import (
    decrypt_access_token,
    repository_for_worker,
    reseal_secrets,
    secret_context,
)
from services.ingest.secretbox import SecretBox, generate_key_spec
from tests.conftest import UserFactory


async def test_worker_reads_settings_and_opens_the_token(
    pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user = await user_factory()
    box = SecretBox.parse(generate_key_spec("w1"))
    repository_id = uuid.uuid4()
    sealed = box.encrypt(b"glpat-worker-token", context=secret_context(repository_id, "access_token"))
    await pool.execute(
        "insert into public.repositories (id, user_id, full_name, url, provider, default_branch, settings,"
        " access_token_encrypted, last_synced_commit) values ($1, $2, 'o/w', 'https://gitlab.com/o/w.git',"
        " 'gitlab', 'trunk', $3::jsonb, $4, $5)",
        repository_id,
        user,
        json.dumps({"include_globs": ["src/**"], "exclude_globs": ["*.lock"], "max_file_bytes": 4096}),
        sealed,
        "c" * 40,
    )
    async with db.as_service(pool) as conn:
        record = await repository_for_worker(conn, repository_id)
    assert (record.url, record.branch, record.provider) == ("https://gitlab.com/o/w.git", "trunk", "gitlab")
    assert (record.include_globs, record.exclude_globs, record.max_file_bytes) == (
        ("src/**",),
        ("*.lock",),
        4096,
    )
    assert record.last_synced_commit == "c" * 40 and record.user_id == user
    assert "glpat" not in repr(record) and "access_token_encrypted" not in repr(record)
    assert decrypt_access_token(record, box=box) == "glpat-worker-token"
    with pytest.raises(FailedPrecondition) as unreadable:
        decrypt_access_token(record, box=SecretBox.parse(generate_key_spec("other")))
    assert unreadable.value.reason == "ACCESS_TOKEN_UNREADABLE"
    async with db.as_service(pool) as conn:
        with pytest.raises(NotFound):
            await repository_for_worker(conn, uuid.uuid4())


async def test_a_repository_without_a_token_has_none(pool: asyncpg.Pool, user_factory: UserFactory) -> None:
    user = await user_factory()
    repository_id = await pool.fetchval(
        "insert into public.repositories (user_id, full_name, url) values ($1, 'o/n', 'https://github.com/o/n')"
        " returning id",
        user,
    )
    async with db.as_service(pool) as conn:
        record = await repository_for_worker(conn, repository_id)
    assert decrypt_access_token(record, box=SecretBox.parse(generate_key_spec())) is None
    assert (record.branch, record.include_globs, record.max_file_bytes) == ("main", (), 0)


async def test_reseal_moves_every_secret_to_the_new_key(
    pool: asyncpg.Pool, user_factory: UserFactory
) -> None:
    user = await user_factory()
    old_spec, new_spec = generate_key_spec("old1"), generate_key_spec("new1")
    old = SecretBox.parse(old_spec)
    ids = [uuid.uuid4() for _ in range(3)]
    for index, repository_id in enumerate(ids):
        token = old.encrypt(b"tok", context=secret_context(repository_id, "access_token")) if index else None
        await pool.execute(
            "insert into public.repositories (id, user_id, full_name, url, webhook_secret_encrypted,"
            " access_token_encrypted) values ($1, $2, $3, 'https://github.com/o/r', $4, $5)",
            repository_id,
            user,
            f"o/reseal-{index}",
            old.encrypt(b"hook", context=secret_context(repository_id, "webhook_secret")),
            token,
        )
    rotated = SecretBox.parse(f"{new_spec},{old_spec}")
    # Other tests' repositories share the table under keys this box does not hold: skipped, counted.
    first = await reseal_secrets(pool, rotated, batch=2)
    assert first.resealed == 5
    second = await reseal_secrets(pool, rotated, batch=2)
    assert (second.resealed, second.unreadable) == (0, first.unreadable)
    new_only = SecretBox.parse(new_spec)
    async with db.as_service(pool) as conn:
        for index, repository_id in enumerate(ids):
            record = await repository_for_worker(conn, repository_id)
            assert record.webhook_secret_encrypted is not None
            assert new_only.key_id(record.webhook_secret_encrypted) == "new1"
            assert (
                new_only.decrypt(
                    record.webhook_secret_encrypted, context=secret_context(repository_id, "webhook_secret")
                )
                == b"hook"
            )
            assert decrypt_access_token(record, box=new_only) == ("tok" if index else None)
