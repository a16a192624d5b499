"""Golden tests of the on-disk format (format.py): byte layout, the v1 fixture, versions, corruption.

The fixture under fixtures/format_v1/index was built by this module from fixtures/format_v1/src;
it is kept as written by format version 1 (this code now writes version 3: 2 added the document
facts, 3 stores block checksums as base64), so it must never be regenerated: it proves old
indexes still open. Version 2 segments are made from version 3 ones by `downgrade_to_v2`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pyroaring import BitMap

from services.search.engine.index.format import (
    FACT_GENERATED_CONTENT,
    FACT_GENERATED_PATH,
    FACT_PRESENT,
    FACT_TEST,
    FACT_VENDORED,
    FORMAT_VERSION,
    HEADER_SIZE,
    IndexCorruptError,
    IndexFileError,
    IndexNotFoundError,
    IndexVersionError,
    PartInfo,
    block_sums_json,
    canonical_json,
    dump_checked_json,
    load_checked_json,
    pack_block_sums,
)
from services.search.engine.index.index import Index
from services.search.engine.index.trigrams import sorted_trigrams, trigram_bytes
from services.search.engine.index.writer import IndexWriter
from services.search.engine.model import SkipReason, SourceDocument, Symbol
from services.search.engine.search.results import SearchMode
from services.search.engine.search.searcher import Searcher

FIXTURE = Path(__file__).parent / "fixtures" / "format_v1"
SOURCES = FIXTURE / "src"
OLD_README = b"# Fixture\n\nAn older draft, replaced in the second commit.\n"


def fixture_symbols(path: str, content: bytes) -> tuple[Symbol, ...]:
    """fixture_symbols are hand-written symbol records for the fixture's source files."""

    def at(name: bytes, after: bytes) -> tuple[int, int]:
        start = content.index(after) + after.index(name)
        return start, start + len(name)

    if path == "pkg/greeter.py":
        return (
            Symbol("Greeter", "class", "Greeter", 4, 6, *at(b"Greeter", b"class Greeter")),
            Symbol("hello", "method", "Greeter.hello", 5, 6, *at(b"hello", b"def hello"), parent="Greeter"),
            Symbol("main", "function", "main", 9, 10, *at(b"main", b"def main")),
        )
    if path == "pkg/server.go":
        return (
            Symbol("Server", "type", "Server", 5, 5, *at(b"Server", b"type Server")),
            Symbol("Start", "method", "Server.Start", 7, 10, *at(b"Start", b"Start()"), parent="Server"),
        )
    return ()


def fixture_documents() -> list[SourceDocument]:
    """fixture_documents reads the fixture sources as the documents of the second commit."""
    docs = []
    for file in sorted(p for p in SOURCES.rglob("*") if p.is_file()):
        rel = file.relative_to(SOURCES).as_posix()
        content = file.read_bytes()
        language = {".py": "python", ".go": "go", ".md": "markdown"}.get(file.suffix, "")
        docs.append(
            SourceDocument(rel, rel, content, "fixture/repo", language, fixture_symbols(rel, content))
        )
    return docs


def build_fixture(dest: Path) -> None:
    """build_fixture writes the v1 fixture: two commits, so it has a deletion file and a skip list."""
    index = Index.create(dest)
    with IndexWriter(index) as writer:
        for doc in fixture_documents():
            content = OLD_README if doc.path == "README.md" else doc.content
            writer.add(
                SourceDocument(doc.external_id, doc.path, content, doc.repository, doc.language, doc.symbols)
            )
        writer.commit(merge=False)
        readme = next(d for d in fixture_documents() if d.path == "README.md")
        writer.add(readme)
        writer.commit(merge=False)
    (dest / "LOCK").unlink()


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """v1 is a scratch copy of the committed fixture index, safe to corrupt."""
    copy = tmp_path / "index"
    shutil.copytree(FIXTURE / "index", copy)
    return copy


