"""Walking a source tree and deciding which files become documents, each refusal with its reason.

Used by the sync workers on a git checkout and, client side, by `kotadb push` on a local
directory, so both leave out the same files for the same reasons. Everything here is plain
filesystem work with no database or network: the path and content checks are pure functions.

Rules, in the order they are applied:

* `.git` is never entered (silently). Directories named in `WalkRules.skip_dirs` (vendored and
  generated trees such as `node_modules`, `vendor`, `dist`) are never entered either; each is
  recorded once (`skipped_dir`).
* Symbolic links are never followed, whether they point inside the tree or out of it
  (`symlink`); nor are sockets, FIFOs or devices read (`not_regular`). Files are opened with
  O_NOFOLLOW one path component at a time, so a directory replaced by a link between the walk
  and the read is refused too.
* Paths a document may not have (`..`, backslashes, control characters, not UTF-8, too long;
  the document rules of services/ingest/paths.py) are refused (`bad_path`).
* Include and exclude globs (`fnmatch` on the whole relative path, `*` crossing `/`) pick
  files (`excluded`); machine-written files (lock files, minified bundles, protobuf stubs:
  the engine's `is_generated`) are left out (`generated`).
* Files over `max_file_bytes` (`too_large`), with a NUL byte in their first 8 KiB (`binary`) or
  that are not UTF-8 (`not_utf8`) are left out.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from services.ingest.paths import check_path
from services.search.engine.languages import is_generated

# A NUL in the first 8 KiB is how git itself tells binary from text.
BINARY_SNIFF_BYTES = 8000
DEFAULT_SKIP_DIRS: frozenset[str] = frozenset(
    {".git", ".hg", ".svn", "node_modules", "vendor", "third_party", "bower_components", "__pycache__"}
)


@dataclasses.dataclass(frozen=True)
class WalkRules:
    """WalkRules says which files of a tree become documents (see the module docstring)."""

    max_file_bytes: int = 1024 * 1024
    skip_dirs: frozenset[str] = DEFAULT_SKIP_DIRS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_generated: bool = True


@dataclasses.dataclass(frozen=True)
class Skip:
    """Skip is one file or directory left out of a sync, with a stable reason and a detail."""

    path: str
    reason: str
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        """to_json is the record stored on the job."""
        return {"path": self.path, "reason": self.reason, "detail": self.detail}


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """FileEntry is a regular file the walk found: its relative path and size at the time."""

    path: str
    size: int


def split_dirs(text: str) -> frozenset[str]:
    """split_dirs parses a comma-separated list of directory names (the skip_dirs setting)."""
    return frozenset(part.strip() for part in text.split(",") if part.strip())


def path_skip(path: str, rules: WalkRules) -> Skip | None:
    """path_skip is why `path` (relative, `/`-separated) is left out by its name alone, or None."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return Skip(_printable(path), "bad_path", "the file name is not UTF-8")
    refusal = check_path(path)
    if refusal is not None:
        return Skip(_printable(path), "bad_path", refusal[1])
    parts = path.split("/")
    for part in parts[:-1]:
        if part in rules.skip_dirs:
            return Skip(path, "skipped_dir", f"inside {part}/")
    if rules.include and not any(_glob(path, pattern) for pattern in rules.include):
        return Skip(path, "excluded", "matches no include pattern")
    for pattern in rules.exclude:
        if _glob(path, pattern):
            return Skip(path, "excluded", f"matches exclude pattern {pattern!r}")
    if rules.skip_generated and is_generated(path):
        return Skip(path, "generated", "a machine-written file")
    return None


def content_skip(path: str, content: bytes, rules: WalkRules) -> Skip | None:
    """content_skip is why a file with `content` is left out (size, binary, not UTF-8), or None."""
    if len(content) > rules.max_file_bytes:
        return Skip(path, "too_large", f"{len(content)} bytes, over the limit of {rules.max_file_bytes}")
    if b"\x00" in content[:BINARY_SNIFF_BYTES]:
        return Skip(path, "binary", "contains NUL bytes")
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Skip(path, "not_utf8", f"invalid UTF-8 at byte {exc.start}")
    return None


