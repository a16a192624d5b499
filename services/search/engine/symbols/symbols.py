"""Symbol extraction: tree-sitter definitions (functions, classes, methods, ...) per document.

`extract_symbols(content, language)` parses one document with the grammar wheel for its
language and runs this package's own query (`queries/<language>.scm`) to find definitions.
Each query pattern captures the definition node as `@definition.<kind>` and its name as
`@name`; C and C++ functions, typedefs and variables carry no `@name` and are resolved here by
following the declarator chain. The matches are then sorted by position and nested with a
stack, which gives every symbol its parent and qualified name (`Class.method`, `Type::method`,
Go's `Type.Method` from the receiver, Rust's `impl Foo { fn bar }` as `Foo::bar`) without a
Python walk over the tree: the query runs in C and only definitions reach Python.

Kinds use one vocabulary across languages: function, method, class, struct, enum, interface,
trait, type, constant, variable, module, namespace, macro, field. A function directly inside
a class-like definition becomes a method; upper-case variables become constants.

Parsing is most of the cost. C and C++ function bodies are left out of the parse (see
`_outside_bodies`), and so are the tails of Python function bodies that define nothing
(pygaps.py); both give the same symbols at a fraction of the parse.

Extraction never raises: unknown languages, documents over `MAX_SOURCE_BYTES` and anything
unexpected give `()`, and at most `MAX_SYMBOLS` symbols are kept per document. Work is linear
in the input: parsing is, and the one quadratic case of the query cursor (very wide ERROR
nodes, e.g. a file of unbalanced brackets) is avoided by `_query_segments`.

`SymbolExtractor` and `extract_many`, which spread documents over worker processes, live in
symbolpool.py (with the throughput measurements), which imports this module and never the
other way round.
"""

from __future__ import annotations

import bisect
import importlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources

import tree_sitter

from services.search.engine.model import Symbol
from services.search.engine.symbols import pygaps

__all__ = [
    "KINDS",
    "MAX_SOURCE_BYTES",
    "MAX_SYMBOLS",
    "PARSE_SECONDS",
    "PARSE_SECONDS_PER_MIB",
    "SYMBOL_LANGUAGES",
    "extract_symbols",
]

MAX_SOURCE_BYTES = 4 * 1024 * 1024
"""MAX_SOURCE_BYTES bounds the documents parsed; larger ones (generated tables) get no symbols."""

PARSE_SECONDS = 1.0
PARSE_SECONDS_PER_MIB = 2.0
"""PARSE_SECONDS and PARSE_SECONDS_PER_MIB bound one document's parse (see `_parse`)."""

MAX_SYMBOLS = 20_000
"""MAX_SYMBOLS bounds the symbols kept per document, in document order."""

KINDS: frozenset[str] = frozenset(
    {
        "function", "method", "class", "struct", "enum", "interface", "trait", "type",
        "constant", "variable", "module", "namespace", "macro", "field",
    }
)  # fmt: skip


def _grammar(module: str, attribute: str = "language") -> Callable[[], object]:
    """_grammar returns a loader for a grammar wheel's language pointer, imported on first use."""

    def load() -> object:
        return getattr(importlib.import_module(module), attribute)()

    return load


@dataclass(frozen=True, slots=True)
class _Spec:
    """_Spec describes how one language's definitions are found and nested."""

    grammar: Callable[[], object]
    query: str
    separator: str
    # Kinds whose span qualifies the definitions inside them (empty: a flat namespace, as C's).
    containers: frozenset[str]
    # Kinds that turn a directly nested function into a method.
    method_parents: frozenset[str]
    # Whether column-0 function bodies are left out of the parse (see `_outside_bodies`).
    skip_bodies: bool = False


def _spec(
    module: str,
    query: str,
    separator: str,
    containers: str,
    method_parents: str,
    *,
    attribute: str = "language",
    skip_bodies: bool = False,
) -> _Spec:
    """_spec builds a _Spec from space-separated kind lists, keeping the table below compact."""
    return _Spec(
        _grammar(module, attribute),
        query,
        separator,
        frozenset(containers.split()),
        frozenset(method_parents.split()),
        skip_bodies,
    )


_JS = "class function method variable constant"
_TS = _JS + " interface namespace module"

