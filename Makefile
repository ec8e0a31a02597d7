# The two commands of the README: `make demo` and `make test`. Both create .venv and install
# everything on first use (torch is pinned to the CPU wheel, see pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,eval]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py $(ARGS)

# Lint, then every test (unit tests on tiny models, then the real-model integration tests).
# pytest exits 5 when it collects nothing: that is a broken test setup, reported as a failure.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q $(ARGS); code=$$?; \
	if [ $$code -eq 5 ]; then echo "pytest collected no tests: the test setup is broken" >&2; fi; \
	exit $$code

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
