# one2one — `make demo` and `make test` each set up everything they need.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DATA   ?= data/movielens
DEMO   ?= .demo
BUILD_DEPS := setuptools wheel "cython>=3.0" "numpy>=1.26" "grpcio-tools>=1.60"
# Every install (here, CI, deploy/Dockerfile) is pinned by the lock, so a new upstream
# release changes nothing until `make lock` is re-run and its diff reviewed.
LOCK   := requirements/constraints.txt

.PHONY: help venv install build demo test test-fast test-debug lint lock docs bench clean deps-system deps-node

help:
	@echo "make demo   - set up, build a bundle from MovieLens-100K, serve it, show rankings"
	@echo "make test   - set up and run the whole test suite"
	@echo "make test-fast - kernels and units only (no bundle builds, servers or promtool), under a minute"
	@echo "make lint   - ruff (lint and format), mypy, cython-lint"
	@echo "make lock   - re-pin $(LOCK) from a fresh install"
	@echo "make bench  - benchmarks (figures printed and written under bench/out)"
	@echo "make deps-system - Debian tools the tests run (prometheus, e2fsprogs, util-linux, mount, nodejs, npm, redis-server, java)"
	@echo "make deps-node - npm packages the tests run (typescript, @grafana/schema) into build/node"
	@echo "make docs   - regenerate the settings tables in docs/ from the config classes"

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamp: reinstall when the build inputs change.
$(VENV)/.installed: $(VENV)/bin/python setup.py pyproject.toml $(LOCK) $(wildcard ranking/kernels/*.pyx server/*.pyx) ranking/kernels/_typedefs.pxd $(wildcard proto/one2one/v1/*.proto)
	$(PIP) install -q -c $(LOCK) $(BUILD_DEPS)
	$(PIP) install -q -c $(LOCK) --no-build-isolation -e ".[test,report,lint,spark]"
	touch $@

venv install: $(VENV)/.installed

build: install
	$(PY) setup.py -q build_ext --inplace

$(DATA)/events.csv: | install
	$(PY) -m index_builder fetch-movielens --out $(DATA)

demo: install $(DATA)/events.csv
	$(PY) -m index_builder build --events $(DATA)/events.csv --items $(DATA)/items.csv \
	    --users $(DATA)/users.csv --out $(DEMO)/artifacts $(if $(CI),--quiet,)
	$(PY) -m server.demo --artifacts $(DEMO)/artifacts --items $(DATA)/items.csv

# System tools some tests need: Debian's prometheus (prometheus, promtool), e2fsprogs,
# util-linux and mount (a full tmpfs and a read-only ext4 image under the event log), nodejs
# and npm (tsc checks the Grafana dashboard), redis-server (the shared event store's tests), a Java
# 17 runtime (pyspark's: the portfolio run as a Spark job). Idempotent; CI runs it before the tests,
# which then never skip for want of them.
deps-system:
	@missing=""; \
	command -v promtool >/dev/null && command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v mkfs.ext4 >/dev/null || missing="$$missing e2fsprogs"; \
	command -v findmnt >/dev/null || missing="$$missing util-linux"; \
	command -v mount >/dev/null || missing="$$missing mount"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# npm packages the tests run (typescript, @grafana/schema), pinned by
# deploy/grafana/schema-check/package-lock.json, installed under build/ (never committed).
NODE_DIR := build/node
SCHEMA_CHECK := deploy/grafana/schema-check
$(NODE_DIR)/.installed: $(SCHEMA_CHECK)/package.json $(SCHEMA_CHECK)/package-lock.json
	@command -v npm >/dev/null || { echo "need npm on PATH: make deps-system"; exit 1; }
	mkdir -p $(NODE_DIR)
	cp $^ $(NODE_DIR)/
	cd $(NODE_DIR) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

deps-node: $(NODE_DIR)/.installed

# CI installs every tool the tests need; locally the npm packages too when npm is there.
test: install $(if $(CI),deps-system deps-node,$(if $(shell command -v npm),deps-node,))
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The edit loop: what is marked slow (bundle builds, real servers, promtool) is left out.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The kernels again, compiled with bounds checking on (CI runs this once).
test-debug: install
	ONE2ONE_CYTHON_DEBUG=1 $(PY) setup.py -q build_ext --inplace --force
	$(PY) -m pytest -q tests/ranking
	$(PY) setup.py -q build_ext --inplace --force

# ruff (lint and format), mypy (config in pyproject.toml), cython-lint over the kernels;
# cython-lint runs pycodestyle by name, so the venv's bin goes first on PATH.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	PATH="$(abspath $(VENV))/bin:$$PATH" cython-lint ranking/kernels/*.pyx ranking/kernels/*.pxd server/*.pyx

# Re-pin the lock: install from pyproject's ranges into a fresh venv and freeze it
# (pip itself is left out: the venv's own pip is upgraded before installing).
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q $(BUILD_DEPS)
	$(LOCK_VENV)/bin/pip install -q --no-build-isolation ".[test,report,lint,spark]"
	{ sed -n '/^#/p' $(LOCK); $(LOCK_VENV)/bin/pip freeze --all --exclude one2one | grep -v '^pip=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

# The settings tables in docs/ come from the config classes' field metadata (tests check them).
docs: install
	$(PY) -m server.config --markdown docs/operations.md
	$(PY) -m index_builder.config --markdown docs/builder.md

bench: install
	$(PY) -m bench.run

clean:
	rm -rf build $(VENV) $(DEMO) ranking/kernels/_scoring.cpp ranking/kernels/_rows.cpp ranking/kernels/*.so proto/one2one/v1/*_pb2*.py*
