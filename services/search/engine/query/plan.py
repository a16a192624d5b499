"""Trigram query plans, and the planner that derives one from a regular expression.

A plan is a small algebra over the folded trigram index: `All` (no constraint: scan), `Empty`
(matches nothing), `Tri(b"abc")` (the document contains that trigram), `And(children)` and
`Or(children)`. A document can match the regex only if it satisfies the plan; the verifier
then removes the false positives. Plans are built through `and_`/`or_`, which keep them
simplified (flattened, deduplicated, absorbed, common factors pulled out, All/Empty
propagated), so equal plans print equally. The canonical string is codesearch's:
`"abc" ("bcd"|"xyz")` — juxtaposition is AND, `|` is OR, `ALL` and `NONE` are the constants.

The planner follows Russ Cox's method ("Regular Expression Matching with a Trigram Index"):
for every node of the parsed pattern it computes whether it can match the empty string, its
exact set of matching strings (when small), sets of possible prefixes and suffixes, and a
trigram query that every match satisfies; concatenation crosses the sets, alternation unites
them, and sets that grow past the caps below are turned into trigram constraints and
trimmed. Strings are UTF-8 bytes, ASCII-folded like the index; case-insensitive patterns add
each character's Unicode case variants (`k` also stands for KELVIN SIGN), which the ASCII
fold mostly collapses again, so `(?i)` costs nothing for ASCII text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Set

from services.search.engine.query import regexsyntax as rx
from services.search.engine.record import Record

# Exact sets above this many strings become prefix/suffix sets plus trigram constraints.
MAX_EXACT = 16
# Prefix and suffix sets above this size are trimmed to shorter strings.
MAX_SET = 16
# Character classes with more code points than this are treated as "any character".
MAX_CLASS = 64
# A prefix/suffix set of more alternatives than this is too unselective to be worth a plan
# node (a 100-way OR of digit trigrams): it adds no constraint.
MAX_OR = 64
# An AND keeps at most this many conjuncts (single trigrams first). Dropping a conjunct only
# weakens a plan, 64 distinct trigrams are already very selective, and the cap keeps planning
# linear: a 10,000-character (?i) literal took 59 s to plan without it.
MAX_AND = 64
# x{n,m} is analysed as at most this many copies of x (the rest is "anything").
MAX_COPIES = 4


class All(Record):
    """All is the plan without constraint: every document is a candidate."""

    def evaluate(self, has: Callable[[bytes], bool]) -> bool:
        """All.evaluate is always true."""
        return True

    def __str__(self) -> str:
        return "ALL"


class Empty(Record):
    """Empty is the plan no document satisfies."""

    def evaluate(self, has: Callable[[bytes], bool]) -> bool:
        """Empty.evaluate is always false."""
        return False

    def __str__(self) -> str:
        return "NONE"


class Tri(Record):
    """Tri requires one folded trigram (three bytes of content without a newline)."""

    gram: bytes

    @property
    def id(self) -> int:
        """Tri.id is the trigram as the index numbers it: `b0<<16 | b1<<8 | b2`."""
        return trigram_id(self.gram)

    def evaluate(self, has: Callable[[bytes], bool]) -> bool:
        """Tri.evaluate asks `has` whether the document contains the trigram."""
        return has(self.gram)

    def __str__(self) -> str:
        return '"' + _escape(self.gram) + '"'


class And(Record):
    """And requires all of its children (at least two, built by `and_`)."""

    children: tuple[Plan, ...]

    def evaluate(self, has: Callable[[bytes], bool]) -> bool:
        """And.evaluate is true when every child is."""
        return all(child.evaluate(has) for child in self.children)

    def __str__(self) -> str:
        return " ".join(f"({child})" if isinstance(child, Or) else str(child) for child in self.children)


class Or(Record):
    """Or requires one of its children (at least two, built by `or_`)."""

    children: tuple[Plan, ...]

    def evaluate(self, has: Callable[[bytes], bool]) -> bool:
        """Or.evaluate is true when some child is."""
        return any(child.evaluate(has) for child in self.children)

    def __str__(self) -> str:
        return "|".join(f"({child})" if isinstance(child, And) else str(child) for child in self.children)


Plan = All | Empty | Tri | And | Or
ALL = All()
EMPTY = Empty()


def trigram_id(gram: bytes) -> int:
    """trigram_id numbers a 3-byte trigram as `b0<<16 | b1<<8 | b2`."""
    return gram[0] << 16 | gram[1] << 8 | gram[2]


def _escape(gram: bytes) -> str:
    out = []
    for b in gram:
        if b in (0x22, 0x5C):
            out.append("\\" + chr(b))
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def _sort_key(plan: Plan) -> tuple[int, str]:
    return (0 if isinstance(plan, Tri) else 1, str(plan))


def _conjuncts(plan: Plan) -> frozenset[Plan]:
    return frozenset(plan.children) if isinstance(plan, And) else frozenset((plan,))


def _disjuncts(plan: Plan) -> frozenset[Plan]:
    return frozenset(plan.children) if isinstance(plan, Or) else frozenset((plan,))


def _minimal(groups: list[frozenset[Plan]]) -> list[frozenset[Plan]]:
    """_minimal drops duplicates and every group that is a superset of another (absorption)."""
    unique = set(groups)
    singles = {next(iter(g)) for g in unique if len(g) == 1}
    # A single element absorbs every group containing it; only the rest need pairwise checks.
    multi = sorted(
        (g for g in unique if len(g) > 1 and not (g & singles)), key=lambda g: (len(g), sorted(map(str, g)))
    )
    kept: list[frozenset[Plan]] = [frozenset((p,)) for p in singles]
    kept_multi: list[frozenset[Plan]] = []
    for group in multi:
        if not any(other <= group for other in kept_multi):
            kept_multi.append(group)
    return kept + kept_multi


def and_(*plans: Plan) -> Plan:
    """and_ builds the simplified conjunction of plans."""
    nontrivial = [p for p in plans if not isinstance(p, All)]
    if len(nontrivial) <= 1:
        # Plans are built simplified, so one plan needs no further work.
        return nontrivial[0] if nontrivial else ALL
    flat: list[Plan] = []
    for plan in plans:
        if isinstance(plan, Empty):
            return EMPTY
        if isinstance(plan, And):
            flat.extend(plan.children)
        elif not isinstance(plan, All):
            flat.append(plan)
    # a (a|b) = a: a conjunct whose disjuncts include all of another's is implied by it.
    groups = _minimal([_disjuncts(p) for p in flat])
    if len(groups) > 1 and all(len(g) > 1 for g in groups):
        # (a|b) (a|c) = a|(b c): pull out disjuncts every conjunct shares.
        common = frozenset.intersection(*groups)
        if common:
            rest = and_(*(or_(*(g - common)) for g in groups))
            return or_(*common, rest)
    children = [or_(*g) if len(g) > 1 else next(iter(g)) for g in groups]
    if not children:
        return ALL
    if len(children) == 1:
        return children[0]
    return And(tuple(sorted(children, key=_sort_key)[:MAX_AND]))


def or_(*plans: Plan) -> Plan:
    """or_ builds the simplified disjunction of plans."""
    nontrivial = [p for p in plans if not isinstance(p, Empty)]
    if len(nontrivial) <= 1:
        return nontrivial[0] if nontrivial else EMPTY
    flat: list[Plan] = []
    for plan in plans:
        if isinstance(plan, All):
            return ALL
        if isinstance(plan, Or):
            flat.extend(plan.children)
        elif not isinstance(plan, Empty):
            flat.append(plan)
    # a|(a b) = a: an alternative that needs all of another's conjuncts adds nothing.
    groups = _minimal([_conjuncts(p) for p in flat])
    if len(groups) > 1 and all(len(g) > 1 for g in groups):
        # (a b)|(a c) = a (b|c): pull out conjuncts every alternative shares.
        common = frozenset.intersection(*groups)
        if common:
            rest = or_(*(and_(*(g - common)) for g in groups))
            return and_(*common, rest)
    children = [and_(*g) if len(g) > 1 else next(iter(g)) for g in groups]
    if not children:
        return EMPTY
    if len(children) == 1:
        return children[0]
    return Or(tuple(sorted(children, key=_sort_key)))


def plan_trigrams(plan: Plan) -> frozenset[bytes]:
    """plan_trigrams lists every trigram a plan mentions (for prefetching posting lists)."""
    if isinstance(plan, Tri):
        return frozenset((plan.gram,))
    if isinstance(plan, And | Or):
        return frozenset().union(*(plan_trigrams(child) for child in plan.children))
    return frozenset()


def evaluate_on(plan: Plan, trigrams: Set[bytes]) -> bool:
    """evaluate_on says whether a document with these folded trigrams satisfies the plan."""
    return plan.evaluate(trigrams.__contains__)


# ---------------------------------------------------------------------------------------------
# From string sets to trigram plans.


def string_trigrams(s: bytes) -> Plan:
    """string_trigrams requires every indexable trigram of `s` (those without a newline)."""
    return and_(*(Tri(s[i : i + 3]) for i in range(len(s) - 2) if 0x0A not in s[i : i + 3]))


def _or_strings(strings: Iterable[bytes], limit: int | None = None) -> Plan:
    """_or_strings requires one of the strings; a string shorter than 3 bytes requires nothing,
    and so does a set of more than `limit` strings."""
    items = list(strings)
    if (limit is not None and len(items) > limit) or any(len(s) < 3 for s in items):
        return ALL
    return or_(*(string_trigrams(s) for s in items))


def _fold(s: bytes) -> bytes:
    # bytes.lower() folds ASCII only, exactly as the index folds its trigrams.
    return s.lower()


# Unicode case orbits, built on first use: code point -> every code point in its orbit.
@functools.cache
def _orbits() -> dict[int, frozenset[int]]:
    parent: dict[int, int] = {}

    def find(c: int) -> int:
        while parent.get(c, c) != c:
            c = parent[c]
        return c

    for cp in range(0x20000):
        ch = chr(cp)
        for other in (ch.lower(), ch.upper(), ch.casefold()):
            if len(other) == 1 and other != ch:
                a, b = find(cp), find(ord(other))
                if a != b:
                    parent[a] = b
    groups: dict[int, set[int]] = {}
    for cp in list(parent):
        groups.setdefault(find(cp), set()).add(cp)
    for root, members in list(groups.items()):
        members.add(root)
    return {cp: frozenset(members) for members in groups.values() for cp in members}


# RE2's case orbits for ASCII letters: only k and s have non-ASCII members.
_ASCII_EXTRA = {ord("k"): 0x212A, ord("s"): 0x17F}


def case_variants(cp: int) -> frozenset[int]:
    """case_variants is the set of code points RE2's `(?i)` lets `cp` stand for (a superset)."""
    if cp < 0x80:
        ch = chr(cp)
        if not ch.isalpha():
            return frozenset((cp,))
        lower = ord(ch.lower())
        out = {lower, ord(ch.upper())}
        if lower in _ASCII_EXTRA:
            out.add(_ASCII_EXTRA[lower])
        return frozenset(out)
    return _orbits().get(cp, frozenset((cp,)))


