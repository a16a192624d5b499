"""The README stays true: generated sections are current and CI runs the README's test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_sections_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/readme_config.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in readme
    assert "\nmake test\n" in ci


def test_every_unimplemented_rpc_is_listed() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import readme_config
    finally:
        sys.path.pop(0)
    listed = readme_config.unimplemented_list()
    readme = (ROOT / "README.md").read_text()
    for line in listed.splitlines():
        assert line in readme
