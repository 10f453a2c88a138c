# Two commands do all set-up from a fresh clone:
#   make demo   runs veil's main job
#   make test   runs the tests (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VEIL_DATA_DIR ?= $(abspath ../shared/data)
export VEIL_DATA_DIR

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/veil demo

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks examples tools

test: lint
	$(PY) -m pytest
	VEIL_TEST_PARTIES=3 $(PY) -m pytest tests/mpc -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) benchmarks/pointer_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
