"""Settings read from the environment: types, defaults, validation that names the variable, docs rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.auth.config import AuthSettings
from services.common.settings import (
    CommonSettings,
    SettingsError,
    describe,
    describe_markdown,
    env_settings,
    setting,
)
from services.ingest.config import IngestSettings
from services.search.config import SearchSettings


def test_defaults_and_overrides_come_from_prefixed_variables() -> None:
    settings = env_settings(
        SearchSettings,
        environ={
            "KOTADB_DATABASE_URL": "postgresql://db/kotadb",
            "KOTADB_DB_STATEMENT_CACHE_SIZE": "0",
            "KOTADB_SEARCH_PORT": "6000",
            "KOTADB_SEARCH_SHUTDOWN_GRACE": "2.5",
            "KOTADB_SEARCH_DATA_DIR": "/var/lib/kotadb",
            "KOTADB_LOG_LEVEL": "debug",
            # Another service's variable must not leak in.
            "KOTADB_AUTH_PORT": "7000",
            # Empty means unset, as in env files.
            "KOTADB_SEARCH_HOST": "",
        },
    )
    assert settings.database_url == "postgresql://db/kotadb"
    assert settings.db_statement_cache_size == 0
    assert settings.port == 6000
    assert settings.shutdown_grace == 2.5
    assert settings.data_dir == Path("/var/lib/kotadb")
    assert settings.log_level == "DEBUG"
    assert settings.host == "127.0.0.1"
    assert env_settings(AuthSettings, environ={}).port == 50051
    assert env_settings(IngestSettings, environ={}).port == 50052
    assert env_settings(SearchSettings, environ={}).port == 50053
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("KOTADB_AUTH_PORT", "fifty", "integer"),
        ("KOTADB_AUTH_PORT", "-1", "at least 0"),
        ("KOTADB_AUTH_SHUTDOWN_GRACE", "soon", "number"),
        ("KOTADB_DB_POOL_MAX", "0", "at least 1"),
        ("KOTADB_LOG_LEVEL", "LOUD", "one of"),
        ("KOTADB_DB_POOL_MIN", "20", "must not exceed KOTADB_DB_POOL_MAX"),
    ],
)
def test_invalid_values_name_the_variable(variable: str, value: str, problem: str) -> None:
    with pytest.raises(SettingsError) as caught:
        env_settings(AuthSettings, environ={variable: value})
    assert caught.value.env == variable
    assert variable in str(caught.value)
    assert problem in str(caught.value)


def test_required_and_boolean_fields() -> None:
    @dataclasses.dataclass(frozen=True)
    class Example:
        env_prefix = "KOTADB_EXAMPLE_"
        token: str = setting(help="A required token.")
        verbose: bool = setting(False, help="Whether to talk.")

    with pytest.raises(SettingsError) as caught:
        env_settings(Example, environ={})
    assert caught.value.env == "KOTADB_EXAMPLE_TOKEN"
    assert env_settings(
        Example, environ={"KOTADB_EXAMPLE_TOKEN": "t", "KOTADB_EXAMPLE_VERBOSE": "yes"}
    ).verbose
    with pytest.raises(SettingsError, match="KOTADB_EXAMPLE_VERBOSE"):
        env_settings(Example, environ={"KOTADB_EXAMPLE_TOKEN": "t", "KOTADB_EXAMPLE_VERBOSE": "maybe"})
    assert describe(Example)[0] == ("KOTADB_EXAMPLE_TOKEN", "(required)", "A required token.")


def test_describe_documents_every_field() -> None:
    rows = describe(SearchSettings)
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names)) == len(dataclasses.fields(SearchSettings))
    assert all(help_text.strip() for _, _, help_text in rows)
    table = dict((name, default) for name, default, _ in rows)
    assert table["KOTADB_SEARCH_PORT"] == "50053"
    assert table["KOTADB_SEARCH_DATA_DIR"] == "data/search"
    assert table["KOTADB_DATABASE_URL"] == ""
    assert {
        "KOTADB_DB_POOL_MIN",
        "KOTADB_DB_POOL_MAX",
        "KOTADB_DB_STATEMENT_CACHE_SIZE",
        "KOTADB_LOG_LEVEL",
    } <= set(table)

    markdown = describe_markdown([CommonSettings, AuthSettings, IngestSettings, SearchSettings])
    assert markdown.count("`KOTADB_DATABASE_URL`") == 1
    for prefix in ("KOTADB_AUTH_PORT", "KOTADB_INGEST_PORT", "KOTADB_SEARCH_PORT"):
        assert f"`{prefix}`" in markdown
