"""Golden tests for tree-sitter symbol extraction, one hand-written snippet per language.

Each row lists every symbol the snippet must yield, in document order, as
(kind, qualified name, start line, end line, parent); the name's byte range is checked
against the source for every symbol.
"""

from __future__ import annotations

import ast
import contextlib
import os
import signal
import sysconfig
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.search.engine.model import Symbol
from services.search.engine.symbols import symbols
from services.search.engine.symbols.symbolpool import SymbolExtractor, extract_many
from services.search.engine.symbols.symbols import MAX_SYMBOLS, SYMBOL_LANGUAGES, extract_symbols

Row = tuple[str, str, int, int, str]

PYTHON = """\
import os
MAX = 3
debug = False

class Foo(Base):
    x: int = 1

    @property
    def bar(self):
        def inner():
            pass
        return inner

    class Nested:
        def deep(self): ...

def top(a, b):
    return a

type Alias = list[int]
"""

PYTHON_ROWS: list[Row] = [
    ("constant", "MAX", 2, 2, ""),
    ("variable", "debug", 3, 3, ""),
    ("class", "Foo", 5, 15, ""),
    ("field", "Foo.x", 6, 6, "Foo"),
    ("method", "Foo.bar", 9, 12, "Foo"),
    ("function", "Foo.bar.inner", 10, 11, "Foo.bar"),
    ("class", "Foo.Nested", 14, 15, "Foo"),
    ("method", "Foo.Nested.deep", 15, 15, "Foo.Nested"),
    ("function", "top", 17, 18, ""),
    ("type", "Alias", 20, 20, ""),
]

JAVASCRIPT = """\
const fs = require('fs');
const MAX_SIZE = 10;
let counter = 0;
function hello(name) { return name; }
function* gen() {}
class Animal extends Base {
  legs = 4; onClick = () => this.legs;
  constructor(x) { this.x = x; }
  speak() { return 1; }
  static create() {}
}
export const handler = async (event) => { return event; };
export function exported() {}
const api = { get() {} };
Animal.prototype.walk = function () { return 2; };
module.exports.helper = () => 1;
"""

JAVASCRIPT_ROWS: list[Row] = [
    ("variable", "fs", 1, 1, ""),
    ("constant", "MAX_SIZE", 2, 2, ""),
    ("variable", "counter", 3, 3, ""),
    ("function", "hello", 4, 4, ""),
    ("function", "gen", 5, 5, ""),
    ("class", "Animal", 6, 11, ""),
    ("field", "Animal.legs", 7, 7, "Animal"),
    ("method", "Animal.onClick", 7, 7, "Animal"),
    ("method", "Animal.constructor", 8, 8, "Animal"),
    ("method", "Animal.speak", 9, 9, "Animal"),
    ("method", "Animal.create", 10, 10, "Animal"),
    ("function", "handler", 12, 12, ""),
    ("function", "exported", 13, 13, ""),
    ("variable", "api", 14, 14, ""),
    ("method", "api.get", 14, 14, "api"),
    ("method", "Animal.walk", 15, 15, "Animal"),
    ("function", "helper", 16, 16, ""),
]

TYPESCRIPT = """\
interface Shape {
  area(): number;
  name: string;
}
type Id = string | number;
enum Color { Red, Green }
namespace Geo.Util { export function dist(): number { return 0; } }
declare module "foo" { export function f(): void; }
abstract class Base<T> {
  abstract run(): void;
  protected value: T;
  private handler = async (e: Event): Promise<void> => {};
}
export class Circle extends Base<number> implements Shape {
  area() { return 1; }
}
export const PI = 3.14;
const arrow = (x: number): number => x;
"""

