"""request holds what one search is asked to do and what it may use: SearchRequest and RunContext.

These are small values passed down the search path (searcher.py → searchrun.py → page.py), so
no module below the searcher reaches back into it: the run gets a `RunContext` (the clock,
the cursor encoder, the worker processes it may use) instead of the Searcher itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from services.search.engine.query.query import Query
from services.search.engine.record import Record
from services.search.engine.search.results import SearchMode

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    from services.search.engine.search.cursor import Cursor

DEFAULT_LIMIT_FILES = 50
# Exact-order searches with at least this many candidates are worth splitting over
# processes (below it, pickling results and waking a worker cost more than they save).
PROCESS_MIN = 1024


class SearchRequest(Record):
    """SearchRequest is everything a search needs besides the index.

    `query` is query-language text or a parsed Query; with `regex=True` it is one RE2
    pattern taken whole (no query-language parsing), matched case-sensitively unless it
    says `(?i)`. `limit_files` is the page size (None: every matching file);
    `limit_matches` stops counting once that many matching lines were found (reason
    MATCH_LIMIT). `deadline` is a `time.monotonic()` instant. `cursor` continues a previous
    page of the same query on the same snapshot generation. `with_symbols=False` leaves
    out the enclosing symbol of each line (ranking still uses definitions), which saves
    decoding symbol records when a caller only wants lines. `cancel`, once set, stops
    the search with SearchCancelled (it takes part in equality, by identity).
    """

    query: str | Query
    limit_files: int | None = DEFAULT_LIMIT_FILES
    limit_matches: int | None = None
    context_lines: int = 0
    mode: SearchMode = SearchMode.FIRST_PAGE
    cursor: str | None = None
    deadline: float | None = None
    regex: bool = False
    with_symbols: bool = True
    cancel: threading.Event | None = None


def _no_pool() -> ProcessPoolExecutor:
    raise RuntimeError("this run has no worker processes")


class RunContext(Record):
    """RunContext is what a search run may use besides its snapshot and request.

    `clock` is the time source deadlines are compared with; `encode` turns a cursor into the
    caller's token; with `processes` > 1, exact-order runs of at least `process_min`
    candidates are split over `process_pool()` (started on first call) and workers open
    `index_path` themselves.
    """

    encode: Callable[[Cursor], str]
    index_path: str
    clock: Callable[[], float] = time.monotonic
    processes: int = 1
    process_min: int = PROCESS_MIN
    process_pool: Callable[[], ProcessPoolExecutor] = _no_pool