def _char_strings(cps: Iterable[int], fold: bool) -> set[bytes]:
    out: set[bytes] = set()
    for cp in cps:
        for variant in case_variants(cp) if fold else (cp,):
            if 0xD800 <= variant <= 0xDFFF:
                continue
            out.add(_fold(chr(variant).encode()))
    return out


# ---------------------------------------------------------------------------------------------
# Cox's analysis.


class _Info(Record, frozen=False):
    can_empty: bool
    exact: set[bytes] | None
    prefix: set[bytes]
    suffix: set[bytes]
    match: Plan


def _any_match() -> _Info:
    return _Info(True, None, {b""}, {b""}, ALL)


def _any_char() -> _Info:
    return _Info(False, None, {b""}, {b""}, ALL)


def _no_match() -> _Info:
    return _Info(False, set(), set(), set(), EMPTY)


def _empty_string() -> _Info:
    return _Info(True, {b""}, set(), set(), ALL)


def _exact(strings: set[bytes]) -> _Info:
    return _Info(b"" in strings, strings, set(), set(), ALL)


def _cross(xs: Iterable[bytes], ys: set[bytes]) -> set[bytes]:
    return {x + y for x in xs for y in ys}


def _add_exact(info: _Info) -> None:
    if info.exact is not None:
        info.match = and_(info.match, _or_strings(info.exact))