# Per language: grammar wheel, query file, separator, container kinds, kinds making methods.
# Ruby has only methods; a top-level `def` becomes a function in `_nest`.
_SPECS: dict[str, _Spec] = {
    "python": _spec("tree_sitter_python", "python", ".", "class function method", "class"),
    "javascript": _spec("tree_sitter_javascript", "javascript", ".", _JS, "class"),
    "typescript": _spec("tree_sitter_typescript", "typescript", ".", _TS, "class interface",
                        attribute="language_typescript"),
    "tsx": _spec("tree_sitter_typescript", "typescript", ".", _TS, "class interface",
                 attribute="language_tsx"),
    "go": _spec("tree_sitter_go", "go", ".", "interface struct", ""),
    "rust": _spec("tree_sitter_rust", "rust", "::", "scope trait module function method", "scope trait"),
    "java": _spec("tree_sitter_java", "java", ".", "class interface enum method", ""),
    "c": _spec("tree_sitter_c", "c", "::", "", "", skip_bodies=True),
    "cpp": _spec("tree_sitter_cpp", "cpp", "::", "class struct namespace enum", "class struct",
                 skip_bodies=True),
    "ruby": _spec("tree_sitter_ruby", "ruby", ".", "class module", ""),
}  # fmt: skip

SYMBOL_LANGUAGES: frozenset[str] = frozenset(_SPECS)
"""SYMBOL_LANGUAGES names the languages `extract_symbols` understands (as `detect_language` names them)."""


@dataclass(frozen=True, slots=True)
class _Compiled:
    """_Compiled holds a language's grammar and compiled definitions query."""

    language: tree_sitter.Language
    query: tree_sitter.Query


_compiled: dict[str, _Compiled] = {}
_compile_lock = threading.Lock()
# Parsers keep per-parse state, so each thread gets its own; queries are shared read-only.
_parsers = threading.local()


def _compile(language: str) -> _Compiled:
    """_compile loads and caches a language's grammar and query for this process."""
    found = _compiled.get(language)
    if found is not None:
        return found
    with _compile_lock:
        found = _compiled.get(language)
        if found is None:
            spec = _SPECS[language]
            lang = tree_sitter.Language(spec.grammar())
            source = resources.files("services.search.engine.symbols").joinpath(f"queries/{spec.query}.scm")
            found = _Compiled(lang, tree_sitter.Query(lang, source.read_text(encoding="utf-8")))
            _compiled[language] = found
    return found


def _parser(language: str, compiled: _Compiled) -> tree_sitter.Parser:
    """_parser returns this thread's parser for a language."""
    cache: dict[str, tree_sitter.Parser] | None = getattr(_parsers, "by_language", None)
    if cache is None:
        cache = {}
        _parsers.by_language = cache
    parser = cache.get(language)
    if parser is None:
        parser = tree_sitter.Parser(compiled.language)
        cache[language] = parser
    return parser


@dataclass(slots=True)
class _Def:
    """_Def is one definition match before nesting; `kind` "scope" marks an impl block."""

    start: int
    end: int
    start_line: int
    end_line: int
    kind: str
    name: str
    name_start: int
    name_end: int
    # Qualification written in the source (`Foo` of `void Foo::bar()`, Go's receiver type).
    prefix: str = ""


_QUALIFIED_NAME_TYPES = frozenset(
    {"qualified_identifier", "scope_resolution", "nested_identifier", "nested_namespace_specifier"}
)
_DECLARATOR_NAME_TYPES = frozenset(
    {"identifier", "field_identifier", "type_identifier", "qualified_identifier", "destructor_name",
     "operator_name", "template_function", "primitive_type"}
)  # fmt: skip
_TEMPLATE_ARGS = re.compile(r"<[^<>]*>")
_JS_LANGUAGES = frozenset({"javascript", "typescript", "tsx"})
_FUNCTION_VALUES = frozenset({"arrow_function", "function_expression", "function", "generator_function"})
_TOP_LEVEL_PARENTS = frozenset({"translation_unit", "declaration_list", "linkage_specification", "ERROR"})
_DEFINITION_PARENTS = _TOP_LEVEL_PARENTS | {"field_declaration_list", "template_declaration"}


