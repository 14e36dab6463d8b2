# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODELS ?= /tmp/segq-models

.PHONY: demo test test-long bench export-models clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test,dev]'
	touch $@

# torch and transformers, for the exporter, the benchmark's PyTorch side and the fidelity
# checks against transformers. torch is pinned to the CPU build this project is tested with.
$(VENV)/.export: $(VENV)/.installed
	$(PY) -m pip install -q 'torch==2.13.0' 'torchvision==0.28.0'
	$(PY) -m pip install -q -e '.[cpu,test,dev,export]'
	touch $@

demo: $(VENV)/.installed          ## local Redis + S3 + worker + Flower, a sample through all four jobs
	$(VENV)/bin/segq dev

test: $(VENV)/.installed          ## the default suite (long runs excluded)
	$(PY) -m pytest

test-long: $(VENV)/.export        ## the marked long runs: load, soak, outages, torch-backed checks
	$(PY) -m pytest -m "long or load or soak"

export-models: $(VENV)/.export    ## real-architecture random-weight models for the benchmark
	$(PY) -m bench.export_models --out $(MODELS)

bench: $(VENV)/.installed         ## the side-by-side benchmark (see bench/README.md)
	$(PY) -m bench.run --models $(MODELS)

clean:
	rm -rf $(VENV) segq-dev-output .pytest_cache
