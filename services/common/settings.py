"""Settings: frozen dataclasses read from the environment, one documented field per variable.

Every field carries `metadata={"env": ..., "help": ...}`. `env` is either a full variable name
(`KOTADB_DATABASE_URL`, shared by every process) or, when it is missing, the field name upper-cased
behind the class's `env_prefix` (`KOTADB_AUTH_` + `PORT`). `describe` turns a settings class into
the rows of the configuration table in the README, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """SettingsError reports an environment variable that is missing or malformed; it names it."""

    def __init__(self, env: str, problem: str) -> None:
        super().__init__(f"{env}: {problem}")
        self.env = env
        self.problem = problem


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    env: str | None = None,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """setting declares one documented field; `env` overrides the prefixed variable name."""
    metadata: dict[str, Any] = {"help": help}
    if env is not None:
        metadata["env"] = env
    if minimum is not None:
        metadata["minimum"] = minimum
    if choices is not None:
        metadata["choices"] = choices
    return dataclasses.field(default=default, metadata=metadata)


def env_name(cls: type[Any], field: dataclasses.Field[Any], prefix: str | None = None) -> str:
    """env_name is the environment variable that feeds `field` of settings class `cls`."""
    explicit = field.metadata.get("env")
    if explicit:
        return str(explicit)
    chosen = prefix if prefix is not None else getattr(cls, "env_prefix", "KOTADB_")
    return f"{chosen}{field.name.upper()}"


def env_settings(cls: type[T], prefix: str | None = None, environ: Mapping[str, str] | None = None) -> T:
    """env_settings builds `cls` from the environment (or `environ`), validating every field.

    Unset variables keep their defaults; a variable set to the empty string counts as unset so
    that `KOTADB_X=` in an env file does not turn into a parse error.
    """
    source = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not field.init:
            continue
        name = env_name(cls, field, prefix)
        raw = source.get(name, "")
        if raw == "":
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise SettingsError(name, f"is required ({field.metadata.get('help', '')})")
            continue
        values[field.name] = _parse(name, raw.strip(), hints[field.name], field)
    try:
        return cls(**values)
    except SettingsError:
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError(cls.__name__, str(exc)) from exc


def describe(cls: type[Any], prefix: str | None = None) -> list[tuple[str, str, str]]:
    """describe lists `(env_name, default, help)` for every field of settings class `cls`."""
    rows: list[tuple[str, str, str]] = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            default = _render(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = _render(field.default_factory())
        else:
            default = "(required)"
        rows.append((env_name(cls, field, prefix), default, str(field.metadata.get("help", ""))))
    return rows


def describe_markdown(classes: list[type[Any]]) -> str:
    """describe_markdown renders the README configuration table for `classes`, without repeats."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    seen: set[str] = set()
    for cls in classes:
        for env, default, help_text in describe(cls):
            if env in seen:
                continue
            seen.add(env)
            shown = f"`{default}`" if default not in ("", "(required)") else default or "(empty)"
            lines.append(f"| `{env}` | {shown} | {help_text} |")
    return "\n".join(lines)


