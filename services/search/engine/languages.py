"""Language detection and file classification for indexing, `lang:` filters and ranking.

`detect_language` names a file's language from, in order: its exact file name (`Makefile`,
`Dockerfile`, `Kconfig`, `BUILD`, ...), its file-name pattern (`Makefile.lib`, `Kconfig.debug`,
`Dockerfile.dev`), its extension, and finally a `#!` line for extension-less scripts. The
result is a short lower-case name (`"python"`, `"cpp"`, `"shell"`, ...) or `""` when unknown.

A `.h` header is C unless its first 16 KiB show C++ markers at the start of a line
(`namespace x {`, `template <`, `class X ... {`, `#include <iostream>`-style standard headers,
`extern "C++"`); without content it is C. The sniff is deliberately simple: it misfiles a C++
header that uses none of those markers, which only costs it C++-only symbol kinds.

`normalize_language` maps what users type after `lang:` (`py`, `golang`, `c++`, `js`,
an extension such as `hpp`) to the same names. `is_generated`, `is_vendored` and `is_test`
are the predicates ranking uses to push such files down.
"""

from __future__ import annotations

import posixpath
import re

# Canonical names known to the engine, for `lang:` validation and listings.
LANGUAGES: frozenset[str] = frozenset(
    {
        "assembly", "awk", "batch", "c", "clojure", "cmake", "cpp", "csharp", "css", "csv",
        "dart", "devicetree", "diff", "dockerfile", "elixir", "erlang", "fortran", "go",
        "graphql", "groovy", "haskell", "hcl", "html", "ini", "java", "javascript", "json",
        "julia", "kconfig", "kotlin", "latex", "less", "lex", "linkerscript", "lisp", "lua",
        "makefile", "markdown",
        "nix", "objective-c", "ocaml", "perl", "php", "powershell", "protobuf", "python", "r",
        "rst", "ruby", "rust", "scala", "scss", "shell", "sql", "starlark", "svelte", "swift",
        "tcl", "text", "toml", "tsx", "typescript", "vim", "vue", "xml", "yacc", "yaml", "zig",
    }
)  # fmt: skip

_EXTENSIONS: dict[str, str] = {
    # Languages with symbol extraction.
    "py": "python", "pyi": "python", "pyw": "python", "pyx": "python",
    "js": "javascript", "mjs": "javascript", "cjs": "javascript", "jsx": "javascript",
    "ts": "typescript", "mts": "typescript", "cts": "typescript", "tsx": "tsx",
    "go": "go", "rs": "rust", "java": "java",
    "c": "c", "h": "c",
    "cc": "cpp", "cpp": "cpp", "cxx": "cpp", "c++": "cpp", "hh": "cpp", "hpp": "cpp",
    "hxx": "cpp", "h++": "cpp", "ipp": "cpp", "tpp": "cpp", "inl": "cpp",
    "rb": "ruby", "rake": "ruby", "gemspec": "ruby", "ru": "ruby",
    # Languages searchable with `lang:` but without symbols.
    "md": "markdown", "markdown": "markdown", "mdx": "markdown",
    "json": "json", "jsonc": "json", "json5": "json", "ipynb": "json",
    "yaml": "yaml", "yml": "yaml", "toml": "toml",
    "sh": "shell", "bash": "shell", "zsh": "shell", "ksh": "shell", "fish": "shell",
    "html": "html", "htm": "html", "xhtml": "html", "css": "css", "scss": "scss",
    "sass": "scss", "less": "less", "sql": "sql",
    "mk": "makefile", "mak": "makefile", "make": "makefile", "dockerfile": "dockerfile",
    "kt": "kotlin", "kts": "kotlin", "swift": "swift", "cs": "csharp", "php": "php",
    "scala": "scala", "sc": "scala", "pl": "perl", "pm": "perl", "t": "perl", "lua": "lua",
    "s": "assembly", "asm": "assembly", "S": "assembly",
    "dts": "devicetree", "dtsi": "devicetree", "rst": "rst", "rest": "rst",
    "txt": "text", "text": "text",
    "xml": "xml", "xsd": "xml", "xsl": "xml", "svg": "xml", "plist": "xml",
    "proto": "protobuf", "cmake": "cmake", "bzl": "starlark", "star": "starlark",
    "ini": "ini", "cfg": "ini", "conf": "ini", "diff": "diff", "patch": "diff",
    "awk": "awk", "bat": "batch", "cmd": "batch", "ps1": "powershell", "psm1": "powershell",
    "hs": "haskell", "ml": "ocaml", "mli": "ocaml", "ex": "elixir", "exs": "elixir",
    "erl": "erlang", "hrl": "erlang", "clj": "clojure", "cljs": "clojure", "dart": "dart",
    "m": "objective-c", "mm": "objective-c", "zig": "zig", "nix": "nix", "tf": "hcl",
    "hcl": "hcl", "graphql": "graphql", "gql": "graphql", "vue": "vue", "svelte": "svelte",
    "tex": "latex", "sty": "latex", "csv": "csv", "tsv": "csv", "groovy": "groovy",
    "gradle": "groovy", "jl": "julia", "f90": "fortran", "f": "fortran", "for": "fortran",
    "vim": "vim", "tcl": "tcl", "lisp": "lisp", "el": "lisp", "scm": "lisp", "r": "r", "R": "r",
    "y": "yacc", "yy": "yacc", "l": "lex", "ll": "lex", "lds": "linkerscript", "ld": "linkerscript",
}  # fmt: skip

