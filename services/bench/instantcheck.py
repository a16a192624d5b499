"""instantcheck: an ext_authz Check server that allows everything at once, for `kotadb bench auth`.

It runs the same lean HTTP/2 listener as the auth service (services/common/h2unary.py) but
answers every Check with one precomputed OK that adds a fixed signed identity, with no lookup,
no admission and no signing per request. An Envoy with ext_authz pointed at it shows what
ext_authz costs through Envoy when the authorization server takes no time at all: the floor
under the real Check's figure on the same machine.

    python -m services.bench.instantcheck --port-file F   (KOTADB_IDENTITY_TOKEN: the identity)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from grpc_health.v1 import health_pb2

from services.auth.check import CREDENTIAL_HEADERS, header_option
from services.auth.server import CHECK_PATH, HEALTH_PATH
from services.common.h2unary import H2UnaryServer
from services.common.identity import IDENTITY_HEADER

TOKEN_VARIABLE = "KOTADB_IDENTITY_TOKEN"


def answer(token: str) -> bytes:
    """answer is the serialized OK CheckResponse adding `token` as the signed identity."""
    from envoy.service.auth.v3 import external_auth_pb2
    from google.rpc import code_pb2, status_pb2

    ok = external_auth_pb2.OkHttpResponse()
    ok.headers.append(header_option(IDENTITY_HEADER, token))
    ok.headers_to_remove.extend(CREDENTIAL_HEADERS)
    response = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)
    return bytes(response.SerializeToString())


async def serve(port_file: Path, token: str) -> None:
    """serve answers Check and health on a free port until SIGTERM or SIGINT."""
    ok = answer(token)
    health = bytes(
        health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()
    )
    server = H2UnaryServer(
        {CHECK_PATH: lambda message, headers: ok, HEALTH_PATH: lambda message, headers: health}
    )
    port = await server.start("127.0.0.1", 0)
    partial = port_file.with_name(port_file.name + ".tmp")
    partial.write_text(f"{port}\n")
    partial.replace(port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    """main parses `--port-file` and serves."""
    parser = argparse.ArgumentParser(prog="python -m services.bench.instantcheck")
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port_file, os.environ.get(TOKEN_VARIABLE, "")))


if __name__ == "__main__":
    main()
