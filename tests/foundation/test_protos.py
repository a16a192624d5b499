"""Tests of the v1 contracts: generated code, buf, HTTP rules, AIP shapes and the Envoy descriptor.

The last group runs a real Envoy with the committed descriptor set in front of a real
grpc.aio server, to prove the REST shapes the contracts promise actually transcode:
`GET /health`, the raw webhook body, and the KotaDB-compatible symbol search body.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor, ServiceDescriptor
from kotadb.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    document_pb2,
    health_pb2,
    health_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    job_pb2,
    repository_pb2,
    search_pb2,
    search_pb2_grpc,
)

# googleapis-common-protos has no py.typed marker, so mypy cannot see its types; the
# module is loaded by name and used through its descriptors.
annotations_pb2: Any = importlib.import_module("google.api.annotations_pb2")

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DESCRIPTOR_SET = REPO / "deploy" / "envoy" / "kotadb.pb"
EXTERNAL_FILES: tuple[FileDescriptor, ...] = (
    auth_pb2.DESCRIPTOR,
    ingest_pb2.DESCRIPTOR,
    search_pb2.DESCRIPTOR,
    health_pb2.DESCRIPTOR,
)
RESOURCE_FILES: tuple[FileDescriptor, ...] = (
    document_pb2.DESCRIPTOR,
    job_pb2.DESCRIPTOR,
    repository_pb2.DESCRIPTOR,
)

# RPCs with no REST mapping, on purpose: ValidateApiKey is service-to-service only, and
# a client-streaming upload has no HTTP/JSON form through Envoy's transcoder.
GRPC_ONLY = {"kotadb.v1.AuthService.ValidateApiKey", "kotadb.v1.IngestService.StreamUpsertDocuments"}

# The REST surface the Foundation issue promises, one row per binding: (RPC, verb, path, body).
EXPECTED_BINDINGS = {
    ("kotadb.v1.AuthService.CreateApiKey", "post", "/v1/apiKeys", "*"),
    ("kotadb.v1.AuthService.ListApiKeys", "get", "/v1/apiKeys", ""),
    ("kotadb.v1.AuthService.GetApiKey", "get", "/v1/apiKeys/{id}", ""),
    ("kotadb.v1.AuthService.UpdateApiKey", "patch", "/v1/apiKeys/{api_key.id}", "api_key"),
    ("kotadb.v1.AuthService.RevokeApiKey", "post", "/v1/apiKeys/{id}:revoke", "*"),
    ("kotadb.v1.AuthService.RotateApiKey", "post", "/v1/apiKeys/{id}:rotate", "*"),
    ("kotadb.v1.AuthService.GetUsage", "get", "/v1/usage", ""),
    ("kotadb.v1.IngestService.UpsertDocuments", "post", "/v1/documents:batchUpsert", "*"),
    ("kotadb.v1.IngestService.GetDocument", "get", "/v1/documents/{id}", ""),
    ("kotadb.v1.IngestService.ListDocuments", "get", "/v1/documents", ""),
    ("kotadb.v1.IngestService.DeleteDocument", "delete", "/v1/documents/{id}", ""),
    ("kotadb.v1.IngestService.CreateRepository", "post", "/v1/repositories", "*"),
    ("kotadb.v1.IngestService.GetRepository", "get", "/v1/repositories/{id}", ""),
    ("kotadb.v1.IngestService.ListRepositories", "get", "/v1/repositories", ""),
    ("kotadb.v1.IngestService.UpdateRepository", "patch", "/v1/repositories/{repository.id}", "repository"),
    ("kotadb.v1.IngestService.RotateWebhookSecret", "post", "/v1/repositories/{id}:rotateWebhookSecret", "*"),
    ("kotadb.v1.IngestService.DeleteRepository", "delete", "/v1/repositories/{id}", ""),
    ("kotadb.v1.IngestService.SyncRepository", "post", "/v1/repositories/{id}:sync", "*"),
    ("kotadb.v1.IngestService.GetJob", "get", "/v1/jobs/{id}", ""),
    ("kotadb.v1.IngestService.ListJobs", "get", "/v1/jobs", ""),
    ("kotadb.v1.IngestService.CancelJob", "post", "/v1/jobs/{id}:cancel", "*"),
    ("kotadb.v1.IngestService.WatchJob", "get", "/v1/jobs/{id}:watch", ""),
    ("kotadb.v1.IngestService.ReceiveGithubWebhook", "post", "/v1/webhooks/github/{repository_id}", "body"),
    ("kotadb.v1.SearchService.SearchCode", "post", "/v1/code:search", "*"),
    ("kotadb.v1.SearchService.StreamSearchCode", "post", "/v1/code:streamSearch", "*"),
    ("kotadb.v1.SearchService.SearchSymbols", "post", "/v1/symbols:search", "*"),
    ("kotadb.v1.SearchService.SearchSymbols", "post", "/api/v1/symbols/search", "*"),
    ("kotadb.v1.SearchService.GetIndexStatus", "get", "/v1/index", ""),
    ("kotadb.v1.SearchService.RebuildIndex", "post", "/v1/index:rebuild", "*"),
    ("kotadb.v1.HealthService.GetHealth", "get", "/health", ""),
}


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run executes a command from the repository root and captures its output."""
    return subprocess.run(
        [str(a) for a in args], cwd=REPO, capture_output=True, text=True, check=False, env=env, timeout=300
    )


