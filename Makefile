# Two commands for a newcomer: `make demo` and `make test`. Both create the virtualenv, install
# the project, and start the local stack (Kafka KRaft, Redis + Redis Cluster, PostgreSQL) first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv stack-up stack-down stack-status stack-clean topics test test-unit demo bench bench-latency bench-entitlement lint format

help:
	@echo "make demo        set up, start the stack, run the worker on a simulated workload,"
	@echo "                 then serve the admin page (its URL and token are printed)"
	@echo "make test        set up, start the stack, run the whole test suite"
	@echo "make lint        ruff check, ruff format --check, mypy --strict (worker/, schemas/, devstack/)"
	@echo "make stack-up    start Kafka, Redis (+cluster) and PostgreSQL under .stack/"
	@echo "make stack-down  stop them"
	@echo "make stack-clean stop them and delete their data (.stack/)"
	@echo "make bench       end-to-end benchmark"
	@echo "make bench-latency pause latency under steady traffic, beside both backlog shapes"
	@echo "make bench-entitlement entitlement requests/s and latency at 2,000/s, alone and beside a worker"

venv: $(STAMP)

# Reinstall only when the dependency list changes; the project itself is installed editable.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python >= 3.11"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is required ($(PYTHON) is older)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

stack-up: venv
	$(PY) -m devstack.stack up --cluster

stack-down:
	@if [ -x $(PY) ]; then $(PY) -m devstack.stack down; else echo "no virtualenv: nothing was started"; fi

# Throws away all local data (Kafka topics, Redis, PostgreSQL); jars come back from ~/.m2.
stack-clean: stack-down
	rm -rf .stack

stack-status: venv
	$(PY) -m devstack.stack status

topics: stack-up
	$(PY) -m devstack.stack topics

test: venv stack-up
	$(PY) -m devstack.stack browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The story, then the admin page with a token (Ctrl-C ends it); DEMO_ARGS= for the story only.
DEMO_ARGS ?= --serve
demo: venv stack-up topics
	$(PY) -m devstack.demo $(DEMO_ARGS)

bench-latency: venv stack-up
	$(PY) -m bench.latency --shapes

# Alone, then beside a worker taking 2,000 usage events/s (the pipeline it shares cores with).
bench-entitlement: venv stack-up
	$(PY) -m bench.entitlement
	$(PY) -m bench.entitlement --worker-rate 2000 --batch-rate 0 --seconds 20

bench: venv stack-up
	@if [ -f bench/__main__.py ]; then $(PY) -m bench; \
	elif [ -f bench/run.py ]; then $(PY) bench/run.py; \
	else echo "no benchmark entry point (bench/__main__.py or bench/run.py)"; exit 1; fi

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
