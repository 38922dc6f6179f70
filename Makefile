# Set-up-and-go targets. `make demo` and `make test` work on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv install demo test test-all lint bench clean

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m experiments.sweep --sweep=cpu_ladder

test: install
	$(PY) -m pytest -q -n 2 --durations=15

test-all: install
	$(PY) -m pytest -q -n 2 -m "" --durations=15

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m benchmarks.train_throughput

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