def test_committed_v1_fixture_stays_readable(v1: Path) -> None:
    index = Index.open(v1)
    expected = {d.external_id: d for d in fixture_documents()}
    with index.snapshot() as snap:
        assert snap.generation == 2
        assert [s.name for s in snap.segments] == ["seg-00000000", "seg-00000001"]
        seen = {}
        for seg in snap.segments:
            seg.verify()
            for ordinal in seg.live:
                rec = seg.doc(ordinal)
                want = expected[rec.external_id]
                content = bytes(seg.content(ordinal))
                assert content == want.content
                assert (rec.path, rec.repository, rec.language, rec.size) == (
                    want.path,
                    want.repository,
                    want.language,
                    len(want.content),
                )
                assert rec.content_hash == hashlib.sha256(content).hexdigest()
                assert seg.symbols(ordinal) == want.symbols
                for tid in sorted_trigrams(content).tolist():
                    assert ordinal in seg.postings(trigram_bytes(tid))
                seen[rec.external_id] = content
        # The binary and empty files are skipped, the old README version deleted.
        assert set(seen) == {"README.md", "pkg/greeter.py", "pkg/server.go"}
        old = snap.segments[0]
        assert old.doc_count - old.live_count == 1
        assert snap.segments[0].postings(b"dra")  # the deleted draft is still in the postings ...
        assert not (snap.segments[0].postings(b"dra") & old.live)  # ... but not live
        assert {(s.external_id, s.reason) for s in snap.skipped()} == {
            ("empty.txt", SkipReason.EMPTY),
            ("logo.gif", SkipReason.BINARY),
        }


def test_golden_bytes_of_a_one_document_segment(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index) as writer:
        writer.add(SourceDocument("id-1", "a.txt", b"aBcd", "r", "text"))
        writer.commit()
    seg = tmp_path / "idx" / "seg-00000000"
    header = struct.Struct("<4sIQ")
    # dict.bin: header, ids of "abc" and "bcd" (folded), pad to 8, offsets 0, 18, 36.
    raw = (seg / "dict.bin").read_bytes()
    assert header.unpack_from(raw) == (b"KTRI", 3, 2)
    assert np.frombuffer(raw, "<u4", 2, HEADER_SIZE).tolist() == [0x616263, 0x626364]
    assert raw[24:24] == b"" and len(raw) == 16 + 8 + 0 + 24
    assert np.frombuffer(raw, "<u8", 3, 24).tolist() == [0, 18, 36]
    # postings.bin: two portable roaring bitmaps of {0}.
    raw = (seg / "postings.bin").read_bytes()
    assert header.unpack_from(raw) == (b"KPST", 3, 2)
    assert raw[16:] == BitMap([0]).serialize() * 2
    # content.bin: the raw bytes, case preserved.
    assert (seg / "content.bin").read_bytes() == header.pack(b"KCNT", 3, 1) + b"aBcd"
    # docs.bin: one 80-byte record, then the NUL-joined strings.
    raw = (seg / "docs.bin").read_bytes()
    strings = b"id-1\0a.txt\0r\0text"
    # facts: 0x80 (present), and none of test, vendored, generated.
    record = struct.pack("<QQQQIIII", 0, 4, 0, 0, len(strings), 0, 0, 0x80) + hashlib.sha256(b"aBcd").digest()
    assert raw == header.pack(b"KDOC", 3, 1) + record + strings
    assert (seg / "symbols.bin").read_bytes() == header.pack(b"KSYM", 3, 0)
    meta = json.loads((seg / "meta.json").read_bytes())
    assert meta["format"] == FORMAT_VERSION == 3
    # Block checksums: one base64 string of little-endian u32 per part (here one block each).
    for name in ("dict.bin", "postings.bin", "docs.bin", "content.bin", "symbols.bin"):
        raw = (seg / name).read_bytes()
        assert meta["parts"][name]["blocks"] == base64.b64encode(struct.pack("<I", zlib.crc32(raw))).decode()
    assert (meta["doc_count"], meta["trigram_count"], meta["content_bytes"]) == (1, 2, 4)
    assert meta["parts"]["content.bin"]["crc32"] == zlib.crc32((seg / "content.bin").read_bytes())
    manifest = json.loads((tmp_path / "idx" / "manifest-000000000001.json").read_bytes())
    assert manifest["segments"] == [
        {"name": "seg-00000000", "doc_count": 1, "deleted": None, "deleted_count": 0, "deleted_crc32": 0}
    ]
    assert manifest["next_segment"] == 1 and manifest["skipped"] is None


