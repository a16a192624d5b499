"""Size limits and memory at the real gateway: per-route body limits, header limits, the heap.

Every case runs against tests/gateway/conftest.py's stack (real services, real Envoy). Whether
auth's Check ran is read from Envoy's own ext_authz counters on the admin endpoint, so "refused
before Check" means exactly that: no Check call, hence no rate-limit token spent.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from kotadb.v1 import document_pb2, ingest_pb2, ingest_pb2_grpc, search_pb2, search_pb2_grpc

from services.cli import gateway
from tests.gateway.conftest import TIGHT_HEAP_MIB, Gateways, Reply, raw_request, request
from tests.harness import Envoy, wait_until

MIB = 1024 * 1024
LIMITS = gateway.GatewayConfig()

# (method, REST path, the body limit the gateway applies there)
ROUTE_LIMITS: list[tuple[str, str, int]] = [
    ("POST", "/v1/code:search", LIMITS.body_limit_bytes),
    ("POST", "/v1/apiKeys", LIMITS.body_limit_bytes),
    ("POST", "/v1/documents:batchUpsert", LIMITS.batch_body_limit_bytes),
    ("POST", "/v1/webhooks/github/some-repository", LIMITS.webhook_body_limit_bytes),
]


def _admin_json(envoy: Envoy, path: str) -> Any:
    with urllib.request.urlopen(f"{envoy.admin}{path}", timeout=30) as response:
        return json.loads(response.read())


def check_calls(envoy: Envoy) -> int:
    """check_calls is how many times this Envoy has asked auth's Check (any outcome)."""
    stats = _admin_json(envoy, "/stats?format=json&filter=ext_authz")["stats"]
    return sum(
        int(stat.get("value", 0))
        for stat in stats
        if stat.get("name", "").rsplit(".", 1)[-1] in ("ok", "denied", "error", "failure_mode_allowed")
    )


def allocated_bytes(envoy: Envoy) -> int:
    """allocated_bytes is the heap Envoy's allocator reports in use (admin /memory)."""
    return int(_admin_json(envoy, "/memory")["allocated"])


def resident_heap_bytes(envoy: Envoy) -> int:
    """resident_heap_bytes is the heap the allocator holds from the system: mapped, used or free."""
    memory = _admin_json(envoy, "/memory")
    return int(memory["heap_size"]) - int(memory["pageheap_unmapped"])


def _head(method: str, path: str, length: int, key: str | None = None, chunked: bool = False) -> str:
    lines = [f"{method} {path} HTTP/1.1", "host: gateway", "content-type: application/json"]
    lines.append("transfer-encoding: chunked" if chunked else f"content-length: {length}")
    if key is not None:
        lines.append(f"authorization: Bearer {key}")
    return "\n".join(lines) + "\n"


def _chunks(total: int) -> Iterator[bytes]:
    """_chunks yields an HTTP/1.1 chunked search body of `total` bytes (see _json_chunks)."""
    return _json_chunks(b'{"query": "', total, b'"}')


