"""Tests for the regex → trigram planner and the plan algebra (services/search/engine/query/plan.py)."""

from __future__ import annotations

import pathlib
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.search.engine.query.plan import (
    ALL,
    EMPTY,
    And,
    Or,
    Tri,
    and_,
    evaluate_on,
    or_,
    plan_literal,
    plan_regex,
    plan_trigrams,
    trigram_id,
)
from services.search.engine.query.verify import LineMatcher

BENCH_QUERIES = pathlib.Path(__file__).resolve().parents[2] / "services" / "bench" / "queries"

# (regex, case_insensitive, expected canonical plan). Juxtaposition is AND, `|` is OR.
PLAN_TABLE: list[tuple[str, bool, str]] = [
    # Literals, folded like the index.
    ("abc", False, '"abc"'),
    ("ab", False, "ALL"),
    ("abcd", False, '"abc" "bcd"'),
    ("ABC", False, '"abc"'),
    ("a.c", False, "ALL"),
    (r"a\.b\*c", False, '".b*" "a.b" "b*c"'),
    (r"\Qa.b*c\E", False, '".b*" "a.b" "b*c"'),
    (r"\x41BC", False, '"abc"'),
    (r"\101BC", False, '"abc"'),
    # Alternation and classes.
    ("abc|abd", False, '"abc"|"abd"'),
    ("(abc|abd)e", False, '("abc" "bce")|("abd" "bde")'),
    ("a[bc]d", False, '"abd"|"acd"'),
    ("[ab][cd][ef]", False, '"ace"|"acf"|"ade"|"adf"|"bce"|"bcf"|"bde"|"bdf"'),
    ("abc|de", False, "ALL"),
    ("abc|", False, "ALL"),
    ("a|b|c", False, "ALL"),
    ("[[:digit:]]abc", False, '"abc" ("0ab"|"1ab"|"2ab"|"3ab"|"4ab"|"5ab"|"6ab"|"7ab"|"8ab"|"9ab")'),
    ("[^a]bc", False, "ALL"),
    (r"a\pLbcd", False, '"bcd"'),
    (r"\d\d\d", False, "ALL"),
    ("[0-9]{4}-[0-9]{2}", False, "ALL"),
    ("[^\\x00-\\x{10FFFF}]", False, "NONE"),
    ("abc[^\\x00-\\x{10FFFF}]", False, "NONE"),
    # Repetition.
    ("abc.*def", False, '"abc" "def"'),
    ("abc+", False, '"abc"'),
    ("(abc)+x", False, '"abc" "bcx"'),
    ("(abc)*x", False, "ALL"),
    ("(abc)?def", False, '"def"'),
    ("abc??def", False, '"def" (("abc" "bcd" "cde")|("abd" "bde"))'),
    ("x{3}", False, '"xxx"'),
    ("ab{2}c", False, '"abb" "bbc"'),
    ("abc{2,5}", False, '"abc" "bcc"'),
    ("(?:abc){5}", False, '"abc" "bca" "cab"'),
    ("a{0,3}bcd", False, '"bcd"'),
    ("[a-z]+_probe", False, '"_pr" "obe" "pro" "rob"'),
    ("(a*)*b", False, "ALL"),
    # Patterns with no trigram at all.
    ("", False, "ALL"),
    (".*", False, "ALL"),
    ("a*", False, "ALL"),
    (r"\w+", False, "ALL"),
    # Anchors are zero-width.
    ("^abc$", False, '"abc"'),
    (r"\babc\b", False, '"abc"'),
    (r"\Aabc\z", False, '"abc"'),
    # Case: ASCII variants collapse in the folded index; k and s also stand for KELVIN
    # SIGN (e2 84 aa) and LATIN SMALL LETTER LONG S (c5 bf) under RE2's (?i).
    ("fixme", True, '"fix" "ixm" "xme"'),
    ("(?i)fixme", False, '"fix" "ixm" "xme"'),
    ("(?i:FIX)me", False, '"fix" "ixm" "xme"'),
    ("Kelvin", False, '"elv" "kel" "lvi" "vin"'),
    ("(?i)kelvin", False, '"elv" "lvi" "vin" ("kel"|("\\x84\\xaae" "\\xaael" "\\xe2\\x84\\xaa"))'),
    ("(?i)é", False, "ALL"),
    # Unicode literals are planned on their UTF-8 bytes.
    ("héllo", False, '"\\xa9ll" "\\xc3\\xa9l" "h\\xc3\\xa9" "llo"'),
    (r"\x{65e5}\x{672c}", False, '"\\x97\\xa5\\xe6" "\\xa5\\xe6\\x9c" "\\xe6\\x97\\xa5" "\\xe6\\x9c\\xac"'),
    # Newlines are never inside an indexed trigram.
    ("a\\nbcd", False, '"bcd"'),
    ("(?s)abc.def", False, '"abc" "def"'),
    # What the planning parser cannot read is a scan; RE2 reports the error at verification.
    ("(abc", False, "ALL"),
    ("a**", False, "ALL"),
    # The benchmark queries (services/bench/queries/*.txt).
    (
        "spin_lock_irqsave",
        False,
        '"_ir" "_lo" "ave" "ck_" "in_" "irq" "k_i" "loc" "n_l" "ock" "pin" "qsa" "rqs" "sav" "spi"',
    ),
    (
        "sched_setaffinity",
        False,
        '"_se" "aff" "che" "d_s" "ed_" "eta" "ffi" "fin" "hed" "ini" "ity" "nit" "sch" "set" "taf"',
    ),
    (
        r"struct task_struct \*\w+ = current",
        False,
        '" = " " cu" " ta" "= c" "_st" "ask" "ct " "cur" "ent" "k_s" "ren" "rre" "ruc"'
        ' "sk_" "str" "t *" "t t"'
        ' "tas" "tru" "uct" "urr"',
    ),
    (
        r"static int \w+_probe\(struct platform_device",
        False,
        '" in" " pl" "(st" "_de" "_pr" "atf" "ati" "be(" "c i" "ct " "dev" "e(s" "evi"'
        ' "for" "ic " "ice" "int"'
        ' "lat" "m_d" "nt " "obe" "orm" "pla" "pro" "rm_" "rob" "ruc" "sta" "str" "t p"'
        ' "tat" "tfo" "tic" "tru"'
        ' "uct" "vic"',
    ),
    (
        r'MODULE_LICENSE\("GPL v2"\)',
        False,
        '" v2" "(\\"g" "2\\")" "\\"gp" "_li" "cen" "dul" "e(\\"" "e_l" "ens" "gpl" "ice"'
        ' "l v" "le_" "lic" "mod"'
        ' "nse" "odu" "pl " "se(" "ule" "v2\\""',
    ),
    (
        r"copy_from_user\(",
        False,
        '"_fr" "_us" "cop" "er(" "fro" "m_u" "om_" "opy" "py_" "rom" "ser" "use" "y_f"',
    ),
    ("DEFINE_MUTEX", False, '"_mu" "def" "e_m" "efi" "fin" "ine" "mut" "ne_" "tex" "ute"'),
    (
        r"\bkzalloc\b.*GFP_ATOMIC",
        False,
        '"_at" "all" "ato" "fp_" "gfp" "kza" "llo" "loc" "mic" "omi" "p_a" "tom" "zal"',
    ),
    (
        r"EXPORT_SYMBOL_GPL\(kmalloc",
        False,
        '"(km" "_gp" "_sy" "all" "bol" "exp" "gpl" "kma" "l(k" "l_g" "llo" "loc" "mal"'
        ' "mbo" "ol_" "ort" "pl("'
        ' "por" "rt_" "sym" "t_s" "xpo" "ymb"',
    ),
    # The many-match Linux queries (linux-many.txt): anchors and classes leave the literals.
    (
        r"^#include <linux/[a-z_]+\.h>$",
        False,
        '" <l" "#in" ".h>" "<li" "clu" "de " "e <" "inc" "inu" "lin" "lud" "ncl" "nux" "ude" "ux/"',
    ),
    (
        r"0x[0-9a-f]{8}",
        False,
        '"0x0"|"0x1"|"0x2"|"0x3"|"0x4"|"0x5"|"0x6"|"0x7"|"0x8"|"0x9"|"0xa"|"0xb"|"0xc"|"0xd"|"0xe"|"0xf"',
    ),
    (r"ops->open\(", False, '"->o" ">op" "en(" "ope" "ops" "pen" "ps-" "s->"'),
    # More Linux queries (linux-extra.txt): no literal of three bytes is a scan (ALL).
    ("(?i)todo", False, '"odo" "tod"'),
    (r"struct \w+_ops \{", False, '"_op" "ct " "ops" "ps " "ruc" "s {" "str" "tru" "uct"'),
    (
        r"printk\(KERN_ERR",
        False,
        '"(ke" "_er" "ern" "err" "int" "k(k" "ker" "n_e" "ntk" "pri" "rin" "rn_" "tk("',
    ),
    (
        "^static const struct file_operations",
        False,
        '" co" " fi" " st" "_op" "ati" "c c" "con" "ct " "e_o" "era" "fil" "ic " "ile" "ion" "le_"'
        ' "nst" "ons" "ope" "per" "rat" "ruc" "st " "sta" "str" "t f" "t s" "tat" "tic" "tio" "tru" "uct"',
    ),
    ("[A-Z]{20,}", False, "ALL"),
    (r"\w+_init\(void\)", False, '"(vo" "_in" "id)" "ini" "it(" "nit" "oid" "t(v" "voi"'),
    ("goto out;", False, '" ou" "got" "o o" "oto" "out" "to " "ut;"'),
    (
        r"(kmalloc|kzalloc)\(sizeof",
        False,
        '"(si" "all" "c(s" "eof" "ize" "llo" "loc" "oc(" "siz" "zeo" (("kma" "mal")|("kza" "zal"))',
    ),
    ("ab", False, "ALL"),
    (r"\bmutex_lock\b", False, '"_lo" "ex_" "loc" "mut" "ock" "tex" "ute" "x_l"'),
    (
        r"(?i)copyright \(c\) 2005",
        False,
        '" (c" " 20" "(c)" ") 2" "005" "200" "c) " "cop" "ght" "ht " "igh" "opy" "pyr" "rig" "t (" "yri"',
    ),
    ("def __init__", False, '" __" "__i" "_in" "def" "ef " "f _" "ini" "it_" "nit" "t__"'),
    ("ZIP_DEFLATED", False, '"_de" "ate" "def" "efl" "fla" "ip_" "lat" "p_d" "ted" "zip"'),
    (
        "raise NotImplementedError",
        False,
        '" no" "ais" "der" "e n" "ede" "eme" "ent" "err" "imp" "ise" "lem" "men" "mpl"'
        ' "not" "nte" "oti" "ple"'
        ' "rai" "ror" "rro" "se " "ted" "tim"',
    ),
    (
        r"def test_\w+_unicode",
        False,
        '" te" "_un" "cod" "def" "ef " "est" "f t" "ico" "nic" "ode" "st_" "tes" "uni"',
    ),
    (
        r"class \w+Error\(Exception\)",
        False,
        '"(ex" "ass" "cep" "cla" "ept" "err" "exc" "ion" "las" "on)" "or(" "pti" "r(e"'
        ' "ror" "rro" "ss " "tio" "xce"',
    ),
    (
        r"socket\.(AF_INET6|AF_UNIX)",
        False,
        '".af" "af_" "cke" "et." "ket" "ock" "soc" "t.a" (("_in" "et6" "f_i" "ine"'
        ' "net")|("_un" "f_u" "nix" "uni"))',
    ),
    ("TODO|FIXME", False, '("fix" "ixm" "xme")|("odo" "tod")'),
    ("(?i)http_proxy", False, '"_pr" "htt" "oxy" "p_p" "pro" "rox" "tp_" "ttp"'),
    (r"\bcontextmanager\b", False, '"age" "ana" "con" "ext" "ger" "man" "nag" "nte" "ont" "tex" "tma" "xtm"'),
]