FACTS_CORPUS = [
    ("tests/test_app.py", b"def test_x(): pass\n", FACT_TEST),
    ("vendor/lib/a.go", b"package a\n", FACT_VENDORED),
    ("api/service.pb.go", b"package api\n", FACT_GENERATED_PATH),
    ("api/marked.go", b"// Code generated by hand. DO NOT EDIT.\npackage api\n", FACT_GENERATED_CONTENT),
    ("src/main.c", b"int main(void) { return 0; }\n", 0),
]


def test_version_2_segments_store_each_documents_facts(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index) as writer:
        for path, content, _ in FACTS_CORPUS:
            writer.add(SourceDocument(path, path, content, "r", "text"))
        writer.commit()
    want = {path: FACT_PRESENT | bits for path, _, bits in FACTS_CORPUS}
    with index.snapshot() as snap:
        (seg,) = snap.segments
        assert seg.data.stores_facts
        ordinals = range(seg.doc_count)
        got = dict(zip((seg.doc(o).path for o in ordinals), seg.facts(ordinals), strict=True))
        assert got == want
        for o in range(seg.doc_count):
            assert seg.doc_facts(o, seg.content(o)) == want[seg.doc(o).path]


def test_version_1_segments_work_facts_out_per_candidate(v1: Path) -> None:
    index = Index.open(v1)
    with index.snapshot() as snap:
        for seg in snap.segments:
            assert seg.data.format == 1 and not seg.data.stores_facts
            live = sorted(seg.live)
            assert list(seg.facts(live)) == [FACT_PRESENT] * len(live)  # no test/vendored/generated
            # Only the ordinals asked for were classified: nothing proportional to the segment.
            assert set(seg.data._worked_facts) == set(live)


def test_version_1_indexes_answer_searches(v1: Path) -> None:
    result = Searcher(Index.open(v1)).search("package", mode=SearchMode.EXHAUSTIVE, limit_files=None)
    assert [f.path for f in result.files] == ["pkg/server.go"]


def test_a_version_2_record_without_facts_is_corrupt(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index) as writer:
        writer.add(SourceDocument("id-1", "a.txt", b"aBcd", "r", "text"))
        writer.commit()
    seg = tmp_path / "idx" / "seg-00000000"
    raw = bytearray((seg / "docs.bin").read_bytes())
    struct.pack_into("<I", raw, HEADER_SIZE + 44, 0)  # the record's facts field
    (seg / "docs.bin").write_bytes(bytes(raw))
    meta = seg / "meta.json"
    body = json.loads(meta.read_bytes())
    size = body["block_size"]
    entry = body["parts"]["docs.bin"]
    entry["crc32"] = zlib.crc32(raw)
    entry["blocks"] = block_sums_json(
        pack_block_sums([zlib.crc32(raw[i : i + size]) for i in range(0, len(raw), size)])
    )
    rewrite_json(meta, parts=body["parts"])
    with Index.open(tmp_path / "idx").snapshot() as snap, pytest.raises(IndexCorruptError, match="no facts"):
        snap.segments[0].facts([0])


def rewrite_json(path: Path, **changes: object) -> None:
    body = json.loads(path.read_bytes())
    body.update(changes)
    path.write_bytes(dump_checked_json(body))


