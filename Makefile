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

# The tools spatiAL is tested against, each in its own interpreter pinned by .ci/<tool>-constraints.txt:
# scPortrait 1.8.0 for tests/test_scportrait_interop.py (a second PyTorch, 7 GB; .ci/run builds it), and MAGeCK
# (mageck2 0.3.0: MAGeCK's count and test unchanged; it compiles MAGeCK's RRA with g++) for tests/test_mageck_interop.py
# (make test builds it). Without them those tests skip.
scportrait-env: .venv-scportrait/.installed
mageck-env: .venv-mageck/.installed
PACKAGES_scportrait := scportrait torch torchvision
PACKAGES_mageck := mageck2

.venv-%/.installed: .ci/%-constraints.txt
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/pip install --quiet --upgrade pip
	.venv-$*/bin/pip install --quiet -c $< $(PACKAGES_$*)
	touch $@

run: install
	dvc repro

# Two pytest workers (pytest-xdist), a test file per worker at a time so that a module's fixtures (the dvc repro) stay
# in one worker: on a 2-core machine one process leaves a core idle while it waits on start-up, servers and disk, and
# two workers cut the suite by about a quarter. `make test TEST_WORKERS=0`: one process.
TEST_WORKERS ?= 2
test: install mageck-env
	$(BIN)/pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: install
	$(BIN)/ruff check .

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b --check || exit 1; done

clean:  # what `dvc repro` caches (committed files stay: dvc.lock, metrics/*.json, reports/summary.md and
        # reports/screen/index.html, which `dvc repro` rewrites, and the reports/ measurements)
	rm -rf data/raw data/index/*.parquet data/screen models/ensemble reports/evaluate reports/discovery \
		reports/screen/scores.parquet reports/screen/scores.parquet.parts reports/screen/bins reports/screen/counts \
		reports/screen/hits reports/screen/hits_cells mlflow.db mlartifacts bentoml_home