def _json_chunks(body_start: bytes, total: int, body_end: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """_json_chunks yields an HTTP/1.1 chunked JSON body of `total` bytes, filler between its ends.

    The JSON stays valid as far as it goes, so the transcoder (which parses as bytes arrive)
    has nothing to refuse before the size does.
    """
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        data = b"x" * piece
        if sent == 0:
            data = body_start + data[len(body_start) :]
        if sent + piece == total:
            data = data[: -len(body_end)] + body_end
        yield f"{piece:x}\r\n".encode() + data + b"\r\n"
        sent += piece
    yield b"0\r\n\r\n"


def assert_too_large(reply: Reply) -> None:
    """assert_too_large checks the gateway's 413: the API's error shape with its reason."""
    assert reply.status == 413, (reply.status, reply.raw[:300])
    assert reply.content_type == "application/json"
    assert reply.headers["x-kotadb-error-reason"] == "REQUEST_TOO_LARGE"
    body = reply.body
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert body["reason"] == "REQUEST_TOO_LARGE"
    assert body["message"]
    (info,) = body["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["reason"] == "REQUEST_TOO_LARGE" and info["domain"] == "kotadb.dev"
    assert info["metadata"]["request_id"]
    assert not reply.reached_service


def test_declared_oversize_bodies_are_413_before_check(gateways: Gateways) -> None:
    envoy = gateways.main
    before = check_calls(envoy)
    for method, path, limit in ROUTE_LIMITS:
        # Only the head is sent: the gateway answers from Content-Length, reading no body.
        for key in (None, gateways.key):
            assert_too_large(raw_request(envoy, _head(method, path, limit + 1, key)))
        # A credential in the query string changes nothing (and is stripped, see test_gateway_secrets).
        assert_too_large(raw_request(envoy, _head(method, f"{path}?key={gateways.key}", 60 * MIB)))
    # One admitted request proves the counters are live; it must be the only Check since.
    assert request("GET", f"{envoy.url}/v1/index", key=gateways.key).reached_service
    counted = lambda: (check_calls(envoy) > before, str(check_calls(envoy)))  # noqa: E731
    wait_until("ext_authz counters", counted, gateways.supervisor)
    assert check_calls(envoy) == before + 1


def test_each_route_takes_its_own_limit_exactly(gateways: Gateways) -> None:
    url = gateways.main.url
    # The default limit, to the byte: a body of exactly 1 MiB reaches the service, one more is 413.
    prefix, suffix = b'{"query": "', b'"}'
    exact = prefix + b"x" * (LIMITS.body_limit_bytes - len(prefix) - len(suffix)) + suffix
    assert len(exact) == LIMITS.body_limit_bytes
    at_limit = request("POST", f"{url}/v1/code:search", exact, key=gateways.key)
    assert at_limit.reached_service, (at_limit.status, at_limit.raw[:300])
    over = exact[:-2] + b'x"}'
    assert_too_large(request("POST", f"{url}/v1/code:search", over, key=gateways.key))
    # Batch upserts and webhook deliveries take more than the default.
    document = {"path": "two-mib.txt", "text": "y" * (2 * MIB)}
    batch = json.dumps({"documents": [document]}).encode()
    assert request("POST", f"{url}/v1/documents:batchUpsert", batch, key=gateways.key).reached_service
    webhook = request("POST", f"{url}/v1/webhooks/github/some-repository", batch)
    assert webhook.reached_service, (webhook.status, webhook.raw[:300])


def test_chunked_oversize_body_is_413_as_it_streams(gateways: Gateways) -> None:
    # Without Content-Length the gateway counts the bytes as they arrive. Check has been asked
    # by then (it runs on the headers), but no byte past the limit goes anywhere.
    head = _head("POST", "/v1/code:search", 0, gateways.key, chunked=True)
    assert_too_large(raw_request(gateways.main, head, _chunks(LIMITS.body_limit_bytes + 256 * 1024)))
    head = _head("POST", "/v1/documents:batchUpsert", 0, gateways.key, chunked=True)
    within = raw_request(gateways.main, head, _chunks(2 * MIB))
    assert within.status != 413 and within.reached_service, (within.status, within.raw[:300])


def test_oversize_grpc_message_is_refused_with_the_reason(gateways: Gateways) -> None:
    credentials = (("authorization", f"Bearer {gateways.key}"),)
    with grpc.insecure_channel(gateways.main.target) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.SearchCode(
                search_pb2.SearchCodeRequest(query="x" * (2 * MIB)), metadata=credentials, timeout=60
            )
    call = raised.value
    assert isinstance(call, grpc.Call)
    metadata = dict((*(call.initial_metadata() or ()), *(call.trailing_metadata() or ())))
    assert metadata.get("x-kotadb-error-reason") == "REQUEST_TOO_LARGE", (call.code(), metadata)
    # The same code a REST client reads in the body (Envoy alone would say UNKNOWN).
    assert call.code() == grpc.StatusCode.INVALID_ARGUMENT, (call.code(), call.details())


def test_client_streams_are_not_capped_by_the_body_limit(gateways: Gateways) -> None:
    # A client stream may carry any number of messages; each is bounded by the service instead.
    credentials = (("authorization", f"Bearer {gateways.key}"),)

    def messages() -> Iterator[ingest_pb2.StreamUpsertDocumentsRequest]:
        for index in range(3):
            document = document_pb2.Document(path=f"stream-{index}.txt", text="z" * (600 * 1024))
            yield ingest_pb2.StreamUpsertDocumentsRequest(document=document)

    with grpc.insecure_channel(gateways.main.target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        try:
            stub.StreamUpsertDocuments(messages(), metadata=credentials, timeout=60)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            metadata = dict((*(exc.initial_metadata() or ()), *(exc.trailing_metadata() or ())))
            assert metadata.get("x-kotadb-error-reason") != "REQUEST_TOO_LARGE", metadata
            # The stream reached the service: its errors carry the service's request id.
            assert "x-request-id" in metadata, (exc.code(), exc.details(), metadata)


def test_oversize_headers_are_431_with_the_reason(gateways: Gateways) -> None:
    url = f"{gateways.main.url}/v1/index"
    big = {"x-filler": "h" * (LIMITS.max_request_headers_kb * 1024)}
    many = {f"x-filler-{index}": "h" for index in range(120)}
    for headers in (big, many):
        reply = request("GET", url, key=gateways.key, headers=headers)
        assert reply.status == 431, (reply.status, reply.raw[:300])
        assert reply.content_type == "application/json"
        assert reply.headers["x-kotadb-error-reason"] == "HEADERS_TOO_LARGE"
        assert reply.body["reason"] == "HEADERS_TOO_LARGE"
        assert reply.body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert reply.body["details"][0]["reason"] == "HEADERS_TOO_LARGE"
    # Headers within the limit pass.
    fine = request("GET", url, key=gateways.key, headers={"x-filler": "h" * 8192})
    assert fine.reached_service


def test_oversize_headers_over_http2_reset_the_stream(gateways: Gateways) -> None:
    # HTTP/2 has no room for a 431: Envoy advertises its limit in SETTINGS and resets a stream
    # whose header block exceeds it. The connection survives for the client's other streams.
    host, port = gateways.main.target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        connection.sendall(client.data_to_send())
        base = [(":method", "GET"), (":scheme", "http"), (":authority", "gateway"), (":path", "/health")]
        filler = ("x-filler", "h" * (LIMITS.max_request_headers_kb * 1024))
        client.send_headers(1, [*base, filler], end_stream=True)
        client.send_headers(3, base, end_stream=True)
        connection.sendall(client.data_to_send())
        outcome: dict[int, str] = {}
        while len(outcome) < 2:
            data = connection.recv(65536)
            assert data, f"connection closed after {outcome}"
            for event in client.receive_data(data):
                if isinstance(event, h2.events.StreamReset):
                    outcome[event.stream_id] = "reset"
                elif isinstance(event, h2.events.ResponseReceived):
                    outcome[event.stream_id] = dict(event.headers)[b":status"].decode()
                elif isinstance(event, h2.events.ConnectionTerminated):
                    pytest.fail(f"connection terminated: {event}")
            connection.sendall(client.data_to_send())
    assert outcome[1] == "reset" and outcome[3].isdigit(), outcome


def test_unknown_json_fields_are_dropped_not_refused(gateways: Gateways) -> None:
    # Envoy's transcoder cannot refuse unknown JSON fields (it has no such option in 1.40); it
    # drops them before the service sees the message. The README documents this; the test pins
    # it: the same request with and without extra fields gets the same answer.
    url = f"{gateways.main.url}/v1/code:search"
    plain = request("POST", url, json.dumps({"query": "needle"}).encode(), key=gateways.key)
    extra = {"query": "needle", "isAdmin": True, "userId": "00000000-0000-0000-0000-000000000000"}
    padded = request("POST", url, json.dumps(extra).encode(), key=gateways.key)
    assert plain.reached_service and padded.reached_service
    assert padded.status == plain.status == 200
    # The same answer but for its timings.
    assert {k: v for k, v in padded.body.items() if k != "stats"} == {
        k: v for k, v in plain.body.items() if k != "stats"
    }
    assert "isAdmin" not in padded.raw.decode() and "userId" not in padded.raw.decode()


class PeakSampler:
    """PeakSampler polls an Envoy's allocated heap in a thread and keeps the highest value seen."""

    def __init__(self, envoy: Envoy) -> None:
        self.envoy = envoy
        self.peak = allocated_bytes(envoy)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, allocated_bytes(self.envoy))
            self._done.wait(0.02)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, allocated_bytes(self.envoy))


def test_oversize_bodies_cost_the_gateway_no_memory(gateways: Gateways) -> None:
    # The case: ten concurrent 60 MB bodies with a valid read key took Envoy from
    # 195 MiB to 1.7 GiB. Now they are refused at the limit, declared or counted.
    envoy = gateways.tight
    baseline = allocated_bytes(envoy)

    def declared(_: int) -> int:
        return raw_request(envoy, _head("POST", "/v1/code:search", 60 * MIB, gateways.key)).status

    def counted(_: int) -> int:
        head = _head("POST", "/v1/code:search", 0, gateways.key, chunked=True)
        return raw_request(envoy, head, _chunks(2 * MIB)).status

    with PeakSampler(envoy) as sampler, concurrent.futures.ThreadPoolExecutor(max_workers=20) as workers:
        statuses = list(workers.map(declared, range(10))) + list(workers.map(counted, range(10)))
    assert set(statuses) == {413}, statuses
    # At most the limit per counted request is read before the refusal; generous slack.
    assert sampler.peak < baseline + 10 * 2 * LIMITS.body_limit_bytes + 16 * MIB, (sampler.peak, baseline)


def _paced(chunks: Iterator[bytes], pause: float) -> Iterator[bytes]:
    """_paced yields `chunks` with a pause before each: a client on a real network, not loopback."""
    for chunk in chunks:
        time.sleep(pause)
        yield chunk


def test_near_limit_bodies_are_shed_at_the_heap_budget_and_memory_goes_back(gateways: Gateways) -> None:
    # Eight batch bodies just under the limit, streamed at the same time: held in full they
    # would need far more than the tight gateway's heap budget (the transcoder keeps about three
    # copies of a request). The overload manager resets the streams holding the most memory
    # instead, and the heap stays near its budget.
    envoy = gateways.tight
    budget = TIGHT_HEAP_MIB * MIB
    baseline = allocated_bytes(envoy)
    shed_before = _shed_count(envoy)
    streams = 8
    size = LIMITS.batch_body_limit_bytes - 4096
    assert streams * size > budget

    def upload(_: int) -> int:
        head = _head("POST", "/v1/documents:batchUpsert", 0, gateways.key, chunked=True)
        body = _json_chunks(b'{"documents": [{"path": "near.txt", "text": "', size, b'"}]}')
        return raw_request(envoy, head, _paced(body, 0.004)).status

    with PeakSampler(envoy) as sampler, concurrent.futures.ThreadPoolExecutor(streams) as workers:
        statuses = list(workers.map(upload, range(streams)))
    # Within the limit, so never 413. Shed streams are answered 503 GATEWAY_OVERLOADED, or
    # their connection is closed (status 0) when the heap passes 95% mid-upload.
    assert 413 not in statuses, statuses
    shed = [status for status in statuses if status in (0, 503)]
    assert shed or _shed_count(envoy) > shed_before, statuses
    # The heap is sampled every 20 ms and the manager looks every 100 ms: generous slack.
    # The heap is checked every 100 ms, so a burst over loopback overshoots the budget before the
    # overload manager acts, the more so on a loaded machine; unshed, these bodies reach 384 MiB.
    assert sampler.peak < 2 * budget, (sampler.peak // MIB, statuses)
    # Afterwards the memory goes back: in use at once, and the allocator's free pages soon.
    wait_until(
        "envoy heap back to its baseline",
        lambda: (allocated_bytes(envoy) < baseline + 16 * MIB, f"{allocated_bytes(envoy)} bytes"),
        gateways.supervisor,
        limit=60,
    )
    wait_until(
        "envoy free heap given back",
        lambda: (resident_heap_bytes(envoy) < budget // 2, f"{resident_heap_bytes(envoy)} bytes"),
        gateways.supervisor,
        limit=120,
    )


def _shed_count(envoy: Envoy) -> int:
    """_shed_count is how many streams and requests the overload manager has refused or reset."""
    stats = _admin_json(envoy, "/stats?format=json&filter=overload")["stats"]
    return sum(
        int(stat.get("value", 0))
        for stat in stats
        if stat.get("name")
        in (
            "envoy.overload_actions.reset_high_memory_stream.count",
            "http.gateway.downstream_rq_overload_close",
            "overload.envoy.load_shed_points.http1_server_abort_dispatch.shed_load_count",
        )
    )


def test_the_overload_manager_watches_the_heap(gateways: Gateways) -> None:
    stats = _admin_json(gateways.tight, "/stats?format=json&filter=^overload\\.")["stats"]
    names = {stat.get("name", "") for stat in stats}
    for action in ("reset_high_memory_stream", "shrink_heap", "stop_accepting_requests"):
        assert any(action in name for name in names), sorted(names)
    pressure = next(
        s for s in stats if s.get("name") == "overload.envoy.resource_monitors.fixed_heap.pressure"
    )
    # The monitor reports the heap against the budget, in percent: above zero, below shedding.
    assert 0 < int(pressure["value"]) < 95, pressure