_FILENAMES: dict[str, str] = {
    "Makefile": "makefile", "makefile": "makefile", "GNUmakefile": "makefile",
    "Kbuild": "makefile", "Build": "makefile", "Dockerfile": "dockerfile", "Containerfile": "dockerfile",
    "Gemfile": "ruby", "Rakefile": "ruby", "Guardfile": "ruby", "Podfile": "ruby",
    "Vagrantfile": "ruby", "Brewfile": "ruby", "Fastfile": "ruby", "Gemfile.lock": "text",
    "BUILD": "starlark", "BUILD.bazel": "starlark", "WORKSPACE": "starlark",
    "WORKSPACE.bazel": "starlark", "MODULE.bazel": "starlark", "Tiltfile": "starlark",
    "CMakeLists.txt": "cmake", "Kconfig": "kconfig", "SConstruct": "python",
    "SConscript": "python", "meson.build": "text", "Pipfile": "toml", "Cargo.lock": "toml",
    "go.mod": "text", "go.sum": "text", "Jenkinsfile": "groovy", "Justfile": "makefile",
    "justfile": "makefile", ".bashrc": "shell", ".bash_profile": "shell", ".zshrc": "shell",
    ".profile": "shell", ".gitignore": "text", ".dockerignore": "text",
    ".gitattributes": "text", ".editorconfig": "ini", "README": "text", "LICENSE": "text",
    "COPYING": "text", "CREDITS": "text", "MAINTAINERS": "text", "AUTHORS": "text",
    "CHANGES": "text", "NEWS": "text",
}  # fmt: skip

# File names that take a suffix (`Makefile.lib`, `Kconfig.debug`, `Dockerfile.dev`).
_FILENAME_PREFIXES: tuple[tuple[str, str], ...] = (
    ("Makefile.", "makefile"),
    ("Kconfig.", "kconfig"),
    ("Dockerfile.", "dockerfile"),
    ("Containerfile.", "dockerfile"),
)

_INTERPRETERS: dict[str, str] = {
    "python": "python", "pypy": "python", "sh": "shell", "bash": "shell", "zsh": "shell",
    "dash": "shell", "ksh": "shell", "ash": "shell", "fish": "shell", "ruby": "ruby",
    "node": "javascript", "nodejs": "javascript", "deno": "typescript", "bun": "javascript",
    "ts-node": "typescript", "tsx": "typescript", "perl": "perl", "lua": "lua", "php": "php",
    "awk": "awk", "gawk": "awk", "tclsh": "tcl", "Rscript": "r", "make": "makefile",
}  # fmt: skip

_ALIASES: dict[str, str] = {
    "py": "python", "python3": "python", "python2": "python",
    "js": "javascript", "node": "javascript", "jsx": "javascript", "ecmascript": "javascript",
    "ts": "typescript", "golang": "go", "rs": "rust",
    "c++": "cpp", "cplusplus": "cpp", "cxx": "cpp", "rb": "ruby",
    "sh": "shell", "bash": "shell", "zsh": "shell", "md": "markdown", "yml": "yaml",
    "c#": "csharp", "cs": "csharp", "kt": "kotlin", "asm": "assembly", "dts": "devicetree",
    "make": "makefile", "mk": "makefile", "docker": "dockerfile", "txt": "text",
    "plaintext": "text", "restructuredtext": "rst", "objc": "objective-c",
    "objectivec": "objective-c", "proto": "protobuf", "bazel": "starlark", "tex": "latex",
    "terraform": "hcl", "pwsh": "powershell",
}  # fmt: skip

# C++-only constructs at the start of a line; see the module docstring for why this is enough.
_CPP_HEADER_MARKERS = re.compile(
    rb"^[ \t]*(?:namespace\s+[\w:]*\s*\{|template\s*<|class\s+\w+[^;\n]*\{|"
    rb"#\s*include\s*<(?:iostream|string|vector|map|memory|algorithm|utility|functional)>|"
    rb'extern\s+"C\+\+"|(?:public|private|protected)\s*:)',
    re.MULTILINE,
)
_CPP_SNIFF_BYTES = 16 * 1024


def detect_language(path: str, content: bytes = b"") -> str:
    """detect_language returns the language name for a file, or "" when it is unknown.

    `path` may be relative or absolute with `/` separators; `content`, when given, lets
    extension-less scripts be recognised by their `#!` line and `.h` headers by C++ markers.
    """
    base = posixpath.basename(path)
    known = _FILENAMES.get(base)
    if known is not None:
        return known
    for prefix, language in _FILENAME_PREFIXES:
        if base.startswith(prefix):
            return language
    dot = base.rfind(".")
    if dot > 0:
        ext = base[dot + 1 :]
        language = _EXTENSIONS.get(ext) or _EXTENSIONS.get(ext.lower(), "")
        if language == "c" and ext == "h" and content and _looks_like_cpp(content):
            return "cpp"
        if language:
            return language
    if content.startswith(b"#!"):
        return _shebang_language(content)
    return ""


