# trustfed: `make demo` and `make test` are all the setup a user needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo
# test processes for make test (pytest-xdist; each test file runs whole on one of them); 0 runs in-process
TEST_JOBS ?= 2

.PHONY: all install demo test test-all lint typecheck bench clean etcd chromium

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first so that pip takes the CPU build.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[all,dev]"
	$(PY) -m compileall -q src >/dev/null  # bytecode, as a wheel install has it (an editable one does not)
	@touch $(STAMP)

install: $(STAMP)

# Node tools for the ledger (solcjs, anvil), pinned in package-lock.json; npm ci when missing.
NODE_STAMP := node_modules/.package-lock.json
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund

demo: $(STAMP)
	$(VENV)/bin/trustfed demo --out $(OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy src

# etcd for the etcd-lease tests (apt's etcd-server when run as root; otherwise those tests skip and say why).
etcd:
	@command -v etcd >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq etcd-server || (apt-get update -qq && apt-get install -y -qq etcd-server)) >/dev/null 2>&1 \
	      || echo "could not install etcd-server: the etcd lease tests will be skipped"; \
	  else echo "etcd is not installed: the etcd lease tests will be skipped (apt-get install etcd-server)"; fi; }

# Debian's chromium and chromedriver for the dashboard's browser test (apt-get when run as root; otherwise
# that test is skipped and says why). Never a browser downloaded by a tool: this uses the system's package.
chromium:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq chromium chromium-driver || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)) >/dev/null 2>&1 \
	      || echo "could not install chromium: the dashboard's browser test will be skipped"; \
	  else echo "chromium is not installed: the dashboard's browser test will be skipped (apt-get install chromium chromium-driver)"; fi; }

test: $(STAMP) $(NODE_STAMP) etcd chromium lint typecheck
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

test-all: $(STAMP) $(NODE_STAMP) etcd chromium lint typecheck
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "slow or not slow"

bench: $(STAMP)
	$(PY) benchmarks/aggregators.py

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
