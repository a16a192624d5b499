"""The three real services, each a `kotadb serve` process on port 0 against the test database.

Each must report SERVING only once its database and schema are ready, expose reflection for its
own API and the health service, and answer exactly the RPCs the README lists as not built with
UNIMPLEMENTED naming the missing capability (never a made-up result), while GetHealth works.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection_pb2
from kotadb.v1 import auth_pb2, health_pb2, health_pb2_grpc, ingest_pb2, search_pb2

from services.common.identity import IDENTITY_HEADER, IdentityCodec
from services.common.supervisor import Supervisor
from tests.harness import serve, service_env
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
IDENTITY_KEY = "runtime-tests-identity-key-0123456789abcdef"
IDENTITY_CODEC = IdentityCodec(IDENTITY_KEY)

Case = tuple[str, ServiceDescriptor]

CASES: list[Case] = [
    ("auth", auth_pb2.DESCRIPTOR.services_by_name["AuthService"]),
    ("ingest", ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]),
    ("search", search_pb2.DESCRIPTOR.services_by_name["SearchService"]),
]


@pytest.fixture(scope="module")
def services(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """services runs each service as a real `kotadb serve` process (what a container runs).

    Separate processes, not in-process servers: grpc.aio servers started and stopped many times in
    one event loop occasionally never finish stopping, which would wedge the test process itself.
    """
    workdir = tmp_path_factory.mktemp("services")
    env = service_env(database_url, workdir, IDENTITY_KEY, KOTADB_LOG_LEVEL="WARNING")
    with Supervisor() as supervisor:
        running = {name: serve(supervisor, workdir, name, name, env)[0] for name, _ in CASES}
        yield {"addresses": running, "data_dir": workdir / "search-data"}


@pytest.fixture(params=CASES, ids=[case[0] for case in CASES])
async def running(request: pytest.FixtureRequest, services: dict[str, Any]) -> AsyncIterator[Any]:
    name, descriptor = request.param
    channel = grpc.aio.insecure_channel(services["addresses"][name])
    try:
        yield name, services["data_dir"], descriptor, channel
    finally:
        await channel.close(None)


def _call(channel: grpc.aio.Channel, method: MethodDescriptor) -> Any:
    """_call invokes `method` with an empty request as the service role, whatever its streaming shape."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    token = IDENTITY_CODEC.sign(
        user_id=None, kind="service", permissions=("read", "write", "admin"), method=path
    )
    metadata = ((IDENTITY_HEADER, token),)
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
    name, data_dir, descriptor, channel = running
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
        assert data_dir.is_dir()


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
        if method.name not in listed:
            # A built RPC may accept or refuse an empty service-role request, but never as "not built".
            try:
                if method.server_streaming:
                    _ = [item async for item in call]
                else:
                    await call
            except grpc.aio.AioRpcError as refused:
                assert refused.code() != grpc.StatusCode.UNIMPLEMENTED, method.full_name
            continue
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if method.server_streaming:
                _ = [item async for item in call]
            else:
                await call
        error = caught.value
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