def _looks_like_cpp(content: bytes) -> bool:
    """_looks_like_cpp reports whether a header's opening bytes use C++-only syntax."""
    return _CPP_HEADER_MARKERS.search(content, 0, _CPP_SNIFF_BYTES) is not None


def _shebang_language(content: bytes) -> str:
    """_shebang_language names the interpreter of a `#!` line (`/usr/bin/env -S python3 -u`)."""
    end = content.find(b"\n", 0, 256)
    line = content[2 : end if end >= 0 else 256].decode("utf-8", "replace")
    words = line.split()
    if words and posixpath.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    if not words:
        return ""
    program = posixpath.basename(words[0])
    # Versioned interpreters (`python3.11`, `ruby2.7`, `perl5`) name the same language.
    stripped = program.rstrip("0123456789.")
    return _INTERPRETERS.get(program) or _INTERPRETERS.get(stripped, "")


def normalize_language(name: str) -> str | None:
    """normalize_language maps a `lang:` value to a canonical language name, or None.

    Canonical names, the aliases people type (`py`, `golang`, `c++`, `js`) and file
    extensions (`hpp`, `yml`) are all accepted, case-insensitively.
    """
    key = name.strip().lower()
    if not key:
        return None
    if key in LANGUAGES:
        return key
    alias = _ALIASES.get(key)
    if alias is not None:
        return alias
    return _EXTENSIONS.get(key.lstrip(".")) or None


_VENDOR_DIRS = frozenset(
    {
        "vendor", "vendors", "third_party", "third-party", "thirdparty", "3rdparty",
        "node_modules", "bower_components", "site-packages", "dist-packages", "Pods",
        "Carthage", ".venv", "venv", ".yarn", "jspm_packages",
    }
)  # fmt: skip

_TEST_DIRS = frozenset(
    {"test", "tests", "__tests__", "spec", "specs", "testdata", "testing", "selftests", "e2e"}
)

_TEST_FILE = re.compile(
    r"""^(?:
        test_.*\.py | .*_test\.py | conftest\.py
      | .*_test\.go
      | .*\.(?:test|spec)\.(?:js|jsx|mjs|cjs|ts|tsx|mts)
      | .*(?:Test|Tests|TestCase|IT)\.(?:java|kt|scala)
      | .*_(?:spec|test)\.rb
      | .*_tests?\.(?:rs|c|cc|cpp|h|hpp)
      | test_.*\.(?:c|cc|cpp)
    )$""",
    re.VERBOSE,
)

_GENERATED_FILE = re.compile(
    r"""(?:
        \.pb\.(?:go|h|cc|c)$ | _pb2(?:_grpc)?\.pyi?$ | \.pb\.gw\.go$ | _grpc\.pb\.go$
      | \.min\.(?:js|css)$ | \.bundle\.js$ | -bundle\.js$ | \.js\.map$ | \.generated\.\w+$
      | (?:^|/)(?:package-lock\.json|yarn\.lock|pnpm-lock\.yaml|Cargo\.lock|go\.sum
                 |poetry\.lock|Gemfile\.lock|composer\.lock|uv\.lock)$
      | _string\.go$ | zz_generated\.\w+\.go$
    )""",
    re.VERBOSE,
)

_GENERATED_MARKERS = re.compile(
    rb"(?:Code generated .* DO NOT EDIT|@generated\b|DO NOT EDIT|"
    rb"[Aa]uto-?generated|[Aa]utomatically generated|Generated by the protocol buffer compiler|"
    rb"This file (?:was|is) generated)",
)
_GENERATED_SNIFF_BYTES = 1024


def is_generated(path: str, content: bytes = b"") -> bool:
    """is_generated reports whether a file is machine-written (protobuf stubs, minified, lock files).

    Besides name patterns, the first KiB of `content` is checked for the usual markers: Go's
    `// Code generated ... DO NOT EDIT.`, `@generated`, "auto-generated" and friends.
    """
    if _GENERATED_FILE.search(path):
        return True
    return bool(content) and _GENERATED_MARKERS.search(content, 0, _GENERATED_SNIFF_BYTES) is not None


def is_vendored(path: str) -> bool:
    """is_vendored reports whether a path lies in a directory of third-party code (vendor/, node_modules/)."""
    parts = path.split("/")
    return any(part in _VENDOR_DIRS for part in parts[:-1])


def is_test(path: str) -> bool:
    """is_test reports whether a path is a test file or lies in a test directory."""
    parts = path.split("/")
    if any(part in _TEST_DIRS for part in parts[:-1]):
        return True
    return _TEST_FILE.match(parts[-1]) is not None
