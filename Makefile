# shotlabel: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
CARGO ?= cargo
VENV_STAMP := $(VENV)/.installed
# Deploy tools (SAM CLI, cargo-lambda with zig, cfn-lint, checkov) in their own virtualenv:
# they pin boto3 and friends at versions that clash with moto's.
DEPLOY_VENV ?= .venv-deploy
DEPLOY_VENV_STAMP := $(DEPLOY_VENV)/.installed
# Where cargo puts binaries (CARGO_TARGET_DIR when set).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)

.PHONY: help venv deploy-venv build build-lambda demo test test-rust test-python fmt fmt-check clippy lint
.PHONY: fuzz

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

# checkov pins boto3 exactly (3.3.30: boto3==1.35.49) and SAM CLI pins another exact boto3
# (1.170.0: boto3[crt]==1.43.108), so no single environment holds both: checkov gets a
# virtualenv of its own inside $(DEPLOY_VENV), linked into $(DEPLOY_VENV)/bin. Both come
# from the one pinned requirements file.
$(DEPLOY_VENV_STAMP): infra/python/requirements-deploy.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	grep -v '^checkov' infra/python/requirements-deploy.txt > $(DEPLOY_VENV)/requirements-main.txt
	$(DEPLOY_VENV)/bin/pip install --quiet --disable-pip-version-check -r $(DEPLOY_VENV)/requirements-main.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)/checkov
	grep '^checkov' infra/python/requirements-deploy.txt > $(DEPLOY_VENV)/requirements-checkov.txt
	$(DEPLOY_VENV)/checkov/bin/pip install --quiet --disable-pip-version-check -r $(DEPLOY_VENV)/requirements-checkov.txt
	ln -sf ../checkov/bin/checkov $(DEPLOY_VENV)/bin/checkov
	touch $@

deploy-venv: $(DEPLOY_VENV_STAMP)

build:
	$(CARGO) build --workspace --all-targets

# The Lambda bootstraps, as `sam deploy` uploads them: .aws-sam/build/<LogicalId>/bootstrap.
# SAM's rust-cargolambda builder runs `cargo lambda build --release --bin <Binary>` once per
# distinct build (a second function on the same Binary reuses the first's), in the source
# tree: x86_64-unknown-linux-gnu with panic=abort and target-cpu=haswell, linked by zig
# against an old glibc (provided.al2023 has 2.34). It honours CARGO_TARGET_DIR; all functions
# share LAMBDA_TARGET_DIR, and keep it from one run to the next, so a run compiles only what
# changed and links each binary. Its own directory, because none of its units match the
# test and dev builds, and so that it never waits for a `cargo build --release` elsewhere in
# the tree (cargo locks target/release, where the build scripts of both would go).
# No --cached: SAM would hash the whole CodeUri (`.`, target dirs included) on every run.
LAMBDA_TARGET_DIR ?= $(TARGET_DIR)/sam
build-lambda: $(DEPLOY_VENV_STAMP)
	PATH="$(CURDIR)/$(DEPLOY_VENV)/bin:$$PATH" CARGO_TARGET_DIR="$(LAMBDA_TARGET_DIR)" SAM_CLI_TELEMETRY=0 \
	  $(DEPLOY_VENV)/bin/sam build --template-file template.yaml --build-dir .aws-sam/build

demo: $(VENV_STAMP)
	$(CARGO) run --quiet -p shotlabel-cli -- local --images tests/data/screenshots

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

lint: fmt-check clippy

# template.yaml, linted offline: `sam validate --lint` (cfn-lint with SAM's transform; the region
# only selects the rules' resource specs, no credentials are needed), cfn-lint itself, and
# checkov with zero failed checks (every skip is justified beside its resource in the template).
.PHONY: lint-infra
lint-infra: $(DEPLOY_VENV_STAMP)
	SAM_CLI_TELEMETRY=0 $(DEPLOY_VENV)/bin/sam validate --lint --template-file template.yaml --region us-east-1
	$(DEPLOY_VENV)/bin/cfn-lint template.yaml
	$(DEPLOY_VENV)/bin/checkov --file template.yaml --framework cloudformation --skip-download --quiet --compact