def services() -> list[ServiceDescriptor]:
    """Services lists every service declared by the external proto files."""
    return [service for file in EXTERNAL_FILES for service in file.services_by_name.values()]


def http_rule(method: MethodDescriptor) -> Any:
    """Http_rule returns a method's google.api.http option, or None when it has none."""
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return None
    return options.Extensions[annotations_pb2.http]


def bindings(method: MethodDescriptor) -> set[tuple[str, str, str, str]]:
    """Bindings flattens a method's HTTP rule and its additional bindings into (rpc, verb, path, body)."""
    rule = http_rule(method)
    if rule is None:
        return set()
    found = set()
    for binding in (rule, *rule.additional_bindings):
        verb = binding.WhichOneof("pattern")
        assert verb is not None and verb != "custom"
        found.add((method.full_name, verb, getattr(binding, verb), binding.body))
    return found


# --- generated code and buf ------------------------------------------------------------------------


def test_generated_code_is_fresh() -> None:
    result = run(PYTHON, "scripts/gen_protos.py", "--check")
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_check_names_stale_missing_and_extra_files(tmp_path: Path) -> None:
    assert run(PYTHON, "scripts/gen_protos.py", "--output-root", tmp_path).returncode == 0
    assert run(PYTHON, "scripts/gen_protos.py", "--check", "--output-root", tmp_path).returncode == 0
    v1 = tmp_path / "gen" / "python" / "kotadb" / "v1"
    (v1 / "search_pb2.py").write_text("# edited by hand\n")
    (v1 / "removed_pb2.py").write_text("")
    (tmp_path / "deploy" / "envoy" / "kotadb.pb").unlink()

    result = run(PYTHON, "scripts/gen_protos.py", "--check", "--output-root", tmp_path)

    assert result.returncode == 1
    assert "stale: gen/python/kotadb/v1/search_pb2.py" in result.stderr
    assert "extra (not generated): gen/python/kotadb/v1/removed_pb2.py" in result.stderr
    assert "missing: deploy/envoy/kotadb.pb" in result.stderr
    assert "auth_pb2.py" not in result.stderr


