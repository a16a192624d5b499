"""A process serving gRPC never plain-forks, and gRPC's fork handlers are off in it.

services/common/forksafety.py holds the rules. Each case runs a fresh interpreter (gRPC reads
its fork switch once, and at-fork hooks cannot be removed) that serves grpc.aio on loopback:

* with `kotadb serve`'s imports, gRPC's C core skips its fork handlers (its "skipping fork()
  handlers" line is absent), where a plain process with the same server prints it;
* `guard_forks` makes a plain os.fork() log an error and count in kotadb_unsafe_forks_total;
* git run the way the ingest workers run it (services/ingest/gitfetch.py) and the forkserver
  pool the symbolizer uses create their processes without a plain fork: the guard stays silent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

FORK_HANDLERS_RAN = "skipping fork() handlers"

SERVE_AND_FORK = """
import asyncio, os
import grpc

async def main() -> None:
    server = grpc.aio.server()
    server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    await server.stop(0)

asyncio.run(main())
"""


def _python(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    env["GRPC_VERBOSITY"] = "INFO"
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_grpc_fork_handlers_are_off_in_a_serve_process(tmp_path: Path) -> None:
    plain = _python(SERVE_AND_FORK, tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert FORK_HANDLERS_RAN in plain.stderr, plain.stderr  # the control: gRPC's handlers ran
    served = _python("import services.cli.serve\n" + SERVE_AND_FORK, tmp_path)
    assert served.returncode == 0, served.stderr
    assert FORK_HANDLERS_RAN not in served.stderr, served.stderr


def test_a_plain_fork_is_reported(tmp_path: Path) -> None:
    script = """
    import os
    from services.common import forksafety
    forksafety.guard_forks("forktest")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print(forksafety.UNSAFE_FORKS.labels(service="forktest")._value.get())
    """
    done = _python(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1.0"
    assert "plain fork() in a process serving gRPC" in done.stderr


def test_git_and_the_symbol_pool_never_plain_fork(tmp_path: Path) -> None:
    script = """
    import asyncio, os
    from pathlib import Path
    import grpc
    from services.common import forksafety
    from services.ingest.gitfetch import GitRepository
    from services.ingest.symbolizer import Symbolizer

    async def main() -> None:
        server = grpc.aio.server()
        server.add_insecure_port("127.0.0.1:0")
        await server.start()
        forksafety.guard_forks("forktest")
        work = Path("work")
        work.mkdir()
        git = GitRepository(work, url="file:///nowhere", timeout=60, allow_local=True)
        for _ in range(5):
            status, out = await git.run("--version")
            assert status == 0 and out.startswith(b"git version"), out
        symbolizer = Symbolizer(2)
        try:
            found = await symbolizer.analyze_many([(b"def f():\\n    pass\\n", "python")] * 4)
            assert len(found) == 4, found
        finally:
            symbolizer.close()
        await server.stop(0)
        print(forksafety.UNSAFE_FORKS.labels(service="forktest")._value.get())

    asyncio.run(main())
    """
    done = _python(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0.0", done.stderr
    assert "plain fork()" not in done.stderr
