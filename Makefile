# vpipe — the two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install test lint demo bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

# The exact versions CI and the images use (constraints.txt), within pyproject.toml's ranges.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ray,tensorboard,parquet,webdataset,tune,onnx]'
	touch $(STAMP)

install: $(STAMP) ## create .venv/ and install vpipe with the pinned dependencies

test: $(STAMP) ## install, then run the whole test suite (slow end-to-end tests included)
	$(PY) -m pytest -q

lint: $(STAMP) ## ruff over the package, tests and benchmarks
	$(VENV)/bin/ruff check pipeline tests benchmarks

demo: $(STAMP) ## install, generate synthetic trailers and run workflows/demo.toml end to end
	$(PY) -m pipeline.demo

bench: $(STAMP) ## the speed checks (prints figures; see benchmarks/README.md)
	$(PY) benchmarks/media.py
	$(PY) benchmarks/features.py
	$(PY) benchmarks/end_to_end.py

clean: ## remove the virtual environment and demo outputs
	rm -rf $(VENV) demo-work
