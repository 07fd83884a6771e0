# srft developer commands. `make serve` sets everything up and starts the service on the
# embedded default; `make test` runs the whole suite (real Postgres and Redis, started by it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The service (with tokenized exports) for `make serve`; everything, torch included, for tests.
SERVE_STAMP := $(VENV)/.installed-serve
STAMP := $(VENV)/.installed-dev

.PHONY: install serve test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[export]'
	touch $(SERVE_STAMP)

# torch is pinned (constraints.txt) in the same pip call, so nothing resolves another build.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,export,train]'
	touch $(STAMP) $(SERVE_STAMP)

install: $(STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/srft serve

lint: $(STAMP)
	$(BIN)/ruff check app workers tests bench migrations
	$(BIN)/ruff format --check app workers
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy --strict app workers

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/labeling.py
	$(BIN)/python bench/export.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var