def extract_symbols(content: bytes, language: str) -> tuple[Symbol, ...]:
    """extract_symbols returns the definitions in a document, in document order.

    `language` is a name from `detect_language`; languages without a grammar give `()`.
    The function never raises: malformed input yields whatever tree-sitter recovers.
    """
    if language not in _SPECS or not content or len(content) > MAX_SOURCE_BYTES:
        return ()
    try:
        return _extract(content, language)
    except Exception:
        # Grammar or binding surprises must not fail indexing; the document just has no symbols.
        return ()


def _extract(content: bytes, language: str) -> tuple[Symbol, ...]:
    """_extract parses, queries and nests; see the module docstring."""
    spec = _SPECS[language]
    compiled = _compile(language)
    parser = _parser(language, compiled)
    defs: dict[tuple[int, int, int], _Def] = {}
    gaps: list[pygaps.Gap] = []
    if spec.skip_bodies:
        ranges, skipped = _outside_bodies(content)
        parser.included_ranges = ranges
        for found in _body_macros(content, skipped):
            defs[(found.start, found.end, found.name_start)] = found
    elif language == "python":
        ranges, gaps = pygaps.python_gaps(content)
        parser.included_ranges = ranges
    tree = _parse(parser, content)
    if gaps and tree is not None and tree.root_node.has_error:
        # A cut may have been misjudged (or the document has errors anyway): parse it all.
        gaps = []
        parser.included_ranges = [pygaps.WHOLE]
        tree = _parse(parser, content)
    if tree is None:
        return ()
    for root, start, end in _query_segments(tree.root_node):
        cursor = tree_sitter.QueryCursor(compiled.query)
        cursor.set_byte_range(start, end)
        for _, captures in cursor.matches(root):
            for found in _definitions(captures, content, language):
                defs.setdefault((found.start, found.end, found.name_start), found)
    if gaps:
        _restore_ends(defs.values(), gaps, content)
    ordered = sorted(defs.values(), key=lambda d: (d.start, -d.end, d.name_start))
    return _nest(ordered, spec, language)


_WIDE_ERROR = 4096


def _parse(parser: tree_sitter.Parser, content: bytes) -> tree_sitter.Tree | None:
    """_parse parses within a time budget, returning None (and resetting the parser) past it.

    Parsing is linear for real code, but some grammars' error recovery is not: a 1 MB file of
    `"` takes Rust's grammar 16 s and JavaScript's 9 s, 1 MB of random bytes C's 10 s. The
    parser's progress callback (only offered for callback-fed input) stops it once
    `PARSE_SECONDS + PARSE_SECONDS_PER_MIB * size` has passed, several times what real code
    needs even on a busy machine (kernel C parses at ~8 MB/s). Time makes the cut-off
    machine-dependent, but only for such inputs: operation counts, which would not be, do not
    grow with the slow recovery.
    """
    view = memoryview(content)
    deadline = time.monotonic() + PARSE_SECONDS + PARSE_SECONDS_PER_MIB * len(content) / (1 << 20)

    def read(offset: int, _point: tree_sitter.Point) -> memoryview:
        return view[offset:]

    def progress(_offset: int, _has_error: bool) -> bool:
        return time.monotonic() > deadline

    try:
        return parser.parse(read, progress_callback=progress)
    except ValueError:  # "Parsing failed": the callback cancelled it.
        parser.reset()  # Otherwise the next parse would resume this one.
        return None


def _query_segments(root: tree_sitter.Node) -> Iterator[tuple[tree_sitter.Node, int, int]]:
    """_query_segments yields (node, start byte, end byte): the query runs on each, in that range.

    tree-sitter's query cursor is quadratic in the number of children of an ERROR node: on
    40,000 unbalanced `(` the query takes 1.5 s, and a 1 MiB file of them would take minutes.
    So the cursor never walks a wide ERROR node (over `_WIDE_ERROR` children): the tree is
    queried around it, and each of its non-leaf children (error recovery keeps whole
    definitions there) is queried as a root of its own. Only subtrees containing an error are
    searched for such nodes (`has_error` is stored in every node), so a well-formed file pays
    one attribute read.
    """
    wide = _wide_errors(root)
    if not wide:
        yield root, 0, _END_BYTE
        return
    start = 0
    for node in wide:
        if node.start_byte > start:
            yield root, start, node.start_byte
        start = max(start, node.end_byte)
    yield root, start, _END_BYTE
    for node in wide:
        yield from _wide_error_segments(node)