def walk(root: Path, rules: WalkRules) -> Iterator[FileEntry | Skip]:
    """walk yields the regular files under `root` that pass the name rules, and every skip.

    Directory entries are visited in sorted order, so two walks of the same tree agree.
    """
    stack: list[str] = [""]
    while stack:
        relative_dir = stack.pop()
        directory = root / relative_dir if relative_dir else root
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as exc:
            yield Skip(relative_dir or ".", "unreadable", os.strerror(exc.errno or errno.EIO))
            continue
        subdirs: list[str] = []
        for entry in entries:
            name = entry.name
            path = f"{relative_dir}/{name}" if relative_dir else name
            if entry.is_symlink():
                yield Skip(_printable(path), "symlink", "symbolic links are not followed")
            elif entry.is_dir(follow_symlinks=False):
                if name == ".git":
                    continue  # the checkout's own metadata: never content, not worth a record
                if name in rules.skip_dirs:
                    yield Skip(_printable(path) + "/", "skipped_dir", f"{name}/ is never indexed")
                else:
                    subdirs.append(path)
            elif entry.is_file(follow_symlinks=False):
                skip = path_skip(path, rules)
                if skip is not None:
                    yield skip
                    continue
                size = entry.stat(follow_symlinks=False).st_size
                if size > rules.max_file_bytes:
                    yield Skip(path, "too_large", f"{size} bytes, over the limit of {rules.max_file_bytes}")
                else:
                    yield FileEntry(path, size)
            else:
                yield Skip(_printable(path), "not_regular", "not a regular file")
        stack.extend(reversed(subdirs))


def read_file(root: Path, path: str, rules: WalkRules) -> bytes | Skip:
    """read_file reads `root/path` without following any symbolic link, or says why it is skipped.

    It checks the name rules, refuses links and non-regular files at every component, reads at
    most `max_file_bytes + 1` bytes and applies the content checks.
    """
    skip = path_skip(path, rules)
    if skip is not None:
        return skip
    parts = path.split("/")
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fds: list[int] = []
    try:
        current = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        fds.append(current)
        for part in parts[:-1]:
            current = os.open(part, flags | os.O_DIRECTORY, dir_fd=current)
            fds.append(current)
        fd = os.open(parts[-1], flags | getattr(os, "O_NONBLOCK", 0), dir_fd=current)
        fds.append(fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return Skip(path, "not_regular", "not a regular file")
        if info.st_size > rules.max_file_bytes:
            return Skip(path, "too_large", f"{info.st_size} bytes, over the limit of {rules.max_file_bytes}")
        chunks: list[bytes] = []
        remaining = rules.max_file_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        content = b"".join(chunks)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return Skip(path, "symlink", "a path component is a symbolic link")
        if exc.errno == errno.ENOENT:
            return Skip(path, "missing", "not in the checkout")
        return Skip(path, "unreadable", os.strerror(exc.errno or errno.EIO))
    finally:
        for opened in reversed(fds):
            os.close(opened)
    return content_skip(path, content, rules) or content


def rules_for(
    *,
    max_file_bytes: int,
    skip_dirs: frozenset[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> WalkRules:
    """rules_for builds WalkRules from settings and a repository's own globs and limit."""
    return WalkRules(
        max_file_bytes=max_file_bytes,
        skip_dirs=skip_dirs,
        include=tuple(include),
        exclude=tuple(exclude),
    )


def _glob(path: str, pattern: str) -> bool:
    # "dir/" and "dir/**" both mean everything below dir; a bare name matches at any depth.
    if pattern.endswith("/"):
        pattern += "*"
    pattern = pattern.replace("**/", "*").replace("/**", "/*")
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern) or fnmatch.fnmatchcase(path, pattern)
    return fnmatch.fnmatchcase(path, pattern.lstrip("/"))


def _printable(path: str) -> str:
    """_printable makes a path safe to store and show: invalid UTF-8 and controls escaped."""
    raw = os.fsencode(path)
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)[:1024]
