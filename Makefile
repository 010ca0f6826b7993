# The two front-door commands:
#   make demo   set up .venv (torch CPU, the package, the C++ extension built in place), then train
#               a small OCRNet on the embedded synthetic set (a 4-minute budget), evaluate it,
#               and print the kernel benchmark table at small shapes
#   make test   same set-up, then the whole test suite
#   make bench  the kernel benchmark (bench/run.py), fused against the eager reference
#   make gpu-check  on a CUDA machine with torch, Triton and nvcc installed (no network): build
#               the extension in place, pytest -m gpu, the kernel and model benchmarks and a
#               short bf16 training run, with $(GPU_PY) as it is (no venv, no pip); writes
#               report.md / report.json to $OUT or gpu_check/ (tools/gpu_check.py --help;
#               GPU_CHECK_ARGS="--dry-run" runs the same steps on the CPU at tiny sizes)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0; on a GPU machine pick the matching CUDA build, e.g. TORCH_SPEC="torch==2.14.1".
TORCH_SPEC ?= torch==2.13.0
# gpu-check runs with the environment's own python (torch, Triton, nvcc already installed).
GPU_PY ?= python3
GPU_CHECK_ARGS ?=
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.extension-built
SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml

.PHONY: setup demo test bench gpu-check clean

setup: $(BUILT)

$(DEPS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" triton==3.8.0 numpy opencv-python-headless pillow scipy tensorboard pytest ninja setuptools wheel onnx onnxruntime onnxscript onnxruntime-extensions cityscapesscripts
	OCRKERNELS_SKIP_EXTENSION=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# Incremental in-place build of ocrkernels._C (ninja reuses objects under build/).
$(BUILT): $(DEPS) $(SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

# The kernel table at small shapes (seconds); `make bench` measures the real ones (minutes).
demo: $(BUILT)
	$(PY) -m ocrnet demo --minutes 4
	$(PY) bench/run.py --quick --no-compile

bench: $(BUILT)
	$(PY) bench/run.py --json bench/results.json

test: $(BUILT)
	$(PY) -m pytest -q tests

# No prerequisites: nothing is created or installed (the GPU machine has no network).
gpu-check:
	$(GPU_PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build ocrkernels/_C*.so $(BUILT)