@pytest.mark.parametrize(("regex", "case_insensitive", "expected"), PLAN_TABLE)
def test_plan_table(regex: str, case_insensitive: bool, expected: str) -> None:
    assert str(plan_regex(regex, case_insensitive=case_insensitive)) == expected


def test_table_covers_every_bench_query() -> None:
    planned = {regex for regex, _, _ in PLAN_TABLE}
    bench = {
        line
        for path in sorted(BENCH_QUERIES.glob("*.txt"))
        for line in path.read_text().splitlines()
        if line.strip()
    }
    assert bench, "no benchmark queries found"
    assert bench <= planned, sorted(bench - planned)


def test_plan_literal_matches_escaped_regex() -> None:
    for text in ["def __init__", "a.b*c(", "Kelvin sign", "héllo wörld", "ab"]:
        for ci in (False, True):
            escaped = "".join("\\" + c if not c.isalnum() and c.isascii() else c for c in text)
            assert plan_literal(text, case_insensitive=ci) == plan_regex(escaped, case_insensitive=ci)


def test_and_or_simplification() -> None:
    a, b, c = Tri(b"aaa"), Tri(b"bbb"), Tri(b"ccc")
    assert and_() == ALL
    assert or_() == EMPTY
    assert and_(a, ALL) == a
    assert and_(a, EMPTY) == EMPTY
    assert or_(a, ALL) == ALL
    assert or_(a, EMPTY) == a
    assert and_(a, and_(b, a)) == And((a, b))
    assert or_(b, or_(a, b)) == Or((a, b))
    # Absorption both ways.
    assert and_(a, or_(a, b)) == a
    assert or_(a, and_(a, b)) == a
    # Common factors come out.
    assert or_(and_(a, b), and_(a, c)) == and_(a, or_(b, c))
    assert and_(or_(a, b), or_(a, c)) == or_(a, and_(b, c))
    assert str(and_(c, or_(b, a))) == '"ccc" ("aaa"|"bbb")'
    assert str(or_(and_(a, b), c)) == '"ccc"|("aaa" "bbb")'


