# podbroker: `make demo` runs the whole thing locally; `make test` runs every check.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PODBROKER_CACHE ?= $(HOME)/.cache/podbroker
export UV_CACHE_DIR ?= $(PODBROKER_CACHE)/uv
EXTRAS := broker,airflow,postgres,dev

.PHONY: help venv binaries postgres-packages browser-packages lint typecheck imports check unit test demo bench bench-burst bench-scale bench-vault chaos lock clean

help:
	@echo "make demo   - local OpenBao + control plane + broker + example DAG runs + audit report"
	@echo "make test   - install everything needed, then ruff, mypy, import-linter and all tests"
	@echo "make bench  - launch latency benchmarks (printed tables)"
	@echo "make bench-burst - scale figures: bursts vs the floor, cleanup, policy, audit, memory"
	@echo "make bench-scale - scale-out: replicas on one audit store, many nodes and pods, a replica killed"
	@echo "make bench-vault - Vault requests and storage writes per launch, by kind (counts)"
	@echo "make chaos  - fault loops (kill, freeze, replicas) on the local stack, with figures"
	@echo "make lock   - re-resolve constraints.txt from pyproject.toml"

$(BIN)/uv:
	@echo "==> creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check uv==0.13.8

# podbroker plus its development stack (deploy/devstack: podbroker-dev, the test fixtures'
# servers), a separate distribution so the podbroker wheel never ships it.
$(VENV)/.installed: pyproject.toml constraints.txt deploy/devstack/pyproject.toml | $(BIN)/uv
	@echo "==> installing podbroker[$(EXTRAS)] and podbroker-devstack with pinned versions (constraints.txt)"
	$(BIN)/uv pip install --python $(BIN)/python -q -c constraints.txt -e ".[$(EXTRAS)]" \
	  -e deploy/devstack
	@touch $@

venv: $(VENV)/.installed

lock: | $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml --extra broker --extra airflow --extra postgres \
	  --extra dev --python-version 3.11 -c deploy/python-pins.txt -o constraints.txt \
	  --no-header --annotation-style line -q

# Control-plane binaries: built once from pinned Go modules into $(PODBROKER_CACHE),
# or taken from $$KUBEBUILDER_ASSETS.
binaries:
	@echo "==> control-plane binaries (etcd, kube-apiserver, controller-manager, scheduler, kubectl, kwok, helm)"
	@bash deploy/devstack/build-binaries.sh >/dev/null
	@bash deploy/devstack/build-binaries.sh helm >/dev/null

postgres-packages:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "$$PODBROKER_PG_BINDIR" ]; then \
	  echo "==> installing PostgreSQL from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi

# The UI tests drive a real headless browser (Debian's chromium).
browser-packages:
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then \
	  echo "==> installing chromium (headless browser for the UI tests) from Debian's packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

lint: venv
	$(BIN)/ruff check broker airflow_plugin tests deploy/devstack
	$(BIN)/ruff format --check broker airflow_plugin tests deploy/devstack

typecheck: venv
	$(BIN)/mypy

imports: venv
	$(BIN)/lint-imports

check: lint typecheck imports

unit: venv
	$(BIN)/pytest tests/unit -q

test: venv binaries postgres-packages browser-packages check
	$(BIN)/pytest tests -q -p no:cacheprovider --durations=20

demo: venv binaries postgres-packages
	$(BIN)/podbroker-dev demo

bench: venv binaries postgres-packages
	$(BIN)/python -m tests.bench.launch_latency

# Issue 14's Vault load per launch (counted on OpenBao); BENCH_VAULT_ARGS e.g. "-n 50"
bench-vault: venv binaries postgres-packages
	$(BIN)/python -m tests.bench.vault_load $(BENCH_VAULT_ARGS)

# Issue 15's figures in one run (several minutes); BENCH_BURST_ARGS e.g. "--bursts 50 --only burst"
bench-burst: venv binaries postgres-packages
	$(BIN)/python -m tests.bench.scale $(BENCH_BURST_ARGS)

# Issue 15, figure 7: replicas on one PostgreSQL audit store, many kwok nodes and pods in
# flight, one replica SIGKILLed; BENCH_SCALE_ARGS e.g. "--replicas 3 --nodes 200 --pods 1000"
bench-scale: venv binaries postgres-packages
	$(BIN)/python -m tests.bench.scale_out $(BENCH_SCALE_ARGS)

chaos: venv binaries postgres-packages
	$(BIN)/python -m tests.chaos

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
