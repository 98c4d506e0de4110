# `make demo` runs the main job on the shipped sample images; `make test` runs lint, types and tests.
# Both create and reuse a local virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e '.[test]' -c .ci/constraints.txt
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/rsprune-data demo --out demo_out

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check rsprune_data tests benchmarks examples
	$(VENV)/bin/ruff format --check rsprune_data tests benchmarks examples
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/selection_speed.py

clean:
	rm -rf $(VENV) demo_out results .pytest_cache .mypy_cache .ruff_cache .hypothesis
