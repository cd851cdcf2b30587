# mmalign developer entry points. `make test` sets up everything on a fresh machine (venv, pinned
# dependencies, the cached real Kubernetes/etcd/helm binaries) and runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv binaries test test-realnode lint mypy crds unit integration e2e bench demo demo-down clean

help:
	@echo "make test       set up everything, then lint + unit + integration + e2e tests"
	@echo "make demo       the whole loop on a local control plane (see docs/quickstart.md)"
	@echo "make demo-down  stop the demo cluster"
	@echo "make crds       regenerate the CRD YAML from the API models"
	@echo "make binaries   build/reuse the cached kube-apiserver, controller-manager, etcd, helm"
	@echo "make test-realnode  the real kubelet/containerd node, the project's image, the operator lifecycle tests on it (not yet default)"
	@echo "make bench      DPO step vs TRL's DPOTrainer on CPU, small size (docs/benchmarks.md)"

# torch first (its pins are read from pyproject.toml, the one place they live); deepspeed is an sdist
# that must build against THAT torch: --no-build-isolation, DS_BUILD_OPS=0 (ops JIT-compile if needed).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "setuptools>=68" wheel
	$(BIN)/pip install -q $$(grep -oE '"torch(vision)?==[^"]+"' pyproject.toml | tr -d '"')
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -e ".[operator,trainer,dev,tracking]"
	touch $(STAMP)

venv: $(STAMP)

# --kwok: kwok and kube-scheduler, for the fast mode's tests (tests/integration/test_kwok.py); --kueue:
# Kueue's manager, for tests/integration/test_kueue.py (cold: the longest single build, see docs/devcluster.md).
binaries: $(STAMP)
	$(BIN)/python -m mmalign.devcluster.binaries --kwok --kueue

crds: $(STAMP)
	$(BIN)/mmalign crds

lint: $(STAMP) mypy
	$(BIN)/ruff check .
	$(BIN)/mmalign crds --check
	$(BIN)/mmalign validate manifests/examples/*.yaml

# mypy follows no editable-install import hook, so it is shown the packages under the names they install
# as ([tool.setuptools.package-dir]: operator/ is mmalign.operator, ...): build/mypy/mmalign, a tree of
# symlinks that pyproject's [tool.mypy] (mypy_path, packages, the level of each package) points at.
MYPY_TREE := build/mypy/mmalign
mypy: $(STAMP)
	rm -rf $(MYPY_TREE) && mkdir -p $(MYPY_TREE)
	ln -s $(CURDIR)/mmalign/* $(MYPY_TREE)/
	for dir in operator trainer devcluster; do ln -s $(CURDIR)/$$dir $(MYPY_TREE)/$$dir; done
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit tests/trainer -q

integration: binaries
	$(BIN)/pytest tests/integration -q

e2e: binaries
	$(BIN)/pytest tests/e2e -q

test: lint binaries
	$(BIN)/pytest tests/unit tests/trainer tests/integration tests/e2e -q --timeout=900 --durations=15

# The real node (kubelet + containerd + the project's image; docs/devcluster.md "The real node"): not yet
# the default path of `make test`/`make demo` (MMALIGN_NODE=real switches both). Its binaries and images
# take ~70-80 min cold on 2 cores (docs/devcluster.md, "Cold build cost"); warm, a source change ~1 min.
# Three pytest runs: each starts its own real node (one at a time: the node's paths are fixed per machine).
test-realnode: binaries
	$(BIN)/python -m mmalign.devcluster.binaries --real-node
	MMALIGN_NODE=real $(BIN)/pytest tests/integration/test_realnode.py -q
	MMALIGN_NODE=real $(BIN)/pytest tests/integration/test_operator_lifecycle.py -q
	MMALIGN_NODE=real $(BIN)/pytest tests/e2e -q

# The bench extra (TRL) goes into the same venv only here, never in `make test`'s install.
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?= --model tiny --pairs 4 --tokens 128 --steps 5 --warmup 2 --rounds 3
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q --no-build-isolation -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	mkdir -p bench/results
	$(BIN)/python bench/dpo_vs_trl.py $(BENCH_ARGS) --data image --out bench/results/cpu-tiny-image.json
	$(BIN)/python bench/dpo_vs_trl.py $(BENCH_ARGS) --data text --out bench/results/cpu-tiny-text.json

demo: binaries
	$(BIN)/python -m mmalign.devcluster.demo

demo-down: $(STAMP)
	$(BIN)/mmalign dev down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
