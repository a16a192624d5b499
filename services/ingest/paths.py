"""paths holds the rule for a document's path, shared by the ingest service and `kotadb push`.

A path is what a document is stored and shown under, relative to its repository's root. It
lives apart from documents.py so that the client (`kotadb push`, through walk.py) checks paths
without importing what the service writes documents with (the database driver, the symbol
extractor and the engine's builder with numpy: ~0.2 s of every `kotadb push`).
"""

from __future__ import annotations

MAX_PATH_BYTES = 4096
"""MAX_PATH_BYTES is the longest path accepted, in UTF-8 bytes."""


def has_control(text: str) -> bool:
    """has_control tells whether `text` holds C0/C1 control characters or DEL (NUL included)."""
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)


def check_path(path: str) -> tuple[str, str] | None:
    """check_path returns (reason, description) when `path` is not a safe relative path, else None."""
    if not path:
        return "PATH_EMPTY", "the path is empty"
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return "PATH_TOO_LONG", f"the path is longer than {MAX_PATH_BYTES} bytes"
    if has_control(path):
        return "PATH_CONTROL_CHARACTER", "the path contains a control character"
    if "\\" in path:
        return "PATH_BACKSLASH", "the path contains a backslash; use '/' as the separator"
    if path.startswith("/"):
        return "PATH_ABSOLUTE", "the path is absolute; give it relative to the repository root"
    parts = path.split("/")
    if ".." in parts:
        return "PATH_TRAVERSAL", "the path contains a '..' segment"
    if any(part in ("", ".") for part in parts):
        return "PATH_NOT_CANONICAL", "the path contains an empty or '.' segment"
    return None
