# Set-up-and-go targets. `make demo` and `make test` work on a fresh machine with Python 3.10+.
# `make demo` installs the runtime dependencies only; the test extra (torch, transformers, lm-eval, ray, ruff:
# the tests' independent references and tools) is installed for test, test-all, lint and bench. One stamp per
# install, so demo then test (or test then demo) in one venv installs each set once.
# Every install here takes the exact versions of requirements.lock (the set CI last passed with); setup.cfg keeps
# the open ranges for installing chinchax elsewhere. `make lock` refreshes the lock (pip-tools' pip-compile).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := requirements.lock
RUNTIME_STAMP := $(VENV)/.installed-runtime
TEST_STAMP    := $(VENV)/.installed-test
# `make lock LOCK_FLAGS=` keeps today's pins and only adds what setup.cfg newly asks for.
LOCK_FLAGS ?= --upgrade

.PHONY: venv install install-test demo test test-slow test-all lint bench lock clean

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint $(LOCK) pip

$(RUNTIME_STAMP): setup.cfg pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install --quiet --constraint $(LOCK) -e .
	touch $@

# The test extra brings the runtime dependencies with it: both stamps are then current.
$(TEST_STAMP): setup.cfg pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install --quiet --constraint $(LOCK) -e '.[test]'
	touch $@ $(RUNTIME_STAMP)

install: $(RUNTIME_STAMP)

install-test: $(TEST_STAMP)

demo: install
	$(PY) -m experiments.sweep --sweep=cpu_ladder
	$(PY) -m experiments.report --root=runs/sweeps/cpu_ladder

test: install-test
	$(PY) -m pytest -q -n 2 --durations=15

# CI's second job (.ci/run runs it after `make test`): the tests marked slow, each a must-have behaviour too
# long for the default run (every published point's cpu dry run, the real μTransfer sweep, a bare-venv install).
test-slow: install-test
	$(PY) -m pytest -q -n 2 -m slow --durations=15

test-all: install-test
	$(PY) -m pytest -q -n 2 -m "" --durations=15

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install-test
	$(PY) -m benchmarks.train_throughput

# The newest releases within setup.cfg's ranges (runtime, test and lock extras) for this Python; run
# `make test` on the result before committing it.
lock: | $(PY)
	$(PY) -m pip install --quiet --constraint $(LOCK) pip-tools
	$(VENV)/bin/pip-compile --quiet $(LOCK_FLAGS) --allow-unsafe --strip-extras --extra=test --extra=lock \
	    --no-emit-find-links --no-emit-index-url --no-emit-trusted-host --output-file=$(LOCK) setup.cfg

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
