# Kasparro: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow test-all lint format schema bench up down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools

run: $(STAMP) ## start the service on the embedded PostgreSQL (or DATABASE_URL)
	$(BIN)/kasparro serve

test: $(STAMP) ## the test suite (embedded PostgreSQL, or TEST_DATABASE_URL)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP) ## the fault-injection scenarios (kill, outage, hostile upstream, replicas)
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP) ## every test
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff, mypy --strict and the import layers (app > pipelines > observability > persistence > config)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

schema: $(STAMP) ## render alembic/schema.sql (an empty database's schema) after a new migration
	$(BIN)/python -c "from persistence.database import render_schema; print(render_schema(), end='')" > alembic/schema.sql

bench: $(STAMP) ## benchmarks against baselines measured in the same run (not part of test)
	$(BIN)/python -m bench.run

up: ## start PostgreSQL, the service, Prometheus and Grafana in containers (needs .env)
	docker compose up -d --build

down: ## stop the containers
	docker compose down

clean: ## remove the virtual environment and the embedded database
	rm -rf $(VENV) .data