def _and_set_trigrams(info: _Info, strings: set[bytes]) -> None:
    if not strings:
        info.match = EMPTY
    elif min(len(s) for s in strings) >= 3:
        info.match = and_(info.match, _or_strings(strings, MAX_OR))


def _trim_set(strings: set[bytes], suffix: bool) -> set[bytes]:
    """_trim_set cuts strings to 2 bytes (their trigrams are already required), then shorter
    while the set is too big, then drops strings made redundant by a shorter one."""
    length = 2
    while True:
        strings = {(s[-length:] if length else b"") if suffix else s[:length] for s in strings}
        if len(strings) <= MAX_SET or length == 0:
            break
        length -= 1
    ordered = sorted(strings, key=len)
    kept: list[bytes] = []
    for s in ordered:
        if not any((s.endswith(k) if suffix else s.startswith(k)) for k in kept):
            kept.append(s)
    return set(kept)


def _simplify(info: _Info, force: bool) -> None:
    exact = info.exact
    if exact is not None and exact:
        shortest = min(len(s) for s in exact)
        if len(exact) > MAX_EXACT or (force and shortest >= 3) or shortest >= 4:
            _add_exact(info)
            for s in exact:
                info.prefix.add(s[:2])
                info.suffix.add(s[-2:] if len(s) >= 2 else s)
            info.exact = None
    if info.exact is None:
        _and_set_trigrams(info, info.prefix)
        info.prefix = _trim_set(info.prefix, suffix=False)
        _and_set_trigrams(info, info.suffix)
        info.suffix = _trim_set(info.suffix, suffix=True)


