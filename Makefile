# The two commands of the README: `make serve` and `make test`. Both start from a
# clean clone: they create .venv and install everything the project needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Python sources that lint covers (two scripts are Python without a .py suffix).
PY_SOURCES := src tests service.py scripts/quantization_report.py scripts/test_times.py scripts/bench-http scripts/bench-peers scripts/bench-stages scripts/bench-corpus scripts/bench-rerank scripts/soak
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
# Test reports: JUnit XML of every run (durations are printed too: docs/benchmarks/test-time.md).
REPORTS := build/test-reports
PYTEST := env HF_HUB_OFFLINE=1 $(BIN)/pytest
# Each phase prints its wall time ("phase NAME: N s"), so a CI log says where minutes go.
PHASE := scripts/phase

.PHONY: setup serve test test-fast lint image clean _install

# Python byte-compiles each module the first time it is imported and keeps it, in every
# recipe: a machine that sets PYTHONDONTWRITEBYTECODE would otherwise recompile torch in
# every process (and compiling the whole venv ahead took 53 s; docs/benchmarks/test-time.md).
unexport PYTHONDONTWRITEBYTECODE

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PHASE) install $(MAKE) --no-print-directory _install
	rm -f $(VENV)/.installed-*
	touch $@

_install:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build (see pyproject); export + dev extras for tests and release,
	# openvino for the second CPU runtime (its variants and tests), batch for embed-corpus (Parquet,
	# Ray), train for the reranker recipe's trainer (its test trains a few steps).
	scripts/install $(VENV) -e '.[export,dev,openvino,batch,train]'

serve: setup
	./scripts/serve

# mypy's cache outside the clone: a fresh clone on a machine that ran it before checks only
# what changed (mypy validates each entry by the file's hash).
MYPY_CACHE_DIR ?= $(HOME)/.cache/embedkit-mypy
lint: setup
	$(BIN)/ruff format --check $(PY_SOURCES)
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/mypy --cache-dir $(MYPY_CACHE_DIR)

# Every tier; the timed tier (latency, memory, soak) runs alone, after the rest. The rest
# runs in TEST_WORKERS pytest-xdist workers, a module per worker at a time (module-scoped
# servers stay one per module): measured on 2 cores in docs/benchmarks/test-time.md.
# A machine's first run also makes the image tests' base (debootstrap, ~2 min, mostly one
# core): started first, in the background, it overlaps the install and lint (one core each);
# the image tests' scripts/build-image waits for it (a lock) and finds it made. Its log:
# build/image/base-early.log. Debian's redis-server (the quota store's tests run a real one)
# is installed first when missing, so its apt-get never meets the base build's.
TEST_WORKERS ?= 2
test:
	@scripts/ensure-apt redis-server:redis-server
	@mkdir -p build/image; scripts/build-image --base-only >build/image/base-early.log 2>&1 &
	@$(MAKE) --no-print-directory setup
	@$(PHASE) lint $(MAKE) --no-print-directory lint
	@$(PHASE) tests $(PYTEST) -m "not timed" -n $(TEST_WORKERS) --dist loadfile --durations=30 --junitxml=$(REPORTS)/junit.xml
	@$(PHASE) timed-tests $(PYTEST) -m timed --durations=10 --junitxml=$(REPORTS)/junit-timed.xml

# The unit tier: the edit loop (no lint, no server, no release, no image).
test-fast: setup
	$(PYTEST) -m unit -n $(TEST_WORKERS) --dist loadfile --durations=10 -q

# The CPU image with podman, from nothing (docs/bento.md); SIGNING_KEY=release.pem signs the release.
image: setup
	./scripts/build-image $(if $(SIGNING_KEY),--signing-key $(SIGNING_KEY))

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
