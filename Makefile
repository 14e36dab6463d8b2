# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-load bench export-models clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test,dev]'
	touch $@

demo: $(VENV)/.installed          ## local Redis + S3 + worker + Flower, a sample through all four jobs
	$(VENV)/bin/segq dev

test: $(VENV)/.installed          ## the default suite (load and soak runs excluded)
	$(PY) -m pytest

test-load: $(VENV)/.installed     ## the marked long runs: 2,000 jobs through two workers, soak
	$(PY) -m pytest -m "load or soak" -s

export-models:                    ## real-architecture random-weight models for benchmarks (needs torch)
	$(PYTHON) -m bench.export_models --out /tmp/segq-models

bench: $(VENV)/.installed         ## the side-by-side benchmark (see bench/README.md)
	$(PY) -m bench.run --models /tmp/segq-models

clean:
	rm -rf $(VENV) segq-dev-output .pytest_cache