def _concat(x: _Info, y: _Info) -> _Info:
    out = _Info(x.can_empty and y.can_empty, None, set(), set(), and_(x.match, y.match))
    if x.exact is not None and y.exact is not None:
        out.exact = _cross(x.exact, y.exact)
    else:
        if x.exact is not None:
            out.prefix = _cross(x.exact, y.prefix)
        else:
            out.prefix = set(x.prefix)
            if x.can_empty:
                out.prefix |= y.exact if y.exact is not None else y.prefix
        if y.exact is not None:
            out.suffix = _cross(x.suffix, y.exact)
        else:
            out.suffix = set(y.suffix)
            if y.can_empty:
                out.suffix |= x.exact if x.exact is not None else x.suffix
    # A match spans the x/y boundary: when every suffix+prefix joint is 3+ bytes long, one of
    # their trigrams must be present (and neither side's sets recorded it).
    if (
        x.exact is None
        and y.exact is None
        and x.suffix
        and y.prefix
        and len(x.suffix) <= MAX_SET
        and len(y.prefix) <= MAX_SET
        and min(map(len, x.suffix)) + min(map(len, y.prefix)) >= 3
    ):
        out.match = and_(out.match, _or_strings(_cross(x.suffix, y.prefix), MAX_OR))
    _simplify(out, False)
    return out


def _alternate(x: _Info, y: _Info) -> _Info:
    out = _Info(x.can_empty or y.can_empty, None, set(), set(), EMPTY)
    if x.exact is not None and y.exact is not None:
        out.exact = x.exact | y.exact
    elif x.exact is not None:
        out.prefix = x.exact | y.prefix
        out.suffix = x.exact | y.suffix
        _add_exact(x)
    elif y.exact is not None:
        out.prefix = x.prefix | y.exact
        out.suffix = x.suffix | y.exact
        _add_exact(y)
    else:
        out.prefix = x.prefix | y.prefix
        out.suffix = x.suffix | y.suffix
    out.match = or_(x.match, y.match)
    _simplify(out, False)
    return out


def _alternate_all(items: list[_Info]) -> _Info:
    """_alternate_all is `_alternate` folded over many items at once, linear in their number."""
    if all(item.exact is not None for item in items):
        out = _exact(set().union(*(item.exact or set() for item in items)))
        out.match = or_(*(item.match for item in items))
        _simplify(out, False)
        return out
    out = _Info(any(item.can_empty for item in items), None, set(), set(), EMPTY)
    for item in items:
        if item.exact is not None:
            _add_exact(item)
            out.prefix |= item.exact
            out.suffix |= item.exact
        else:
            out.prefix |= item.prefix
            out.suffix |= item.suffix
    out.match = or_(*(item.match for item in items))
    _simplify(out, False)
    return out


