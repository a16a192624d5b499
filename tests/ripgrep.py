"""ripgrep as the reference printer: a small tree, and ripgrep's bytes for what a command printed.

`TREE` is a handful of files whose matches of `PATTERN` make every shape of output: context
groups that overlap, touch and stand apart, matches on the first and last lines, two matches
on one line, multi-byte text before a match (byte offsets), a tab, quotes, a backslash and a
form feed (JSON escapes), CRLF line ends, and a file that does not match.
`ripgrep(root, flags, paths)` runs ripgrep over the files a command printed, in the order it
printed them (`printed_paths`; one thread, so ripgrep keeps that order); `comparable(output)`
blanks what cannot be equal (elapsed times, and counts of work ripgrep and the index do
differently) so that the rest is compared byte for byte.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

PATTERN = r"Pars(er|ing)"

_LONG = [f"line {n}" for n in range(1, 21)]
_LONG[0] = "Parser at the top"
_LONG[19] = "Parsing at the bottom"

TREE: dict[str, str] = {
    "docs/guide.md": "# Guide\n\nParsing is described here.\n\nNothing else.\n\x0cParsing, a new page\n",
    "src/alpha.txt": (
        "alpha\nbeta Parser\ngamma\ndelta\nepsilon\nzeta Parser Parser\neta\ntheta\n"
        "iota\nkappa\nlambda\nmu Parser\nnu\nxi\nomicron\npi\nrho\nsigma\ntau\nupsilon Parsing\n"
    ),
    "src/cafe.py": (
        '# café\ndef café_Parser():\n\treturn \'naïve Parsing\'  # two\nprint(1)\nprint("Parser", "\\\\")\n'
    ),
    "src/crlf.txt": "one\r\nParser two\r\nthree\r\nfour\r\nfive\r\nsix\r\nParsing seven\r\n",
    "src/edges.txt": "\n".join(_LONG) + "\n",
    "src/nothing.txt": "no match in here\nat all\n",
    "tests/test_parse.py": "from src import Parser\n\n\ndef test():\n    assert Parser\n",
}


def write_tree(root: Path) -> Path:
    """write_tree writes TREE under `root` and returns it."""
    for path, text in TREE.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, "utf-8")
    return root


def printed_paths(stdout: bytes, as_json: bool) -> list[str]:
    """printed_paths lists the files a command printed, in its order."""
    if as_json:
        rows = [json.loads(line) for line in stdout.splitlines()]
        return [row["data"]["path"]["text"] for row in rows if row["type"] == "begin"]
    paths: list[str] = []
    for line in stdout.decode().splitlines():
        found = re.match(r"^(.+?)[:-]\d+[:-]", line)
        if found and (not paths or paths[-1] != found[1]):
            paths.append(found[1])
    return paths


def ripgrep(root: Path, flags: list[str], paths: list[str]) -> bytes:
    """ripgrep runs `rg` over `paths` (relative to `root`) in that order, as our commands print."""
    command = ["rg", "--no-heading", "--line-number", "--color", "never", "--threads", "1", *flags]
    proc = subprocess.run(
        [*command, "-e", PATTERN, "--", *paths], cwd=root, capture_output=True, check=False, timeout=60
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout


def matching_paths(root: Path) -> set[str]:
    """matching_paths is the set of files ripgrep finds PATTERN in."""
    proc = subprocess.run(["rg", "-l", "-e", PATTERN], cwd=root, capture_output=True, check=True, timeout=60)
    return set(proc.stdout.decode().splitlines())


_ELAPSED = re.compile(rb'"(elapsed|elapsed_total)":\{[^}]*\}')
_SEARCHED = re.compile(rb'"(bytes_searched|searches)":\d+')


def comparable(output: bytes, *, sizes_known: bool) -> bytes:
    """comparable blanks elapsed times, and the summary's files and bytes searched.

    ripgrep searches only the files it was given where the index also verifies candidates
    that do not match; per file, `bytes_searched` is compared when the source knows sizes.
    """
    lines = []
    for line in output.splitlines(keepends=True):
        line = _ELAPSED.sub(rb'"\1":{}', line)
        if line.startswith(b'{"data":') or not sizes_known:
            line = _SEARCHED.sub(rb'"\1":0', line)
        lines.append(line)
    return b"".join(lines)


def record_types(output: bytes) -> list[str]:
    """record_types lists the `type` of each JSON record printed."""
    return [json.loads(line)["type"] for line in output.splitlines()]