def test_check_names_a_generator_version_mismatch(tmp_path: Path) -> None:
    assert run(PYTHON, "scripts/gen_protos.py", "--output-root", tmp_path).returncode == 0
    marker = tmp_path / "gen" / "python" / "kotadb" / "v1" / "__init__.py"
    recorded = marker.read_text()
    assert "# generated with: grpcio-tools " in recorded
    marker.write_text(recorded.split("# generated with:")[0] + "# generated with: grpcio-tools 0.0.1\n")

    result = run(PYTHON, "scripts/gen_protos.py", "--check", "--output-root", tmp_path)

    assert result.returncode == 1
    assert "stale: gen/python/kotadb/v1/__init__.py" in result.stderr
    assert "generated with grpcio-tools 0.0.1, but grpcio-tools " in result.stderr


def test_buf_lint_passes() -> None:
    result = run("bash", "scripts/buf.sh", "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_rejects_a_violation(tmp_path: Path) -> None:
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    (tmp_path / "protos" / "kotadb" / "v1" / "extra.proto").write_text(
        'syntax = "proto3";\npackage kotadb.v1;\n'
        "// Color is a color.\nenum Color {\n  // RED is red.\n  RED = 0;\n}\n"
    )
    result = run("bash", "scripts/buf.sh", "lint", tmp_path / "protos")
    assert result.returncode != 0
    assert 'kotadb/v1/extra.proto:6:3:Enum zero value name "RED" should be suffixed with "_UNSPECIFIED"' in (
        result.stdout
    )
    # Google's own files are outside our rules, so only ours are reported.
    assert "google/" not in result.stdout


def test_buf_breaking_compares_against_a_git_ref(tmp_path: Path) -> None:
    # A scratch repository with this checkout's scripts and protos, so the test can commit.
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "protos", repo / "protos")
    (repo / "scripts").mkdir()
    for name in ("buf.sh", "gen_protos.py"):
        shutil.copy(REPO / "scripts" / name, repo / "scripts" / name)
    env = {**os.environ, "PYTHON": PYTHON, "BUF": str(REPO / "node_modules" / ".bin" / "buf")}
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    assert subprocess.run([*git, "init", "-q", "-b", "trunk"], check=False).returncode == 0
    script = repo / "scripts" / "buf.sh"

    unborn = run("bash", script, "breaking", "HEAD", env=env)
    assert unborn.returncode == 2  # no commit yet: HEAD names nothing
    assert "unknown git ref: HEAD" in unborn.stderr
    subprocess.run([*git, "add", "scripts"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "scripts only"], check=True)
    no_main = run("bash", script, "breaking", env=env)
    assert no_main.returncode == 0, no_main.stderr
    assert "no main or origin/main branch" in no_main.stdout
    subprocess.run([*git, "branch", "main"], check=True)
    no_protos = run("bash", script, "breaking", env=env)
    assert no_protos.returncode == 0, no_protos.stderr
    assert "main has no protos" in no_protos.stdout

    subprocess.run([*git, "add", "protos"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "protos"], check=True)
    subprocess.run([*git, "branch", "-f", "main", "trunk"], check=True)
    same = run("bash", script, "breaking", env=env)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "no breaking changes against main" in same.stdout

    search = repo / "protos" / "kotadb" / "v1" / "search.proto"
    text = search.read_text()
    removed = (
        "  // context_lines is the number of lines of context before and after each matching line (max 10).\n"
    )
    removed += "  int32 context_lines = 4;\n"
    assert removed in text
    search.write_text(text.replace(removed, ""))
    broken = run("bash", script, "breaking", "main", env=env)
    assert broken.returncode != 0
    assert 'Previously present field "4" with name "context_lines" on message "SearchCodeRequest"' in (
        broken.stdout
    )


# --- the contracts --------------------------------------------------------------------------------


