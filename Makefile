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

# The main job on the embedded defaults: local Ray, MLflow in ./mlflow.db, checkpoints in ./ray_results.
# On 4,000 rows of the dictionary corpus (built on first use: those rows and the 2,135 validation
# rows, about a minute), where the lattice passes ridge and kernel ridge; validated on 1,024 rows.
run: install
	$(PY) jobs/progressive_scaling.py --stages scale-12,scale-24 --steps-per-stage 400,100 \
		--set corpus=dictionary --set train_rows=4000 --set val_max_samples=1024 \
		--summary-json runs/progressive_scaling.json

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m orchestrator bench --json bench.json

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .cache
