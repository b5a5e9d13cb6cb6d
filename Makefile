# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates the repo-local .venv and installs the package first when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO_DIR ?= runs/demo
LINTED  := mmssl tests tools datasets

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmssl demo --out $(DEMO_DIR)

# a lint error (ruff: pyflakes, pycodestyle, import order, bugbear, pyupgrade) or a file that
# `ruff format` would change fails the tests, as in CI (.ci/run runs `make test`)
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

test: lint
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
