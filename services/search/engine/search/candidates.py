"""Candidates: the documents a search must verify, found by evaluating its plan on bitmaps.

Per segment the trigram plan (plan.py) is evaluated on roaring bitmaps (And is intersection,
Or is union, All is every document) and intersected with the segment's live set; then the
query's cheap terms (path, language, repository) prune candidates without touching content.
The survivors of the whole snapshot become flat sequences (segment index, ordinal, stored
path facts) plus the order to verify them in: index order for exact searches, and for first
pages ordinary files before tests, vendored and generated ones (rank.py's path weight). No
numpy: a fresh CLI process would pay more for its import than a first page costs.
"""

from __future__ import annotations

import array
from collections.abc import Iterator, Sequence

from pyroaring import BitMap

from services.search.engine import _fastscan
from services.search.engine.index.index import Snapshot
from services.search.engine.index.reader import SegmentReader, SymbolScreen
from services.search.engine.model import Symbol
from services.search.engine.query.matchtree import DocFacts, MatchTree
from services.search.engine.query.plan import All, And, Empty, Or, Plan, Tri
from services.search.engine.query.verify import required_text
from services.search.engine.record import Record
from services.search.engine.search import rank


def evaluate_plan(plan: Plan, segment: SegmentReader) -> BitMap | None:
    """evaluate_plan returns the segment's ordinals satisfying plan, or None for "every document".

    Deleted ordinals may be included; the caller intersects with the live set.
    """
    if isinstance(plan, All):
        return None
    if isinstance(plan, Empty):
        return BitMap()
    if isinstance(plan, Tri):
        return segment.postings(plan.gram)
    if isinstance(plan, And):
        # Trigram leaves first, in one call (shortest lists first, see SegmentReader.intersect):
        # they are cheap and usually the most selective.
        grams = [child.gram for child in plan.children if isinstance(child, Tri)]
        result: BitMap | None = segment.intersect(grams) if grams else None
        if result is not None and not result:
            return result
        for child in plan.children:
            if isinstance(child, Tri):
                continue
            bits = evaluate_plan(child, segment)
            if bits is None:
                continue
            result = bits if result is None else result & bits
            if not result:
                return result
        return result
    if isinstance(plan, Or):
        union = BitMap()
        for child in plan.children:
            bits = evaluate_plan(child, segment)
            if bits is None:
                return None
            union |= bits
        return union
    raise TypeError(f"unknown plan node {plan!r}")


class Candidates(Record):
    """Candidates are a search's documents to verify, over every segment of its snapshot.

    Candidate i is ordinal `ords[i]` of segment `seg_ids[i]`, whose stored path facts are
    `facts[i]` (format.py; read for a first page only, empty for an exact search); `sequence`
    lists candidate positions in the order to verify them. `scan` says the plan had no usable
    trigram, so every live document is a candidate (a bounded scan).
    """

    seg_ids: Sequence[int]
    ords: Sequence[int]
    facts: bytes
    sequence: Sequence[int]
    scan: bool

    @property
    def count(self) -> int:
        """count is the number of candidates."""
        return len(self.ords)

    def weight(self, i: int) -> float:
        """weight is candidate i's path-only weight, which bounds its final one (rank.prior_weight)."""
        return rank.prior_weight(self.facts[i])


def collect_candidates(snap: Snapshot, tree: MatchTree, *, exact: bool) -> Candidates:
    """collect_candidates evaluates the tree's plan on every segment of the snapshot.

    With `exact` the candidates are verified in index order, else in first-page order (by
    path weight, read from the candidates' stored facts: nothing here is proportional to
    the segment, only to its candidates).
    """
    # Typed arrays: a roaring bitmap's ordinals arrive as uint32 and are copied in bulk (a
    # scan's 78,000 candidates as Python lists cost ~3 ms more than numpy's arrays did).
    seg_ids = array.array("I")
    ords = array.array("I")
    facts = bytearray()
    for seg_index, segment in enumerate(snap.segments):
        found = segment_candidates(tree, segment)
        if not len(found):
            continue
        seg_ids.extend(array.array("I", (seg_index,)) * len(found))
        ords.extend(found)
        if not exact:
            facts += segment.facts(found)
    # FIRST_PAGE: ordinary files first; within a weight, index order (segments are path-sorted).
    sequence = range(len(ords)) if exact else rank.prior_order(bytes(facts))
    return Candidates(seg_ids, ords, bytes(facts), sequence, isinstance(tree.plan, All))