test-rust: $(VENV_STAMP) $(DEPLOY_VENV_STAMP)
	$(CARGO) test --workspace --no-fail-fast

# The Python tests drive the emulator binary with the official openai and standardwebhooks packages.
# `cargo test --no-run` builds the emulator binary with the same features as test-rust does,
# so `make test` does not compile the dependencies a second time.
test-python: $(VENV_STAMP)
	$(CARGO) test --workspace --no-run --quiet
	BATCH_EMULATOR_BIN=$(TARGET_DIR)/debug/batch-emulator SHOTLABEL_BIN=$(TARGET_DIR)/debug/shotlabel $(VENV)/bin/python -m pytest tests/python -q

test: lint lint-infra test-rust test-python

# Fuzzing (docs/reliability.md): every cargo-fuzz target in fuzz/ for FUZZ_SECONDS each,
# starting from the committed seeds in fuzz/corpus/<target>/ (read only: what the fuzzer
# finds goes to fuzz/target/corpus/, crashes to fuzz/artifacts/). Any crash fails the run.
# cargo-fuzz is pinned and installed into .tools/. Its builds need nightly-only rustc
# flags (-Zsanitizer=address and the sanitizer-coverage passes); this machine and CI have
# the stable toolchain only, so RUSTC_BOOTSTRAP=1 lets stable rustc accept them, for these
# builds alone and in their own target directory (fuzz/target), never the main one.
# 16 codegen units: a much faster first build of the AWS SDK for a slightly slower fuzzer.
CARGO_FUZZ_VERSION := 0.13.2
TOOLS_DIR := $(CURDIR)/.tools
CARGO_FUZZ := $(TOOLS_DIR)/bin/cargo-fuzz
CARGO_FUZZ_STAMP := $(TOOLS_DIR)/.cargo-fuzz-$(CARGO_FUZZ_VERSION)
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := prepare_image output_lines webhook_request s3_event
FUZZ_BUILD_FLAGS := --codegen-units 16 --target-dir fuzz/target

$(CARGO_FUZZ_STAMP):
	$(CARGO) install --locked --force --root $(TOOLS_DIR) cargo-fuzz@$(CARGO_FUZZ_VERSION)
	touch $@

fuzz: $(CARGO_FUZZ_STAMP)
	RUSTC_BOOTSTRAP=1 $(CARGO_FUZZ) fuzz build $(FUZZ_BUILD_FLAGS)
	set -e; for target in $(FUZZ_TARGETS); do \
	  echo "== fuzz $$target ($(FUZZ_SECONDS) s)"; \
	  mkdir -p fuzz/target/corpus/$$target; \
	  RUSTC_BOOTSTRAP=1 $(CARGO_FUZZ) fuzz run $(FUZZ_BUILD_FLAGS) $$target \
	    fuzz/target/corpus/$$target fuzz/corpus/$$target -- -max_total_time=$(FUZZ_SECONDS); \
	done

# Benchmarks (docs/benchmarks.md, docs/scale.md): a release build of the CLI and the bench
# binary, then each figure's command. `make bench` runs them all: about half an hour on 2 cores,
# most of it moto serving the submit-memory, harvest, e2e, scale-submit, scale-harvest and export runs.
BENCH := $(TARGET_DIR)/release/shotlabel-bench
.PHONY: bench bench-build
bench-build:
	$(CARGO) build --release -p shotlabel-cli -p shotlabel-bench

bench: $(VENV_STAMP) bench-build
	$(BENCH) prep-vs-notebook
	$(BENCH) profile-prep
	$(BENCH) psnr
	$(BENCH) submit-memory --images 500
	$(BENCH) submit-memory --images 5000
	$(BENCH) harvest --lines 50000
	$(BENCH) e2e --images 1000
	$(BENCH) scale-submit --workers 1,2 --repeats 3
	$(BENCH) scale-submit --workers 1,2 --repeats 3 --submit-every-ms 25000
	$(BENCH) scale-harvest --store memory --latency-ms 20 --lines 10000 --rounds 2
	$(BENCH) scale-harvest --store moto --lines 4000 --rounds 2
	$(BENCH) export --labels 10000 --shotlabel $(TARGET_DIR)/release/shotlabel
