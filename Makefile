# Everything runs from a project-local virtual environment built from nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# llama-cpp-python compiles from source; pip keeps the built wheel in its cache,
# so only the first setup on a machine pays for the compile.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
# Axolotl's default launcher runs `accelerate` from PATH: use the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
# Offline, quiet runs: nothing is ever downloaded at run time.
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export WANDB_MODE=disabled
export AXOLOTL_DO_NOT_TRACK=1
export DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test tiny train-tiny bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	# torch first: a bare requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The whole job on the embedded default: build, train, export, serve, score, plot, summary.
demo: setup
	$(BIN)/python -m serve.demo --out build/demo

test: setup
	$(BIN)/python -m pytest -q

# The embedded tiny model and data used by example_configs/tiny-cpu.yml.
tiny: setup
	$(BIN)/python -m orpo_plugin.tiny build/tiny

# Train the embedded default with the plugin (about 45 s on 2 CPU cores; `make demo` does more).
train-tiny: tiny
	$(BIN)/axolotl train example_configs/tiny-cpu.yml

bench: setup
	mkdir -p build
	$(BIN)/python benchmarks/bench_train_step.py --json build/bench_train_step.json
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_prefix_sharing.py
	$(BIN)/python benchmarks/bench_export.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_orpo_vs_sft.py

clean:
	rm -rf build outputs last_run_prepared .pytest_cache
