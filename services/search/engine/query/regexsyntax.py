"""RE2 pattern syntax parsed into a small tree, for planning only.

The google-re2 binding compiles patterns but exposes no parse tree, and the trigram planner
(`plan.py`) needs one. `parse_regex` reads RE2's syntax (https://github.com/google/re2/wiki/Syntax)
into the node types below. It is deliberately a *planning* parser: RE2 itself stays the source
of truth for what a pattern means and whether it is valid, so anything this parser does not
understand raises `RegexSyntaxError`, and the planner answers that with "no constraint".

Character classes are reduced to code point ranges; Unicode classes (`\\pL`, `\\p{Greek}`) and
`\\C` become the full range, which the planner treats as "any character".
"""

from __future__ import annotations

from services.search.engine.errors import InvalidPatternError
from services.search.engine.record import Record

MAX_CODE_POINT = 0x10FFFF
# RE2 rejects counted repetitions above this (re2/parse.cc's kMaxRepeat).
MAX_REPEAT = 1000
# Deeper groups are left to RE2 alone: each level costs this parser five Python frames.
MAX_NESTING = 100

Ranges = tuple[tuple[int, int], ...]


class RegexSyntaxError(InvalidPatternError):
    """RegexSyntaxError says the planning parser could not read a pattern at `position`.

    It is an InvalidPatternError (errors.py's `pattern` kind) that also knows where.
    """

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at position {position}")
        self.message = message
        self.position = position


class Literal(Record):
    """Literal is a run of characters; `fold` means ASCII and Unicode case-insensitive."""

    text: str
    fold: bool = False


class CharClass(Record):
    """CharClass is a set of code points given as sorted, merged, inclusive ranges.

    Negation has already been applied; `fold` asks the planner to add case variants.
    """

    ranges: Ranges
    fold: bool = False

    @property
    def size(self) -> int:
        """CharClass.size is the number of code points in the class."""
        return sum(hi - lo + 1 for lo, hi in self.ranges)


class AnyChar(Record):
    """AnyChar is `.`, `\\C` or a class too general to enumerate (`\\pL`)."""


class Assertion(Record):
    """Assertion is a zero-width test: `^`, `$`, `\\A`, `\\z`, `\\b` or `\\B`."""

    kind: str


class EmptyMatch(Record):
    """EmptyMatch matches the empty string (an empty group or an empty alternative)."""


class Concat(Record):
    """Concat matches its items one after the other."""

    items: tuple[Node, ...]


class Alternate(Record):
    """Alternate matches any one of its items."""

    items: tuple[Node, ...]


class Repeat(Record):
    """Repeat matches `item` between `min` and `max` times (`max` None: unbounded)."""

    item: Node
    min: int
    max: int | None
    greedy: bool = True


Node = Literal | CharClass | AnyChar | Assertion | EmptyMatch | Concat | Alternate | Repeat


class ParsedRegex(Record):
    """ParsedRegex is a parse tree plus facts the query language and verifier need.

    `has_upper` says a literal character of the pattern is upper case (for `case:auto`);
    `text_anchors` lists the `(start, end)` spans of `\\A` and `\\z` escapes in the source.
    """

    root: Node
    has_upper: bool
    text_anchors: tuple[tuple[int, int, str], ...]


