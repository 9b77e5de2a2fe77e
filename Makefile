# trustfed: `make demo` and `make test` are all the setup a user needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo

.PHONY: all install demo test test-all lint typecheck bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first so that pip takes the CPU build.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[all,dev]"
	@touch $(STAMP)

install: $(STAMP)

# Node tools for the ledger (solcjs, anvil), pinned in package-lock.json; npm ci when missing.
NODE_STAMP := node_modules/.package-lock.json
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund

demo: $(STAMP)
	$(VENV)/bin/trustfed demo --out $(OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy src

test: $(STAMP) $(NODE_STAMP) lint typecheck
	$(PY) -m pytest -q

test-all: $(STAMP) $(NODE_STAMP) lint typecheck
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(PY) benchmarks/aggregators.py

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