def _render(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(env: str, raw: str, hint: Any, field: dataclasses.Field[Any]) -> Any:
    """_parse converts `raw` to the field's annotated type and checks its declared bounds."""
    target = _unwrap_optional(hint)
    value: Any
    if target is bool:
        lowered = raw.lower()
        if lowered in _TRUE:
            value = True
        elif lowered in _FALSE:
            value = False
        else:
            raise SettingsError(env, f"expected a boolean (true/false), got {raw!r}")
    elif target is int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(env, f"expected an integer, got {raw!r}") from None
    elif target is float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(env, f"expected a number, got {raw!r}") from None
    elif target is Path:
        value = Path(raw).expanduser()
    elif target is str:
        value = raw
    else:
        raise SettingsError(env, f"unsupported settings type {hint!r}")
    minimum = field.metadata.get("minimum")
    if minimum is not None and value < minimum:
        raise SettingsError(env, f"must be at least {minimum}, got {raw!r}")
    choices: tuple[str, ...] | None = field.metadata.get("choices")
    if choices is not None:
        value = value.upper()
        if value not in choices:
            raise SettingsError(env, f"must be one of {', '.join(choices)}, got {raw!r}")
    return value


def _unwrap_optional(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return hint


@dataclasses.dataclass(frozen=True)
class CommonSettings:
    """CommonSettings holds what every KotaDB process reads: the database and logging."""

    env_prefix: ClassVar[str] = "KOTADB_"

    database_url: str = setting(
        "",
        env="KOTADB_DATABASE_URL",
        help="PostgreSQL DSN (Supabase direct 5432 or pooler 6543); `kotadb dev` sets it for its children.",
    )
    db_pool_min: int = setting(
        1, env="KOTADB_DB_POOL_MIN", minimum=0, help="Connections the asyncpg pool keeps open."
    )
    db_pool_max: int = setting(
        10, env="KOTADB_DB_POOL_MAX", minimum=1, help="Upper bound on the asyncpg pool's connections."
    )
    db_statement_cache_size: int = setting(
        100,
        env="KOTADB_DB_STATEMENT_CACHE_SIZE",
        minimum=0,
        help="asyncpg prepared-statement cache per connection; set 0 behind Supabase's port-6543 pooler.",
    )
    # The database timeouts stay under Envoy's 2 s ext_authz timeout (deploy/envoy/envoy.yaml.tmpl)
    # so that a hung database fails a call with our JSON 503 rather than Envoy's empty one. They
    # are the backstop for every query; Check bounds its own waits tighter still.
    db_connect_timeout: float = setting(
        1.5,
        env="KOTADB_DB_CONNECT_TIMEOUT",
        minimum=0.1,
        help="Seconds to open one database connection; under Envoy's 2 s ext_authz timeout, so a"
        " hung database fails a call before the gateway gives up on it.",
    )
    db_statement_timeout: float = setting(
        1.5,
        env="KOTADB_DB_STATEMENT_TIMEOUT",
        minimum=0.01,
        help="Seconds one query may run: asyncpg's command timeout on every query, and the server's"
        " `statement_timeout` set per transaction (pooler-safe); under Envoy's 2 s ext_authz timeout."
        " Past it the call fails UNAVAILABLE (DATABASE_UNAVAILABLE) with a retry delay.",
    )
    db_acquire_timeout: float = setting(
        1.0,
        env="KOTADB_DB_ACQUIRE_TIMEOUT",
        minimum=0.01,
        help="Seconds a call waits for a pooled connection (opening one included) before failing"
        " UNAVAILABLE (DATABASE_UNAVAILABLE); it also bounds returning the connection to the pool.",
    )
    log_level: str = setting(
        "INFO", env="KOTADB_LOG_LEVEL", choices=LOG_LEVELS, help="Lowest level written to the JSON log."
    )

    def __post_init__(self) -> None:
        if self.db_pool_min > self.db_pool_max:
            raise SettingsError(
                "KOTADB_DB_POOL_MIN",
                f"must not exceed KOTADB_DB_POOL_MAX ({self.db_pool_min} > {self.db_pool_max})",
            )


@dataclasses.dataclass(frozen=True)
class ServiceSettings(CommonSettings):
    """ServiceSettings adds what every gRPC service reads under its own prefix (`KOTADB_AUTH_`...)."""

    service_name: ClassVar[str] = "service"

    host: str = setting(
        "127.0.0.1", help="Address the gRPC server binds; `0.0.0.0` or `[::]` inside a container."
    )
    port: int = setting(0, minimum=0, help="gRPC port; 0 picks a free one (the bound port is logged).")
    shutdown_grace: float = setting(
        10.0, minimum=0.0, help="Seconds in-flight calls get to finish after SIGTERM before cancellation."
    )
    readiness_interval: float = setting(
        2.0, minimum=0.05, help="Seconds between readiness checks that drive the gRPC health status."
    )
    readiness_timeout: float = setting(
        1.5,
        minimum=0.05,
        help="Seconds one readiness probe may take before it counts as failed; with the interval it"
        " bounds how long a hung database keeps health SERVING (interval + timeout, 3.5 s by default).",
    )
    metrics_host: str = setting(
        "127.0.0.1",
        help="Address the Prometheus metrics listener binds; loopback unless scraped from outside.",
    )
    metrics_port: int = setting(
        0, minimum=0, help="Port of the Prometheus metrics listener (`GET /metrics`); 0 picks a free one."
    )
    max_message_bytes: int = setting(
        16 * 1024 * 1024, minimum=1024, help="Largest gRPC message received or sent, in bytes."
    )
