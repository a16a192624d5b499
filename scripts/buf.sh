#!/usr/bin/env bash
# buf.sh — runs buf on KotaDB's protos without network access.
#
#   bash scripts/buf.sh lint [DIR]        lint DIR/kotadb (default DIR: protos) with protos/buf.yaml
#   bash scripts/buf.sh breaking [REF]    check the working tree's protos against REF's
#                                         (default: $BUF_AGAINST, else main, else origin/main)
#
# Our protos import google/api, google/rpc and google/protobuf files. buf would fetch
# those from the BSR; instead protoc (from grpcio-tools) compiles everything against the
# copies installed with googleapis-common-protos and grpcio-tools into a
# FileDescriptorSet with source info (scripts/gen_protos.py --image), and buf reads that
# image, limited to kotadb/ so Google's own files are not judged by our rules.
#
# Environment: BUF (buf executable; default node_modules/.bin/buf, else buf on PATH),
# PYTHON (default .venv/bin/python, else python3), BUF_AGAINST (breaking's base ref).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

die() { echo "buf.sh: $*" >&2; exit 2; }

buf=${BUF:-}
if [ -z "$buf" ]; then
  if [ -x node_modules/.bin/buf ]; then buf=node_modules/.bin/buf
  elif command -v buf >/dev/null 2>&1; then buf=$(command -v buf)
  else die "buf not found: run scripts/bootstrap.sh (installs @bufbuild/buf from npm) or set BUF"
  fi
fi
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
config="$repo/protos/buf.yaml"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/kotadb-buf.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# image PROTO_ROOT OUT builds a buf-readable image of the protos under PROTO_ROOT.
image() {
  "$python" scripts/gen_protos.py --image "$2" --proto-root "$1"
}

cmd=${1:-}
case "$cmd" in
  lint)
    root=$(cd "${2:-$repo/protos}" && pwd) || die "no such proto directory: ${2:-}"
    image "$root" "$tmp/current.binpb"
    "$buf" lint "$tmp/current.binpb#format=binpb" --config "$config" --path kotadb
    echo "buf lint: ok"
    ;;
  breaking)
    ref=${2:-${BUF_AGAINST:-}}
    if [ -z "$ref" ]; then
      # The default base is main, or origin/main in clones (CI) without a local main.
      # A checkout with neither has nothing to compare against, which is not a failure.
      for candidate in main origin/main; do
        if git rev-parse --verify --quiet "$candidate^{commit}" >/dev/null; then ref=$candidate; break; fi
      done
      if [ -z "$ref" ]; then
        echo "buf breaking: no main or origin/main branch in this checkout; nothing to compare"
        exit 0
      fi
    fi
    git rev-parse --verify --quiet "$ref^{commit}" >/dev/null || die "unknown git ref: $ref"
    if [ -z "$(git ls-tree -r --name-only "$ref" -- protos/kotadb | grep '\.proto$' || true)" ]; then
      echo "buf breaking: $ref has no protos under protos/kotadb yet; nothing to compare"
      exit 0
    fi
    mkdir -p "$tmp/against"
    git archive "$ref" protos | tar -x -C "$tmp/against"
    image "$repo/protos" "$tmp/current.binpb"
    image "$tmp/against/protos" "$tmp/against.binpb"
    "$buf" breaking "$tmp/current.binpb#format=binpb" --against "$tmp/against.binpb#format=binpb" \
      --config "$config" --path kotadb
    echo "buf breaking: no breaking changes against $ref"
    ;;
  *)
    echo "usage: bash scripts/buf.sh lint | breaking [REF]" >&2
    exit 2
    ;;
esac
