"""readme_config.py — regenerates the README's generated sections; `--check` fails when stale.

Two sections are derived from the code so the README cannot drift from it:
* the configuration table, from the settings dataclasses (`describe_markdown`);
* the list of RPCs not built yet: every servicer method whose body raises `Unimplemented`
  (found with `ast`, so nothing is started or imported beyond the settings classes).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SERVICERS = {
    "kotadb.v1.AuthService": ROOT / "services/auth/servicer.py",
    "kotadb.v1.IngestService": ROOT / "services/ingest/servicer.py",
    "kotadb.v1.SearchService": ROOT / "services/search/servicer.py",
}


def config_table() -> str:
    """config_table renders every settings class as one markdown table."""
    from services.auth.config import AuthSettings
    from services.common.identity import IdentitySettings
    from services.common.settings import CommonSettings, describe_markdown
    from services.ingest.config import IngestSettings, IngestWorkerSettings
    from services.search.config import SearchSettings

    return describe_markdown(
        [CommonSettings, IdentitySettings, AuthSettings, IngestSettings, IngestWorkerSettings, SearchSettings]
    )


def _raises_unimplemented(func: ast.AsyncFunctionDef | ast.FunctionDef) -> str | None:
    """_raises_unimplemented returns the message of a top-level `raise Unimplemented(...)`, if any."""
    for stmt in func.body:
        if isinstance(stmt, ast.Raise) and isinstance(stmt.exc, ast.Call):
            callee = stmt.exc.func
            if isinstance(callee, ast.Name) and callee.id == "Unimplemented":
                arg = stmt.exc.args[0] if stmt.exc.args else None
                return ast.unparse(arg) if arg is not None else ""
    return None


def unimplemented_methods() -> dict[str, dict[str, str]]:
    """unimplemented_methods maps service → {RPC name → capability} for RPCs that raise Unimplemented."""
    found: dict[str, dict[str, str]] = {}
    for service, path in SERVICERS.items():
        methods = found.setdefault(service, {})
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for item in node.body:
                if isinstance(item, ast.AsyncFunctionDef | ast.FunctionDef) and item.name[:1].isupper():
                    message = _raises_unimplemented(item)
                    if message is not None:
                        capability = re.sub(r"^f?['\"]|['\"]$", "", message)
                        methods[item.name] = capability.split(", {DELIVERED_BY}")[0]
    return found


def unimplemented_list() -> str:
    """unimplemented_list renders `unimplemented_methods` as the README's bullet list."""
    lines = [
        f"* `{service}/{name}` — {capability}"
        for service, methods in unimplemented_methods().items()
        for name, capability in methods.items()
    ]
    if not lines:
        return "Every RPC in the v1 contracts is built."
    return "\n".join(lines)


def render(text: str) -> str:
    """render replaces both generated sections of the README text."""
    for name, body in (("config-table", config_table()), ("unimplemented", unimplemented_list())):
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        start, stop = text.index(begin) + len(begin), text.index(end)
        text = text[:start] + "\n" + body.strip() + "\n" + text[stop:]
    return text


def main() -> int:
    """main rewrites README.md, or with --check reports whether it is current."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = parser.parse_args()
    current = README.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("README.md is stale: run `.venv/bin/python scripts/readme_config.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
