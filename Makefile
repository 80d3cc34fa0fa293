# Everything runs from a local virtualenv that `make` creates on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install up certs test test-containers test-chaos lint fmt proto proto-check bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its dev extras

up: $(STAMP) ## Run the whole system locally (embedded NATS + Postgres unless NATS_URL/DATABASE_URL)
	$(BIN)/python -m devtools.up

test: $(STAMP) ## Run the test suite against real NATS and Postgres
	@rc=0; $(BIN)/pytest -q -ra || rc=$$?; \
	if [ -z "$$CHROMIUM_PATH" ] && ! command -v chromium >/dev/null 2>&1 \
	   && ! command -v chromium-browser >/dev/null 2>&1 && ! command -v google-chrome >/dev/null 2>&1; then \
	  echo "NOTE: no Chromium here, so the browser tests (tests/test_browser.py) were skipped:"; \
	  echo "      sudo apt-get install chromium   (or set CHROMIUM_PATH), then make test again"; \
	fi; exit $$rc

certs: $(STAMP) ## A local CA, NATS/Postgres certificates and NATS NKeys in .data/tls (TLS compose variant)
	PYTHONPATH=services $(BIN)/python -m devtools.certs --out .data/tls --for-containers

test-containers: $(STAMP) ## Build the image and run docker-compose.yml for real with podman (root)
	$(BIN)/python -m devtools.containers

test-chaos: $(STAMP) ## Run the long fault-injection variants too
	$(BIN)/pytest -q -ra -m chaos

lint: $(STAMP) ## ruff (format check + lint) and mypy
	$(BIN)/ruff format --check services tests
	$(BIN)/ruff check services tests
	$(BIN)/mypy

fmt: $(STAMP) ## Format and autofix with ruff
	$(BIN)/ruff format services tests
	$(BIN)/ruff check --fix services tests

proto: $(STAMP) ## Regenerate the betterproto2 code from protos/
	$(BIN)/python -m devtools.protogen

bench: $(STAMP) ## Run the benchmarks; figures go to bench-results/
	$(BIN)/python -m devtools.bench

clean: ## Remove the virtualenv, local data and caches
	rm -rf $(VENV) .data .cache .mypy_cache .ruff_cache .pytest_cache bench-results
