"""Rendering the gateway template and validating it with the real Envoy binary."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pool
from kotadb.v1 import auth_pb2, ingest_pb2, search_pb2  # noqa: F401 — registers the services

from services.cli import envoyreplies, gateway, main


def _validate(tmp_path: Path, config: gateway.GatewayConfig, name: str = "envoy.yaml") -> tuple[int, str]:
    path = tmp_path / name
    path.write_text(gateway.render(config))
    result = gateway.validate(path)
    return result.returncode, result.stdout + result.stderr


def test_default_render_validates(tmp_path: Path) -> None:
    code, output = _validate(tmp_path, gateway.GatewayConfig())
    assert code == 0, output


def test_ext_authz_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    assert gateway.GatewayConfig().ext_authz
    on = gateway.render(gateway.GatewayConfig())
    assert "disabled: false\n            typed_config" in on
    assert "failure_mode_allow: false" in on
    off = gateway.GatewayConfig(ext_authz=False)
    code, output = _validate(tmp_path, off)
    assert code == 0, output
    assert "disabled: true\n            typed_config" in gateway.render(off)


def test_several_auth_replicas_share_the_auth_cluster(tmp_path: Path) -> None:
    config = gateway.GatewayConfig(auth="127.0.0.1:50051,127.0.0.1:50061")
    code, output = _validate(tmp_path, config)
    assert code == 0, output
    text = gateway.render(config)
    assert '"port_value": 50051' in text and '"port_value": 50061' in text


def test_access_log_streams_to_the_auth_cluster() -> None:
    text = gateway.render(gateway.GatewayConfig())
    assert "envoy.access_loggers.http_grpc" in text
    assert "log_name: kotadb" in text
    assert (
        "additional_request_headers_to_log:\n"
        "                [x-kotadb-key-id, x-kotadb-tenant, x-request-id, x-envoy-original-method]"
    ) in text


def test_ext_authz_calls_the_check_listeners_when_given() -> None:
    # Without --auth-check, Check is asked on the auth gRPC ports; with it, on the lean listeners.
    plain = gateway.render(gateway.GatewayConfig(auth="127.0.0.1:50051"))
    assert "envoy_grpc: { cluster_name: auth_check }" in plain
    check_cluster = plain[plain.index("- name: auth_check") :]
    check_cluster = check_cluster[: check_cluster.index("- name: ingest")]
    assert '"port_value": 50051' in check_cluster
    lean = gateway.render(
        gateway.GatewayConfig(
            auth="127.0.0.1:50051,127.0.0.1:50061", auth_check="127.0.0.1:50055,127.0.0.1:50065"
        )
    )
    check_cluster = lean[lean.index("- name: auth_check") :]
    check_cluster = check_cluster[: check_cluster.index("- name: ingest")]
    assert '"port_value": 50055' in check_cluster and '"port_value": 50065' in check_cluster
    assert '"port_value": 50051' not in check_cluster


def test_hostnames_and_custom_ports_validate(tmp_path: Path) -> None:
    config = gateway.GatewayConfig(
        gateway_port=18080,
        admin_port=19901,
        listen_address="0.0.0.0",
        auth="auth.internal:50051",
        ingest="127.0.0.1:50052",
        search="[::1]:50053",
    )
    code, output = _validate(tmp_path, config)
    assert code == 0, output
    text = gateway.render(config)
    assert "port_value: 18080" in text
    assert "port_value: 19901" in text
    assert "STRICT_DNS" in text  # auth.internal needs a resolver; the IP literals do not


def test_missing_descriptor_fails_validation(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-descriptor.pb"
    code, output = _validate(tmp_path, gateway.GatewayConfig(descriptor=missing))
    assert code != 0
    assert str(missing) in output


def test_corrupt_descriptor_fails_validation(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pb"
    corrupt.write_bytes(b"\x0a\xff\xff\xff\xff this is not a FileDescriptorSet")
    code, output = _validate(tmp_path, gateway.GatewayConfig(descriptor=corrupt))
    assert code != 0, output


def test_relative_descriptor_is_rendered_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(gateway.REPO_ROOT)
    relative = gateway.DEFAULT_DESCRIPTOR.relative_to(gateway.REPO_ROOT)
    text = gateway.render(gateway.GatewayConfig(descriptor=relative))
    assert f"proto_descriptor: {json.dumps(str(gateway.DEFAULT_DESCRIPTOR))}" in text
    # The rendered file, validated from another directory, still finds the descriptor.
    rendered = tmp_path / "envoy.yaml"
    rendered.write_text(text)
    monkeypatch.chdir(tmp_path)
    result = gateway.validate(rendered)
    assert result.returncode == 0, result.stdout + result.stderr


def _streaming_methods_in_python_stubs() -> set[str]:
    """Streaming methods as the generated Python modules describe them (independent of the .pb)."""
    pool = descriptor_pool.Default()
    found: set[str] = set()
    for service_name in gateway.SERVICE_CLUSTERS:
        service = pool.FindServiceByName(service_name)
        for method in service.methods:
            if method.client_streaming or method.server_streaming:
                found.add(f"/{service.full_name}/{method.name}")
    return found


def test_streaming_routes_come_from_the_descriptor() -> None:
    from_descriptor = set(gateway.streaming_methods(gateway.DEFAULT_DESCRIPTOR))
    assert from_descriptor == _streaming_methods_in_python_stubs()
    assert from_descriptor, "the v1 surface has streaming methods"
    # The fallback (used only when the descriptor is unreadable) must not drift from the protos.
    assert set(gateway.FALLBACK_STREAMING_METHODS) == from_descriptor
    text = gateway.render(gateway.GatewayConfig())
    for path in from_descriptor:
        route_line = next(line for line in text.splitlines() if f'"path": "{path}"' in line)
        assert '"timeout": "0s"' in route_line
        assert f'"max_stream_duration": "{gateway.STREAM_MAX_DURATION}"' in route_line


def test_every_routed_service_is_in_the_descriptor() -> None:
    text = gateway.render(gateway.GatewayConfig())
    for service_name, cluster in gateway.SERVICE_CLUSTERS.items():
        assert f"prefix: /{service_name}/" in text
        assert f"cluster: {cluster}" in text


def test_admin_listens_on_loopback_only() -> None:
    text = gateway.render(gateway.GatewayConfig(listen_address="0.0.0.0"))
    admin = text.split("\nadmin:", 1)[1].split("\nstatic_resources:", 1)[0]
    assert "address: 127.0.0.1" in admin


def test_cli_render_and_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli" / "envoy.yaml"
    assert main.main(["gateway", "render", "--gateway-port", "18081", "--out", str(out), "--validate"]) == 0
    assert "port_value: 18081" in out.read_text()
    assert main.main(["gateway", "validate", str(out)]) == 0
    assert "OK" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    assert main.main(["gateway", "render", "--descriptor", str(tmp_path / "x.pb"), "--out", str(bad)]) == 0
    assert main.main(["gateway", "validate", str(bad)]) == 1


def test_cli_render_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main.main(["gateway", "render", "--admin-port", "19902"]) == 0
    assert "port_value: 19902" in capsys.readouterr().out
    assert main.main(["gateway", "render", "--no-ext-authz"]) == 0
    assert "disabled: true\n            typed_config" in capsys.readouterr().out


def test_envoy_binary_can_be_overridden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "envoy"
    monkeypatch.setenv("KOTADB_ENVOY_BIN", str(fake))
    assert gateway.find_envoy() == str(fake)
    monkeypatch.delenv("KOTADB_ENVOY_BIN")
    assert os.access(gateway.find_envoy(), os.X_OK)


def test_rendered_config_is_written_owner_only(tmp_path: Path) -> None:
    # The config holds the access-log token: 0600 in a 0700 directory, even over a wider file.
    out = tmp_path / "fresh" / "envoy.yaml"
    assert main.main(["gateway", "render", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o700
    wide = tmp_path / "wide.yaml"
    wide.write_text("old")
    wide.chmod(0o644)
    gateway.write_config(wide, "new")
    assert wide.read_text() == "new"
    assert stat.S_IMODE(wide.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_limit_flags_reach_the_config(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    flags = {
        "--body-limit": "2048",
        "--batch-body-limit": "4096",
        "--webhook-body-limit": "8192",
        "--max-request-headers-kb": "16",
        "--max-heap-mib": "64",
        "--connection-buffer-bytes": "65536",
        "--max-connections": "50",
    }
    argv = ["gateway", "render", "--out", str(out), "--validate"]
    assert main.main([*argv, *(part for pair in flags.items() for part in pair)]) == 0
    text = out.read_text()
    for line in (
        "max_request_bytes: 2048",
        "max_request_bytes: 4096",
        "max_request_bytes: 8192",
        "max_request_body_size: 8192",  # the transcoder holds at most the largest limit
        "max_request_headers_kb: 16",
        f"max_heap_size_bytes: {64 * 1024 * 1024}",
        "per_connection_buffer_limit_bytes: 65536",
        "max_active_downstream_connections: 50",
    ):
        assert line in text, line
    with pytest.raises(SystemExit):
        main.main(["gateway", "render", "--body-limit", "0"])


def test_default_limits() -> None:
    # The documented defaults (README, "Gateway limits"); changing one is a decision, not a slip.
    defaults = gateway.GatewayConfig()
    mib = 1024 * 1024
    assert defaults.body_limit_bytes == 1 * mib
    assert defaults.batch_body_limit_bytes == 16 * mib
    assert defaults.webhook_body_limit_bytes == 25 * mib
    assert defaults.max_request_headers_kb == 32
    assert defaults.max_heap_mib == 512


def test_batch_methods_are_the_descriptors_bindings() -> None:
    pool = descriptor_pool.Default()
    for grpc_path, rest_path in gateway.BATCH_METHODS.items():
        service, method = grpc_path.strip("/").split("/")
        options = pool.FindMethodByName(f"{service}.{method}").GetOptions()
        assert options.Extensions[annotations_pb2.http].post == rest_path


def _route_line(text: str, path: str) -> dict[str, Any]:
    line = next(line for line in text.splitlines() if f'"path": "{path}"' in line)
    route: dict[str, Any] = json.loads(line.strip()[2:])
    return route


def test_routes_pick_their_body_limit() -> None:
    text = gateway.render(gateway.GatewayConfig())
    client_streaming = set(gateway.client_streaming_methods(gateway.DEFAULT_DESCRIPTOR))
    assert client_streaming == set(gateway.FALLBACK_CLIENT_STREAMING_METHODS)
    for path in gateway.streaming_methods(gateway.DEFAULT_DESCRIPTOR):
        switches = _route_line(text, path).get("typed_per_filter_config", {})
        # Client streams have no gateway body limit; server streams keep the default.
        assert (switches.get("body_limit", {}).get("disabled") is True) == (path in client_streaming), path
    for grpc_path, rest_path in gateway.BATCH_METHODS.items():
        for path in (grpc_path, rest_path):
            switches = _route_line(text, path)["typed_per_filter_config"]
            assert switches["body_limit"]["disabled"] is True
            assert "config" in switches["body_limit_batch"]
    webhook = text[text.index("- name: github-webhook") :].split("\n              - ", 1)[0]
    assert "body_limit_webhook:" in webhook and "envoy.filters.http.ext_authz:" in webhook
    # The limits run before ext_authz, so an oversize body never costs a Check.
    assert text.index("- name: body_limit\n") < text.index("- name: envoy.filters.http.ext_authz")


def test_access_log_never_records_credentials() -> None:
    text = gateway.render(gateway.GatewayConfig())
    stdout_log = text[
        text.index("envoy.access_loggers.stdout") : text.index("envoy.access_loggers.http_grpc")
    ]
    assert 'path: "%PATH(NQ:ORIG_OR_PATH)%"' in stdout_log
    lowered = text.lower()
    for header in ("authorization", "x-api-key", "cookie"):
        assert f"%req({header}" not in lowered
    logged = text[text.index("additional_request_headers_to_log") :].split("]", 1)[0].lower()
    assert not any(header in logged for header in ("authorization", "x-api-key", "cookie"))
    # Query parameters that may carry a key are removed before any filter or log sees them.
    for name in ("key", "api_key", "access_token"):
        assert json.dumps({"remove": name}) in text


def test_every_gateway_error_has_the_api_error_shape() -> None:
    shaped = 0
    for mapper in envoyreplies.local_reply_mappers():
        body = mapper.get("body_format_override", {}).get("json_format")
        if body is None or "code" not in body:
            continue
        shaped += 1
        assert {"code", "message", "reason", "details"} <= set(body), body
        (info,) = body["details"]
        assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
        assert info["reason"] == body["reason"] and info["domain"] == "kotadb.dev"
        assert mapper.get("body_format_override", {}).get("content_type") == "application/json"
    assert shaped >= len(envoyreplies.LOCAL_REPLY_CODES)
    reasons = {reason for status, _, reason in envoyreplies.LOCAL_REPLY_CODES if status in (413, 431)}
    assert reasons == {"REQUEST_TOO_LARGE", "HEADERS_TOO_LARGE"}
