"""gen_protos regenerates the Python stubs and the Envoy descriptor set from protos/.

Outputs, all derived from `protos/kotadb/v1/*.proto` and never edited by hand:

* `gen/python/kotadb/v1/<file>_pb2.py` and `<file>_pb2.pyi` for every proto file;
* `gen/python/kotadb/v1/<file>_pb2_grpc.py` and `<file>_pb2_grpc.pyi` for files that
  declare a service (the `.pyi` from mypy-protobuf types both the sync and the grpc.aio
  stubs and servicers, so services type-check under `mypy --strict`);
* `gen/python/kotadb/__init__.py`, `gen/python/kotadb/v1/__init__.py` (which records the
  grpcio-tools and mypy-protobuf versions used, since their output differs between
  releases) and `py.typed`;
* `deploy/envoy/kotadb.pb`, a FileDescriptorSet with every import included (plus
  `google/rpc/error_details.proto`, which Envoy's transcoder needs to render error
  details, and `google/api/httpbody.proto`) for the gateway's grpc_json_transcoder.

The `_pb2.pyi` stubs also come from mypy-protobuf rather than protoc's `--pyi_out`:
they type enum values, oneof names and `HasField` arguments precisely, and they are
what the `_pb2_grpc.pyi` stubs refer to.

Usage: `python scripts/gen_protos.py` rewrites the outputs; `--check` regenerates into
a temporary directory and exits with status 1, naming every stale, missing or extra
file, when the committed outputs differ (and naming a generator version mismatch when
that is the cause). `--output-root DIR` writes or checks outputs under DIR instead of
the repository. `--image FILE [--proto-root DIR]` only writes
a descriptor set with source info, which `scripts/buf.sh` lints and compares.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"

# Imported by nothing of ours but needed in the gateway's descriptor set: Envoy renders
# google.rpc.Status details only for types it can find there.
EXTRA_DESCRIPTOR_FILES = ("google/rpc/error_details.proto", "google/api/httpbody.proto")

GENERATED_DOCSTRING = '"""Generated code: do not edit (scripts/gen_protos.py)."""\n'
# The generators' output changes between releases, so the exact versions are recorded
# beside the code; --check names a mismatch instead of leaving a puzzling diff.
GENERATORS = ("grpcio-tools", "mypy-protobuf")
TOOLS_PREFIX = "# generated with: "


def package_files() -> dict[Path, str]:
    """Package_files are the package markers written around the generated modules."""
    tools = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in GENERATORS)
    return {
        Path("__init__.py"): GENERATED_DOCSTRING,
        Path("py.typed"): "",
        Path("v1/__init__.py"): f"{GENERATED_DOCSTRING}{TOOLS_PREFIX}{tools}\n",
    }


def recorded_tools(output_root: Path) -> str | None:
    """Recorded_tools reads the generator versions recorded under output_root, if any."""
    marker = output_root / "gen" / "python" / "kotadb" / "v1" / "__init__.py"
    if not marker.is_file():
        return None
    for line in marker.read_text(encoding="utf-8").splitlines():
        if line.startswith(TOOLS_PREFIX):
            return line.removeprefix(TOOLS_PREFIX)
    return None


@dataclass(frozen=True)
class IncludePaths:
    """IncludePaths are the protoc `-I` roots: our protos, googleapis and protobuf's own."""

    protos: Path
    googleapis: Path
    protobuf: Path

    def flags(self) -> list[str]:
        """Flags returns the `-I` arguments, ours first so they win any name clash."""
        return [f"-I{self.protos}", f"-I{self.googleapis}", f"-I{self.protobuf}"]


def package_dir(name: str) -> Path:
    """Package_dir finds an installed package's directory without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"gen_protos: package {name} is not installed; install the dev extra")
    return Path(next(iter(spec.submodule_search_locations)))


def include_paths(proto_root: Path = PROTO_ROOT) -> IncludePaths:
    """Include_paths locates the googleapis and protobuf .proto files in installed wheels.

    googleapis-common-protos ships `google/api/*.proto` and `google/rpc/*.proto` beside
    their modules, and grpcio-tools ships `google/protobuf/*.proto` in `grpc_tools/_proto`,
    so code generation needs no network and no vendored copies.
    """
    googleapis = package_dir("google.api").parent.parent
    protobuf = package_dir("grpc_tools") / "_proto"
    for root, probe in (
        (googleapis, "google/api/annotations.proto"),
        (protobuf, "google/protobuf/any.proto"),
    ):
        if not (root / probe).is_file():
            raise SystemExit(f"gen_protos: {probe} not found under {root}; is the dev environment installed?")
    return IncludePaths(protos=proto_root, googleapis=googleapis, protobuf=protobuf)


def proto_files(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Proto_files lists our .proto files relative to proto_root, sorted for determinism."""
    return sorted(p.relative_to(proto_root).as_posix() for p in proto_root.glob("kotadb/**/*.proto"))


def plugin(name: str) -> str:
    """Plugin finds a protoc plugin executable installed beside this interpreter or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise SystemExit(f"gen_protos: {name} not found; install the dev extra (mypy-protobuf)")
    return found


def protoc(args: Sequence[str]) -> None:
    """Protoc runs grpc_tools' bundled protoc and exits with its message on failure."""
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"gen_protos: protoc failed:\n{result.stderr}{result.stdout}")