def _plus(x: _Info) -> _Info:
    # x+ starts with an x and ends with an x, so prefixes and suffixes stay; exactness is lost.
    if x.exact is not None:
        _add_exact(x)
        x.prefix = set(x.exact)
        x.suffix = set(x.exact)
        x.exact = None
        _simplify(x, False)
    return x


def _repeat(node: rx.Repeat) -> _Info:
    lo, hi = node.min, node.max
    if hi == 0:
        return _empty_string()
    if lo == 0:
        # x? is exact; x* and x{0,m} say nothing useful (Cox treats x* as "anything").
        return _alternate(_analyze(node.item), _empty_string()) if hi == 1 else _any_match()
    copies = min(lo, MAX_COPIES)
    info = _empty_string()
    for i in range(copies):
        item = _analyze(node.item)
        info = _concat(info, _plus(item) if (hi is None and i == lo - 1) else item)
    if copies < lo or (hi is not None and hi > lo + 1):
        info = _concat(info, _any_match())
    elif hi is not None and hi == lo + 1:
        info = _concat(info, _alternate(_analyze(node.item), _empty_string()))
    return info


def _class(node: rx.CharClass) -> _Info:
    if not node.ranges:
        return _no_match()
    if node.size > MAX_CLASS:
        return _any_char()
    cps = (cp for lo, hi in node.ranges for cp in range(lo, hi + 1))
    strings = _char_strings(cps, node.fold)
    if not strings:
        return _no_match()
    info = _exact(strings)
    _simplify(info, False)
    return info


def _literal(node: rx.Literal) -> _Info:
    if not node.fold:
        return _exact({_fold(node.text.encode("utf-8", "surrogatepass"))})
    info = _empty_string()
    run: list[bytes] = []
    for ch in node.text:
        variants = _char_strings((ord(ch),), True)
        if len(variants) == 1:
            # Characters with a single folded form extend a run planned as one string.
            run.append(next(iter(variants)))
            continue
        if run:
            info = _concat(info, _exact({b"".join(run)}))
            run = []
        info = _concat(info, _exact(variants))
    if run:
        info = _concat(info, _exact({b"".join(run)}))
    return info


def _analyze(node: rx.Node) -> _Info:
    if isinstance(node, rx.Literal):
        return _literal(node)
    if isinstance(node, rx.CharClass):
        return _class(node)
    if isinstance(node, rx.AnyChar):
        return _any_char()
    if isinstance(node, rx.Assertion | rx.EmptyMatch):
        return _empty_string()
    if isinstance(node, rx.Concat):
        info = _empty_string()
        for item in node.items:
            info = _concat(info, _analyze(item))
        return info
    if isinstance(node, rx.Alternate):
        return _alternate_all([_analyze(item) for item in node.items])
    return _repeat(node)


def plan_parsed(root: rx.Node) -> Plan:
    """plan_parsed derives the trigram plan of an already parsed pattern."""
    info = _analyze(root)
    _simplify(info, True)
    _add_exact(info)
    return info.match


def plan_regex(pattern: str, *, case_insensitive: bool = False) -> Plan:
    """plan_regex derives the trigram plan every line matching `pattern` satisfies.

    A pattern the planning parser cannot read yields `ALL` (a scan); RE2, in the verifier,
    decides whether it is valid.
    """
    try:
        parsed = rx.parse_regex(pattern, case_insensitive=case_insensitive)
        return plan_parsed(parsed.root)
    except (rx.RegexSyntaxError, RecursionError):
        return ALL


def plan_literal(text: str, *, case_insensitive: bool = False) -> Plan:
    """plan_literal derives the plan of a literal string (no regex syntax)."""
    if not case_insensitive:
        return string_trigrams(_fold(text.encode("utf-8", "surrogatepass")))
    return plan_parsed(rx.Literal(text, fold=True))
