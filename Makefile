# make check  — create .venv, install, validate every kernel on this machine (lorafast check)
# make test   — create .venv, install, run the test suite
# make demo   — create .venv, install, validate the kernels and train a LoRALinear
# On a GPU machine with torch already installed, set TORCH= to reuse it (system site-packages).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
NVCC   ?= nvcc

.PHONY: check demo test bench cuda-check clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(if $(TORCH),,--system-site-packages) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[test]"
	touch $@

check: $(VENV)/.installed
	$(VENV)/bin/lorafast check

demo: $(VENV)/.installed
	$(PY) -m lorafast.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
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

clean:
	rm -rf $(VENV) build *.egg-info
