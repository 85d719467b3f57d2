# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
# The CPU build of torch (it lies on these machines' disk); on a GPU machine pass a CUDA build,
# e.g. `make install TORCH=torch`. A plain `torch` requirement downloads several GB.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# checkov pins botocore and urllib3 apart from aiobotocore's pins: it gets a virtualenv of its own,
# inside .venv so that git ignores it and `make clean` removes it (tests/test_infra.py finds it).
TOOLS := $(VENV)/tools
# What the sidecar image installs (the core and the HTTP backends, no extras): the footprint
# benchmark runs the daemon from it, so that the extras above do not weigh on its figures.
SIDECAR := $(VENV)/sidecar

.PHONY: install sidecar test lint demo bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[local,dev,diffusers]'
	test -x $(TOOLS)/bin/checkov || { $(PYTHON) -m venv $(TOOLS) \
		&& $(TOOLS)/bin/python -m pip install --quiet 'checkov>=3.2,<4'; }
	touch $(STAMP)

sidecar: $(SIDECAR)/.installed

$(SIDECAR)/.installed: pyproject.toml
	test -x $(SIDECAR)/bin/python || $(PYTHON) -m venv $(SIDECAR)
	$(SIDECAR)/bin/python -m pip install --quiet --upgrade pip
	$(SIDECAR)/bin/python -m pip install --quiet -e .
	touch $@

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: install
	$(BIN)/sdworker demo

bench: install sidecar
	$(BIN)/python bench/run.py

bench-quick: install sidecar
	$(BIN)/python bench/run.py --quick

# Issue 6's chaos run: a few hundred jobs through faulty workers; the last line is its JSON report.
.PHONY: chaos
chaos: install
	$(BIN)/python bench/chaos.py --seed 1 --workers 3 --jobs 300

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
