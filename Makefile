# One-command entry points (idempotent).  `make demo`: set up everything and run
# the main job; `make test`: set up everything and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned here only (the package itself asks for torch>=2.8): the CUDA 13 build
# of torch that pip takes from this image's local wheel cache.
TORCH_PIN ?= torch==2.14.1
MAX_JOBS ?= $(shell nproc)

.PHONY: setup build demo test bench clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q "$(TORCH_PIN)" numpy lmdb pillow safetensors pyyaml av tqdm "pytest>=8" "hypothesis>=6.100" "pytest-benchmark>=4" expecttest
	touch $@

# Rebuilt when a kernel source changes; builds CUDA kernels whenever nvcc exists.
$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cuh csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.built

build: setup

# Writes demo-out/demo.mp4 (the CLI's default --out).
demo: setup
	$(PY) -m gpavatar.cli demo

# pytest exit 5 (nothing collected) is reported as a failure, not a pass.
test: setup
	@$(PY) -m pytest -q; code=$$?; \
	if [ $$code -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$code

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only -q

clean:
	rm -rf build *.egg-info gpavatar/_C*.so $(VENV)/.built
