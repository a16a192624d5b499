"""Tests of the engine's package layout: no import cycles, lazy packages, a light query path.

pyproject.toml's import-linter contracts (`lint-imports`) keep the layering between and inside
the sub-packages, but they skip imports under TYPE_CHECKING; the cycle check here counts them
too, so that no module needs another only "for typing" in a loop. The lazy-import checks run
the interpreter for real: `kotadb index search` pays only for the modules a search needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import grimp
import pytest

ENGINE = "services.search.engine"
ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("index", "query", "search", "symbols")


@cache
def _graph(type_checking: bool) -> grimp.ImportGraph:
    """_graph is the project's import graph, with or without imports under TYPE_CHECKING."""
    return grimp.build_graph("services", exclude_type_checking_imports=not type_checking, cache_dir=None)


def _engine_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    """_engine_edges maps each engine module to the engine modules it imports.

    The package itself is left out: its names resolve lazily (PEP 562), and `from engine import
    _fastscan` (a C extension grimp cannot see) shows up as an import of the package.
    """
    modules = {m for m in graph.modules if m.startswith(ENGINE + ".")}
    return {m: {i for i in graph.find_modules_directly_imported_by(m) if i in modules} for m in modules}


def _cycles(edges: dict[str, set[str]]) -> Iterator[list[str]]:
    """_cycles yields one cycle (as a path back to its start) per back edge a depth-first walk meets."""
    state: dict[str, int] = {}
    for start in sorted(edges):
        if start in state:
            continue
        path: list[str] = []
        stack: list[tuple[str, Iterator[str]]] = []
        state[start] = 1
        path.append(start)
        stack.append((start, iter(sorted(edges[start]))))
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                yield [*path[path.index(child) :], child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(edges[child]))))


def test_cycle_finder_finds_a_planted_cycle() -> None:
    """The cycle finder is not vacuous: a loop of three and a self-contained chain."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert list(_cycles(edges)) == [["a", "b", "c", "a"]]
    assert list(_cycles({"a": {"b"}, "b": set()})) == []


@pytest.mark.parametrize("type_checking", [False, True], ids=["runtime", "with-type-checking"])
def test_no_import_cycles_among_engine_modules(type_checking: bool) -> None:
    """No engine module reaches itself through imports (searcher ↔ searchrun ↔ page, symbols ↔ symbolpool)."""
    edges = _engine_edges(_graph(type_checking))
    assert len(edges) > 30, sorted(edges)  # the graph really holds the engine
    assert list(_cycles(edges)) == []


def test_engine_modules_live_in_a_subpackage_or_the_base() -> None:
    """Every engine module is in index/, query/, search/ or symbols/, or is one of the few base modules."""
    top = {m.rsplit(".", 1)[1] for m in _graph(False).find_children(ENGINE)}
    assert top == {*SUBPACKAGES, "errors", "model", "record", "languages"}


@pytest.mark.parametrize("package", [ENGINE, *(f"{ENGINE}.{p}" for p in SUBPACKAGES)])
def test_packages_import_nothing_at_import_time(package: str) -> None:
    """The engine package and its sub-packages import no module when imported (names load on use)."""
    assert _graph(False).find_modules_directly_imported_by(package) == set()


def _loaded_after(code: str) -> set[str]:
    """_loaded_after runs `code` in a fresh interpreter and returns the engine modules it loaded."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    loaded: list[str] = json.loads(out.splitlines()[-1])
    return {m for m in loaded if m.startswith(ENGINE) or m.startswith("tree_sitter")}


def test_query_path_loads_no_writer_and_no_tree_sitter() -> None:
    """Opening an index and searching it loads none of the write path and no tree-sitter parser."""
    loaded = _loaded_after(
        "from services.search.engine import Index, Searcher, SearchMode, MatchStream\n"
        "import services.search.engine.query.query, services.search.engine.search.searchrun"
    )
    assert f"{ENGINE}.search.searcher" in loaded
    written = {f"{ENGINE}.index.{m}" for m in ("builder", "writer", "merge", "build", "postings")}
    assert loaded & written == set()
    assert f"{ENGINE}.symbols.symbolpool" not in loaded
    assert not any(m.startswith("tree_sitter") for m in loaded)


def test_one_base_module_loads_alone() -> None:
    """The ingest service's import of languages loads the package and that module only."""
    loaded = _loaded_after("import services.search.engine.languages")
    assert loaded == {ENGINE, f"{ENGINE}.languages"}
