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

# Files held to `ruff format`; after the tree-wide `ruff format rsprune_data tests benchmarks examples`
# this becomes the four folders themselves.
FORMATTED := rsprune_data/_fsio.py rsprune_data/_version.py rsprune_data/index_check.py \
	rsprune_data/state_check.py tests/test_index_check.py tests/test_safe_output.py \
	tests/test_state_check.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check rsprune_data tests benchmarks examples
	$(VENV)/bin/ruff format --check $(FORMATTED)
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/selection_speed.py

clean:
	rm -rf $(VENV) demo_out results .pytest_cache .mypy_cache .ruff_cache .hypothesis
