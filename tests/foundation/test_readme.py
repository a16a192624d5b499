"""The README stays true: generated sections are current, CI runs the README's test command, and
the operator examples run as written against a live `kotadb dev` stack."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.stack import StackInfo
from tests.harness import DevStack

ROOT = Path(__file__).resolve().parents[2]
# The ports `make dev` gives the services, which the README's examples use.
DEFAULT_SERVICE_PORTS = {"auth": 50051, "ingest": 50052, "search": 50053}


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


# Every line of the README's live-stack example, matched by its start, and what its output must
# contain. A line with no row here fails the test, so the README cannot gain an untested example.
EXAMPLES: dict[str, str] = {
    "STACK=": "",
    "KEY=": "",
    "ADMIN=": "",
    "curl -s localhost:8080/health": '{"status":"SERVING","services":{"auth":{"status":"SERVING"',
    'curl -s -H "Authorization: Bearer $KEY" localhost:8080/v1/usage': '"apiKeyId"',
    "curl -s localhost:8080/v1/usage": '"reason":"MISSING_CREDENTIALS"',
    ".venv/bin/kotadb keys create --name ci": "secret: kdb_live_",
    ".venv/bin/kotadb keys list": "  ci\n",
    ".venv/bin/grpcurl -plaintext localhost:50053 list": "kotadb.v1.SearchService",
    ".venv/bin/grpcurl -plaintext localhost:50053 describe": "rpc SearchCode",
    ".venv/bin/grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check": '"status": "SERVING"',
    '.venv/bin/grpcurl -plaintext -H "authorization: Bearer $ADMIN"': '"name": "ops"',
    # The gateway's JSON is compact (one line per message: WatchJob streams NDJSON).
    'curl -s -H "Authorization: Bearer $ADMIN" localhost:8080/v1/apiKeys': '"name":"ci"',
    ".venv/bin/kotadb status": "/stats/prometheus",  # and exit 0: every component ok
    # "Put code in"
    ".venv/bin/kotadb repos list": "kotadb/kotadb",
    ".venv/bin/kotadb repos sync kotadb/kotadb --watch": "SUCCEEDED: ",
    ".venv/bin/kotadb jobs list": "SUCCEEDED",
    ".venv/bin/kotadb push docs --prefix notes": "revision ",
    ".venv/bin/kotadb push docs --prefix notes --prune": "sent 0 files",
    ".venv/bin/kotadb repos add me/notes": "webhook secret  ",
    ".venv/bin/kotadb repos rm me/notes": "deleted me/notes",
}
MARK = "@@README@@"


def live_examples() -> list[str]:
    """live_examples is the command lines of the first sh block under "Operator examples", then
    those of the first under "Put code in"."""
    readme = (ROOT / "README.md").read_text()
    lines: list[str] = []
    for heading in ("## Operator examples", "## Put code in"):
        section = readme.split(heading, 1)[1]
        block = section.split("```sh\n", 1)[1].split("```", 1)[0]
        lines += [line for line in block.splitlines() if line.strip()]
    return lines


def _expectation(line: str) -> str:
    matches = [prefix for prefix in EXAMPLES if line.startswith(prefix)]
    assert matches, f"README example with no expected output in this test: {line}"
    return EXAMPLES[max(matches, key=len)]


def _on_stack(line: str, stack: StackInfo) -> str:
    """_on_stack points a README line (written for `make dev`'s defaults) at the test's stack."""
    ports = {
        "localhost:8080": stack.gateway.removeprefix("http://"),
        "localhost:9901": stack.envoy_admin.removeprefix("http://"),
        **{f"localhost:{port}": stack.grpc[name] for name, port in DEFAULT_SERVICE_PORTS.items()},
        "~/.cache/kotadb/dev": shlex.quote(stack.data_dir),
    }
    for written, real in ports.items():
        line = line.replace(written, real)
    return line


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    stack = DevStack(tmp_path_factory.mktemp("readme") / "dev", "--gateway-port", "0")
    try:
        stack.wait_for_stack()
        yield stack
    finally:
        stack.kill_if_running()


def test_the_operator_examples_work_as_written(dev: DevStack) -> None:
    stack = dev.info()
    lines = live_examples()
    assert "curl -s localhost:8080/health" in "\n".join(lines)
    assert lines[0] == "STACK=~/.cache/kotadb/dev/stack.json"  # the default data dir, as documented
    script = ["set -euo pipefail"]
    for number, line in enumerate(lines):
        _expectation(line)
        # Each command's output is framed by markers, so it can be checked on its own.
        script += [f"echo {MARK}{number}", _on_stack(line, stack), "echo"]
    env = dict(os.environ)
    # As next to `make dev`: no database URL, the dev stack found by the default data dir.
    env.pop("KOTADB_DATABASE_URL", None)
    env["KOTADB_DEV_DATA_DIR"] = stack.data_dir
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"a README example failed:\n{done.stdout}\n{done.stderr}"
    outputs = done.stdout.split(MARK)[1:]
    assert len(outputs) == len(lines)
    for line, output in zip(lines, outputs, strict=True):
        assert _expectation(line) in output, f"{line}\nprinted:\n{output}"