def test_future_manifest_version_is_rejected(v1: Path) -> None:
    manifest = v1 / "manifest-000000000002.json"
    rewrite_json(manifest, format=FORMAT_VERSION + 1)
    with pytest.raises(IndexVersionError) as err:
        Index.open(v1)
    assert err.value.path == str(manifest)
    assert err.value.found == 4 and "format version 4 is not supported" in str(err.value)


def test_future_segment_version_is_rejected(v1: Path) -> None:
    meta = v1 / "seg-00000001" / "meta.json"
    rewrite_json(meta, format=FORMAT_VERSION + 1)
    with pytest.raises(IndexVersionError) as err:
        Index.open(v1).snapshot()
    assert err.value.path == str(meta)


def test_future_part_version_is_rejected(v1: Path) -> None:
    part = v1 / "seg-00000001" / "dict.bin"
    raw = bytearray(part.read_bytes())
    struct.pack_into("<I", raw, 4, FORMAT_VERSION + 1)
    part.write_bytes(bytes(raw))
    meta = v1 / "seg-00000001" / "meta.json"
    parts = json.loads(meta.read_bytes())["parts"]
    parts["dict.bin"]["crc32"] = zlib.crc32(raw)
    rewrite_json(meta, parts=parts)
    with pytest.raises(IndexVersionError) as err:
        Index.open(v1).snapshot()
    assert err.value.path == str(part)


def read_everything(root: Path) -> None:
    """read_everything opens the index and touches every byte a search could read."""
    index = Index.open(root)
    with index.snapshot() as snap:
        snap.skipped()
        for seg in snap.segments:
            for tid in seg.data.trigram_ids.tolist():
                seg.postings(trigram_bytes(tid))
            for ordinal in range(seg.doc_count):
                seg.doc(ordinal)
                bytes(seg.content(ordinal))
                seg.symbols(ordinal)


FILES = [
    "manifest-000000000002.json",
    "skipped-000000000001.json",
    "seg-00000000/meta.json",
    "seg-00000000/dict.bin",
    "seg-00000000/postings.bin",
    "seg-00000000/docs.bin",
    "seg-00000000/content.bin",
    "seg-00000000/symbols.bin",
    "seg-00000000/deleted-000000000002.roar",
    "seg-00000001/content.bin",
]


def flip(offset_of: Callable[[int], int]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        raw = bytearray(path.read_bytes())
        raw[offset_of(len(raw))] ^= 0x20
        path.write_bytes(bytes(raw))

    return damage


def truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:-n])