def segment_candidates(tree: MatchTree, segment: SegmentReader) -> Sequence[int]:
    """segment_candidates lists one segment's candidates in ordinal order, metadata terms applied.

    This is all a stream needs (it verifies in index order): no weights.
    """
    bits = evaluate_plan(tree.plan, segment)
    live = segment.live if bits is None else bits & segment.live
    ordinals: Sequence[int] = live.to_array()
    if tree.has_metadata_terms and len(ordinals):
        ordinals = prune_by_metadata(tree, segment, ordinals)
    return ordinals


def prune_by_metadata(tree: MatchTree, segment: SegmentReader, ordinals: Sequence[int]) -> list[int]:
    """prune_by_metadata drops candidates that the query's path, language and repository terms exclude."""
    kept: list[int] = []
    for ordinal in ordinals:
        doc = segment.doc(ordinal)
        facts = DocFacts(path=doc.path, language=doc.language, repository=doc.repository)
        if tree.prefilter(facts) is not False:
            kept.append(ordinal)
    return kept


def symbol_search_screen(pattern: str, *, case_sensitive: bool = False) -> SymbolScreen | None:
    """symbol_search_screen chooses how a symbol search screens symbols, or None to decode them all.

    A plain pattern's needle (symsearch.symbol_needle) is all its tiers need. A regex is
    screened by the text its literal tiers need and by the regex itself, run natively over
    each name (symsearch.regex_screen), guarded by text every regex match holds when RE2's
    analysis finds some: `(get|set)_[a-z]+` has only `_`, which most names hold, and
    `[a-z]+[0-9]{3}` none, so either would otherwise decode most or all of the index's
    symbols (Linux: 3.4 million, 14-18 s).
    """
    # Imported here: symsearch loads the tree-sitter kinds, which a text search never needs.
    from services.search.engine.symbols.symsearch import regex_screen, symbol_needle

    needle = symbol_needle(pattern, lambda regex: required_text(regex, case_sensitive=False))
    screen = regex_screen(pattern, case_sensitive=case_sensitive)
    if screen is None:
        return None if needle is None else SymbolScreen(needle)
    if screen.source is None:
        return SymbolScreen(screen.piece)  # not a valid regex: the literal tiers alone
    try:
        regex = _fastscan.regex_compile(screen.source.encode(), case_sensitive, False)
    except ValueError:
        # RE2 here refuses what the search's RE2 accepts: the needle alone, if any.
        return None if needle is None else SymbolScreen(needle)
    return SymbolScreen(screen.piece, regex, screen.qualified, needle)


def symbol_candidates(
    segment: SegmentReader, screen: SymbolScreen | None
) -> Iterator[tuple[int, Sequence[Symbol]]]:
    """symbol_candidates yields (ordinal, symbols) of the live documents a symbol search must rank.

    With a `screen` (`symbol_search_screen`) only the symbols it keeps are decoded, found in
    one native pass over the segment's symbols.bin: decoding every symbol in Python cost
    ~5 us per symbol of the index (Linux's: 9 s a query). Without one, every live document's
    symbols are.
    """
    if screen is None:
        for ordinal in segment.live:
            found = segment.symbols(ordinal)
            if found:
                yield ordinal, found
        return
    yield from segment.symbols_holding(segment.live.to_array(), screen)
