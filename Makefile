# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test lint typecheck unit bench bench-adr clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamp files record what was installed, so a later `make` skips pip unless the inputs changed.
$(VENV)/.runtime: $(PY) pyproject.toml constraints.txt
	$(PIP) -e '.[demo]'
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) -e '.[dev]'
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m esper.tamiyo.policy demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check src tests benchmarks docs/examples  # docs/*.md keep aligned comments
	$(VENV)/bin/mypy

unit: $(VENV)/.dev
	$(PY) -m pytest

test: lint unit

# Times the seed design (old) against LSTMPolicyBundle (new); writes bench.json.
bench: $(VENV)/.runtime
	$(PY) -m esper.tamiyo.policy bench --json bench.json

# Re-measures the normalization options compared in docs/adr/0002.
bench-adr: $(VENV)/.runtime
	$(PY) benchmarks/normalization_options.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
