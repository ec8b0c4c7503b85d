# The verbs people look for. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint format bench bench-readme clean

# The server and the client (`qaas` command, client/) side by side; `pip install ./client` alone gives the client.
$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./client -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start the API and one worker (embedded default: SQLite + filesystem broker under ./var); .venv/bin/qaas talks to it.
run: $(STAMP)
	$(PY) -m service.run

## Run the whole test suite (PostgreSQL/Redis tests skip with a reason when those are down), three at a
## time: most of the end-to-end tests wait on the processes they start, so three keep a 2-core machine busy.
test: $(STAMP)
	$(PY) -m pytest -n 3

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

## Benchmarks under bench/, each figure beside a baseline measured in the same run, recorded in
## bench/results/figures.json with its machine, commit and load; then the README's table from it.
bench: $(STAMP)
	$(PY) -m bench
	$(PY) -m bench --readme

## The README's Performance table, written from bench/results/figures.json.
bench-readme: $(STAMP)
	$(PY) -m bench --readme

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
