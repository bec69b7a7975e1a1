# `make demo` and `make test` work on a fresh machine: they use the active virtual environment, or
# create ./.venv, install attnzoo into it and run.
PYTHON ?= python3
VENV ?= .venv
ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif
STAMP := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(VENV))/.attnzoo-installed

.PHONY: install install-recipes install-dev demo zoo test lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP)-base: setup.cfg pyproject.toml | $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP)-recipes: setup.cfg pyproject.toml | $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[recipes]'
	touch $@

# the tests cover the optional parts too (recipes, dense heads, medical), so they install every extra
$(STAMP)-dev: setup.cfg pyproject.toml | $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	touch $@

install: $(STAMP)-base

install-recipes: $(STAMP)-recipes

install-dev: $(STAMP)-dev

# train a zoo model on the embedded digits on this CPU, score it on the held-out split
demo: install-recipes
	$(PY) -m attnzoo.recipes.demo

# the zoo table: every registered model, its size, cost, paper figures and CPU latency
zoo: install
	$(PY) scripts/zoo_table.py

lint: install-dev
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -n 2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
