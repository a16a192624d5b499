"""Postgres `pg_trgm` as a benchmark peer: what a Supabase user would reach for first.

A throwaway cluster (services.common.pgembed) gets one table of the corpus's files, those of
at most 1 MiB that are valid UTF-8 without NUL bytes (Postgres `text` cannot hold NUL), and a
GIN `gin_trgm_ops` index on the content. A query is `select path from files where content ~
$1`: it answers which files match, not which lines, so it does less work than the other
peers and the report says so.

Postgres's regex dialect (ARE) differs from RE2 in ways `translate_pattern` handles: a word
boundary is `\\y` (`\\b` is backspace), embedded options are allowed only at the very start,
and matching is line-oriented only under the `n` option, which every query sets so that `.`
never crosses a newline, as in the other peers.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from services.bench.measure import PeerBuild, ProcessRun
from services.common.pgembed import EmbeddedPostgres

MAX_FILE_BYTES = 1 << 20
_LEADING_FLAGS = re.compile(r"^\(\?([a-zA-Z]+)\)")
# Rows per COPY batch: large enough to amortise the round trip, small enough that a batch of
# 1 MiB files stays well under the memory the benchmark process should use.
_BATCH = 500


class UnsupportedPattern(ValueError):
    """UnsupportedPattern marks an RE2 pattern with no faithful Postgres spelling."""


def translate_pattern(pattern: str) -> str:
    """translate_pattern rewrites an RE2 pattern into a newline-sensitive Postgres ARE.

    Leading RE2 flags merge into the ARE's option prefix; flags anywhere else, and flag
    groups such as `(?i:...)`, raise UnsupportedPattern.
    """
    flags = "n"
    match = _LEADING_FLAGS.match(pattern)
    body = pattern
    if match is not None:
        for flag in match.group(1):
            if flag == "i":
                flags += "i"
            elif flag == "s":
                # RE2's (?s) lets '.' match '\n'; lines never contain one, so it changes nothing.
                continue
            else:
                raise UnsupportedPattern(f"flag {flag!r} in {pattern!r}")
        body = pattern[match.end() :]
    if "(?" in body.replace("(?:", ""):
        raise UnsupportedPattern(f"embedded flags after the start of {pattern!r}")
    out: list[str] = []
    i = 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append({"b": "\\y", "B": "\\Y"}.get(nxt, body[i : i + 2]))
            i += 2
            continue
        out.append(body[i])
        i += 1
    return f"(?{flags})" + "".join(out)


def corpus_rows(corpus: Path) -> Iterator[tuple[str, str]]:
    """corpus_rows yields (relative path, text) for every file Postgres can store as text."""
    for dirpath, dirnames, filenames in os.walk(corpus):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or os.path.getsize(full) > MAX_FILE_BYTES:
                continue
            with open(full, "rb") as fh:
                data = fh.read()
            if b"\0" in data:
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            yield os.path.relpath(full, corpus), text


class PgTrgmPeer:
    """PgTrgmPeer loads a corpus into a throwaway Postgres and times GIN-indexed `~` queries."""

    name = "pg_trgm"

    def __init__(self, corpus: str | Path, work_dir: str | Path) -> None:
        self.corpus = Path(corpus).resolve()
        self.work_dir = Path(work_dir)
        self._pg: EmbeddedPostgres | None = None
        self._runner = asyncio.Runner()
        self._conn: asyncpg.Connection | None = None

    def build(self) -> PeerBuild:
        """build starts Postgres, loads the files and creates the GIN index, timing each step."""
        data_dir = self.work_dir / "pgdata"
        if data_dir.exists():
            shutil.rmtree(data_dir)
        self._pg = EmbeddedPostgres(data_dir)
        dsn = self._pg.start()
        return self._runner.run(self._build(dsn))

    async def _build(self, dsn: str) -> PeerBuild:
        conn: asyncpg.Connection = await asyncpg.connect(dsn)
        self._conn = conn
        await conn.execute("create extension if not exists pg_trgm")
        await conn.execute("drop table if exists files")
        await conn.execute("create table files (path text primary key, content text not null)")
        started = time.perf_counter()
        batch: list[tuple[str, str]] = []
        rows = 0
        text_bytes = 0
        for row in corpus_rows(self.corpus):
            batch.append(row)
            rows += 1
            text_bytes += len(row[1].encode("utf-8"))
            if len(batch) >= _BATCH:
                await conn.copy_records_to_table("files", records=batch, columns=["path", "content"])
                batch = []
        if batch:
            await conn.copy_records_to_table("files", records=batch, columns=["path", "content"])
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        # The default 64 MB makes a GIN build over a gigabyte spill and merge many times; a
        # user indexing this much text would raise it for the session too.
        await conn.execute("set maintenance_work_mem = '512MB'")
        await conn.execute("create index files_content_trgm on files using gin (content gin_trgm_ops)")
        await conn.execute("analyze files")
        index_seconds = time.perf_counter() - started
        index_bytes = int(await conn.fetchval("select pg_relation_size('files_content_trgm')"))
        table_bytes = int(await conn.fetchval("select pg_total_relation_size('files')"))
        return PeerBuild(
            seconds=load_seconds + index_seconds,
            index_bytes=index_bytes,
            # The server's processes are not our children; their memory is not measured.
            peak_rss_bytes=0,
            detail={
                "load_seconds": load_seconds,
                "index_seconds": index_seconds,
                "files": rows,
                "text_bytes": text_bytes,
                "table_bytes_with_index": table_bytes,
            },
        )

    def query(self, pattern: str) -> ProcessRun:
        """query fetches the paths of files matching pattern; the line count is the file count."""
        if self._conn is None:
            raise RuntimeError("PgTrgmPeer.query before build")
        translated = translate_pattern(pattern)
        started = time.perf_counter()
        rows = self._runner.run(self._conn.fetch("select path from files where content ~ $1", translated))
        seconds = time.perf_counter() - started
        return ProcessRun(
            seconds=seconds,
            peak_rss_bytes=0,
            returncode=0,
            output_bytes=sum(len(r["path"]) for r in rows),
            output_lines=len(rows),
        )

    def supports(self, pattern: str) -> bool:
        """supports reports whether pattern can be run with RE2's meaning."""
        try:
            translate_pattern(pattern)
        except UnsupportedPattern:
            return False
        return True

    def close(self) -> None:
        """close disconnects, stops the cluster and deletes its data directory."""
        if self._conn is not None:
            self._runner.run(self._conn.close())
            self._conn = None
        self._runner.close()
        if self._pg is not None:
            self._pg.stop()
            self._pg = None
        shutil.rmtree(self.work_dir / "pgdata", ignore_errors=True)