DAMAGE: dict[str, Callable[[Path], None]] = {
    "flip-middle": flip(lambda n: n // 2),
    "flip-last": flip(lambda n: n - 2),
    "flip-header": flip(lambda n: 1),
    "truncate": lambda p: truncate(p, 3),
    "missing": lambda p: p.unlink(),
}


def test_fixture_has_every_file_the_corruption_tests_name() -> None:
    for rel in FILES:
        assert (FIXTURE / "index" / rel).is_file(), rel


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("rel", FILES)
def test_corruption_raises_a_typed_error_naming_the_file(v1: Path, rel: str, damage: str) -> None:
    read_everything(v1)
    target = v1 / rel
    DAMAGE[damage](target)
    with pytest.raises(IndexFileError) as err:
        read_everything(v1)
    if rel.startswith("manifest-") and damage == "missing":
        # Without its only manifest the directory is no longer an index.
        assert isinstance(err.value, IndexNotFoundError)
        return
    assert isinstance(err.value, IndexCorruptError), err.value
    assert err.value.path == str(target), err.value


# dump_checked_json's output in every shape the fast check must tell apart: plain, a string with
# spaces, a nested `checksum` key, escapes and non-ASCII (both checked the original way), an
# object with nothing but the version, and the checksum as the last key.
CHECKED_JSON = [
    {"format": 2, "parts": {"dict.bin": {"blocks": [1, 22, 333], "size": 9}}, "kind": "kotadb-segment"},
    {"format": 2, "name": "a b  c", "empty": [], "nested": {}},
    {"format": 2, "inner": {"checksum": 3}},
    {"format": 2, "path": 'caf\u00e9 \\ "q"'},
    {"format": 2},
    {"format": 2, "a": [1.5, None, True]},
]


def _checked_json_reference(path: Path) -> dict[str, object] | None:
    """_checked_json_reference is load_checked_json as the format defines it: parse, re-serialise."""
    try:
        obj = json.loads(path.read_bytes())
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("format") != 2:
        return None
    checksum = obj.pop("checksum", None)
    return obj if checksum == zlib.crc32(canonical_json(obj)) else None


@pytest.mark.parametrize("obj", CHECKED_JSON)
def test_checked_json_read_as_bytes_agrees_with_the_canonical_check(
    tmp_path: Path, obj: dict[str, object]
) -> None:
    # load_checked_json checks the bytes as read rather than re-serialising the parsed object:
    # every one-byte change must get the answer the canonical check gives.
    path = tmp_path / "meta.json"
    raw = dump_checked_json(obj)
    path.write_bytes(raw)
    assert load_checked_json(path) == obj
    refused = 0
    for at in range(len(raw)):
        for byte in (0x20, 0x0A, 0x22, 0x2C, 0x31, 0x7D):
            if raw[at] == byte:
                continue
            path.write_bytes(raw[:at] + bytes([byte]) + raw[at + 1 :])
            expected = _checked_json_reference(path)
            try:
                got: dict[str, object] | None = load_checked_json(path)
            except IndexFileError:
                got = None
            assert got == expected, (at, byte)
            refused += got is None
    assert refused > len(raw)  # most changes are damage


def test_checked_json_in_another_layout_still_loads(tmp_path: Path) -> None:
    # A file written with other whitespace or key order (by hand, or an older writer) is checked
    # against its canonical form as before.
    body = {"format": 2, "b": [1, 2], "a": "x"}
    checksum = zlib.crc32(canonical_json(body))
    path = tmp_path / "manifest.json"
    path.write_text(f'{{"checksum" :{checksum},\t"format":2, "b":[1,\r\n2], "a":"x"}}')
    assert load_checked_json(path) == body
    path.write_text(f'{{"format": 2, "b": [1, 2], "a": "x", "checksum": {checksum + 1}}}')
    with pytest.raises(IndexCorruptError, match="checksum mismatch"):
        load_checked_json(path)


@pytest.mark.parametrize("blocks", [[1, "2"], [1, 2.0], [None], "12", [[1]], {"a": 1}])
def test_a_version_2_part_entry_whose_block_sums_are_not_integers_is_malformed(blocks: object) -> None:
    with pytest.raises(IndexCorruptError, match="malformed part entry"):
        PartInfo.from_json(Path("meta.json"), {"size": 10, "crc32": 1, "blocks": blocks}, 2)
    info = PartInfo.from_json(Path("meta.json"), {"size": 10, "crc32": 1, "blocks": [3, 4]}, 2)
    assert info.blocks == struct.pack("<II", 3, 4) and info.block_count == 2 and info.block_sum(1) == 4


@pytest.mark.parametrize("blocks", [[-1], [2**32]])
def test_a_version_2_block_sum_outside_u32_is_corrupt(blocks: list[int]) -> None:
    with pytest.raises(IndexCorruptError, match="out of range"):
        PartInfo.from_json(Path("meta.json"), {"size": 10, "crc32": 1, "blocks": blocks}, 2)


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([3, 4], "malformed part entry"),  # the version 2 form in a version 3 file
        (7, "malformed part entry"),
        ("AAA", "malformed block checksums"),  # base64 without its padding
        ("AA=A", "malformed block checksums"),  # padding inside the data
        ("AAAA AAA=", "malformed block checksums"),  # whitespace is not base64
        ("AAAA", "not whole u32s"),  # three bytes
        ("éééé", "malformed block checksums"),
    ],
)
def test_a_version_3_part_entry_whose_block_sums_are_not_base64_u32s_is_malformed(
    blocks: object, message: str
) -> None:
    with pytest.raises(IndexCorruptError, match=message):
        PartInfo.from_json(Path("meta.json"), {"size": 10, "crc32": 1, "blocks": blocks}, 3)
    info = PartInfo.from_json(Path("meta.json"), {"size": 10, "crc32": 1, "blocks": "AwAAAAQAAAA="}, 3)
    assert info.blocks == struct.pack("<II", 3, 4) and info.block_sum(0) == 3
    assert info.to_json() == {"size": 10, "crc32": 1, "blocks": "AwAAAAQAAAA="}
    assert PartInfo.from_json(Path("meta.json"), {"size": 10, "crc32": 1}, 3).block_count == 0


