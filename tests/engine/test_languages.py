"""Table tests for language detection, `lang:` aliases and the ranking predicates."""

from __future__ import annotations

import pytest

from services.search.engine import languages
from services.search.engine.languages import (
    LANGUAGES,
    detect_language,
    is_generated,
    is_test,
    is_vendored,
    normalize_language,
)

DETECTION: list[tuple[str, bytes, str]] = [
    # Extensions of the languages with symbols.
    ("pkg/mod.py", b"", "python"),
    ("stubs/mod.pyi", b"", "python"),
    ("web/app.js", b"", "javascript"),
    ("web/app.mjs", b"", "javascript"),
    ("web/App.jsx", b"", "javascript"),
    ("web/app.ts", b"", "typescript"),
    ("web/App.tsx", b"", "tsx"),
    ("cmd/main.go", b"", "go"),
    ("src/lib.rs", b"", "rust"),
    ("src/Main.java", b"", "java"),
    ("kernel/fork.c", b"", "c"),
    ("include/linux/list.h", b"", "c"),
    ("src/widget.cc", b"", "cpp"),
    ("src/widget.cpp", b"", "cpp"),
    ("src/widget.hpp", b"", "cpp"),
    ("lib/thing.rb", b"", "ruby"),
    ("thing.gemspec", b"", "ruby"),
    # `.h` is C unless C++ markers open a line in the first 16 KiB.
    ("include/widget.h", b"#pragma once\nnamespace ui {\nclass W;\n}\n", "cpp"),
    ("include/box.h", b"template <typename T>\nstruct Box { T v; };\n", "cpp"),
    ("include/cls.h", b"class Widget : public Base {\npublic:\n};\n", "cpp"),
    ("include/plain.h", b"/* the class of errors */\nstruct s { int class_id; };\n", "c"),
    ("include/late.h", b"/* pad */\n" * 2000 + b"namespace late {\n", "c"),
    # Languages searchable with lang: only.
    ("README.md", b"", "markdown"),
    ("data/x.json", b"", "json"),
    ("ci.yml", b"", "yaml"),
    ("ci.yaml", b"", "yaml"),
    ("pyproject.toml", b"", "toml"),
    ("scripts/run.sh", b"", "shell"),
    ("index.html", b"", "html"),
    ("style.css", b"", "css"),
    ("schema.sql", b"", "sql"),
    ("app/Main.kt", b"", "kotlin"),
    ("App.swift", b"", "swift"),
    ("Program.cs", b"", "csharp"),
    ("index.php", b"", "php"),
    ("Main.scala", b"", "scala"),
    ("tool.pl", b"", "perl"),
    ("init.lua", b"", "lua"),
    ("arch/x86/entry/entry_64.S", b"", "assembly"),
    ("boot.asm", b"", "assembly"),
    ("arch/arm/boot/dts/board.dts", b"", "devicetree"),
    ("arch/arm/boot/dts/soc.dtsi", b"", "devicetree"),
    ("Documentation/index.rst", b"", "rst"),
    ("notes.txt", b"", "text"),
    ("api.proto", b"", "protobuf"),
    # Well-known file names, with and without suffixes.
    ("Makefile", b"", "makefile"),
    ("scripts/Makefile.lib", b"", "makefile"),
    ("GNUmakefile", b"", "makefile"),
    ("drivers/Kbuild", b"", "makefile"),
    ("Dockerfile", b"", "dockerfile"),
    ("deploy/Dockerfile.dev", b"", "dockerfile"),
    ("Gemfile", b"", "ruby"),
    ("Rakefile", b"", "ruby"),
    ("BUILD", b"", "starlark"),
    ("BUILD.bazel", b"", "starlark"),
    ("CMakeLists.txt", b"", "cmake"),
    ("Kconfig", b"", "kconfig"),
    ("arch/x86/Kconfig.debug", b"", "kconfig"),
    ("tools/perf/util/Build", b"", "makefile"),
    ("arch/x86/kernel/vmlinux.lds", b"", "linkerscript"),
    ("scripts/kconfig/parser.y", b"", "yacc"),
    # Shebangs for extension-less scripts.
    ("bin/tool", b"#!/usr/bin/env python3\nprint(1)\n", "python"),
    ("bin/tool", b"#!/usr/bin/python3.11 -u\n", "python"),
    ("bin/tool", b"#!/bin/sh\nset -e\n", "shell"),
    ("bin/tool", b"#!/usr/bin/env bash\n", "shell"),
    ("bin/tool", b"#!/usr/bin/env ruby\n", "ruby"),
    ("bin/tool", b"#!/usr/bin/env node\n", "javascript"),
    ("bin/tool", b"#!/usr/bin/env -S deno run\n", "typescript"),
    ("bin/tool", b"#!/usr/bin/perl -w\n", "perl"),
    # An extension wins over a shebang; unknown stays unknown.
    ("bin/tool.rb", b"#!/bin/sh\n", "ruby"),
    ("bin/tool", b"#!/opt/custom/interp\n", ""),
    ("bin/tool", b"no shebang", ""),
    ("data.bin", b"\x00\x01", ""),
    ("LICENSE", b"", "text"),
]


