# synthperf: two commands for a newcomer — `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint bench venv tools demo-model clean images

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned: here it installs from the local CPU wheel.
	@$(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

tools:
	@bash deploy/dev/ensure_tools.sh
	@bash deploy/dev/ensure_ohif.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# checkov (policy checks of deploy/k8s) pins older releases of packages the service uses (packaging,
# networkx), so it lives in a venv of its own.
CHECKOV := .venv-checkov/bin/checkov
$(CHECKOV):
	@test -x .venv-checkov/bin/python || $(PYTHON) -m venv .venv-checkov
	@.venv-checkov/bin/python -m pip install -q checkov==3.3.30

# Slow and load tests run in a small form here (SYNTHPERF_SLOW_SCALE=small).
# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file per process at a time (module
# fixtures such as a running Orthanc stay in one process), files with slow tests first
# (tests/conftest.py; --no-loadscope-reorder keeps that order: pytest-xdist's default re-sorts files by
# their number of tests, which handed the one-test slow files out last). Every process
# and the services it starts use one compute thread (OMP_NUM_THREADS=1): three processes of two
# threads each on two cores spent CPU time waiting for each other. Measured side by side in
# docs/benchmarks.md, "make test".
# The three set-up steps are independent (pip into .venv, Debian packages, pip into .venv-checkov) and
# run side by side: one after another they took 68 + 39 s on a fresh machine here, before the tools.
TEST_WORKERS ?= 3
test:
	@$(MAKE) --no-print-directory -j 3 venv tools $(CHECKOV)
	@$(MAKE) --no-print-directory lint
	SYNTHPERF_REQUIRE_TOOLS=1 SYNTHPERF_SLOW_SCALE=small PYTHON=$(PY) OMP_NUM_THREADS=1 \
	  bash deploy/dev/with_redis.sh $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# The service and CPU-worker images, built with podman on a local Debian base (no registry of base
# images here; docs/operations.md, "Images"). Layers are cached under var/images. Targets: IMAGES=...
IMAGES ?= service worker-cpu
images:
	bash deploy/images/build.sh $(IMAGES)

bench: venv tools
	PYTHON=$(PY) bash deploy/dev/with_redis.sh $(PY) -m bench

run: venv
	$(VENV)/bin/synthperf serve --demo

clean:
	rm -rf $(VENV) .venv-checkov var
