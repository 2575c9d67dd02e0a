# Two entry points, both create/reuse the virtual environment in $(VENV):
#   make demo   - the main job (build CSO preference data from ESConv, print statistics)
#   make test   - the test suite
# CPU machines get the local CPU torch wheel (TORCH=torch==2.13.0); on a GPU machine
# run `make TORCH=torch ...` or `pip install -e .` inside your own CUDA environment.
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cso-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cso-dist demo --config configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
