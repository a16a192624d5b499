"""index holds the index directory: generation manifests, snapshots, file lifetimes and the writer lock.

The directory layout is described in format.py. A snapshot pins one manifest generation: its
segments, their deletion files and its skip list stay on disk and mapped until the snapshot is
closed, however many commits and merges happen meanwhile. Files are reference-counted in this
process; the current manifest holds one reference, each open snapshot another, and a file is
unlinked when its count drops to zero. Another process's readers keep their mapped files (Linux
keeps an unlinked file's pages while mapped) and retry with the newest manifest if a file they
were about to open has gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroaring import BitMap, FrozenBitMap

from services.search.engine.index.format import (
    DELETED_PREFIX,
    FORMAT_VERSION,
    MANIFEST_PREFIX,
    SKIPPED_PREFIX,
    IndexCorruptError,
    IndexFileError,
    IndexNotFoundError,
    dump_checked_json,
    fsync_dir,
    load_checked_json,
    write_atomic,
)
from services.search.engine.index.reader import SegmentData, SegmentReader
from services.search.engine.model import Skipped, SkipReason
from services.search.engine.record import Record, field

LOCK_FILE = "LOCK"
_OPEN_RETRIES = 5


class IndexLockedError(IndexFileError):
    """IndexLockedError reports that another process holds the index's writer lock."""


def manifest_name(generation: int) -> str:
    """manifest_name is the file name of a generation's manifest."""
    return f"{MANIFEST_PREFIX}{generation:012d}.json"


def deleted_name(generation: int) -> str:
    """deleted_name is the file name of a deletion bitmap written at `generation`."""
    return f"{DELETED_PREFIX}{generation:012d}.roar"


def skipped_name(generation: int) -> str:
    """skipped_name is the file name of a skip list written at `generation`."""
    return f"{SKIPPED_PREFIX}{generation:012d}.json"


class SegmentEntry(Record):
    """SegmentEntry is a manifest's record of one live segment and its current deletion file."""

    name: str
    doc_count: int
    deleted: str | None = None
    deleted_count: int = 0
    deleted_crc32: int = 0

    @property
    def live_count(self) -> int:
        """live_count is the number of documents not deleted."""
        return self.doc_count - self.deleted_count


class SkippedRef(Record):
    """SkippedRef is a manifest's pointer to its skip list file."""

    file: str
    crc32: int
    count: int


class Manifest(Record):
    """Manifest is one generation of the index: its segments, deletions and skip list."""

    generation: int
    next_segment: int
    segments: tuple[SegmentEntry, ...] = ()
    skipped: SkippedRef | None = None

    def to_json(self) -> dict[str, Any]:
        """to_json renders the manifest body (dump_checked_json adds the checksum)."""
        return {
            "format": FORMAT_VERSION,
            "generation": self.generation,
            "next_segment": self.next_segment,
            "segments": [
                {
                    "name": s.name,
                    "doc_count": s.doc_count,
                    "deleted": s.deleted,
                    "deleted_count": s.deleted_count,
                    "deleted_crc32": s.deleted_crc32,
                }
                for s in self.segments
            ],
            "skipped": None
            if self.skipped is None
            else {"file": self.skipped.file, "crc32": self.skipped.crc32, "count": self.skipped.count},
        }

    @staticmethod
    def load(path: Path) -> Manifest:
        """load reads and verifies a manifest file."""
        obj = load_checked_json(path)
        try:
            segments = tuple(
                SegmentEntry(
                    str(s["name"]),
                    int(s["doc_count"]),
                    s["deleted"],
                    int(s["deleted_count"]),
                    int(s["deleted_crc32"]),
                )
                for s in obj["segments"]
            )
            sk = obj["skipped"]
            skipped = None if sk is None else SkippedRef(str(sk["file"]), int(sk["crc32"]), int(sk["count"]))
            manifest = Manifest(int(obj["generation"]), int(obj["next_segment"]), segments, skipped)
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptError(path, f"malformed manifest: {exc}") from exc
        for entry in segments:
            if "/" in entry.name or entry.name.startswith(".") or (entry.deleted and "/" in entry.deleted):
                raise IndexCorruptError(path, f"invalid file name in manifest: {entry.name!r}")
        return manifest

    def files(self) -> set[str]:
        """files lists the paths (relative to the index directory) this manifest keeps alive."""
        out = {manifest_name(self.generation)}
        for s in self.segments:
            out.add(s.name)
            if s.deleted:
                out.add(f"{s.name}/{s.deleted}")
        if self.skipped:
            out.add(self.skipped.file)
        return out


