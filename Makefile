# srft developer commands. `make serve` sets everything up and starts the service on the
# embedded default; `make test` runs the whole suite (real Postgres and Redis, started by it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/srft serve

lint: $(STAMP)
	$(BIN)/ruff check app workers tests bench migrations
	$(BIN)/ruff format --check app workers

typecheck: $(STAMP)
	$(BIN)/mypy --strict app workers

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/labeling.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var
