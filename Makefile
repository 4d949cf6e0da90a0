# Quickstart: `make demo` and `make test` on a fresh machine. Both create and use .venv/ in the repo root.
# The venv reuses an installed torch when there is one (the GPU machines ship a CUDA build); otherwise it
# installs the CPU build torch==$(TORCH_CPU_VERSION). The extension is built the PyTorch-extension way
# (pip install --no-build-isolation), editable so that Python edits need no rebuild.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_CPU_VERSION := 2.13.0
TRITON_CPU_VERSION := 3.8.0
TEST_DEPS := numpy scipy matplotlib tqdm pillow pytest pytest-benchmark pytest-xdist hypothesis expecttest pybind11 \
	ninja setuptools wheel onnx onnxscript onnxruntime
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py
# Triton kernels run on the CPU through Triton's interpreter when no GPU is visible.
# Deferred (=): evaluated when a test recipe runs, after the venv exists.
NO_GPU = $(shell $(PY) -c "import torch,sys; sys.exit(torch.cuda.is_available())" 2>/dev/null && echo 1)
PYTEST_ENV = $(if $(filter 1,$(NO_GPU)),TRITON_INTERPRET=1,) PYTHONHASHSEED=0

.PHONY: demo test test-python test-cpp bench bench-smoke clean venv build

# The main job: eager reference against the fused path (norm kernels, one-backward per-task gradients, fused
# aggregation), step by step, on NYUv2, Cityscapes, CelebA and PASCAL-Context at a small synthetic scale (real scale on a GPU).
demo: build
	$(PY) -m tsbn_kernels.pipeline.check all --steps 3

test: build test-cpp test-python bench-smoke

venv: $(VENV)/.deps-stamp

$(VENV)/.deps-stamp: Makefile pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the installed torch: $$($(PYTHON) -c 'import torch;print(torch.__version__)')"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==$(TORCH_CPU_VERSION)
	@$(PY) -c "import triton" 2>/dev/null || $(PIP) install triton==$(TRITON_CPU_VERSION) \
	  || echo "triton unavailable: the triton backend is left out"
	$(PIP) install $(TEST_DEPS)
	@touch $@

build: $(VENV)/.build-stamp

$(VENV)/.build-stamp: $(VENV)/.deps-stamp $(CSRC)
	$(PIP) install --no-build-isolation -e .
	@$(PY) -c "import tsbn_kernels._C" && touch $@

test-cpp: $(VENV)/.deps-stamp
	@TP=$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)'); \
	cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(VENV)/bin/ninja \
	  -DCMAKE_PREFIX_PATH="$$TP" -DPython_EXECUTABLE=$(CURDIR)/$(PY) > build-cmake.log 2>&1 \
	  || { cat build-cmake.log; exit 1; }
	cmake --build build/cmake -j2 >> build-cmake.log 2>&1 || { cat build-cmake.log; exit 1; }
	ctest --test-dir build/cmake --output-on-failure

# One pytest worker per core (pytest-xdist): the suite is CPU-bound and its tests are independent.
TEST_WORKERS ?= auto
test-python: build
	$(PYTEST_ENV) TSBN_CMAKE_LIB=$(CURDIR)/build/cmake/libtsbn_ops.so $(PY) -m pytest tests -q -n $(TEST_WORKERS)

bench-smoke: build
	$(PYTEST_ENV) TSBN_BENCH_SMOKE=1 $(PY) -m pytest benchmarks -q -p no:randomly --benchmark-columns=median,rounds

bench: build
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results.json
	$(PY) -m benchmarks.report benchmarks/results.json --out benchmarks/results.md --plot benchmarks/results.png

clean:
	rm -rf build build-cmake.log *.egg-info tsbn_kernels/_C*.so $(VENV)/.build-stamp
