# The two commands of the README. Both create the virtual environment when it is missing.
# VENV=/path/to/venv reuses one (CI does); TORCH_SPEC pins the torch build pip takes.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slidemil-installed
# one pytest-xdist worker per core (at most 4; each builds the shared fixtures once), one torch thread each
XDIST ?= -n auto --maxprocesses 4
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint install clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	echo "$(CURDIR)" > $(STAMP)

# The stamp names the checkout the venv's editable install points at: a venv shared by two checkouts (VENV=...)
# would otherwise run one checkout's tests against the other's code. Re-pointing it costs a few seconds.
install: $(STAMP)
	@grep -qxF "$(CURDIR)" $(STAMP) || { echo "$(VENV) pointed at $$(cat $(STAMP)); installing $(CURDIR)"; \
		$(PY) -m pip install -q --disable-pip-version-check --no-deps -e . && echo "$(CURDIR)" > $(STAMP); }

demo: install
	$(VENV)/bin/slidemil demo --out demo_run

# The house rules: ruff clean, and imports only go down the layers of docs/architecture.md.
lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The inner loop: everything but the tests marked slow (training runs, whole pipelines).
test-fast: lint
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/train_speed.py

clean:
	rm -rf demo_run .pytest_cache build src/*.egg-info