def merge_ranges(ranges: list[tuple[int, int]]) -> Ranges:
    """merge_ranges sorts ranges and merges the overlapping or adjacent ones."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def negate_ranges(ranges: Ranges) -> Ranges:
    """negate_ranges returns the complement of merged ranges within [0, MAX_CODE_POINT]."""
    out: list[tuple[int, int]] = []
    next_lo = 0
    for lo, hi in ranges:
        if lo > next_lo:
            out.append((next_lo, lo - 1))
        next_lo = hi + 1
    if next_lo <= MAX_CODE_POINT:
        out.append((next_lo, MAX_CODE_POINT))
    return tuple(out)


_DIGIT: Ranges = ((0x30, 0x39),)
_SPACE: Ranges = ((0x09, 0x0A), (0x0C, 0x0D), (0x20, 0x20))
_WORD: Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_PERL_CLASSES: dict[str, Ranges] = {"d": _DIGIT, "s": _SPACE, "w": _WORD}
_POSIX_CLASSES: dict[str, Ranges] = {
    "alnum": ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)),
    "alpha": ((0x41, 0x5A), (0x61, 0x7A)),
    "ascii": ((0x00, 0x7F),),
    "blank": ((0x09, 0x09), (0x20, 0x20)),
    "cntrl": ((0x00, 0x1F), (0x7F, 0x7F)),
    "digit": _DIGIT,
    "graph": ((0x21, 0x7E),),
    "lower": ((0x61, 0x7A),),
    "print": ((0x20, 0x7E),),
    "punct": ((0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)),
    "space": ((0x09, 0x0D), (0x20, 0x20)),
    "upper": ((0x41, 0x5A),),
    "word": _WORD,
    "xdigit": ((0x30, 0x39), (0x41, 0x46), (0x61, 0x66)),
}
_SIMPLE_ESCAPES = {"a": 0x07, "f": 0x0C, "t": 0x09, "n": 0x0A, "r": 0x0D, "v": 0x0B}
_FULL: Ranges = ((0, MAX_CODE_POINT),)
_HEX = "0123456789abcdefABCDEF"


class _Parser:
    """_Parser is a recursive-descent reader of one pattern; flags live on the instance."""

    def __init__(self, pattern: str, fold: bool) -> None:
        self.src = pattern
        self.pos = 0
        self.fold = fold
        self.has_upper = False
        self.anchors: list[tuple[int, int, str]] = []
        self.depth = 0
        # Set when a `\\p` class was read: such classes cannot be enumerated or negated here.
        self.saw_unicode_class = False

    def error(self, message: str) -> RegexSyntaxError:
        return RegexSyntaxError(message, self.pos)

    def peek(self) -> str:
        return self.src[self.pos] if self.pos < len(self.src) else ""

    def literal_char(self, ch: str) -> Literal:
        if ch.isupper():
            self.has_upper = True
        return Literal(ch, self.fold)

    def parse(self) -> Node:
        node = self.alternation()
        if self.pos < len(self.src):
            raise self.error("unexpected )")
        return node

    def alternation(self) -> Node:
        items = [self.concatenation()]
        while self.peek() == "|":
            self.pos += 1
            items.append(self.concatenation())
        return items[0] if len(items) == 1 else Alternate(tuple(items))

    def concatenation(self) -> Node:
        items: list[Node] = []
        while self.pos < len(self.src) and self.peek() not in "|)":
            atom = self.atom()
            if atom is None:
                continue
            node = self.repetitions(atom)
            last = items[-1] if items else None
            if isinstance(node, Literal) and isinstance(last, Literal) and last.fold == node.fold:
                # One node per literal run keeps long literals linear to plan.
                items[-1] = Literal(last.text + node.text, node.fold)
            else:
                items.append(node)
        if not items:
            return EmptyMatch()
        return items[0] if len(items) == 1 else Concat(tuple(items))

    def repetitions(self, atom: Node) -> Node:
        repeated = False
        while True:
            ch = self.peek()
            if ch in ("*", "+", "?") and ch:
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
                self.pos += 1
            elif ch == "{":
                counts = self.counted_repeat()
                if counts is None:
                    return atom
                lo, hi = counts
            else:
                return atom
            if repeated:
                raise self.error("bad repetition operator")
            repeated = True
            greedy = True
            if self.peek() == "?":
                self.pos += 1
                greedy = False
            atom = Repeat(atom, lo, hi, greedy)

    def counted_repeat(self) -> tuple[int, int | None] | None:
        """counted_repeat reads `{n}`, `{n,}` or `{n,m}`; anything else leaves `{` literal."""
        end = self.src.find("}", self.pos)
        if end < 0:
            return None
        body = self.src[self.pos + 1 : end]
        lo_text, comma, hi_text = body.partition(",")
        if not lo_text.isdigit() or (hi_text and not hi_text.isdigit()):
            return None
        if not lo_text.isascii() or not hi_text.isascii():
            return None
        lo = int(lo_text)
        hi = None if comma and not hi_text else int(hi_text) if comma else lo
        if lo > MAX_REPEAT or (hi is not None and (hi > MAX_REPEAT or hi < lo)):
            raise self.error("bad repetition operator")
        self.pos = end + 1
        return lo, hi

    def atom(self) -> Node | None:
        ch = self.peek()
        if ch == "(":
            return self.group()
        if ch == "[":
            return self.char_class()
        if ch == "\\":
            return self.escape()
        if ch in ("*", "+", "?"):
            raise self.error("missing argument to repetition operator")
        self.pos += 1
        if ch == ".":
            return AnyChar()
        if ch == "^":
            return Assertion("^")
        if ch == "$":
            return Assertion("$")
        return self.literal_char(ch)

    def group(self) -> Node | None:
        start = self.pos
        self.pos += 1
        saved_fold = self.fold
        if self.src.startswith("?P<", self.pos) or (
            self.src.startswith("?<", self.pos) and not self.src.startswith("?<=", self.pos)
        ):
            close = self.src.find(">", self.pos)
            name = self.src[self.src.find("<", self.pos) + 1 : close] if close >= 0 else ""
            if close < 0 or not name or not all(c.isalnum() or c == "_" for c in name):
                raise self.error("invalid named capture group")
            self.pos = close + 1
        elif self.peek() == "?":
            self.pos += 1
            if self.flags():
                # A bare `(?flags)` changes the flags until the enclosing group ends.
                return None
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error("nesting too deep")
        node = self.alternation()
        self.depth -= 1
        if self.peek() != ")":
            self.pos = start
            raise self.error("missing )")
        self.pos += 1
        self.fold = saved_fold
        return node

    def flags(self) -> bool:
        """flags reads `i-sm:` or `i)`; True when the group was a bare flag setting."""
        negate = False
        seen = False
        while True:
            ch = self.peek()
            self.pos += 1
            if ch in ("i", "m", "s", "U"):
                seen = True
                if ch == "i":
                    self.fold = not negate
            elif ch == "-" and not negate:
                negate = True
                seen = False
            elif ch == ":" and (seen or not negate):
                return False
            elif ch == ")" and seen:
                return True
            else:
                self.pos -= 1
                raise self.error("invalid or unsupported Perl syntax")

    def escape(self) -> Node:
        start = self.pos
        self.pos += 1
        ch = self.peek()
        if not ch:
            raise self.error("trailing \\")
        self.pos += 1
        if ch in ("A", "z"):
            self.anchors.append((start, self.pos, ch))
            return Assertion("\\" + ch)
        if ch in ("b", "B"):
            return Assertion("\\" + ch)
        if ch == "C":
            return AnyChar()
        if ch == "Q":
            end = self.src.find("\\E", self.pos)
            text = self.src[self.pos :] if end < 0 else self.src[self.pos : end]
            self.pos = len(self.src) if end < 0 else end + 2
            if any(c.isupper() for c in text):
                self.has_upper = True
            return Literal(text, self.fold) if text else EmptyMatch()
        self.pos -= 1
        self.saw_unicode_class = False
        ranges = self.class_escape()
        if self.saw_unicode_class:
            return AnyChar()
        if ranges is not None:
            return CharClass(ranges, self.fold)
        return self.literal_char(chr(self.char_escape()))

    def class_escape(self) -> Ranges | None:
        """class_escape reads `\\d`-style and `\\p` classes at self.pos (after the backslash)."""
        ch = self.peek()
        if ch.lower() in _PERL_CLASSES:
            self.pos += 1
            ranges = _PERL_CLASSES[ch.lower()]
            return negate_ranges(ranges) if ch.isupper() else ranges
        if ch in ("p", "P"):
            self.pos += 1
            if self.peek() == "{":
                end = self.src.find("}", self.pos)
                if end < 0:
                    raise self.error("invalid character class range")
                self.pos = end + 1
            elif self.peek():
                self.pos += 1
            else:
                raise self.error("invalid character class range")
            # Unicode classes are too large to enumerate: "any character" for planning.
            self.saw_unicode_class = True
            return _FULL
        return None

    def char_escape(self) -> int:
        """char_escape reads one escaped character at self.pos (after the backslash)."""
        ch = self.peek()
        self.pos += 1
        if ch in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[ch]
        if "1" <= ch <= "7" and not ("0" <= self.peek() <= "7"):
            raise self.error("invalid escape sequence (backreferences are not supported)")
        if "0" <= ch <= "7":
            code = int(ch)
            for _ in range(2):
                if "0" <= self.peek() <= "7":
                    code = code * 8 + int(self.peek())
                    self.pos += 1
            return code
        if ch == "x":
            if self.peek() == "{":
                end = self.src.find("}", self.pos)
                digits = self.src[self.pos + 1 : end] if end > 0 else ""
                if not digits or any(d not in _HEX for d in digits):
                    raise self.error("invalid escape sequence")
                self.pos = end + 1
            else:
                digits = self.src[self.pos : self.pos + 2]
                if len(digits) != 2 or any(d not in _HEX for d in digits):
                    raise self.error("invalid escape sequence")
                self.pos += 2
            code = int(digits, 16)
            if code > MAX_CODE_POINT:
                raise self.error("invalid escape sequence")
            return code
        if ch and ch.isascii() and not ch.isalnum():
            return ord(ch)
        self.pos -= 1
        raise self.error("invalid escape sequence")

    def char_class(self) -> Node:
        start = self.pos
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        first = True
        self.saw_unicode_class = False
        while True:
            ch = self.peek()
            if not ch:
                self.pos = start
                raise self.error("missing ]")
            if ch == "]" and not first:
                self.pos += 1
                break
            first = False
            if ch == "[" and self.src.startswith("[:", self.pos):
                end = self.src.find(":]", self.pos + 2)
                name = self.src[self.pos + 2 : end] if end >= 0 else ""
                posix = _POSIX_CLASSES.get(name.removeprefix("^"))
                if posix is None:
                    raise self.error("invalid character class range")
                ranges.extend(negate_ranges(posix) if name.startswith("^") else posix)
                self.pos = end + 2
                continue
            if ch == "\\":
                self.pos += 1
                escaped = self.class_escape()
                if escaped is not None:
                    ranges.extend(escaped)
                    continue
                lo = self.char_escape()
            else:
                lo = ord(ch)
                self.pos += 1
            if chr(lo).isupper():
                self.has_upper = True
            hi = lo
            if self.peek() == "-" and self.src[self.pos + 1 : self.pos + 2] not in ("]", ""):
                self.pos += 1
                if self.peek() == "\\":
                    self.pos += 1
                    hi = self.char_escape()
                else:
                    hi = ord(self.peek())
                    self.pos += 1
                if chr(hi).isupper():
                    self.has_upper = True
                if hi < lo:
                    raise self.error("invalid character class range")
            ranges.append((lo, hi))
        if self.saw_unicode_class:
            return AnyChar()
        merged = merge_ranges(ranges)
        if negated:
            merged = negate_ranges(merged)
        return CharClass(merged, self.fold)


def parse_regex(pattern: str, *, case_insensitive: bool = False) -> ParsedRegex:
    """parse_regex reads an RE2 pattern into a tree; `case_insensitive` starts with `(?i)` on.

    Raises RegexSyntaxError for anything it cannot read (which RE2 may still accept).
    """
    parser = _Parser(pattern, case_insensitive)
    root = parser.parse()
    return ParsedRegex(root, parser.has_upper, tuple(parser.anchors))


def has_upper_literal(pattern: str) -> bool:
    """has_upper_literal says whether a literal character of the pattern is upper case.

    This drives `case:auto`: escapes such as `\\W` or `\\S` do not count. When the pattern
    cannot be parsed, characters that follow a backslash are ignored instead.
    """
    try:
        return parse_regex(pattern).has_upper
    except (RegexSyntaxError, RecursionError):
        pass
    skip = False
    for ch in pattern:
        if skip:
            skip = False
        elif ch == "\\":
            skip = True
        elif ch.isupper():
            return True
    return False


def line_anchored(pattern: str) -> str:
    """line_anchored rewrites `\\A` and `\\z` to line anchors, as ripgrep treats them per line.

    Patterns the parser cannot read are returned unchanged (RE2 will judge them).
    """
    try:
        anchors = parse_regex(pattern).text_anchors
    except (RegexSyntaxError, RecursionError):
        return pattern
    out: list[str] = []
    last = 0
    for start, end, kind in anchors:
        out.append(pattern[last:start])
        out.append("(?m:^)" if kind == "A" else "(?m:$)")
        last = end
    out.append(pattern[last:])
    return "".join(out)
