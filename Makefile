# The two commands a newcomer needs: `make run` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
PROFILE ?= auto
NPROC ?= 2
PYTEST_ARGS ?=

.PHONY: install run test lint clean-runs

install:
	@bash launchers/setup_env.sh --profile $(PROFILE) --venv $(VENV)

run: install
	@NPROC=$(NPROC) VENV=$(VENV) bash launchers/run_demo.sh

test: install
	$(VENV)/bin/ruff check cstwa_dist tests launchers
	$(VENV)/bin/ruff format --check cstwa_dist tests launchers
	$(VENV)/bin/python -m pytest tests -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check cstwa_dist tests launchers
	$(VENV)/bin/ruff format --check cstwa_dist tests launchers

clean-runs:
	rm -rf runs