TYPESCRIPT_ROWS: list[Row] = [
    ("interface", "Shape", 1, 4, ""),
    ("method", "Shape.area", 2, 2, "Shape"),
    ("field", "Shape.name", 3, 3, "Shape"),
    ("type", "Id", 5, 5, ""),
    ("enum", "Color", 6, 6, ""),
    ("namespace", "Geo.Util", 7, 7, "Geo"),
    ("function", "Geo.Util.dist", 7, 7, "Geo.Util"),
    ("module", "foo", 8, 8, ""),
    ("function", "foo.f", 8, 8, "foo"),
    ("class", "Base", 9, 13, ""),
    ("method", "Base.run", 10, 10, "Base"),
    ("field", "Base.value", 11, 11, "Base"),
    ("method", "Base.handler", 12, 12, "Base"),
    ("class", "Circle", 14, 16, ""),
    ("method", "Circle.area", 15, 15, "Circle"),
    ("constant", "PI", 17, 17, ""),
    ("function", "arrow", 18, 18, ""),
]

TSX = """\
interface Props { title: string }
export function Header({ title }: Props) {
  return <h1>{title}</h1>;
}
export const Footer = () => <footer />;
"""

TSX_ROWS: list[Row] = [
    ("interface", "Props", 1, 1, ""),
    ("field", "Props.title", 1, 1, "Props"),
    ("function", "Header", 2, 4, ""),
    ("function", "Footer", 5, 5, ""),
]

GO = """\
package main

const Answer = 42

const (
	A = iota
	B
)

var global int

type Server struct {
	Addr string
}

type Handler interface {
	Serve(w Writer) error
}

type ID string

type Alias = int

func (s *Server) Start() error {
	const local = 1
	return nil
}

func (l List[T]) Len() int { return 0 }

func main() {
	var x int
}
"""

GO_ROWS: list[Row] = [
    ("constant", "Answer", 3, 3, ""),
    ("constant", "A", 6, 6, ""),
    ("constant", "B", 7, 7, ""),
    ("variable", "global", 10, 10, ""),
    ("struct", "Server", 12, 14, ""),
    ("interface", "Handler", 16, 18, ""),
    ("method", "Handler.Serve", 17, 17, "Handler"),
    ("type", "ID", 20, 20, ""),
    ("type", "Alias", 22, 22, ""),
    ("method", "Server.Start", 24, 27, "Server"),
    ("method", "List.Len", 29, 29, "List"),
    ("function", "main", 31, 33, ""),
]

RUST = """\
mod outer {
    pub struct Point { x: i32 }
    impl Point {
        pub fn new() -> Self { Point { x: 0 } }
        const ORIGIN: i32 = 0;
    }
}
pub enum Shape { Circle, Square }
pub trait Draw {
    fn draw(&self);
    fn default_impl(&self) {}
}
impl Draw for Shape { fn draw(&self) {} }
impl<T> Wrapper<T> { fn get(&self) -> &T { &self.0 } }
type Pair = (i32, i32);
static mut counter: u32 = 0;
const LIMIT: usize = 10;
macro_rules! my_macro { () => {} }
fn main() { fn helper() {} }
union U { a: u32 }
"""

RUST_ROWS: list[Row] = [
    ("module", "outer", 1, 7, ""),
    ("struct", "outer::Point", 2, 2, "outer"),
    ("method", "outer::Point::new", 4, 4, "outer::Point"),
    ("constant", "outer::Point::ORIGIN", 5, 5, "outer::Point"),
    ("enum", "Shape", 8, 8, ""),
    ("trait", "Draw", 9, 12, ""),
    ("method", "Draw::draw", 10, 10, "Draw"),
    ("method", "Draw::default_impl", 11, 11, "Draw"),
    ("method", "Shape::draw", 13, 13, "Shape"),
    ("method", "Wrapper::get", 14, 14, "Wrapper"),
    ("type", "Pair", 15, 15, ""),
    ("variable", "counter", 16, 16, ""),
    ("constant", "LIMIT", 17, 17, ""),
    ("macro", "my_macro", 18, 18, ""),
    ("function", "main", 19, 19, ""),
    ("function", "main::helper", 19, 19, "main"),
    ("struct", "U", 20, 20, ""),
]

