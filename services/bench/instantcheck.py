"""instantcheck: an ext_authz Check server that allows everything at once, for `kotadb bench auth`.

It runs the same lean HTTP/2 listener as the auth service (services/common/h2unary.py) but
answers every Check with one precomputed OK: Check's own answer for a fixed signed identity
(the same headers, minus the RateLimit ones), with no lookup, no admission and no signing per
request. An Envoy with ext_authz pointed at it shows what
ext_authz costs through Envoy when the authorization server takes no time at all: the floor
under the real Check's figure on the same machine.

    python -m services.bench.instantcheck --port-file F
    (KOTADB_IDENTITY_TOKEN: the identity, signed with KOTADB_IDENTITY_KEY)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from grpc_health.v1 import health_pb2

from services.auth.check import Grant, allowed
from services.auth.server import CHECK_PATH, HEALTH_PATH
from services.common.h2unary import H2UnaryServer
from services.common.identity import IdentityCodec
from services.common.server import write_port_file

TOKEN_VARIABLE = "KOTADB_IDENTITY_TOKEN"
# The method `kotadb bench auth` calls (REST GET /v1/index); signed identities are bound to it.
BENCH_METHOD = "/kotadb.v1.SearchService/GetIndexStatus"


def answer(token: str, identity_key: str) -> bytes:
    """answer is Check's serialized OK for the identity `token` carries (verified with the key)."""
    identity = IdentityCodec(identity_key, ttl=6 * 3600).verify(token, method=BENCH_METHOD)
    return bytes(allowed(Grant(identity=identity, token=token)).SerializeToString())


async def serve(port_file: Path, ok: bytes) -> None:
    """serve answers every Check with `ok`, and health, on a free port until SIGTERM or SIGINT."""
    health = bytes(
        health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()
    )
    server = H2UnaryServer(
        {CHECK_PATH: lambda message, headers: ok, HEALTH_PATH: lambda message, headers: health}
    )
    write_port_file(port_file, await server.start("127.0.0.1", 0))
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
    ok = answer(os.environ.get(TOKEN_VARIABLE, ""), os.environ.get("KOTADB_IDENTITY_KEY", ""))
    asyncio.run(serve(args.port_file, ok))


if __name__ == "__main__":
    main()
