"""bench_symbols.py — symbol extraction speed per CPU core on a tree, now and at a git revision.

    .venv/bin/python scripts/bench_symbols.py /tmp/corpus/stdlib [--rev REV] [--rounds N]

Every file of the tree with a symbol language (as `detect_language` names it) is read into
memory, then `extract_symbols` runs over all of them in this one process, and the CPU time
it takes is reported as MB per CPU-second, per language and in total. With `--rev`, the
symbols.py of that git revision (loaded from `git show` beside today's modules) is measured in
the same run, rounds alternating, so both figures see the same machine load; its symbols are
compared with today's, document by document. CPU time, unlike wall time, hardly moves when
other jobs share the cores, so it is the figure to compare across runs.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.search.engine.languages import detect_language  # noqa: E402
from services.search.engine.model import Symbol  # noqa: E402
from services.search.engine.symbols import symbols  # noqa: E402

Extract = Callable[[bytes, str], tuple[Symbol, ...]]
Found = list[tuple[Symbol, ...]]


# Where symbols.py has lived: its sub-package since the engine was grouped by data direction.
SYMBOLS_PATHS = ("services/search/engine/symbols/symbols.py", "services/search/engine/symbols.py")
# What a revision from before the grouping imports, and where it is today.
MOVED = (
    (b"from services.search.engine import pygaps", b"from services.search.engine.symbols import pygaps"),
    (b'resources.files("services.search.engine")', b'resources.files("services.search.engine.symbols")'),
)


def revision_source(rev: str) -> bytes:
    """revision_source is symbols.py at `rev`, its imports pointed at today's layout."""
    for path in SYMBOLS_PATHS:
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True)
        if shown.returncode == 0:
            source = shown.stdout
            for before, now in MOVED:
                source = source.replace(before, now)
            return source
    raise SystemExit(f"symbols.py not found at {rev} (looked at {', '.join(SYMBOLS_PATHS)})")


def load_revision(rev: str) -> ModuleType:
    """load_revision imports symbols.py as of git revision `rev` as a module of its own."""
    source = revision_source(rev)
    folder = Path(tempfile.mkdtemp(prefix="bench-symbols-"))
    path = folder / "symbols_at_rev.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("symbols_at_rev", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    # Its query files are found through the package, which is today's (the .scm files).
    spec.loader.exec_module(module)
    return module


def read_tree(root: Path) -> list[tuple[bytes, str]]:
    """read_tree returns (content, language) for every file of `root` with a symbol language."""
    docs: list[tuple[bytes, str]] = []
    for folder, _dirs, names in os.walk(root):
        for name in sorted(names):
            path = Path(folder, name)
            if path.is_symlink() or not path.is_file():
                continue
            content = path.read_bytes()
            language = detect_language(path.as_posix(), content[:512])
            if language in symbols.SYMBOL_LANGUAGES and content:
                docs.append((content, language))
    return docs


def measure(
    extract: Extract, docs: Sequence[tuple[bytes, str]]
) -> tuple[dict[str, float], list[tuple[Symbol, ...]]]:
    """measure extracts every document once: CPU seconds per language, and the symbols."""
    seconds: dict[str, float] = collections.defaultdict(float)
    found: Found = []
    for content, language in docs:
        start = time.process_time()
        found.append(extract(content, language))
        seconds[language] += time.process_time() - start
    return seconds, found


def main(argv: Sequence[str] | None = None) -> int:
    """main runs the measurement and prints one row per language and version."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tree", type=Path)
    parser.add_argument("--rev", help="also measure symbols.py at this git revision")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    docs = read_tree(args.tree)
    sizes: dict[str, int] = collections.Counter()
    for content, language in docs:
        sizes[language] += len(content)
    versions: dict[str, Extract] = {"now": symbols.extract_symbols}
    if args.rev:
        versions[args.rev] = load_revision(args.rev).extract_symbols
    best: dict[str, dict[str, float]] = {}
    found: dict[str, Found] = {}
    load = [os.getloadavg()[0]]
    for _ in range(max(1, args.rounds)):
        for name, extract in versions.items():
            seconds, found[name] = measure(extract, docs)
            kept = best.setdefault(name, dict(seconds))
            for language, value in seconds.items():
                kept[language] = min(kept[language], value)
            load.append(os.getloadavg()[0])
    print(f"{len(docs)} files; load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores")
    print(f"{'version':<12} {'language':<12} {'MB':>7} {'CPU s':>7} {'MB/CPU-s':>9} {'symbols':>8}")
    for name in versions:
        counts: dict[str, int] = collections.Counter()
        for (_content, language), got in zip(docs, found[name], strict=True):
            counts[language] += len(got)
        for language in [*sorted(sizes), "total"]:
            mb = (sum(sizes.values()) if language == "total" else sizes[language]) / 1e6
            cpu = sum(best[name].values()) if language == "total" else best[name][language]
            count = sum(counts.values()) if language == "total" else counts[language]
            print(f"{name:<12} {language:<12} {mb:7.1f} {cpu:7.2f} {mb / cpu:9.2f} {count:8}")
    if args.rev:
        differ = sum(1 for a, b in zip(found["now"], found[args.rev], strict=True) if a != b)
        print(f"documents whose symbols differ between now and {args.rev}: {differ}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
