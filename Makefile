# The two commands the README leads with. Both work on a fresh machine with Python >= 3.10 and pip.
PYTHON ?= python3
PROFILE ?= laptop
JOBS ?= 2
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $@ $(VENV)/.installed-run

## run: the main job on the embedded default: the phantom, then the pipeline (data, pre-training
## of every registered method, fine-tuning over the label budgets x seeds, comparison report) at
## $(PROFILE) with $(JOBS) stages side by side; METHODS=m1,m2 compares fewer methods; rerunning
## continues a stopped run (completed stages are skipped)
run: $(VENV)/.installed-run
	$(BIN)/medssl run --profile $(PROFILE) --out runs/main-$(PROFILE) --jobs $(JOBS) --resume \
		$(if $(METHODS),--methods $(METHODS))

## test: unit tests, then every notebook under nbval at the smoke profile (their smoke run
## folders are removed first so that notebooks are tested, not their earlier results)
test: $(VENV)/.installed-test
	MEDSSL_PROFILE=smoke OMP_NUM_THREADS=2 $(BIN)/python -m pytest --durations=15 tests
	rm -rf runs/notebooks/*-smoke
	MEDSSL_PROFILE=smoke OMP_NUM_THREADS=2 $(BIN)/python -m pytest --nbval-lax --nbval-current-env notebooks

lint: $(VENV)/.installed-test
	$(BIN)/ruff check medssl_kit tests benchmarks scripts notebooks
	$(BIN)/ruff format --check medssl_kit tests benchmarks scripts notebooks