def _wide_error_segments(node: tree_sitter.Node) -> Iterator[tuple[tree_sitter.Node, int, int]]:
    """_wide_error_segments queries each non-leaf child of a wide ERROR node on its own."""
    for child in node.children:
        if child.child_count == 0:
            continue  # A token holds no definition.
        if child.type == "ERROR" and child.child_count > _WIDE_ERROR:
            yield from _wide_error_segments(child)
        else:
            yield from _query_segments(child)


def _wide_errors(root: tree_sitter.Node) -> list[tree_sitter.Node]:
    """_wide_errors returns the outermost wide ERROR nodes at or under `root`, in document order."""
    if not root.has_error:
        return []
    found: list[tree_sitter.Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" and node.child_count > _WIDE_ERROR:
            found.append(node)
            continue
        stack.extend(child for child in node.children if child.has_error)
    return sorted(found, key=lambda node: node.start_byte)


# `...)` then `{` alone on a line: the opening of a function body in kernel/BSD/GNU style.
_BODY_OPEN = re.compile(rb"\)[ \t]*\r?\n\{[ \t]*\r?\n")


def _outside_bodies(content: bytes) -> tuple[list[tree_sitter.Range], list[tuple[int, int]]]:
    """_outside_bodies returns the ranges to parse and the byte spans of the bodies left out.

    A body opens with `{` alone on the line after a `)` and closes at the next `}` in column 0;
    it is skipped only when the braces between balance, so a misplaced `}` or a brace in a
    string costs nothing but the speed-up. The `{` and `}` themselves stay in the parse, so
    the function still parses as a definition spanning the right lines. On the Linux kernel
    this leaves ~63% of C bytes out and parses 3x faster. Local definitions inside bodies are
    lost (symbol search does not miss them), `#define`s are recovered by `_body_macros`, and
    statement macros such as `for_each_cpu(cpu) {` no longer parse as bogus definitions.
    """
    ranges: list[tree_sitter.Range] = []
    skipped: list[tuple[int, int]] = []
    start = 0
    row = 0  # newline count up to `counted`
    counted = 0
    start_point = tree_sitter.Point(0, 0)
    for match in _BODY_OPEN.finditer(content):
        body = match.end()
        if body < start:
            continue
        close = content.find(b"\n}", body - 1)
        if close < 0:
            break
        if content.count(b"{", body, close) != content.count(b"}", body, close):
            continue
        row += content.count(b"\n", counted, body)
        counted = body
        end_point = tree_sitter.Point(row, 0)  # `body` starts a line
        ranges.append(tree_sitter.Range(start_point, end_point, start, body))
        skipped.append((body, close + 1))
        start = close + 1
        row += content.count(b"\n", counted, start)
        counted = start
        start_point = tree_sitter.Point(row, 0)  # `}` is in column 0
    ranges.append(tree_sitter.Range(start_point, _END_POINT, start, _END_BYTE))
    return ranges, skipped


_END_BYTE = pygaps.END_BYTE
_END_POINT = pygaps.END_POINT
_DEFINE = re.compile(rb"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)", re.MULTILINE)


def _body_macros(content: bytes, skipped: Sequence[tuple[int, int]]) -> Iterator[_Def]:
    """_body_macros finds the `#define`s inside function bodies that the parse left out."""
    for start, end in skipped:
        if content.find(b"define", start, end) < 0:
            continue  # A memchr-speed test spares the regex on almost every body.
        for match in _DEFINE.finditer(content, start, end):
            line_start = match.start()
            line = content.count(b"\n", 0, line_start) + 1
            line_end = content.find(b"\n", line_start, end)
            last = line
            # A macro continues while its lines end in a backslash.
            while line_end > 0 and content[line_end - 1 : line_end] == b"\\":
                line_end = content.find(b"\n", line_end + 1, end)
                last += 1
            stop = line_end if line_end > 0 else end
            yield _Def(line_start, stop, line, last, "macro", match.group(1).decode("ascii"),
                       match.start(1), match.end(1))  # fmt: skip


def _restore_ends(defs: Iterable[_Def], gaps: Sequence[pygaps.Gap], content: bytes) -> None:
    """_restore_ends gives the definitions whose body tail was left out of the parse their real end."""
    zones = [gap.zone for gap in gaps]
    for d in defs:
        at = bisect.bisect_right(zones, d.end) - 1
        if at >= 0 and d.end <= gaps[at].start:
            gap = gaps[at]
            d.end = gap.end
            d.end_line = gap.end_row + 1 - pygaps.trailing_comment_lines(content, d.start, gap.end)


def _definitions(
    captures: dict[str, list[tree_sitter.Node]], content: bytes, language: str
) -> Iterator[_Def]:
    """_definitions turns one query match into zero or more definitions."""
    kind = ""
    node: tree_sitter.Node | None = None
    for key, nodes in captures.items():
        if key.startswith("definition."):
            kind = key[11:]
            node = nodes[0]
        elif key == "scope":
            kind = "scope"
            node = nodes[0]
    if node is None:
        return
    names = captures.get("name")
    if names:
        found = _named(node, names[0], kind, content, language)
        if found is not None:
            receiver = captures.get("receiver")
            if receiver:
                found.prefix = _text(content, receiver[0])
            owner = captures.get("owner")
            if owner:
                found.prefix = _js_owner(_text(content, owner[0]))
            yield found
    elif language in ("c", "cpp"):
        yield from _declared(node, kind, content, language)


def _js_owner(owner: str) -> str:
    """_js_owner names the class of `Foo.prototype.bar = ...`; exports objects name none."""
    if owner in ("exports", "module.exports", "window", "this", "self", "globalThis"):
        return ""
    return owner.removesuffix(".prototype")


def _named(
    node: tree_sitter.Node, name: tree_sitter.Node, kind: str, content: bytes, language: str
) -> _Def | None:
    """_named builds a definition from a captured name, fixing the kind where syntax decides it."""
    prefix = ""
    if name.type in _QUALIFIED_NAME_TYPES:
        prefix, name = _split_qualified(name, content)
    if name.type == "string" and name.named_child_count:
        name = name.named_children[0]  # `declare module "foo"`: the name is the fragment.
    text = _text(content, name)
    if not text:
        return None
    if kind == "variable":
        kind = _variable_kind(node, text, language)
    elif kind == "field" and language == "java" and _is_static_final(node, content):
        kind = "constant"
    elif kind == "field" and language in _JS_LANGUAGES and _has_function_value(node):
        kind = "method"  # `handleClick = () => {...}`: a class property holding a function.
    end = node.end_point
    # A node ending in its newline (`#define X 1\n`) ends on the line before.
    end_line = end.row if end.column == 0 and end.row > node.start_point.row else end.row + 1
    if language == "python" and node.type in ("function_definition", "class_definition"):
        end_line -= pygaps.trailing_comment_lines(content, node.start_byte, node.end_byte)
    return _Def(
        node.start_byte,
        node.end_byte,
        node.start_point.row + 1,
        end_line,
        kind,
        text,
        name.start_byte,
        name.end_byte,
        prefix,
    )


def _variable_kind(node: tree_sitter.Node, name: str, language: str) -> str:
    """_variable_kind names a module-level binding: function (JS arrow), constant or variable."""
    if language in _JS_LANGUAGES and _has_function_value(node):
        return "function"
    return "constant" if _is_constant_name(name) else "variable"


def _has_function_value(node: tree_sitter.Node) -> bool:
    """_has_function_value reports a JS/TS declarator or field initialised with a function."""
    value = node.child_by_field_name("value")
    return value is not None and value.type in _FUNCTION_VALUES


def _is_constant_name(name: str) -> bool:
    """_is_constant_name reports SCREAMING_CASE names, the cross-language constant convention."""
    return name.isupper() and any(c.isalpha() for c in name)


def _is_static_final(node: tree_sitter.Node, content: bytes) -> bool:
    """_is_static_final reports a Java field declared `static final`."""
    for child in node.children:
        if child.type == "modifiers":
            words = content[child.start_byte : child.end_byte].split()
            return b"static" in words and b"final" in words
    return False


def _split_qualified(node: tree_sitter.Node, content: bytes) -> tuple[str, tree_sitter.Node]:
    """_split_qualified splits `ns::Foo::bar` (or Ruby `A::B`, TS `A.B`) into prefix and last name."""
    last = node
    while last.type in _QUALIFIED_NAME_TYPES:
        nxt = last.child_by_field_name("name") or last.child_by_field_name("property")
        if nxt is None:
            nxt = last.named_children[-1] if last.named_child_count else None
        if nxt is None or nxt == last:
            break
        last = nxt
    if last.type == "template_function":
        last = last.child_by_field_name("name") or last
    prefix = content[node.start_byte : last.start_byte].decode("utf-8", "replace")
    while "<" in prefix and _TEMPLATE_ARGS.search(prefix):
        prefix = _TEMPLATE_ARGS.sub("", prefix)
    return prefix.rstrip(":. \t"), last


def _declared(node: tree_sitter.Node, kind: str, content: bytes, language: str) -> Iterator[_Def]:
    """_declared resolves C/C++ declarators: function definitions, typedefs, variables, methods."""
    if kind == "variable" and (not _at_file_scope(node) or _is_extern(node, content)):
        return  # Under `#if` it may sit in a function body; `extern` only declares.
    if kind == "function" and not _at_file_scope(node):
        return  # `for_each_cpu(cpu) { ... }` in a body parses as a definition named `cpu`.
    for declarator in node.children_by_field_name("declarator"):
        resolved = _follow_declarator(declarator)
        if resolved is None:
            continue
        name, is_function = resolved
        if kind == "variable" and is_function:
            continue  # A prototype declares, it does not define.
        if kind == "method" and not is_function:
            continue
        found = _named(node, name, kind, content, language)
        if found is not None:
            if kind == "function" and found.prefix:
                found.kind = "method"
            yield found


def _is_extern(node: tree_sitter.Node, content: bytes) -> bool:
    """_is_extern reports a C/C++ declaration with `extern` storage (defined elsewhere)."""
    for child in node.children:
        if (
            child.type == "storage_class_specifier"
            and content[child.start_byte : child.end_byte] == b"extern"
        ):
            return True
    return False


def _at_file_scope(node: tree_sitter.Node) -> bool:
    """_at_file_scope reports a C/C++ definition outside any function body."""
    outer = node.parent
    while outer is not None and outer.type.startswith("preproc"):
        outer = outer.parent
    return outer is None or outer.type in _DEFINITION_PARENTS


def _follow_declarator(node: tree_sitter.Node | None) -> tuple[tree_sitter.Node, bool] | None:
    """_follow_declarator walks pointer/array/function/init declarators down to the declared name.

    The flag says whether the innermost wrapper is a function declarator: `int *f(void)` is a
    function, `int (*f)(void)` a pointer variable.
    """
    wrapper = ""
    for _ in range(32):
        if node is None:
            return None
        kind = node.type
        if kind in _DECLARATOR_NAME_TYPES:
            return node, wrapper == "function_declarator"
        if kind == "parenthesized_declarator":
            node = node.named_child(0)
            continue
        wrapper = kind
        node = node.child_by_field_name("declarator")
    return None


def _text(content: bytes, node: tree_sitter.Node) -> str:
    """_text decodes a node's source bytes."""
    return content[node.start_byte : node.end_byte].decode("utf-8", "replace")


def _nest(defs: Sequence[_Def], spec: _Spec, language: str) -> tuple[Symbol, ...]:
    """_nest assigns parents and qualified names from containment, and fixes method kinds."""
    sep = spec.separator
    # Stack entries: (end byte, qualified name, kind) of the open container definitions.
    stack: list[tuple[int, str, str]] = []
    out: list[Symbol] = []
    for d in defs:
        while stack and stack[-1][0] < d.end:
            stack.pop()
        parent, parent_kind = (stack[-1][1], stack[-1][2]) if stack else ("", "")
        kind = d.kind
        if kind == "macro":
            parent = parent_kind = ""  # The preprocessor knows no scopes.
        prefix = d.prefix.replace("::", sep).replace(".", sep) if d.prefix else ""
        if prefix:
            # `void Foo::bar()`, `func (f *Foo) Bar()`, `class A::B`: the source names the owner.
            parent = f"{parent}{sep}{prefix}" if parent else prefix
            parent_kind = "class"
            if kind == "function":
                kind = "method"
        if kind == "function" and parent_kind in spec.method_parents:
            kind = "method"
        elif kind == "method" and language == "ruby" and not parent:
            kind = "function"
        qualified = f"{parent}{sep}{d.name}" if parent else d.name
        if kind in spec.containers:
            stack.append((d.end, qualified, kind))
        if kind == "scope":
            continue
        out.append(
            Symbol(d.name, kind, qualified, d.start_line, d.end_line, d.name_start, d.name_end, parent)
        )
        if len(out) >= MAX_SYMBOLS:
            break
    return tuple(out)