JAVA = """\
package x;
public class A {
    public static final int MAX = 1;
    private int count, other;
    public A() {}
    public void run() {}
    interface Inner { void go(); }
    enum E { ONE, TWO; void m() {} }
    record R(int a) {}
}
@interface Ann { }
"""

JAVA_ROWS: list[Row] = [
    ("class", "A", 2, 10, ""),
    ("constant", "A.MAX", 3, 3, "A"),
    ("field", "A.count", 4, 4, "A"),
    ("field", "A.other", 4, 4, "A"),
    ("method", "A.A", 5, 5, "A"),
    ("method", "A.run", 6, 6, "A"),
    ("interface", "A.Inner", 7, 7, "A"),
    ("method", "A.Inner.go", 7, 7, "A.Inner"),
    ("enum", "A.E", 8, 8, "A"),
    ("constant", "A.E.ONE", 8, 8, "A.E"),
    ("constant", "A.E.TWO", 8, 8, "A.E"),
    ("method", "A.E.m", 8, 8, "A.E"),
    ("class", "A.R", 9, 9, "A"),
    ("interface", "Ann", 11, 11, ""),
]

C = """\
#include <stdio.h>
#define MAX 10
#define SQ(x) \\
	((x)*(x))
struct point { int x; int y; };
typedef struct node { struct node *next; } node_t;
typedef int (*handler_t)(int);
enum color { RED, GREEN = 2 };
static int counter = 0;
extern int elsewhere;
int *make(void);
int (*fp)(int);
static const char *names[] = { "a" };
int *make(void) { return 0; }
static void helper(int a)
{
	int local = 1;
#define INNER 3
	for_each_cpu(cpu) {
		local++;
	}
#ifdef X
	int hidden;
#endif
}
#ifdef CONFIG_X
int config_var;
#endif
union u { int a; };
"""

C_ROWS: list[Row] = [
    ("macro", "MAX", 2, 2, ""),
    ("macro", "SQ", 3, 4, ""),
    ("struct", "point", 5, 5, ""),
    ("type", "node_t", 6, 6, ""),
    ("struct", "node", 6, 6, ""),
    ("type", "handler_t", 7, 7, ""),
    ("enum", "color", 8, 8, ""),
    ("constant", "RED", 8, 8, ""),
    ("constant", "GREEN", 8, 8, ""),
    ("variable", "counter", 9, 9, ""),
    ("variable", "fp", 12, 12, ""),
    ("variable", "names", 13, 13, ""),
    ("function", "make", 14, 14, ""),
    ("function", "helper", 15, 25, ""),
    ("macro", "INNER", 18, 18, ""),
    ("variable", "config_var", 27, 27, ""),
    ("struct", "u", 29, 29, ""),
]

CPP = """\
namespace ns {
class Widget : public Base {
public:
    Widget();
    ~Widget();
    int size() const;
    void inline_method() { }
    enum class Mode { On, Off };
};
int free_fn(int x) { return x; }
}
void ns::Widget::helper() {}
template <typename T> T Box<T>::get() const { return v; }
struct S { int x; };
using Str = std::string;
typedef unsigned long ulong;
namespace a::b { int v = 1; }
bool operator==(const S& a, const S& b) { return true; }
"""

CPP_ROWS: list[Row] = [
    ("namespace", "ns", 1, 11, ""),
    ("class", "ns::Widget", 2, 9, "ns"),
    ("method", "ns::Widget::Widget", 4, 4, "ns::Widget"),
    ("method", "ns::Widget::~Widget", 5, 5, "ns::Widget"),
    ("method", "ns::Widget::size", 6, 6, "ns::Widget"),
    ("method", "ns::Widget::inline_method", 7, 7, "ns::Widget"),
    ("enum", "ns::Widget::Mode", 8, 8, "ns::Widget"),
    ("constant", "ns::Widget::Mode::On", 8, 8, "ns::Widget::Mode"),
    ("constant", "ns::Widget::Mode::Off", 8, 8, "ns::Widget::Mode"),
    ("function", "ns::free_fn", 10, 10, "ns"),
    ("method", "ns::Widget::helper", 12, 12, "ns::Widget"),
    ("method", "Box::get", 13, 13, "Box"),
    ("struct", "S", 14, 14, ""),
    ("type", "Str", 15, 15, ""),
    ("type", "ulong", 16, 16, ""),
    ("namespace", "a::b", 17, 17, "a"),
    ("variable", "a::b::v", 17, 17, "a::b"),
    ("function", "operator==", 18, 18, ""),
]