def downgrade_to_v2(root: Path) -> None:
    """downgrade_to_v2 rewrites every segment of the index at `root` as format version 2 wrote it.

    Each part's header says version 2 (its checksums recomputed) and meta.json lists the block
    checksums as JSON numbers; the manifest says version 2.
    """
    for seg in sorted(root.glob("seg-*")):
        meta = json.loads((seg / "meta.json").read_bytes())
        size = meta["block_size"]
        for name, entry in meta["parts"].items():
            raw = bytearray((seg / name).read_bytes())
            struct.pack_into("<I", raw, 4, 2)
            (seg / name).write_bytes(bytes(raw))
            entry["crc32"] = zlib.crc32(raw)
            entry["blocks"] = [zlib.crc32(raw[i : i + size]) for i in range(0, len(raw), size)]
        meta["format"] = 2
        (seg / "meta.json").write_bytes(dump_checked_json(meta))
    for manifest in root.glob("manifest-*.json"):
        rewrite_json(manifest, format=2)


def test_version_2_indexes_open_and_answer_as_version_3_ones(tmp_path: Path) -> None:
    for name in ("v3", "v2"):
        index = Index.create(tmp_path / name)
        with IndexWriter(index) as writer:
            for doc in fixture_documents():
                writer.add(doc)
            writer.commit()
    downgrade_to_v2(tmp_path / "v2")
    assert '"blocks": [' in (tmp_path / "v2" / "seg-00000000" / "meta.json").read_text()

    def answers(root: Path) -> list[tuple[str, list[int]]]:  # (path, matching line numbers)
        with Index.open(root).snapshot() as snap:
            (seg,) = snap.segments
            seg.verify()
            expected = 2 if root.name == "v2" else 3
            assert seg.data.format == expected and seg.data.stores_facts
        searcher = Searcher(Index.open(root))
        out = []
        for query in ("def", "package", "Greeter"):
            result = searcher.search(query, mode=SearchMode.EXHAUSTIVE, limit_files=None)
            out += [(f.path, [m.line_number for m in f.line_matches]) for f in result.files]
        return out

    want = answers(tmp_path / "v3")
    assert want and answers(tmp_path / "v2") == want


def test_a_damaged_version_2_block_is_caught_on_first_read(tmp_path: Path) -> None:
    index = Index.create(tmp_path / "idx")
    with IndexWriter(index) as writer:
        writer.add(SourceDocument("id-1", "a.txt", b"needle in a haystack\n" * 10, "r", "text"))
        writer.commit()
    downgrade_to_v2(tmp_path / "idx")
    seg = tmp_path / "idx" / "seg-00000000"
    meta = json.loads((seg / "meta.json").read_bytes())
    meta["parts"]["content.bin"]["blocks"][0] ^= 1
    (seg / "meta.json").write_bytes(dump_checked_json(meta))
    with Index.open(tmp_path / "idx").snapshot() as snap, pytest.raises(IndexCorruptError, match="block 0"):
        bytes(snap.segments[0].content(0))
