"""Building an index from a source tree: walk, read, detect language, extract symbols, write.

This is the offline path behind `kotadb index build` and the benchmark; the ingest service
feeds the same writer from the database instead. The walk is deterministic (sorted) and
follows these rules, which the differential test mirrors on ripgrep's side:

* version-control metadata directories (`.git`, `.hg`, `.svn`) are not entered; every other
  directory is, hidden ones included, and no ignore files are read;
* symbolic links are neither followed nor indexed (ripgrep's default), and neither are
  sockets, FIFOs or devices;
* every regular file is handed to the writer, which records the ones it refuses (binary,
  invalid UTF-8, too large, too many trigrams, empty) with their reasons.

Symbol extraction is the expensive step (tree-sitter), so it runs in E-symbols'
`SymbolExtractor` worker pool while this process reads files and the writer builds
segments; documents that the writer will refuse anyway (binary, too large, invalid UTF-8)
are not sent for extraction.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.search.engine.index.builder import Limits, check_document
from services.search.engine.index.index import Index
from services.search.engine.index.merge import TieredMergePolicy
from services.search.engine.index.writer import IndexWriter
from services.search.engine.languages import detect_language
from services.search.engine.model import Skipped, SourceDocument
from services.search.engine.symbols.symbolpool import SymbolExtractor

SKIP_DIRS = frozenset({".git", ".hg", ".svn"})
# Language detection looks at the start of a file (shebang, C++ markers in headers).
_SNIFF_BYTES = 16 * 1024
BUILD_SEGMENT_BYTES = 256 << 20
"""BUILD_SEGMENT_BYTES is the content per segment of a bulk build (the writer's default is 64 MiB).

A query pays some costs once per segment (its meta.json read and checked when the index opens,
a dictionary lookup per trigram, a candidate set), so a built tree answers faster in fewer,
larger segments. Measured on Linux 6.1 (BENCHMARKS.md): 15 segments became 4; a `kotadb index
search` process that finds nothing took 25 ms less and the warm first page's median query 28 %
less; the build took about as long (30 s against 28 s), with a peak RSS of 948 MB instead of
475 MB (one segment's documents are held while the next is read).
"""
MAX_SEGMENT_BYTES = 1 << 30
"""MAX_SEGMENT_BYTES bounds `segment_bytes`: memory of a build is a few times one segment."""


@dataclass(frozen=True, slots=True)
class SourceFile:
    """SourceFile is one regular file found by the walk: its path relative to the root and size."""

    path: str
    size: int


@dataclass(slots=True)
class BuildProgress:
    """BuildProgress is the running state of a build, handed to the progress callback."""

    files_total: int
    bytes_total: int
    files_done: int = 0
    bytes_done: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        """elapsed is the wall time since the build started, in seconds."""
        return time.perf_counter() - self.started


@dataclass(frozen=True, slots=True)
class BuildReport:
    """BuildReport summarises a finished build."""

    files: int
    bytes: int
    indexed: int
    skipped: tuple[Skipped, ...]
    seconds: float
    generation: int

    @property
    def throughput(self) -> float:
        """throughput is the corpus bytes read per second of build time."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def walk_sources(root: str | Path) -> list[SourceFile]:
    """walk_sources lists the regular files under root in sorted order (see the module rules)."""
    base = os.fspath(root)
    found: list[SourceFile] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(base, rel_dir) if rel_dir else base
        with os.scandir(full_dir) as entries:
            listing = sorted(entries, key=lambda e: e.name)
        subdirs: list[str] = []
        for entry in listing:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.is_symlink():
                continue
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in SKIP_DIRS:
                    subdirs.append(rel)
            elif entry.is_file(follow_symlinks=False):
                found.append(SourceFile(rel, entry.stat(follow_symlinks=False).st_size))
        # Reverse so the stack pops directories in sorted order.
        stack.extend(reversed(subdirs))
    found.sort(key=lambda f: f.path)
    return found


def read_source(root: str | Path, source: SourceFile) -> bytes:
    """read_source reads one file found by walk_sources."""
    with open(os.path.join(os.fspath(root), source.path), "rb") as fh:
        return fh.read()


def build_index(
    src: str | Path,
    out: str | Path,
    *,
    repository: str = "",
    workers: int = 2,
    segment_workers: int = 1,
    symbols: bool = True,
    limits: Limits | None = None,
    progress: Callable[[BuildProgress], None] | None = None,
    progress_every: float = 0.2,
    segment_bytes: int = BUILD_SEGMENT_BYTES,
) -> BuildReport:
    """build_index indexes every file under src into the index directory out.

    Paths are stored relative to src with `/` separators and double as external ids, so
    rebuilding into an existing index replaces documents in place and deletes those whose
    files are gone. `workers` processes
    extract symbols and `segment_workers` processes build segments (0: in this process);
    with `symbols=False` no symbols are extracted (a faster build without `sym:` search or
    definition ranking).
    `progress` is called at most every `progress_every` seconds and once at the end.
    `segment_bytes` (1 byte to `MAX_SEGMENT_BYTES`) is the content per segment; a merge of the
    build's segments never makes one larger.
    """
    if not 1 <= segment_bytes <= MAX_SEGMENT_BYTES:
        raise ValueError(f"segment_bytes must be between 1 and {MAX_SEGMENT_BYTES}, not {segment_bytes}")
    limits = limits or Limits()
    sources = walk_sources(src)
    state = BuildProgress(files_total=len(sources), bytes_total=sum(s.size for s in sources))
    skipped: list[Skipped] = []
    last_report = 0.0
    pending: collections.deque[tuple[SourceFile, bytes, str, bool]] = collections.deque()

    def to_extract() -> Iterator[tuple[bytes, str]]:
        for source in sources:
            content = read_source(src, source)
            language = detect_language(source.path, content[:_SNIFF_BYTES])
            probe = SourceDocument(external_id=source.path, path=source.path, content=content)
            refused = check_document(probe, limits) is not None
            pending.append((source, content, language, refused))
            # Refused documents still travel through the extractor (to keep order), but empty.
            yield (b"", "") if refused else (content, language)

    index = Index.open(out, create=True)
    try:
        with (
            IndexWriter(
                index,
                limits=limits,
                workers=segment_workers,
                flush_bytes=segment_bytes,
                merge_policy=TieredMergePolicy(max_segment_bytes=segment_bytes),
            ) as writer,
            SymbolExtractor(workers if symbols else 1) as extractor,
        ):
            stream = extractor.map(to_extract()) if symbols else (() for _ in to_extract())
            for found in stream:
                source, content, language, refused = pending.popleft()
                result = writer.add(
                    SourceDocument(
                        external_id=source.path,
                        path=source.path,
                        content=content,
                        repository=repository,
                        language=language,
                        symbols=() if refused else found,
                    )
                )
                if result is not None:
                    skipped.append(result)
                state.files_done += 1
                state.bytes_done += source.size
                state.skipped = len(skipped)
                if progress is not None and state.elapsed - last_report >= progress_every:
                    last_report = state.elapsed
                    progress(state)
            # Rebuilding into an existing index: files gone from the tree leave it too.
            for external_id in _live_ids(index) - {source.path for source in sources}:
                writer.delete(external_id)
            generation = writer.commit()
            # Skips found while building segments (too many trigrams) surface at commit.
            skipped = _dedupe_skips([*skipped, *writer.skipped])
    finally:
        index.close()
    if progress is not None:
        progress(state)
    return BuildReport(
        files=state.files_total,
        bytes=state.bytes_total,
        indexed=state.files_total - len(skipped),
        skipped=tuple(skipped),
        seconds=state.elapsed,
        generation=generation,
    )


def _dedupe_skips(skips: list[Skipped]) -> list[Skipped]:
    seen: dict[str, Skipped] = {}
    for skip in skips:
        seen[skip.external_id] = skip
    return sorted(seen.values(), key=lambda s: s.path)


def _live_ids(index: Index) -> set[str]:
    with index.snapshot() as snap:
        return {segment.data.external_ids[ordinal] for segment in snap.segments for ordinal in segment.live}
