# spatiAL: `make run` (the main job: dvc repro on the simulated screen) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test lint bench clean scportrait-env mageck-env

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c .ci/constraints.txt -e '.[dev]'
	touch $@

# scPortrait 1.8.0 in its own interpreter, for the live tests of tests/test_scportrait_interop.py (about 4 min, 7 GB:
# a second PyTorch); without it those tests skip
scportrait-env: .venv-scportrait/.installed

.venv-scportrait/.installed: .ci/scportrait-constraints.txt
	$(PYTHON) -m venv .venv-scportrait
	.venv-scportrait/bin/pip install --quiet --upgrade pip
	.venv-scportrait/bin/pip install --quiet -c .ci/scportrait-constraints.txt scportrait torch torchvision
	touch $@

# MAGeCK (mageck2 0.3.0: MAGeCK's count and test unchanged) in its own interpreter, for tests/test_mageck_interop.py
# (about 1 min; it compiles MAGeCK's RRA with g++); .ci/run builds it, elsewhere those tests skip without it
mageck-env: .venv-mageck/.installed

.venv-mageck/.installed: .ci/mageck-constraints.txt
	$(PYTHON) -m venv .venv-mageck
	.venv-mageck/bin/pip install --quiet --upgrade pip
	.venv-mageck/bin/pip install --quiet -c .ci/mageck-constraints.txt mageck2
	touch $@

run: install
	dvc repro

test: install mageck-env
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b --check || exit 1; done

clean:  # what `dvc repro` caches (committed files stay: dvc.lock, metrics/*.json, reports/summary.md and
        # reports/screen/index.html, which `dvc repro` rewrites, and the reports/ measurements)
	rm -rf data/raw data/index/*.parquet data/screen models/ensemble reports/evaluate reports/discovery \
		reports/screen/scores.parquet reports/screen/scores.parquet.parts reports/screen/bins reports/screen/counts \
		reports/screen/hits reports/screen/hits_cells mlflow.db mlartifacts bentoml_home
