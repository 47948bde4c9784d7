# The two commands of the README: `make test` and `make run`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= runs/default
PYTEST_WORKERS ?= 2

.PHONY: test run lint bench bench-peers clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q tests

run: $(STAMP)
	$(PY) -m alignment.main --config=configs/pipeline.py --workdir=$(WORKDIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check alignment configs launch tests bench
	$(VENV)/bin/ruff format --check alignment configs launch tests bench

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache runs
