# Two commands do all set-up on a fresh machine (see README):
#   make up     start the system against the local broker
#   make test   install, lint, type-check and run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install services browser lint mypy pytest chaos test up bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) browser

# The operator page's browser test drives Debian's chromium through chromedriver
# (tests/test_ops_page.py); a fresh machine (CI) gets them here, never at run time.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null; \
	fi

services:
	scripts/ensure-services

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

mypy: install
	$(PY) -m mypy

# Everything, the broker-fault tests (G8, G9; marker chaos) included in their
# bounded form (one round each); `make chaos` runs only those, longer with
# POLOS_CHAOS_ROUNDS=N.
PYTEST_ARGS ?=

pytest: install services
	$(PY) -m pytest $(PYTEST_ARGS)

chaos: install services
	$(PY) -m pytest -m chaos $(CHAOS_ARGS)

test: lint mypy pytest

up: install services
	scripts/run-local

bench: install services
	$(PY) -m bench