def build_descriptor_set(out: Path, includes: IncludePaths, *, source_info: bool = False) -> None:
    """Build_descriptor_set writes a FileDescriptorSet of our protos with all their imports.

    With source_info the set keeps comments and spans, which `buf lint` needs; the
    gateway's copy leaves them out to stay small.
    """
    args = [*includes.flags(), "--include_imports", f"--descriptor_set_out={out}"]
    if source_info:
        args.append("--include_source_info")
    protoc([*args, *EXTRA_DESCRIPTOR_FILES, *proto_files(includes.protos)])


def files_with_services(descriptor_set: Path) -> set[str]:
    """Files_with_services names our proto files that declare at least one service."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    return {f.name for f in fds.file if f.service and f.name.startswith("kotadb/")}


def generate(out_root: Path) -> None:
    """Generate writes every output under out_root, mirroring the repository layout."""
    includes = include_paths()
    python_out = out_root / "gen" / "python"
    python_out.mkdir(parents=True)
    descriptor = out_root / "deploy" / "envoy" / "kotadb.pb"
    descriptor.parent.mkdir(parents=True)
    build_descriptor_set(descriptor, includes)

    protoc(
        [
            *includes.flags(),
            f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={python_out}",
            f"--mypy_out={python_out}",
            f"--grpc_python_out={python_out}",
            f"--mypy_grpc_out={python_out}",
            *proto_files(),
        ]
    )
    # grpc plugins emit a near-empty *_pb2_grpc module for every file; only the files
    # that declare services get one, so the package lists exactly the three services.
    with_services = files_with_services(descriptor)
    for name in proto_files():
        if name not in with_services:
            stem = name.removesuffix(".proto")
            for suffix in ("_pb2_grpc.py", "_pb2_grpc.pyi"):
                (python_out / f"{stem}{suffix}").unlink(missing_ok=True)
    for relative, text in package_files().items():
        (python_out / "kotadb" / relative).write_text(text, encoding="utf-8")


def output_files(root: Path) -> dict[str, Path]:
    """Output_files maps each generated file's repository-relative path to its location under root."""
    found: dict[str, Path] = {}
    package = root / "gen" / "python" / "kotadb"
    if package.is_dir():
        for path in sorted(package.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                found[path.relative_to(root).as_posix()] = path
    descriptor = root / "deploy" / "envoy" / "kotadb.pb"
    if descriptor.is_file():
        found[descriptor.relative_to(root).as_posix()] = descriptor
    return found


def differences(fresh_root: Path, output_root: Path) -> list[str]:
    """Differences lists how the outputs under output_root differ from a fresh generation."""
    fresh = output_files(fresh_root)
    current = output_files(output_root)
    problems: list[str] = []
    for name in sorted(fresh.keys() | current.keys()):
        if name not in current:
            problems.append(f"missing: {name}")
        elif name not in fresh:
            problems.append(f"extra (not generated): {name}")
        elif not filecmp.cmp(fresh[name], current[name], shallow=False):
            problems.append(f"stale: {name}")
    return problems


def install(fresh_root: Path, output_root: Path) -> list[str]:
    """Install copies changed outputs under output_root, removes extra ones, and lists changes."""
    fresh = output_files(fresh_root)
    current = output_files(output_root)
    changed: list[str] = []
    for name, path in fresh.items():
        target = output_root / name
        if name not in current or not filecmp.cmp(path, current[name], shallow=False):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            changed.append(f"wrote {name}")
    for name, path in current.items():
        if name not in fresh:
            path.unlink()
            changed.append(f"removed {name}")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """Main regenerates the outputs, or with --check reports stale ones; it returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the committed outputs are stale")
    parser.add_argument(
        "--image",
        type=Path,
        metavar="FILE",
        help="only write a FileDescriptorSet with source info to FILE (the input scripts/buf.sh gives buf)",
    )
    parser.add_argument(
        "--proto-root",
        type=Path,
        default=PROTO_ROOT,
        metavar="DIR",
        help="with --image, compile the protos under DIR instead of protos/ (e.g. another commit's)",
    )
    parser.add_argument(
        "--output-root",
        type=Path,
        default=REPO,
        metavar="DIR",
        help="write or check gen/python/kotadb and deploy/envoy/kotadb.pb under DIR (default: repository)",
    )
    args = parser.parse_args(argv)
    output_root = args.output_root.resolve()
    if args.image is not None:
        build_descriptor_set(args.image.resolve(), include_paths(args.proto_root.resolve()), source_info=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="kotadb-gen-") as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        if args.check:
            problems = differences(fresh_root, output_root)
            for problem in problems:
                print(problem, file=sys.stderr)
            committed, installed = recorded_tools(output_root), recorded_tools(fresh_root)
            if problems and committed != installed:
                print(
                    f"note: the committed code was generated with {committed}, but {installed} is installed;"
                    " install the versions pinned in pyproject.toml (or regenerate on purpose)",
                    file=sys.stderr,
                )
            if problems:
                print("generated code is out of date: run `python scripts/gen_protos.py`", file=sys.stderr)
                return 1
            print("generated code is up to date")
            return 0
        for line in install(fresh_root, output_root) or ["generated code already up to date"]:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