RUBY = """\
module Outer
  VERSION = "1.0"
  class Foo < Bar
    def initialize(x)
      @x = x
    end
    def self.create
    end
    class << self
      def helper; end
    end
  end
  class A::B
    def m; end
  end
end
def top_level; end
"""

RUBY_ROWS: list[Row] = [
    ("module", "Outer", 1, 16, ""),
    ("constant", "Outer.VERSION", 2, 2, "Outer"),
    ("class", "Outer.Foo", 3, 12, "Outer"),
    ("method", "Outer.Foo.initialize", 4, 6, "Outer.Foo"),
    ("method", "Outer.Foo.create", 7, 8, "Outer.Foo"),
    ("method", "Outer.Foo.helper", 10, 10, "Outer.Foo"),
    ("class", "Outer.A.B", 13, 15, "Outer.A"),
    ("method", "Outer.A.B.m", 14, 14, "Outer.A.B"),
    ("function", "top_level", 17, 17, ""),
]

GOLDEN: list[tuple[str, str, list[Row]]] = [
    ("python", PYTHON, PYTHON_ROWS),
    ("javascript", JAVASCRIPT, JAVASCRIPT_ROWS),
    ("typescript", TYPESCRIPT, TYPESCRIPT_ROWS),
    ("tsx", TSX, TSX_ROWS),
    ("go", GO, GO_ROWS),
    ("rust", RUST, RUST_ROWS),
    ("java", JAVA, JAVA_ROWS),
    ("c", C, C_ROWS),
    ("cpp", CPP, CPP_ROWS),
    ("ruby", RUBY, RUBY_ROWS),
]


def _rows(found: tuple[Symbol, ...]) -> list[Row]:
    return [(s.kind, s.qualified_name, s.start_line, s.end_line, s.parent) for s in found]