@pytest.mark.parametrize(("path", "content", "expected"), DETECTION)
def test_detect_language(path: str, content: bytes, expected: str) -> None:
    assert detect_language(path, content) == expected


def test_detected_names_are_canonical() -> None:
    for path, content, expected in DETECTION:
        language = detect_language(path, content)
        assert language == "" or language in LANGUAGES, (path, language)
        assert expected == "" or normalize_language(expected) == expected


ALIASES: list[tuple[str, str | None]] = [
    ("python", "python"),
    ("py", "python"),
    ("Python", "python"),
    ("golang", "go"),
    ("go", "go"),
    ("c++", "cpp"),
    ("C++", "cpp"),
    ("cpp", "cpp"),
    ("hpp", "cpp"),
    ("js", "javascript"),
    ("ts", "typescript"),
    ("tsx", "tsx"),
    ("rs", "rust"),
    ("rb", "ruby"),
    ("sh", "shell"),
    ("bash", "shell"),
    ("yml", "yaml"),
    ("md", "markdown"),
    ("c#", "csharp"),
    ("asm", "assembly"),
    ("dts", "devicetree"),
    ("make", "makefile"),
    ("docker", "dockerfile"),
    (" c ", "c"),
    ("klingon", None),
    ("", None),
]


@pytest.mark.parametrize(("name", "expected"), ALIASES)
def test_normalize_language(name: str, expected: str | None) -> None:
    assert normalize_language(name) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("vendor/github.com/x/y.go", True),
        ("src/third_party/zlib/inflate.c", True),
        ("web/node_modules/react/index.js", True),
        ("lib/python3.11/site-packages/six.py", True),
        ("src/vendor.go", False),
        ("src/main.go", False),
        ("docs/third_party.md", False),
    ],
)
def test_is_vendored(path: str, expected: bool) -> None:
    assert is_vendored(path) is expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("pkg/server_test.go", True),
        ("tests/test_api.py", True),
        ("pkg/test_api.py", True),
        ("pkg/api_test.py", True),
        ("conftest.py", True),
        ("web/app.test.ts", True),
        ("web/app.spec.js", True),
        ("web/__tests__/app.js", True),
        ("src/test/java/FooTest.java", True),
        ("spec/models/user_spec.rb", True),
        ("tools/testing/selftests/bpf/prog.c", True),
        ("pkg/testdata/input.txt", True),
        ("pkg/server.go", False),
        ("pkg/contest.py", False),
        ("src/attestation.rs", False),
        ("web/latest.js", False),
    ],
)
def test_is_test(path: str, expected: bool) -> None:
    assert is_test(path) is expected


@pytest.mark.parametrize(
    ("path", "content", "expected"),
    [
        ("api/v1/search_pb2.py", b"", True),
        ("api/v1/search_pb2_grpc.py", b"", True),
        ("api/v1/search.pb.go", b"", True),
        ("web/dist/app.min.js", b"", True),
        ("package-lock.json", b"", True),
        ("pkg/zz_generated.deepcopy.go", b"", True),
        ("pkg/enum.go", b"// Code generated by stringer; DO NOT EDIT.\n\npackage x\n", True),
        ("lib/parser.js", b"/* @generated by peggy */\n", True),
        ("src/x.c", b"/* This file was automatically generated by mkdefs */\n", True),
        ("pkg/server.go", b"package server\n\nfunc main() {}\n", False),
        ("lib/app.js", b"", False),
        # Markers only count near the top of the file.
        ("pkg/late.go", b"package x\n" + b"// filler\n" * 200 + b"// DO NOT EDIT\n", False),
    ],
)
def test_is_generated(path: str, content: bytes, expected: bool) -> None:
    assert is_generated(path, content) is expected


def test_every_table_names_a_canonical_language() -> None:
    for table in (languages._EXTENSIONS, languages._FILENAMES, languages._INTERPRETERS, languages._ALIASES):
        assert set(table.values()) <= LANGUAGES
    for _, language in languages._FILENAME_PREFIXES:
        assert language in LANGUAGES