def test_generated_modules_expose_the_services() -> None:
    for module, service in (
        (auth_pb2_grpc, "AuthService"),
        (ingest_pb2_grpc, "IngestService"),
        (search_pb2_grpc, "SearchService"),
        (health_pb2_grpc, "HealthService"),
    ):
        assert hasattr(module, f"{service}Stub")
        assert hasattr(module, f"{service}Servicer")
        assert hasattr(module, f"add_{service}Servicer_to_server")
    assert {s.full_name for s in services()} == {
        "kotadb.v1.AuthService",
        "kotadb.v1.IngestService",
        "kotadb.v1.SearchService",
        "kotadb.v1.HealthService",
    }


def test_every_external_rpc_has_an_http_rule_except_the_grpc_only_ones() -> None:
    for service in services():
        for method in service.methods:
            if method.full_name in GRPC_ONLY:
                assert http_rule(method) is None, method.full_name
            else:
                assert http_rule(method) is not None, f"{method.full_name} has no google.api.http rule"


def test_rest_surface_matches_the_foundation_issue() -> None:
    found = {b for service in services() for method in service.methods for b in bindings(method)}
    assert found == EXPECTED_BINDINGS


def test_streaming_shapes() -> None:
    streaming = {
        method.full_name: (method.client_streaming, method.server_streaming)
        for service in services()
        for method in service.methods
        if method.client_streaming or method.server_streaming
    }
    assert streaming == {
        "kotadb.v1.IngestService.StreamUpsertDocuments": (True, False),
        "kotadb.v1.IngestService.WatchJob": (False, True),
        "kotadb.v1.SearchService.StreamSearchCode": (False, True),
    }


def test_list_methods_paginate_and_creates_take_a_request_id() -> None:
    for service in services():
        for method in service.methods:
            request, response = set(method.input_type.fields_by_name), set(method.output_type.fields_by_name)
            if method.name.startswith("List"):
                assert {"page_size", "page_token"} <= request, method.full_name
                assert "next_page_token" in response, method.full_name
            if method.name.startswith("Create"):
                assert "request_id" in request, method.full_name


def test_enums_start_with_unspecified_zero() -> None:
    pending: list[Any] = [
        m for f in (*EXTERNAL_FILES, *RESOURCE_FILES) for m in f.message_types_by_name.values()
    ]
    enums: list[Any] = [e for f in (*EXTERNAL_FILES, *RESOURCE_FILES) for e in f.enum_types_by_name.values()]
    while pending:
        message = pending.pop()
        enums.extend(message.enum_types)
        pending.extend(message.nested_types)
    assert len(enums) >= 12
    for enum in enums:
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.full_name


def test_webhook_request_carries_the_raw_body() -> None:
    field = ingest_pb2.ReceiveGithubWebhookRequest.DESCRIPTOR.fields_by_name["body"]
    assert field.message_type is not None
    assert field.message_type.full_name == "google.api.HttpBody"
    rule = http_rule(
        ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].methods_by_name["ReceiveGithubWebhook"]
    )
    assert rule is not None and rule.body == "body"


def test_descriptor_set_includes_imports_and_error_details() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    names = [f.name for f in fds.file]
    assert len(names) == len(set(names))
    for required in (
        "google/rpc/error_details.proto",
        "google/rpc/status.proto",
        "google/api/httpbody.proto",
        "google/api/annotations.proto",
        "google/protobuf/timestamp.proto",
        "kotadb/v1/auth.proto",
        "kotadb/v1/ingest.proto",
        "kotadb/v1/search.proto",
        "kotadb/v1/health.proto",
    ):
        assert required in names
    # Every import precedes its importer, as Envoy's descriptor pool requires.
    for index, file in enumerate(fds.file):
        assert set(file.dependency) <= set(names[:index]), file.name
    error_details = next(f for f in fds.file if f.name == "google/rpc/error_details.proto")
    assert {"ErrorInfo", "BadRequest", "QuotaFailure", "RetryInfo"} <= {
        m.name for m in error_details.message_type
    }


# --- transcoding through a real Envoy --------------------------------------------------------------