def test_plan_helpers() -> None:
    plan = plan_regex("abc|xyz.*def")
    assert plan_trigrams(plan) == {b"abc", b"xyz", b"def"}
    assert evaluate_on(plan, {b"xyz", b"def"})
    assert not evaluate_on(plan, {b"xyz"})
    assert Tri(b"abc").id == trigram_id(b"abc") == 0x616263
    assert str(Tri(b'a"\\')) == '"a\\"\\\\"'


def _doc_trigrams(doc: bytes) -> set[bytes]:
    """_doc_trigrams is what the index stores for a document: folded, newline-free trigrams."""
    folded = doc.lower()
    return {folded[i : i + 3] for i in range(len(folded) - 2) if b"\n" not in folded[i : i + 3]}


# Small alphabets make matches likely; KELVIN SIGN and LONG S exercise Unicode case folding.
_ALPHABET = "abcAB skS\nK\u212a\u017f\u00e9\u00c9"
# Case variants as RE2's (?i) sees them, written out independently of the planner's tables.
_VARIANTS = {"k": "kK\u212a", "s": "sS\u017f", "\u00e9": "\u00e9\u00c9"}


def _variants(ch: str) -> str:
    low = ch.lower() if ch not in ("\u212a", "\u017f") else ch
    return _VARIANTS.get(low, _VARIANTS.get(ch.lower(), ch.lower() + ch.upper()))


