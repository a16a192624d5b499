"""Russ Cox's codesearch (`cindex`, `csearch`) as a benchmark peer.

codesearch is the direct ancestor of KotaDB's engine: one trigram index file, posting lists
of file ids, Go's RE2-compatible regexp for verification. The index lives in the file named
by `$CSEARCHINDEX`, so each benchmark run keeps its own and never touches `~/.csearchindex`.
"""

from __future__ import annotations

from pathlib import Path

from services.bench.measure import PeerBuild, ProcessRun, run_process

CINDEX = "cindex"
CSEARCH = "csearch"


class CodesearchPeer:
    """CodesearchPeer builds a codesearch index of a corpus and times `csearch -n` queries."""

    name = "csearch"

    def __init__(self, corpus: str | Path, work_dir: str | Path) -> None:
        self.corpus = Path(corpus).resolve()
        self.index_file = Path(work_dir) / "csearchindex"

    def _env(self) -> dict[str, str]:
        return {"CSEARCHINDEX": str(self.index_file)}

    def build(self) -> PeerBuild:
        """build indexes the corpus from scratch (`cindex -reset`) and measures it."""
        self.index_file.parent.mkdir(parents=True, exist_ok=True)
        self.index_file.unlink(missing_ok=True)
        run = run_process([CINDEX, self.corpus.as_posix()], env=self._env(), measure_rss=True)
        return PeerBuild(
            seconds=run.seconds,
            index_bytes=self.index_file.stat().st_size,
            peak_rss_bytes=run.peak_rss_bytes,
            detail={},
        )

    def query(self, pattern: str) -> ProcessRun:
        """query prints every matching line with `csearch -n` and returns timing and count.

        csearch exits 1 when nothing matched, as grep does.
        """
        return run_process([CSEARCH, "-n", pattern], env=self._env(), ok_codes=(0, 1))

    def supports(self, pattern: str) -> bool:
        """supports is always true: csearch speaks Go's RE2 dialect."""
        return True

    def close(self) -> None:
        """close removes the index file."""
        self.index_file.unlink(missing_ok=True)