# The test server implements only the methods these tests call, through generic handlers:
# the generated servicer base classes declare every RPC abstract (mypy-protobuf), so a
# production servicer cannot forget one, but a partial one cannot be instantiated.


async def get_health(
    request: health_pb2.GetHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> Any:
    """Get_health reports one serving component."""
    component = health_pb2.GetHealthResponse.Component(
        name="database", status=health_pb2.GetHealthResponse.SERVING
    )
    return health_pb2.GetHealthResponse(
        status=health_pb2.GetHealthResponse.SERVING, components=[component], service="test"
    )


async def receive_github_webhook(
    request: ingest_pb2.ReceiveGithubWebhookRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> ingest_pb2.ReceiveGithubWebhookResponse:
    """Receive_github_webhook echoes the body's SHA-256, the event header and the path's repository."""
    metadata = {key: value for key, value in context.invocation_metadata() or ()}
    return ingest_pb2.ReceiveGithubWebhookResponse(
        delivery_id=hashlib.sha256(request.body.data).hexdigest(),
        event=str(metadata.get("x-github-event", "")),
        ignored_reason=f"{request.repository_id} {request.body.content_type}",
    )


async def search_symbols(
    request: search_pb2.SearchSymbolsRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> search_pb2.SearchSymbolsResponse:
    """Search_symbols returns one match named after the query, counting the limit as the total."""
    match = search_pb2.SymbolMatch(name=request.pattern or request.query, kind="function")
    return search_pb2.SearchSymbolsResponse(symbols=[match], total_count=request.limit or request.page_size)


def unary(
    service: str, method: str, behaviour: Any, request_type: Any, response_type: Any
) -> grpc.GenericRpcHandler[Any, Any]:
    """Unary serves one unary method of service with behaviour."""
    handler = grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(service, {method: handler})


@dataclass(frozen=True)
class Gateway:
    """Gateway is a running Envoy in front of the test server."""

    url: str


@pytest.fixture(scope="module")
async def grpc_port() -> AsyncIterator[int]:
    """Grpc_port runs the echoing servicers on a free loopback port."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            unary(
                "kotadb.v1.HealthService",
                "GetHealth",
                get_health,
                health_pb2.GetHealthRequest,
                health_pb2.GetHealthResponse,
            ),
            unary(
                "kotadb.v1.IngestService",
                "ReceiveGithubWebhook",
                receive_github_webhook,
                ingest_pb2.ReceiveGithubWebhookRequest,
                ingest_pb2.ReceiveGithubWebhookResponse,
            ),
            unary(
                "kotadb.v1.SearchService",
                "SearchSymbols",
                search_symbols,
                search_pb2.SearchSymbolsRequest,
                search_pb2.SearchSymbolsResponse,
            ),
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(grace=None)


def envoy_binary() -> Path:
    """Envoy_binary finds the Envoy executable from .venv-envoy, or KOTADB_ENVOY_BIN."""
    override = os.environ.get("KOTADB_ENVOY_BIN")
    path = (
        Path(override)
        if override
        else REPO / ".venv-envoy" / "lib" / "python3.11" / "site-packages" / "envoy" / "_bin" / "envoy"
    )
    assert path.is_file(), f"Envoy not found at {path}; run scripts/bootstrap.sh"
    return path


def envoy_config(grpc_port: int) -> dict[str, Any]:
    """Envoy_config is a minimal transcoding gateway to the test server on grpc_port."""
    transcoder = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3"
        ".GrpcJsonTranscoder",
        "proto_descriptor": str(DESCRIPTOR_SET),
        "services": [s.full_name for s in services()],
        "convert_grpc_status": True,
        "print_options": {"preserve_proto_field_names": True},
        "request_validation_options": {"reject_unknown_method": True},
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "test",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.grpc_json_transcoder", "typed_config": transcoder},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    endpoint = {
        "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": grpc_port}}}
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "up",
                    "type": "STATIC",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                            ".HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [endpoint]}]},
                }
            ],
        },
    }


def listener_url(admin_address_file: Path, envoy: subprocess.Popen[bytes]) -> str:
    """Listener_url waits for Envoy to be ready and returns its listener's base URL."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert envoy.poll() is None, "Envoy exited during startup"
        if admin_address_file.is_file() and admin_address_file.read_text().strip():
            admin = f"http://{admin_address_file.read_text().strip()}"
            try:
                with urllib.request.urlopen(f"{admin}/listeners?format=json", timeout=5) as reply:
                    listeners = json.load(reply)["listener_statuses"]
                address = listeners[0]["local_address"]["socket_address"]
                if address.get("port_value"):
                    return f"http://127.0.0.1:{address['port_value']}"
            except (OSError, KeyError, IndexError):
                pass
        time.sleep(0.1)
    raise AssertionError("Envoy did not become ready within 60 s")


@pytest.fixture(scope="module")
def gateway(grpc_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Gateway runs Envoy with the committed descriptor set in front of the test server."""
    work = tmp_path_factory.mktemp("envoy")
    config = work / "envoy.json"
    config.write_text(json.dumps(envoy_config(grpc_port)))
    admin_address = work / "admin_address"
    command = [
        str(envoy_binary()),
        "-c",
        str(config),
        "--admin-address-path",
        str(admin_address),
        # No shared memory for hot restart, so parallel Envoys in other tests cannot clash.
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]
    with (work / "envoy.log").open("wb") as log:
        envoy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        try:
            yield Gateway(url=listener_url(admin_address, envoy))
        finally:
            envoy.terminate()
            envoy.wait(timeout=30)


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    """Http sends one request and returns the decoded JSON body, failing on a non-2xx status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{method} {url}: {error.code} {error.read()!r}") from error


async def test_health_is_served_as_json(gateway: Gateway) -> None:
    body = await asyncio.to_thread(http, "GET", f"{gateway.url}/health")
    assert body["status"] == "SERVING"
    assert body["components"] == [{"name": "database", "status": "SERVING"}]


async def test_webhook_body_arrives_byte_for_byte(gateway: Gateway) -> None:
    # Whitespace and key order matter to an HMAC, so the bytes must not be re-encoded.
    raw = b'{"ref": "refs/heads/main",   "zen":"\\u00e9 keep  spacing"}\n'
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "push"}
    url = f"{gateway.url}/v1/webhooks/github/repo-123"
    body = await asyncio.to_thread(http, "POST", url, raw, headers)
    assert body["delivery_id"] == hashlib.sha256(raw).hexdigest()
    assert body["event"] == "push"
    assert body["ignored_reason"] == "repo-123 application/json"


async def test_kotadb_compatible_symbol_search_body(gateway: Gateway) -> None:
    payload = json.dumps({"pattern": "parse_config", "limit": 7}).encode()
    url = f"{gateway.url}/api/v1/symbols/search"
    body = await asyncio.to_thread(http, "POST", url, payload, {"Content-Type": "application/json"})
    assert body["symbols"][0]["name"] == "parse_config"
    assert body["total_count"] == "7"  # int64 renders as a JSON string


async def test_grpc_and_rest_reach_the_same_method(gateway: Gateway, grpc_port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        reply = await search_pb2_grpc.SearchServiceStub(channel).SearchSymbols(
            search_pb2.SearchSymbolsRequest(query="Parser.parse", page_size=3), timeout=10
        )
    payload = json.dumps({"query": "Parser.parse", "page_size": 3}).encode()
    url = f"{gateway.url}/v1/symbols:search"
    body = await asyncio.to_thread(http, "POST", url, payload, {"Content-Type": "application/json"})
    assert [s.name for s in reply.symbols] == [s["name"] for s in body["symbols"]] == ["Parser.parse"]
    assert str(reply.total_count) == body["total_count"] == "3"
