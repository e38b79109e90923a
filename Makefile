# Quick start: `make serve` in one terminal, then solve from another (see README).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9464
DB ?= ./secant.db

.PHONY: serve test deploy-check fuzz install protos lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamp is rebuilt when the dependency lists change; torch comes from the pinned CPU wheel.
$(VENV)/.installed-dev: $(BIN)/python pyproject.toml client/pyproject.toml
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed-dev

serve: install
	$(BIN)/secant serve --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT) --db $(DB)

# Debian's chromium for the dashboard's browser tests: Playwright drives it and downloads no
# browser of its own. Where it cannot be installed those tests skip, saying why.
$(VENV)/.installed-browser: | $(BIN)/python
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		chromium >/dev/null 2>&1; } || \
		echo "chromium could not be installed: the dashboard's browser tests will skip"
	@if command -v chromium >/dev/null 2>&1; then touch $@; fi

test: install $(VENV)/.installed-browser
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/python -m pytest -q -p no:cacheprovider --ignore=tests/deploy

# Offline deployment checks (compose, Kustomize, Prometheus, local Ray topology).
deploy-check: install
	./deploy/check.sh

protos: install
	$(BIN)/python scripts/gen_protos.py

lint: install
	$(BIN)/ruff check .

# A longer run of the suite's fuzzer against a gateway subprocess, watching its memory.
fuzz: install
	$(BIN)/python bench/fuzz.py --inputs 3000

bench: install
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python bench/solvers.py
	$(BIN)/python bench/objectives.py
	$(BIN)/python bench/service.py
	$(BIN)/python bench/callbacks.py
	$(BIN)/python bench/kfac.py

clean:
	rm -rf $(VENV) build *.egg-info
