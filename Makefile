# Two commands do all set-up on a fresh machine (see README):
#   make up     start the system against the local broker
#   make test   install, lint, type-check and run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install services lint mypy pytest test up bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

services:
	scripts/ensure-services

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

mypy: install
	$(PY) -m mypy

pytest: install services
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint mypy pytest

up: install services
	scripts/run-local

bench: install services
	$(PY) -m bench
