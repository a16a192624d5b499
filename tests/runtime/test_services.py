"""The three real services, in-process on port 0 against the test database.

Each must report SERVING only once its database and schema are ready, expose reflection for
its own API and the health service, and answer every business RPC with UNIMPLEMENTED naming the
missing capability (never a made-up result), while GetHealth works for real.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection_pb2
from kotadb.v1 import auth_pb2, health_pb2, health_pb2_grpc, ingest_pb2, search_pb2

from services.auth.config import AuthSettings
from services.auth.server import build as build_auth
from services.common.identity import IDENTITY_HEADER, IdentityCodec, IdentitySettings
from services.common.server import ServiceServer
from services.common.settings import ServiceSettings
from services.ingest.config import IngestSettings
from services.ingest.server import build as build_ingest
from services.search.config import SearchSettings
from services.search.server import build as build_search
from tests.runtime.rpc import (
    SERVING,
    file_descriptors,
    health_status,
    reflect,
    status_details,
    unpack_details,
    wait_for_health,
)

# Business RPCs need a caller: the tests sign one the way the gateway's Check does.
IDENTITY = IdentitySettings(identity_key="runtime-tests-identity-key-0123456789abcdef")
IDENTITY_CODEC = IdentityCodec(IDENTITY.identity_key)

Case = tuple[str, Callable[[Any], ServiceServer], ServiceDescriptor, Callable[..., ServiceSettings]]

CASES: list[Case] = [
    ("auth", build_auth, auth_pb2.DESCRIPTOR.services_by_name["AuthService"], AuthSettings),
    ("ingest", build_ingest, ingest_pb2.DESCRIPTOR.services_by_name["IngestService"], IngestSettings),
    ("search", build_search, search_pb2.DESCRIPTOR.services_by_name["SearchService"], SearchSettings),
]


def _settings(factory: Callable[..., ServiceSettings], database_url: str, tmp_path: Path) -> ServiceSettings:
    extra: dict[str, Any] = {"data_dir": tmp_path / "index"} if factory is SearchSettings else {}
    return factory(
        database_url=database_url,
        host="127.0.0.1",
        port=0,
        readiness_interval=0.1,
        shutdown_grace=5.0,
        db_pool_max=2,
        **extra,
    )


@pytest.fixture(params=CASES, ids=[case[0] for case in CASES])
async def running(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    name, build, descriptor, factory = request.param
    server = build(_settings(factory, database_url, tmp_path), identity=IDENTITY)
    port = await server.start()
    assert port > 0
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield name, server, descriptor, channel
    finally:
        await channel.close(None)
        await server.stop()


def _call(channel: grpc.aio.Channel, method: MethodDescriptor) -> Any:
    """_call invokes `method` with an empty request as the service role, whatever its streaming shape."""
    token = IDENTITY_CODEC.sign(user_id=None, kind="service", permissions=("read", "write", "admin"))
    metadata = ((IDENTITY_HEADER, token),)
    path = f"/{method.containing_service.full_name}/{method.name}"
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    serialize, deserialize = request_class.SerializeToString, response_class.FromString
    if method.client_streaming:
        return channel.stream_unary(path, serialize, deserialize)(
            iter([request_class()]), timeout=10, metadata=metadata
        )
    if method.server_streaming:
        return channel.unary_stream(path, serialize, deserialize)(
            request_class(), timeout=10, metadata=metadata
        )
    return channel.unary_unary(path, serialize, deserialize)(request_class(), timeout=10, metadata=metadata)


async def test_serving_once_database_and_schema_are_ready(running: Any) -> None:
    name, server, descriptor, channel = running
    await wait_for_health(channel, SERVING, "")
    await wait_for_health(channel, SERVING, descriptor.full_name)
    assert await health_status(channel, "kotadb.v1.HealthService") == SERVING

    health = await health_pb2_grpc.HealthServiceStub(channel).GetHealth(
        health_pb2.GetHealthRequest(), timeout=10
    )
    assert health.status == health_pb2.GetHealthResponse.SERVING
    assert health.service == name
    assert health.version
    parts = {part.name: part for part in health.components}
    assert parts["database"].status == health_pb2.GetHealthResponse.SERVING
    assert parts["schema"].status == health_pb2.GetHealthResponse.SERVING
    if name == "search":
        assert parts["index_volume"].status == health_pb2.GetHealthResponse.SERVING
        assert (server.settings.data_dir).is_dir()


def _unimplemented_methods() -> dict[str, dict[str, str]]:
    """_unimplemented_methods is the README's list of RPCs not built yet (scripts/readme_config.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    try:
        import readme_config
    finally:
        sys.path.pop(0)
    methods: dict[str, dict[str, str]] = readme_config.unimplemented_methods()
    return methods


async def test_unimplemented_rpcs_are_exactly_the_readme_list(running: Any) -> None:
    """Every RPC the README lists answers UNIMPLEMENTED naming its capability; every other one does not."""
    _, _, descriptor, channel = running
    listed = _unimplemented_methods()[descriptor.full_name]
    assert len(descriptor.methods) >= 5
    for method in descriptor.methods:
        call = _call(channel, method)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if method.server_streaming:
                _ = [item async for item in call]
            else:
                await call
        error = caught.value
        if method.name not in listed:
            # Built RPCs refuse an empty, unauthenticated request, but never as "not built".
            assert error.code() != grpc.StatusCode.UNIMPLEMENTED, method.full_name
            continue
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED, method.full_name
        assert f"({method.name})" in (error.details() or "")
        assert "issue" in (error.details() or "")
        status = status_details(error)
        assert status.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        info = unpack_details(status)["ErrorInfo"]
        assert info.reason == "UNIMPLEMENTED"
        assert info.domain == "kotadb.dev"
        assert method.name in info.metadata["capability"]


async def test_reflection_lists_and_describes_the_services(running: Any) -> None:
    _, _, descriptor, channel = running
    listed, described, health_file = await reflect(
        channel,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=descriptor.full_name),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
    )
    names = {service.name for service in listed.list_services_response.service}
    assert {
        descriptor.full_name,
        "kotadb.v1.HealthService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names

    files = file_descriptors(described)
    own = next(f for f in files if any(s.name == descriptor.name for s in f.service))
    service = next(s for s in own.service if s.name == descriptor.name)
    assert {m.name for m in service.method} == {m.name for m in descriptor.methods}
    assert any(s.name == "Health" for f in file_descriptors(health_file) for s in f.service)
