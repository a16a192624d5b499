"""Gateway client for the user-facing commands (`kotadb push`, `repos`, `jobs`): where, who, and errors.

The commands speak gRPC to the Envoy gateway (native gRPC goes through the same ext_authz,
rate limits and quotas as REST, and it is the only way to stream uploads). Where the gateway is
and which key to present come, in order, from the command's flags, the environment
(`KOTADB_URL`, `KOTADB_API_KEY`) and the running dev stack's stack.json (its gateway and demo
key), so `kotadb push .` works right after `make dev` and anywhere else with two variables.

Errors print as one line — `kotadb: <STATUS> <REASON>: <message>` — and the command exits 1; the
key is never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    # Imported where used: building `kotadb index`'s parser adds these flags (for `index
    # status`), and gRPC, protobuf and the dev stack cost a local `index search` ~170 ms.
    import grpc

    from services.common.stack import StackInfo

# gRPC messages a push sends can be large (one document up to the server's 10 MiB hard limit).
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class ClientError(Exception):
    """ClientError is a problem found before any call (no gateway, no key); printed as one line."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Target is the gateway's gRPC address (host:port) and the API key to present there."""

    address: str
    api_key: str
    secure: bool = False


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """add_target_arguments adds `--url`, `--api-key` and `--data-dir` to a client command."""
    parser.add_argument("--url", help="gateway URL (default: $KOTADB_URL, else the dev stack's gateway)")
    parser.add_argument(
        "--api-key",
        help="API key (default: $KOTADB_API_KEY, else the dev stack's demo key); prefer the variable",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="dev stack data dir whose stack.json supplies defaults"
    )


def resolve_target(args: argparse.Namespace) -> Target:
    """resolve_target picks the gateway and key from flags, environment, then the dev stack."""
    url = args.url or os.environ.get("KOTADB_URL", "")
    key = args.api_key or os.environ.get("KOTADB_API_KEY", "")
    if not url or not key:
        stack = _dev_stack(args.data_dir)
        if stack is not None:
            url = url or stack.gateway
            key = key or stack.demo_api_key
    if not url:
        raise ClientError("no gateway: set KOTADB_URL or --url (or start one with `kotadb dev`)")
    if not key:
        raise ClientError("no API key: set KOTADB_API_KEY or --api-key")
    return target_from_url(url, key)


def _dev_stack(data_dir: Path | None) -> StackInfo | None:
    from services.cli import status

    try:
        return status.load_stack(data_dir or status.default_data_dir())
    except (OSError, ValueError):
        return None


def target_from_url(url: str, key: str) -> Target:
    """target_from_url turns a gateway URL (`http(s)://host[:port]`, or bare `host:port`) into a Target."""
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ClientError(f"gateway URL must be http(s)://host[:port], got {url!r}")
    secure = parsed.scheme == "https"
    port = parsed.port or (443 if secure else 80)
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return Target(address=f"{host}:{port}", api_key=key, secure=secure)


def open_channel(target: Target) -> grpc.aio.Channel:
    """open_channel opens an asyncio gRPC channel to the gateway (TLS when the URL was https)."""
    import grpc

    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    if target.secure:
        return grpc.aio.secure_channel(target.address, grpc.ssl_channel_credentials(), options=options)
    return grpc.aio.insecure_channel(target.address, options=options)


def call_metadata(target: Target) -> tuple[tuple[str, str], ...]:
    """call_metadata is the metadata every call carries: the API key as a bearer credential."""
    return (("authorization", f"Bearer {target.api_key}"),)


class FailedCall(Protocol):
    """FailedCall is what a failed gRPC call offers, synchronous (grpc.RpcError) or asyncio."""

    def code(self) -> grpc.StatusCode | None:
        """code is the call's status code."""
        ...

    def details(self) -> str | None:
        """details is the status message."""
        ...

    def trailing_metadata(self) -> Any:
        """trailing_metadata carries `grpc-status-details-bin` (google.rpc.Status)."""
        ...


def describe_rpc_error(error: FailedCall | grpc.RpcError) -> str:
    """describe_rpc_error renders a failed call as `STATUS REASON: message`, with field violations."""
    from google.rpc import error_details_pb2, status_pb2

    error = cast(FailedCall, error)
    status_code = error.code()
    code = status_code.name if status_code is not None else "UNKNOWN"
    message = error.details() or ""
    reason = ""
    extras: list[str] = []
    trailers = cast(Iterable[tuple[str, str | bytes]], error.trailing_metadata() or ())
    for key, value in trailers:
        # The gateway's own refusals (ext_authz: bad key, permission, quota) carry no status
        # details, only these headers (services/auth/check.py).
        if key == "x-kotadb-error-reason" and isinstance(value, str):
            reason = reason or value
            continue
        if key == "retry-after" and isinstance(value, str):
            extras.append(f"retry after {value}s")
            continue
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        rpc_status = status_pb2.Status.FromString(value)
        for detail in rpc_status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason or reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                extras.extend(f"{v.field}: {v.description}" for v in bad.field_violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                extras.append(f"retry after {retry.retry_delay.seconds}s")
    head = f"{code} {reason}".strip()
    tail = f" ({'; '.join(extras)})" if extras else ""
    return f"{head}: {message}{tail}"


def fail(message: str) -> int:
    """fail prints one `kotadb: …` line on stderr and returns the exit code 1."""
    print(f"kotadb: {message}", file=sys.stderr)
    return 1
