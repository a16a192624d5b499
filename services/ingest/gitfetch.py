"""git as a subprocess: fetch a repository's branch, diff two commits, check out a commit.

Every command runs through `asyncio.create_subprocess_exec` (never a shell) with a timeout
after which the process is killed, in a scrubbed environment: no terminal prompts
(`GIT_TERMINAL_PROMPT=0`, ssh in batch mode), no system or global git configuration, no hooks,
and only the transports the URL policy allows (`file` only with ALLOW_LOCAL_URLS).

Access tokens never appear on a command line, in a URL, in git's configuration or in an error:
the token sits in the child's environment (`KOTADB_GIT_TOKEN`, readable only by our own user)
and a credential helper given with `-c` prints it when git asks. The helper's text names the
variable, not its value, so `/proc/<pid>/cmdline` of git and of its children shows no secret.
Error messages carry git's exit status and a scrubbed first line of its stderr.

For https URLs, git connects only to the addresses the URL policy resolved and checked just
before (`http.curloptResolve`), so a host cannot rebind its DNS to a private address between
the check and the fetch.

Each repository has one working directory under the work dir (`<work_dir>/<repository id>`),
reused between syncs so incremental fetches are small; an exclusive `flock` on a lock file
beside it keeps two workers of one machine out of it at once. Fetches are partial
(`--filter=blob:none`: commits and trees, blobs only when checked out), so the previously
synced commit is usually present for `git merge-base --is-ancestor` and `git diff`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import re
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from services.common.errors import FailedPrecondition, Unavailable

TOKEN_VARIABLE = "KOTADB_GIT_TOKEN"
# The helper prints the token only for `get`; git runs `!` helpers through its own shell.
_HELPER = (
    '!f() { test "$1" = get || exit 0; echo username=x-access-token; '
    f'echo "password=${TOKEN_VARIABLE}"; }}; f'
)
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_STDERR_LIMIT = 64 * 1024


class GitError(Unavailable):
    """GitError is a git command that failed or timed out; retryable (the remote may come back)."""

    default_reason = "GIT_FAILED"


@dataclasses.dataclass(frozen=True)
class Change:
    """Change is one entry of `git diff --name-status`: status letter, path, and the old path of a rename."""

    status: str
    path: str
    old_path: str | None = None


def parse_name_status(output: bytes) -> list[Change]:
    """parse_name_status parses `git diff --name-status -z` output (renames and copies included)."""
    fields = output.split(b"\x00")
    if fields and fields[-1] == b"":
        fields.pop()
    changes: list[Change] = []
    index = 0
    while index < len(fields):
        status = fields[index].decode("ascii", "replace")
        letter = status[:1]
        if letter in ("R", "C"):
            old, new = fields[index + 1], fields[index + 2]
            changes.append(Change(letter, os.fsdecode(new), os.fsdecode(old)))
            index += 3
        else:
            changes.append(Change(letter, os.fsdecode(fields[index + 1])))
            index += 2
    return changes


class GitRepository:
    """GitRepository is one repository's working directory, driven by git subprocesses."""

    def __init__(
        self,
        directory: Path,
        *,
        url: str,
        timeout: float,
        allow_local: bool,
        pinned: tuple[str, int, Sequence[str]] | None = None,
    ) -> None:
        self.directory = directory
        self.url = url
        self.timeout = timeout
        self.allow_local = allow_local
        self.pinned = pinned

    def _environment(self, token: str | None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.directory.parent),
            "LC_ALL": "C",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_ASKPASS": "/bin/false",
            "SSH_ASKPASS": "/bin/false",
            "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
            "GIT_LFS_SKIP_SMUDGE": "1",
        }
        if token:
            env[TOKEN_VARIABLE] = token
        return env

    def _config(self) -> list[str]:
        allowed = ["https", "ssh"] + (["file"] if self.allow_local else [])
        options = [
            "-c", "protocol.allow=never",
            *[item for scheme in allowed for item in ("-c", f"protocol.{scheme}.allow=always")],
            "-c", "credential.helper=",
            "-c", f"credential.helper={_HELPER}",
            "-c", "core.hooksPath=" + os.devnull,
            "-c", "core.fsmonitor=false",
            "-c", "core.symlinks=true",
            "-c", "advice.detachedHead=false",
            "-c", "gc.auto=0",
        ]  # fmt: skip
        if self.pinned is not None:
            # https connects only to the addresses the URL policy checked (no DNS rebinding between
            # the check and git's own lookup); curl wants IPv6 addresses in brackets.
            host, port, addresses = self.pinned
            shown = ",".join(f"[{a}]" if ":" in a else a for a in addresses)
            options += ["-c", f"http.curloptResolve={host}:{port}:{shown}"]
        return options

    async def run(
        self, *args: str, token: str | None = None, check: bool = True, stdin: bytes | None = None
    ) -> tuple[int, bytes]:
        """run executes `git <args>` in the working directory; returns (exit status, stdout).

        With `check`, a non-zero status raises GitError. A command over the timeout is killed
        and raises GitError too.
        """
        # No preexec_fn, user, group or umask: with none, CPython execs git through vfork(), and
        # gRPC's fork handlers never run in this serving process (services/common/forksafety.py).
        process = await asyncio.create_subprocess_exec(
            "git",
            *self._config(),
            *args,
            cwd=self.directory,
            env=self._environment(token),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(stdin), self.timeout)
        except TimeoutError:
            _kill(process)
            await process.wait()
            raise GitError(
                f"git {args[0]} did not finish within {self.timeout:.0f}s", reason="GIT_TIMEOUT"
            ) from None
        except asyncio.CancelledError:
            _kill(process)
            with contextlib.suppress(Exception):
                await asyncio.shield(process.wait())
            raise
        status = process.returncode if process.returncode is not None else -1
        if check and status != 0:
            raise GitError(f"git {args[0]} failed (exit {status}): {self._scrub(stderr, token)}")
        return status, stdout

    def _scrub(self, stderr: bytes, token: str | None) -> str:
        text = stderr[:_STDERR_LIMIT].decode("utf-8", "replace")
        if token:
            text = text.replace(token, "***")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        first = next(
            (line for line in lines if line.startswith(("fatal:", "error:"))), lines[0] if lines else ""
        )
        return first[:300]

    async def _prepare(self) -> None:
        if not (self.directory / ".git").is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            await self.run("init", "--quiet")
        status, _ = await self.run("remote", "get-url", "origin", check=False)
        await self.run("remote", "set-url" if status == 0 else "add", "origin", self.url)

    async def remote_default_branch(self, *, token: str | None) -> str:
        """remote_default_branch asks the remote which branch its HEAD points at."""
        await self._prepare()
        _, output = await self.run("ls-remote", "--symref", "origin", "HEAD", token=token)
        for line in output.decode("utf-8", "replace").splitlines():
            if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
                return line[len("ref: refs/heads/") : -len("\tHEAD")]
        raise GitError("the remote has no default branch (empty repository?)", reason="GIT_NO_DEFAULT_BRANCH")

    async def fetch(self, branch: str, *, token: str | None) -> str:
        """fetch brings the branch's head (commits and trees) into the working directory; returns its sha."""
        await self._prepare()
        status, _ = await self.run("check-ref-format", f"refs/heads/{branch}", check=False)
        if status != 0 or branch.startswith("-"):
            raise FailedPrecondition(f"branch {branch!r} is not a valid branch name", reason="BRANCH_INVALID")
        tracking = f"refs/remotes/origin/{branch}"
        await self.run(
            "fetch", "--quiet", "--filter=blob:none", "--no-tags", "--no-recurse-submodules",
            "origin", f"+refs/heads/{branch}:{tracking}", token=token,
        )  # fmt: skip
        _, head = await self.run("rev-parse", "--verify", "--end-of-options", f"{tracking}^{{commit}}")
        return head.decode("ascii").strip()

    async def has_commit(self, sha: str) -> bool:
        """has_commit tells whether commit `sha` is present locally."""
        if not _SHA.match(sha):
            return False
        status, _ = await self.run("cat-file", "-e", f"{sha}^{{commit}}", check=False)
        return status == 0

    async def is_ancestor(self, old: str, new: str) -> bool:
        """is_ancestor tells whether `old` is an ancestor of (or equal to) `new`."""
        status, _ = await self.run("merge-base", "--is-ancestor", old, new, check=False)
        if status not in (0, 1):
            raise GitError(f"git merge-base failed (exit {status})")
        return status == 0

    async def diff(self, old: str, new: str) -> list[Change]:
        """diff lists the paths that differ between two commits, renames detected."""
        _, output = await self.run(
            "diff", "--name-status", "-z", "-M", "--no-ext-diff", "--no-textconv", old, new, "--"
        )
        return parse_name_status(output)

    async def checkout(self, sha: str, *, token: str | None) -> None:
        """checkout makes the working tree exactly commit `sha` (fetching its blobs)."""
        await self.run("checkout", "--quiet", "--force", "--detach", sha, token=token)
        await self.run("clean", "--quiet", "-ffdx")


@contextlib.asynccontextmanager
async def locked(directory: Path) -> AsyncIterator[None]:
    """locked holds an exclusive lock on `directory` (a lock file beside it) for the block.

    It raises GitError (retryable) when another process holds it, rather than waiting.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = directory.with_name(directory.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GitError(
                "another worker on this machine is using the repository's checkout", reason="CHECKOUT_BUSY"
            ) from None
        yield
    finally:
        os.close(fd)


def work_dir(setting: str) -> Path:
    """work_dir is the workers' checkout directory: the setting, or `kotadb-ingest-<uid>` in the temp dir."""
    if setting:
        return Path(setting).expanduser()
    return Path(tempfile.gettempdir()) / f"kotadb-ingest-{os.getuid()}"


def _kill(process: asyncio.subprocess.Process) -> None:
    # git runs helpers (remote-https, ssh, the credential helper) as children in its session.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, 9)
