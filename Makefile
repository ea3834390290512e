# shotlabel: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
CARGO ?= cargo
VENV_STAMP := $(VENV)/.installed
# Where cargo puts binaries (CARGO_TARGET_DIR when set).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)

.PHONY: help venv build demo test test-rust test-python fmt fmt-check clippy lint

help:
	@echo "make demo   - run the local pipeline on the bundled sample screenshots (no AWS account)"
	@echo "make test   - install the pinned tools, then fmt check, clippy and every test"
	@echo "make venv   - install the pinned Python tools (moto server, openai, standardwebhooks, pytest) into $(VENV)"

# The pinned Python tools live in a project-local virtualenv; reinstalled when the pins change.
$(VENV_STAMP): infra/python/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r infra/python/requirements.txt
	touch $@

venv: $(VENV_STAMP)

build:
	$(CARGO) build --workspace --all-targets

demo: $(VENV_STAMP)
	$(CARGO) run --quiet -p shotlabel-cli -- local --images tests/data/screenshots

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

lint: fmt-check clippy

test-rust: $(VENV_STAMP)
	$(CARGO) test --workspace --no-fail-fast

# The Python tests drive the emulator binary with the official openai and standardwebhooks packages.
# `cargo test --no-run` builds the emulator binary with the same features as test-rust does,
# so `make test` does not compile the dependencies a second time.
test-python: $(VENV_STAMP)
	$(CARGO) test --workspace --no-run --quiet
	BATCH_EMULATOR_BIN=$(TARGET_DIR)/debug/batch-emulator SHOTLABEL_BIN=$(TARGET_DIR)/debug/shotlabel $(VENV)/bin/python -m pytest tests/python -q

test: lint test-rust test-python
