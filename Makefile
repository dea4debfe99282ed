# The two commands of the README: `make serve` and `make test`. Both start from a
# clean clone: they create .venv and install everything the project needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Python sources that lint covers (two scripts are Python without a .py suffix).
PY_SOURCES := src tests service.py scripts/quantization_report.py scripts/bench-http scripts/bench-peers scripts/bench-stages scripts/soak
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: setup serve test lint image clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU build (see pyproject); export + dev extras for tests and release.
	$(BIN)/pip install --quiet -e '.[export,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

serve: setup
	./scripts/serve

lint: setup
	$(BIN)/ruff format --check $(PY_SOURCES)
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/mypy

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest

# The CPU image with podman, from nothing (docs/bento.md); SIGNING_KEY=release.pem signs the release.
image: setup
	./scripts/build-image $(if $(SIGNING_KEY),--signing-key $(SIGNING_KEY))

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
