# The two commands: `make demo` (the whole pipeline on the built-in default, laptop mode)
# and `make test` (the test suite). Both create .venv and install into it when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-faults bench clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/ptmst-ray run

# two pytest-xdist workers, each with its own session Ray, take whole test modules in collection order
# (tests/conftest.py: FIRST; --no-loadscope-reorder: xdist would otherwise start the modules with most tests first)
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -x -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

test-faults: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m faults tests

clean-venv:
	rm -rf $(VENV)
