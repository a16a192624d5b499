"""forksafety keeps processes that serve gRPC away from fork(); importing it sets gRPC's fork switch.

gRPC's C core registers pthread_atfork handlers. A plain fork() of a process serving grpc.aio
runs them while the event engine's threads are mid-flight, which grpc.aio does not support
(gRPC's fork support covers the synchronous stack only). So a KotaDB service process never
plain-forks:

* Subprocesses (git, services/ingest/gitfetch.py) go through asyncio's subprocess support,
  which on CPython 3.11 for Linux execs the child with vfork(): pthread_atfork handlers do not
  run, and the parent thread waits only until the exec. CPython falls back to fork() when a
  `preexec_fn`, `user`, `group`, `extra_groups` or `umask` argument is given, so none is.
* Process pools use the forkserver start method (services/ingest/symbolizer.py, the search
  engine's verification pool and SymbolExtractor) or spawn (the engine's IndexWriter). The fork
  server is itself started by vfork() and exec, and forks its workers from its own
  single-threaded process, which has imported but never started gRPC.
* This module sets `GRPC_ENABLE_FORK_SUPPORT=false` (unless the environment says otherwise)
  when imported, which must happen before grpc is: the C core reads the switch once. With it
  off, gRPC's atfork handlers do nothing, so a fork() by some library would not try to pause
  grpc.aio's threads; the child must then not use gRPC (ours exec or never touch it).
  services/cli/serve.py imports this module first.
* `guard_forks` registers an os.register_at_fork hook: a plain fork through os.fork() or a
  subprocess with `preexec_fn` in a serving process logs an error and counts in
  `kotadb_unsafe_forks_total`, so a regression shows up in the log and on dashboards.

Measured in tests/ingest/test_fork_safety.py's stress run (strace on the ingest process): every
process it created was made by vfork() — git and the fork server — and no thread of it called
fork().
"""

from __future__ import annotations

import logging
import os
import threading

from services.common import metrics

FORK_SUPPORT_VARIABLE = "GRPC_ENABLE_FORK_SUPPORT"
os.environ.setdefault(FORK_SUPPORT_VARIABLE, "false")

UNSAFE_FORKS = metrics.counter(
    "kotadb_unsafe_forks_total",
    "Plain fork() calls (os.fork, or a subprocess with preexec_fn) in a process serving gRPC.",
    ("service",),
)

log = logging.getLogger("kotadb.forksafety")
_guarded: set[str] = set()
_lock = threading.Lock()


def guard_forks(service: str) -> None:
    """guard_forks makes a plain fork in this process log an error and count, once registered per service.

    It cannot stop the fork (the hook runs just before it); it makes one visible. Forks made in
    C (a library calling fork() itself) are not seen: the gRPC switch above covers those.
    """
    with _lock:
        if service in _guarded:
            return
        _guarded.add(service)

    def before() -> None:
        UNSAFE_FORKS.labels(service=service).inc()
        log.error(
            "%s: plain fork() in a process serving gRPC; use vfork-based subprocesses or a"
            " forkserver/spawn pool (services/common/forksafety.py)",
            service,
        )

    os.register_at_fork(before=before)