def list_generations(path: Path) -> list[int]:
    """list_generations returns the generations with a manifest file in `path`, ascending."""
    gens = []
    for name in os.listdir(path):
        if name.startswith(MANIFEST_PREFIX) and name.endswith(".json"):
            with contextlib.suppress(ValueError):
                gens.append(int(name[len(MANIFEST_PREFIX) : -len(".json")]))
    return sorted(gens)


def load_newest(path: Path, newer_than: int = -1) -> Manifest | None:
    """load_newest loads the highest-generation manifest above `newer_than`, or returns None.

    A concurrent writer may unlink an old manifest between listing and reading it; the listing
    is then retried, so readers never fail on a generation that was merely superseded.
    """
    for _ in range(_OPEN_RETRIES):
        gens = list_generations(path)
        if not gens or gens[-1] <= newer_than:
            return None
        try:
            return Manifest.load(path / manifest_name(gens[-1]))
        except FileNotFoundError:
            continue
    raise IndexCorruptError(path, "manifests keep disappearing while being read")


def read_skipped(path: Path, ref: SkippedRef | None) -> list[Skipped]:
    """read_skipped loads a skip list file, verifying its checksum."""
    if ref is None:
        return []
    file = path / ref.file
    try:
        raw = file.read_bytes()
    except FileNotFoundError as exc:
        raise IndexCorruptError(file, "missing") from exc
    if zlib.crc32(raw) != ref.crc32:
        raise IndexCorruptError(file, "checksum mismatch")
    try:
        rows = json.loads(raw)
        return [
            Skipped(r["external_id"], r["path"], SkipReason(r["reason"]), r.get("detail", "")) for r in rows
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexCorruptError(file, f"malformed skip list: {exc}") from exc


def encode_skipped(rows: Sequence[Skipped]) -> bytes:
    """encode_skipped renders a skip list file, sorted by external id."""
    body = [
        {"external_id": s.external_id, "path": s.path, "reason": s.reason.value, "detail": s.detail}
        for s in sorted(rows, key=lambda s: s.external_id)
    ]
    return json.dumps(body, indent=0).encode() + b"\n"


class Snapshot:
    """Snapshot is a pinned, consistent view of one generation; use it as a context manager.

    `segments` are the generation's segment readers, each with the generation's live set.
    """

    def __init__(self, index: Index, manifest: Manifest, segments: Sequence[SegmentReader]) -> None:
        self.index = index
        self.manifest = manifest
        self.segments: Sequence[SegmentReader] = tuple(segments)
        self._closed = False

    @property
    def generation(self) -> int:
        """generation is the manifest generation this snapshot sees."""
        return self.manifest.generation

    @property
    def doc_count(self) -> int:
        """doc_count is the number of live documents in the snapshot."""
        return sum(s.live_count for s in self.segments)

    def skipped(self) -> list[Skipped]:
        """skipped returns the documents this generation's writer refused, with reasons."""
        return read_skipped(self.index.path, self.manifest.skipped)

    def verify(self) -> None:
        """verify checks every checksum of every file of the snapshot now (reads everything once).

        Raises IndexCorruptError naming the first bad file; a search service runs this at start
        and rebuilds the index from the database if it fails.
        """
        for segment in self.segments:
            segment.verify()
        self.skipped()

    def close(self) -> None:
        """close releases the snapshot's pins; files no one else needs are unlinked."""
        if not self._closed:
            self._closed = True
            self.index._unpin(self.manifest.files())

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class IndexStats(Record, frozen=False):
    """IndexStats summarises an index for `kotadb index stats`: sizes are bytes on disk."""

    generation: int
    segments: int
    documents: int
    deleted: int
    content_bytes: int
    trigrams: int
    bytes_by_part: dict[str, int] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """total_bytes is the index's whole size on disk."""
        return sum(self.bytes_by_part.values())


class Index:
    """Index is an opened index directory, shared by every snapshot and the writer in this process."""

    def __init__(self, path: Path, manifest: Manifest, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable
        """durable makes every write fsync files and directories before a manifest names them.

        Without it a power loss can leave a manifest naming torn files; the checksums then
        report them and the index (a cache of the database) is rebuilt. Tests turn it off."""
        self._state = threading.RLock()
        self._write_lock = threading.Lock()
        self._manifest = manifest
        self._pins: Counter[str] = Counter()
        self._data: dict[str, SegmentData] = {}
        self._live: dict[tuple[str, str | None], FrozenBitMap] = {}
        self._closed = False
        self._pin(manifest.files())

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False, durable: bool = True) -> Index:
        """open opens the index at `path`; with create=True an empty index is made if none exists."""
        root = Path(path)
        if create:
            root.mkdir(parents=True, exist_ok=True)
        if not root.is_dir():
            raise IndexNotFoundError(root, "no such directory")
        gens = list_generations(root)
        if not gens:
            if not create:
                raise IndexNotFoundError(root, "no manifest: not an index")
            empty = Manifest(0, 0)
            write_atomic(root / manifest_name(0), dump_checked_json(empty.to_json()), durable=durable)
            fsync_dir(root, durable=durable)
        manifest = load_newest(root)
        if manifest is None:
            raise IndexNotFoundError(root, "no manifest: not an index")
        return cls(root, manifest, durable=durable)

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, durable: bool = True) -> Index:
        """create opens the index at `path`, making an empty one if needed."""
        return cls.open(path, create=True, durable=durable)

    @property
    def manifest(self) -> Manifest:
        """manifest is the newest generation this process has loaded."""
        return self._manifest

    def refresh(self) -> Manifest:
        """refresh loads a newer manifest written by another process, if there is one."""
        with self._state:
            newest = load_newest(self.path, newer_than=self._manifest.generation)
            if newest is not None:
                self._set_current(newest)
            return self._manifest

    def snapshot(self) -> Snapshot:
        """snapshot pins the newest generation and opens its segments (cached across snapshots)."""
        for attempt in range(_OPEN_RETRIES):
            with self._state:
                manifest = self.refresh()
                self._pin(manifest.files())
            try:
                readers = [SegmentReader(self._segment(e.name), self._live_set(e)) for e in manifest.segments]
            except IndexCorruptError as exc:
                self._unpin(manifest.files())
                # Another process may have merged the segment away after we read the manifest.
                if attempt + 1 < _OPEN_RETRIES and list_generations(self.path)[-1:] != [manifest.generation]:
                    continue
                raise exc
            except BaseException:
                self._unpin(manifest.files())
                raise
            return Snapshot(self, manifest, readers)
        raise AssertionError("unreachable")

    def skipped(self) -> list[Skipped]:
        """skipped returns the newest generation's skip list."""
        return read_skipped(self.path, self.refresh().skipped)

    def stats(self) -> IndexStats:
        """stats measures the newest generation: documents, sizes by part, skipped files."""
        with self.snapshot() as snap:
            parts: Counter[str] = Counter()
            for seg in snap.segments:
                for name, part in seg.data.parts.items():
                    parts[name.removesuffix(".bin")] += part.info.size
                parts["meta"] += (seg.data.path / "meta.json").stat().st_size
            for entry in snap.manifest.segments:
                if entry.deleted:
                    parts["deletions"] += (self.path / entry.name / entry.deleted).stat().st_size
            parts["manifest"] += (self.path / manifest_name(snap.generation)).stat().st_size
            if snap.manifest.skipped:
                parts["skipped"] += (self.path / snap.manifest.skipped.file).stat().st_size
            return IndexStats(
                generation=snap.generation,
                segments=len(snap.segments),
                documents=snap.doc_count,
                deleted=sum(s.doc_count - s.live_count for s in snap.segments),
                content_bytes=sum(s.data.content_bytes for s in snap.segments),
                trigrams=sum(s.data.trigram_count for s in snap.segments),
                bytes_by_part=dict(parts),
                skipped=snap.skipped(),
            )

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """write_lock makes the caller the index's only writer, in this process and across processes.

        It never waits: a second writer gets IndexLockedError at once (waiting for a writer that
        lives as long as its service would hang the caller instead).
        """
        if not self._write_lock.acquire(blocking=False):
            raise IndexLockedError(self.path / LOCK_FILE, "another writer is open in this process")
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    raise IndexLockedError(self.path / LOCK_FILE, "another writer holds the lock") from exc
                self.refresh()
                yield
            finally:
                os.close(fd)
        finally:
            self._write_lock.release()

    def segment_data(self, name: str) -> SegmentData:
        """segment_data returns the opened segment `name`, opening it on first use."""
        return self._segment(name)

    def live_set(self, entry: SegmentEntry) -> FrozenBitMap:
        """live_set returns the live ordinals of a manifest entry (cached and shared, hence frozen)."""
        return self._live_set(entry)

    def publish(self, manifest: Manifest) -> None:
        """publish makes `manifest` the current generation: atomic rename, then unpin the old one.

        Only the holder of write_lock may publish.
        """
        raw = dump_checked_json(manifest.to_json())
        write_atomic(self.path / manifest_name(manifest.generation), raw, durable=self.durable)
        fsync_dir(self.path, durable=self.durable)
        with self._state:
            self._set_current(manifest)

    def remove_orphans(self) -> None:
        """remove_orphans deletes files no manifest names (a crashed writer's leftovers); writer lock held."""
        import shutil  # writers only: a reader never removes anything (and shutil loads bz2, lzma)

        with self._state:
            keep = set(self._manifest.files()) | set(self._pins)
            for name in os.listdir(self.path):
                if name.startswith(".tmp-") or (name.startswith("seg-") and name not in keep):
                    shutil.rmtree(self.path / name, ignore_errors=True)
                elif name.startswith((SKIPPED_PREFIX, MANIFEST_PREFIX)) and name not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        (self.path / name).unlink()
            for entry in self._manifest.segments:
                for name in os.listdir(self.path / entry.name):
                    rel = f"{entry.name}/{name}"
                    if name.startswith(DELETED_PREFIX) and rel not in keep:
                        with contextlib.suppress(FileNotFoundError):
                            (self.path / rel).unlink()

    def close(self) -> None:
        """close drops cached segments; open snapshots keep working until closed.

        After close the index never deletes a file: its directory may since have been replaced
        by another index under the same path (a rebuild's swap), whose files have the same
        names, so a snapshot closed late only forgets what it pinned. What it would have
        deleted is an orphan the next writer removes (`remove_orphans`).
        """
        with self._state:
            self._closed = True
            self._data.clear()
            self._live.clear()

    def __enter__(self) -> Index:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _set_current(self, manifest: Manifest) -> None:
        old = self._manifest
        self._manifest = manifest
        self._pin(manifest.files())
        self._unpin(old.files())

    def _segment(self, name: str) -> SegmentData:
        with self._state:
            data = self._data.get(name)
            if data is None:
                data = SegmentData(self.path / name)
                self._data[name] = data
            return data

    def _live_set(self, entry: SegmentEntry) -> FrozenBitMap:
        key = (entry.name, entry.deleted)
        with self._state:
            cached = self._live.get(key)
            if cached is None:
                data = self._segment(entry.name)
                live = BitMap()
                live.add_range(0, entry.doc_count)
                if entry.doc_count != data.doc_count:
                    raise IndexCorruptError(
                        data.path / "meta.json", "document count differs from the manifest"
                    )
                if entry.deleted:
                    deleted = data.load_deleted(self.path / entry.name / entry.deleted, entry.deleted_crc32)
                    if len(deleted) != entry.deleted_count:
                        raise IndexCorruptError(
                            self.path / entry.name / entry.deleted, "count differs from manifest"
                        )
                    live -= deleted
                cached = FrozenBitMap(live)
                self._live[key] = cached
            return cached

    def _pin(self, files: set[str]) -> None:
        with self._state:
            self._pins.update(files)

    def _unpin(self, files: set[str]) -> None:
        with self._state:
            current = self._manifest.files()
            for name in files:
                self._pins[name] -= 1
                if self._pins[name] > 0 or name in current:
                    continue
                del self._pins[name]
                self._drop(name)

    def _drop(self, rel: str) -> None:
        target = self.path / rel
        if rel in self._data:
            del self._data[rel]
        for key in [k for k in self._live if k[0] == rel or f"{k[0]}/{k[1]}" == rel]:
            del self._live[key]
        if self._closed:
            return
        if "/" not in rel and rel.startswith("seg-") and target.is_dir():
            import shutil  # see remove_orphans

            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
