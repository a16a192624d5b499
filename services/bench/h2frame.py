"""h2frame measures Check's framing layer: our hand-rolled h2unary against one built on python-hyper `h2`.

The question it answers: would replacing services/common/h2unary.py's frame loop with the `h2`
package (a complete, independently maintained HTTP/2 state machine) keep Check above its
5,000 checks/s target? Both servers run the same Check-shaped handler (the CheckRequest is
parsed, the `authorization` header looked up, a precomputed OK CheckResponse returned), each
in a child process of its own, driven by h2load (nghttp2, C) with the same request in the same
run, interleaved (ours, h2, ours, h2) so that load from other processes falls on both alike.
Reported per framing: checks/s and the server's CPU per check (psutil, process CPU delta over
answered requests), which does not depend on the client's speed.

`h2-novalidate` is `h2` with its header validation and normalisation turned off (its fastest
configuration; our own request checks would then do that work).

The real Check costs more than this handler (key cache, admission, identity signing); its
figure on the lean listener is in BENCHMARKS.md. The projection printed here adds the framing
difference measured now to that figure: projected us/check = real Check us/check + (h2 framing
us - ours us).

    python -m services.bench.h2frame [--seconds 4] [--clients 4] [--streams 16] [--check-us 63]
    python -m services.bench.h2frame serve --framing ours|h2|h2-novalidate --port-file F   (a child)

`H2FramedServer` (the `h2` framing) is a benchmark subject only: it serves small unary calls,
enforces none of h2limits.py's bounds and ignores the peer's flow control for responses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import psutil
from envoy.service.auth.v3 import external_auth_pb2

from services.bench import h2load
from services.common.h2unary import H2UnaryServer, UnaryMethod
from services.common.server import write_port_file

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
KEY = "kd_bench_h2frame_key"
# ours; h2 with header validation (its default); h2 without it (its fastest).
FRAMINGS = ("ours", "h2", "h2-novalidate")
_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_OK_TRAILERS = [(b"grpc-status", b"0")]
_UNIMPLEMENTED = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"12")]


def check_handler() -> UnaryMethod:
    """check_handler is the Check-shaped handler both framings serve."""
    ok = external_auth_pb2.CheckResponse()
    ok.status.code = 0
    header = ok.ok_response.headers.add().header
    header.key, header.value = "x-kotadb-identity", "bench-identity-token"
    allowed = {f"Bearer {KEY}": bytes(ok.SerializeToString())}
    denied = external_auth_pb2.CheckResponse()
    denied.status.code = 7
    refused = bytes(denied.SerializeToString())

    def check(message: bytes, headers: Mapping[str, str]) -> bytes:
        request = external_auth_pb2.CheckRequest.FromString(message)
        return allowed.get(request.attributes.request.http.headers.get("authorization", ""), refused)

    return check


class _H2Protocol(asyncio.Protocol):
    """_H2Protocol is one connection of H2FramedServer: `h2` parses, this answers unary calls."""

    def __init__(self, methods: Mapping[bytes, UnaryMethod], validate: bool) -> None:
        # validate=False turns off h2's header validation and normalisation both ways: its
        # fastest configuration, which our own framing's checks (h2headers.py) would replace.
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
            validate_inbound_headers=validate,
            normalize_inbound_headers=validate,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.methods = methods
        self.transport: asyncio.Transport | None = None
        self.paths: dict[int, bytes] = {}
        self.bodies: dict[int, bytearray] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.local_settings.initial_window_size = 1 << 24
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window((1 << 24) - 65535)
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                sid = event.stream_id
                self.paths[sid] = dict(event.headers or ()).get(b":path", b"")
                self.bodies[sid] = bytearray()
            elif isinstance(event, h2.events.DataReceived):
                sid = event.stream_id
                self.bodies[sid] += event.data or b""
                self.conn.acknowledge_received_data(event.flow_controlled_length or 0, sid)
            elif isinstance(event, h2.events.StreamEnded):
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    # The client may have sent GOAWAY in the same read: nothing to answer.
                    self._respond(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.paths.pop(event.stream_id or 0, None)
                self.bodies.pop(event.stream_id or 0, None)
        self.transport.write(self.conn.data_to_send())

    def _respond(self, sid: int | None) -> None:
        assert sid is not None
        body = bytes(self.bodies.pop(sid, b""))
        handler = self.methods.get(self.paths.pop(sid, b""))
        if handler is None or len(body) < 5:
            self.conn.send_headers(sid, _UNIMPLEMENTED, end_stream=True)
            return
        answer = handler(body[5:], {})
        assert isinstance(answer, bytes)
        self.conn.send_headers(sid, _RESPONSE_HEADERS)
        self.conn.send_data(sid, b"\x00" + len(answer).to_bytes(4, "big") + answer)
        self.conn.send_headers(sid, _OK_TRAILERS, end_stream=True)


class H2FramedServer:
    """H2FramedServer serves unary gRPC methods with `h2` as the framing layer (benchmark subject only)."""

    def __init__(self, methods: Mapping[str, UnaryMethod], *, validate: bool = True) -> None:
        self.methods = {path.encode(): method for path, method in methods.items()}
        self.validate = validate
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """start listens on host:port and returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _H2Protocol(self.methods, self.validate), host, port)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self, grace: float) -> None:
        """stop closes the listener."""
        if self._server is not None:
            self._server.close()


