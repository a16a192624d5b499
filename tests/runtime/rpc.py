"""Client-side helpers for the runtime tests: status details, health waits, reflection calls."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def metadata_value(metadata: Any, key: str) -> str | bytes | None:
    """metadata_value is the first value of `key` in gRPC metadata, or None."""
    for item_key, value in metadata or ():
        if item_key == key:
            return value  # type: ignore[no-any-return]
    return None


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """status_details decodes the `grpc-status-details-bin` trailer of a failed call."""
    raw = metadata_value(error.trailing_metadata(), "grpc-status-details-bin")
    assert isinstance(raw, bytes), f"no status details in {error.trailing_metadata()!r}"
    return status_pb2.Status.FromString(raw)


def unpack_details(status: status_pb2.Status) -> dict[str, Any]:
    """unpack_details maps each detail's type name (e.g. `ErrorInfo`) to the unpacked message."""
    known = {
        "ErrorInfo": error_details_pb2.ErrorInfo,
        "RequestInfo": error_details_pb2.RequestInfo,
        "BadRequest": error_details_pb2.BadRequest,
        "QuotaFailure": error_details_pb2.QuotaFailure,
        "RetryInfo": error_details_pb2.RetryInfo,
        "ResourceInfo": error_details_pb2.ResourceInfo,
    }
    found: dict[str, Any] = {}
    for detail in status.details:
        name = detail.TypeName().rsplit(".", 1)[-1]
        message = known[name]()
        assert detail.Unpack(message)
        found[name] = message
    return found


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    """health_status is the server's current grpc.health.v1 status for `service`."""
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(response.status)


async def wait_for_health(
    channel: grpc.aio.Channel, expected: int, service: str = "", limit: float = 30
) -> None:
    """wait_for_health watches `service` until it reports `expected`; fails after `limit` seconds."""
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service=service))
    try:
        async with asyncio.timeout(limit):
            async for response in call:
                if response.status == expected:
                    return
    finally:
        call.cancel()
    raise AssertionError(f"health watch for {service!r} ended before reaching {expected}")


async def reflect(channel: grpc.aio.Channel, *requests: reflection_pb2.ServerReflectionRequest) -> list[Any]:
    """reflect sends `requests` on one reflection stream and returns the responses in order."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter(requests), timeout=10)
    return [response async for response in call]


def file_descriptors(response: Any) -> list[descriptor_pb2.FileDescriptorProto]:
    """file_descriptors decodes a reflection response's serialized FileDescriptorProtos."""
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