_atoms = st.one_of(
    st.sampled_from(["a", "b", "c", "A", "s", "k", " ", "\u00e9", "\\x{212a}", "\u017f"]),
    st.sampled_from([".", "[ab]", "[^a]", "[a-c]", "\\w", "\\s", "[sk]", "\\b", "^", "$"]),
)


def _regexes() -> st.SearchStrategy[str]:
    # Flat runs of atoms are where trigrams come from, so they get their own branch.
    flat = st.lists(_atoms, min_size=3, max_size=7).map("".join)
    return flat | st.recursive(
        _atoms,
        lambda inner: st.one_of(
            st.lists(inner, min_size=2, max_size=5).map("".join),
            st.tuples(inner, inner).map(lambda p: f"(?:{p[0]}|{p[1]})"),
            inner.map(lambda r: f"(?:{r})*"),
            inner.map(lambda r: f"(?:{r})+"),
            inner.map(lambda r: f"(?:{r})?"),
            inner.map(lambda r: f"(?:{r}){{1,3}}"),
            inner.map(lambda r: f"(?:{r}){{2}}"),
            inner.map(lambda r: f"(?i:{r})"),
        ),
        max_leaves=10,
    )


def _python_docs(pattern: str, case_insensitive: bool, data: st.DataObject) -> list[bytes]:
    """_python_docs draws documents likely to match: Python's re reads these simple patterns
    nearly like RE2, and hypothesis can generate strings containing a match for them."""
    try:
        compiled = re.compile(
            pattern.replace("\\x{212a}", "\u212a"), re.IGNORECASE if case_insensitive else 0
        )
    except re.error:
        return []
    return [data.draw(st.from_regex(compiled)).encode("utf-8", "surrogatepass") for _ in range(3)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=_regexes(),
    case_insensitive=st.booleans(),
    docs=st.lists(st.text(_ALPHABET, max_size=40), max_size=3),
    data=st.data(),
)
def test_plan_never_excludes_a_true_match_regex(
    pattern: str, case_insensitive: bool, docs: list[str], data: st.DataObject
) -> None:
    plan = plan_regex(pattern, case_insensitive=case_insensitive)
    matcher = LineMatcher(pattern, case_sensitive=not case_insensitive)
    for doc in [text.encode() for text in docs] + _python_docs(pattern, case_insensitive, data):
        if matcher.matches(doc):
            assert evaluate_on(plan, _doc_trigrams(doc)), (pattern, doc, str(plan))


@settings(max_examples=300, deadline=None)
@given(
    needle=st.text(_ALPHABET.replace("\n", ""), min_size=1, max_size=8),
    case_insensitive=st.booleans(),
    prefix=st.text(_ALPHABET, max_size=10),
    suffix=st.text(_ALPHABET, max_size=10),
    picks=st.lists(st.integers(0, 2), min_size=8, max_size=8),
)
def test_plan_never_excludes_a_true_match_literal(
    needle: str, case_insensitive: bool, prefix: str, suffix: str, picks: list[int]
) -> None:
    plan = plan_literal(needle, case_insensitive=case_insensitive)
    matcher = LineMatcher(needle, case_sensitive=not case_insensitive, literal=True)
    # The needle itself, and a copy with each character replaced by one of its case variants
    # (a true match only when insensitive).
    variant = "".join(_variants(c)[i % len(_variants(c))] for c, i in zip(needle, picks, strict=False))
    for text in (prefix + needle + suffix, prefix + variant + suffix):
        doc = text.encode()
        if matcher.matches(doc):
            assert evaluate_on(plan, _doc_trigrams(doc)), (needle, doc, str(plan))