@pytest.mark.parametrize(("language", "source", "expected"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_extraction(language: str, source: str, expected: list[Row]) -> None:
    content = source.encode()
    found = extract_symbols(content, language)
    assert _rows(found) == expected
    for symbol in found:
        assert content[symbol.start_byte : symbol.end_byte].decode() == symbol.name
        assert symbol.qualified_name.endswith(symbol.name)
        assert symbol.kind in symbols.KINDS


def test_golden_covers_every_symbol_language() -> None:
    assert {language for language, _, _ in GOLDEN} == SYMBOL_LANGUAGES


def test_names_are_byte_offsets_after_multibyte_text() -> None:
    content = "# é — ünïcode\ndef naïve_größe():\n    pass\n".encode()
    (symbol,) = extract_symbols(content, "python")
    assert symbol.name == "naïve_größe"
    assert content[symbol.start_byte : symbol.end_byte] == symbol.name.encode()
    assert (symbol.start_line, symbol.end_line) == (2, 3)


def test_kernel_style_bodies_skip_statement_macros_and_keep_defines() -> None:
    # Linux C: bodies open with `{` alone in column 0; `list_for_each(pos) {` inside a body
    # must not become a function, and a `#define` inside a body is still a macro.
    source = textwrap.dedent(
        """\
        static int probe(struct device *dev)
        {
        \tlist_for_each(pos) {
        \t\tcount++;
        \t}
        #define LOCAL_LIMIT 4
        \treturn 0;
        }

        static void remove(struct device *dev)
        {
        \tkfree(dev);
        }
        """
    ).encode()
    assert _rows(extract_symbols(source, "c")) == [
        ("function", "probe", 1, 8, ""),
        ("macro", "LOCAL_LIMIT", 6, 6, ""),
        ("function", "remove", 10, 13, ""),
    ]


def test_unbalanced_body_is_parsed_in_full() -> None:
    # The first column-0 `}` closes an inner block, so the braces before it do not balance:
    # the body is parsed in full and `f` keeps its true end line (7, not 5).
    source = b"int f(void)\n{\n\tif (a) {\n\t\tb();\n}\n\treturn 0;\n}\nint g(void)\n{\n\treturn 1;\n}\n"
    assert _rows(extract_symbols(source, "c")) == [
        ("function", "f", 1, 7, ""),
        ("function", "g", 8, 11, ""),
    ]


def test_unknown_language_and_empty_input_give_nothing() -> None:
    assert extract_symbols(b"def f(): pass\n", "cobol") == ()
    assert extract_symbols(b"", "python") == ()


def test_oversized_documents_are_not_parsed() -> None:
    body = b"def f(): pass\n"
    content = body * (symbols.MAX_SOURCE_BYTES // len(body) + 1)
    assert len(content) > symbols.MAX_SOURCE_BYTES
    assert extract_symbols(content, "python") == ()


def test_symbol_count_is_bounded() -> None:
    content = "".join(f"def f{i}(): pass\n" for i in range(MAX_SYMBOLS + 10)).encode()
    found = extract_symbols(content, "python")
    assert len(found) == MAX_SYMBOLS
    assert found[-1].name == f"f{MAX_SYMBOLS - 1}"


@pytest.mark.parametrize("language", sorted(SYMBOL_LANGUAGES))
@settings(max_examples=40, deadline=None)
@given(content=st.binary(max_size=2000))
def test_garbage_bytes_never_crash(language: str, content: bytes) -> None:
    found = extract_symbols(content, language)
    assert isinstance(found, tuple)
    for symbol in found:
        assert 0 <= symbol.start_byte <= symbol.end_byte <= len(content)
        assert 1 <= symbol.start_line <= symbol.end_line


@pytest.mark.parametrize("language", sorted(SYMBOL_LANGUAGES))
def test_truncated_sources_never_crash(language: str) -> None:
    source = next(s for lang, s, _ in GOLDEN if lang == language).encode()
    for cut in range(0, len(source), 7):
        prefix = source[:cut] + b"\xff\xfe{(\n"
        assert isinstance(extract_symbols(prefix, language), tuple)


def test_extract_many_over_processes_matches_sequential() -> None:
    items = [(source.encode(), language) for language, source, _ in GOLDEN] * 3
    items.append((b"plain text", "text"))
    expected = [extract_symbols(content, language) for content, language in items]
    # Small chunks force several batches through the pool and exercise the ordering.
    with SymbolExtractor(2, chunk_bytes=2048) as extractor:
        assert list(extractor.map(items)) == expected
    assert extract_many(items, workers=1) == expected
    assert extract_many(iter(items), workers=2) == expected


def test_extractor_survives_a_killed_worker() -> None:
    items = [(source.encode(), language) for language, source, _ in GOLDEN] * 4
    expected = [extract_symbols(content, language) for content, language in items]
    with SymbolExtractor(2, chunk_bytes=1024) as extractor:

        def stream() -> Iterator[tuple[bytes, str]]:
            for index, item in enumerate(items):
                if index == len(GOLDEN):
                    # By now chunks are in flight; kill every worker as a grammar crash would.
                    pool = extractor._pool
                    assert pool is not None
                    for process in list(pool._processes.values()):
                        assert process.pid is not None
                        # The pool reaps the others itself once it sees the first death.
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(process.pid, signal.SIGKILL)
                        process.join()
                yield item

        assert list(extractor.map(stream())) == expected
        assert extractor.restarts >= 1


@pytest.mark.parametrize("language", sorted(SYMBOL_LANGUAGES))
def test_wide_error_nodes_are_queried_piecewise_with_the_same_result(
    language: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The query cursor is quadratic in an ERROR node's width, so wide ones are queried child
    # by child; that must find exactly what one query over the whole tree finds.
    source = next(s for lang, s, _ in GOLDEN if lang == language).encode()
    content = source + b"\n" + b"(" * (symbols._WIDE_ERROR + 500) + b"\n" + source
    piecewise = extract_symbols(content, language)
    monkeypatch.setattr(symbols, "_WIDE_ERROR", 10**9)
    assert extract_symbols(content, language) == piecewise
    assert piecewise  # Error recovery keeps at least the definitions before the garbage.


def test_a_mebibyte_of_open_parentheses_is_handled() -> None:
    # Unbounded, this input keeps the query cursor busy for many minutes; with the wide-ERROR
    # guard it parses and queries in about a second. It must simply come back, without symbols.
    content = b"(" * (1 << 20)
    for language in sorted(SYMBOL_LANGUAGES):
        assert extract_symbols(content, language) == ()


def test_parse_past_its_budget_gives_nothing_and_leaves_the_parser_usable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Some grammars recover from garbage slowly (1 MB of `"` takes Rust's 16 s), so a parse
    # has a time budget; with a zero budget the first progress check cancels it.
    big = C.encode() * 400
    assert extract_symbols(big, "c")
    monkeypatch.setattr(symbols, "PARSE_SECONDS", 0.0)
    monkeypatch.setattr(symbols, "PARSE_SECONDS_PER_MIB", 0.0)
    assert extract_symbols(big, "c") == ()
    monkeypatch.undo()
    # The cancelled parse was reset: the same thread's parser starts afresh.
    assert _rows(extract_symbols(C.encode(), "c")) == C_ROWS
    assert len(extract_symbols(big, "c")) == 400 * len(C_ROWS)


def _ast_definitions(tree: ast.AST) -> list[tuple[str, str, int, int]]:
    """_ast_definitions lists classes and functions as Python's own parser sees them."""
    found: list[tuple[str, str, int, int]] = []

    def visit(node: ast.AST, prefix: str, parent_kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                qualified = f"{prefix}.{child.name}" if prefix else child.name
                if isinstance(child, ast.ClassDef):
                    kind = "class"
                else:
                    kind = "method" if parent_kind == "class" else "function"
                assert child.end_lineno is not None
                found.append((kind, qualified, child.lineno, child.end_lineno))
                visit(child, qualified, kind)
            else:
                visit(child, prefix, parent_kind)

    visit(tree, "", "")
    return sorted(found)


def test_python_definitions_match_the_ast_module_on_the_stdlib() -> None:
    # Real code: every 4th module of this interpreter's standard library (about 450 files)
    # must give the same classes, functions and methods, with the same qualified names,
    # kinds and line spans, as Python's own parser.
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)[::4]
    kept: list[Path] = []
    contents: list[bytes] = []
    expected: list[list[tuple[str, str, int, int]]] = []
    for path in files:
        content = path.read_bytes()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(content)
        except (SyntaxError, ValueError):
            continue  # lib2to3's Python 2 test data.
        kept.append(path)
        contents.append(content)
        expected.append(_ast_definitions(tree))
    assert len(contents) > 400
    extracted = extract_many([(content, "python") for content in contents], workers=2)
    mismatched = []
    for path, want, got in zip(kept, expected, extracted, strict=True):
        rows = sorted(
            (s.kind, s.qualified_name, s.start_line, s.end_line)
            for s in got
            if s.kind in ("class", "function", "method")
        )
        if rows != want:
            mismatched.append(path.relative_to(root).as_posix())
    # test_compile.py uses `except*`, which this tree-sitter-python version misparses.
    assert set(mismatched) <= {"test/test_compile.py"}
