# KotaDB task runner. The two commands a newcomer needs:
#   make dev    start Postgres (embedded default), the three services and Envoy
#   make test   run every check CI runs (lint, types, buf, stub freshness, the test suite)
.PHONY: bootstrap dev test lint typecheck buf gen check-gen pytest clean

VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
DEV_ARGS ?=
PYTEST_ARGS ?=

bootstrap:
	@bash scripts/bootstrap.sh

dev: bootstrap
	$(VENV)/bin/kotadb dev $(DEV_ARGS)

test: bootstrap lint typecheck buf check-gen pytest

lint:
	$(VENV)/bin/ruff check services tests scripts
	$(VENV)/bin/ruff format --check services tests scripts
	$(VENV)/bin/lint-imports

typecheck:
	$(VENV)/bin/mypy

buf:
	BUF=$(BUF) bash scripts/buf.sh lint
	BUF=$(BUF) bash scripts/buf.sh breaking

gen: bootstrap
	$(PY) scripts/gen_protos.py

check-gen:
	$(PY) scripts/gen_protos.py --check

pytest:
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-envoy node_modules .pytest_cache .mypy_cache .ruff_cache