async def _serve(framing: str, port_file: Path) -> None:
    methods = {CHECK_PATH: check_handler()}
    server: H2UnaryServer | H2FramedServer
    if framing == "ours":
        server = H2UnaryServer(methods, name="bench-ours")
    else:
        server = H2FramedServer(methods, validate=framing == "h2")
    write_port_file(port_file, await server.start("127.0.0.1", 0))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def _request_body() -> bytes:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host = "GET", "/v1/search", "kotadb.bench"
    http.headers.update({":method": "GET", ":path": "/v1/search", "authorization": f"Bearer {KEY}"})
    return h2load.grpc_frame(bytes(request.SerializeToString()))


def _measure(framing: str, args: argparse.Namespace, scratch: Path) -> tuple[float, float]:
    """_measure serves with `framing` in a child and returns (checks/s, server CPU us per check)."""
    port_file = scratch / f"{framing}.port"
    port_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "services.bench.h2frame", "serve", "--framing", framing]
    child = subprocess.Popen([*command, "--port-file", str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or child.poll() is not None:
                raise RuntimeError(f"the {framing} server did not start")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text().strip()}{CHECK_PATH}"
        process = psutil.Process(child.pid)
        before = process.cpu_times()
        run = h2load.run(
            url,
            clients=args.clients,
            streams=args.streams,
            seconds=args.seconds,
            warm_up=1.0,
            body=_request_body(),
            headers=h2load.GRPC_HEADERS,
            work_dir=scratch,
        )
        after = process.cpu_times()
        # The warm-up's CPU is in the delta but not in the count: scale it by the time share.
        cpu = (after.user + after.system) - (before.user + before.system)
        cpu *= args.seconds / (args.seconds + 1.0)
        answered = max(run.succeeded, 1)
        return answered / run.seconds, cpu / answered * 1e6
    finally:
        child.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(10)
        if child.poll() is None:
            child.kill()


def main() -> None:
    """main runs the comparison (or, with `serve`, one server) and prints the figures."""
    parser = argparse.ArgumentParser(prog="python -m services.bench.h2frame")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("--framing", choices=FRAMINGS, required=True)
    serve.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--check-us", type=float, default=63.0, help="real Check's us/check on the lean listener"
    )
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(_serve(args.framing, args.port_file))
        return
    h2load.find_h2load()
    results: dict[str, list[tuple[float, float]]] = {framing: [] for framing in FRAMINGS}
    with tempfile.TemporaryDirectory(prefix="h2frame-") as scratch:
        for _ in range(args.rounds):
            for framing in FRAMINGS:
                results[framing].append(_measure(framing, args, Path(scratch)))
    print(
        f"h2load -t 1 -c {args.clients} -m {args.streams} -D {args.seconds:g} --warm-up-time 1, "
        f"{args.rounds} interleaved rounds"
    )
    print(f"{'framing':8} {'checks/s':>10} {'server CPU us/check':>20}")
    best = {}
    for framing, rows in results.items():
        for rate, cpu in rows:
            print(f"{framing:8} {rate:10.0f} {cpu:20.1f}")
        best[framing] = (max(r for r, _ in rows), min(c for _, c in rows))
    ours_rate, ours_us = best["ours"]
    for framing in FRAMINGS[1:]:
        rate, us = best[framing]
        projected = args.check_us + (us - ours_us)
        print(
            f"{framing}: ours/{framing} throughput {ours_rate / rate:.2f}x, "
            f"CPU per check {us / ours_us:.2f}x; projected real Check on it {projected:.0f} us/check"
            f" = {1e6 / projected:.0f} checks/s per core"
        )


if __name__ == "__main__":
    main()
