# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test bench clean

install: $(STAMP)

# Re-installs only when the dependency spec or the pins change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

run: install
	$(PY) -m orchestrator train --local --preset debug --max-steps 200

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m orchestrator bench --json bench.json

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .cache
