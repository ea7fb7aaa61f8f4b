# Set-up and entry points. `make demo` and `make test` each install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
# make demo MODEL=mini-flow: the same job on mini's FLUX.1-family sibling
MODEL ?= mini
# test worker processes (pytest-xdist), one torch thread each (tests/conftest.py); whole files per worker, so a
# module's shared training runs once. WORKERS=0: one process, as pytest runs alone.
WORKERS ?= 2

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt tests/support/torchvision_shim.py
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU wheel on disk (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,eval,ui]'
	# the browser test drives Debian's chromium, never a browser build playwright downloads; where apt-get cannot
	# install it (no apt, not root) this says so and tests/test_browser.py skips, naming the reason
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
		(apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) || \
		echo "note: could not install chromium (apt-get install chromium); the browser test will be skipped"
	$(PY) tests/support/torchvision_shim.py --install-if-needed
	touch $@

demo: install
	$(VENV)/bin/boothkit demo --model $(MODEL) --out demo-output

test: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports  # the wings import downward only, no cycles (pyproject [tool.importlinter])
	$(VENV)/bin/python -m pytest -q -n $(WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

# the edit-run loop: everything but the tests marked slow (they train or run a model), under 2 minutes on 2 cores
test-fast: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/boothkit bench speed --model tiny --resolution 64 --steps 10 --warmup 2 --out out/bench

clean:
	rm -rf $(VENV) demo-output
