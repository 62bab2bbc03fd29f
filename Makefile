# Quick start: `make demo` (demo plate end to end) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# Jobs call `python -m metascreen`: put the venv first on PATH for Snakemake and its jobs.
RUN := PATH=$(BIN):$$PATH
DEMO := resources/demo

.PHONY: setup demo demo-data test lint bench clean

setup: $(STAMP)

# torch==2.13.0 (pinned in requirements.lock) resolves to the CPU wheel; no CUDA packages.
$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

demo-data: $(DEMO)/platemap.csv

$(DEMO)/platemap.csv: $(STAMP)
	$(RUN) metascreen synth $(DEMO) --seed 0

demo: setup demo-data
	$(RUN) snakemake --profile profiles/local
	@echo "Per-sample results: results/summary/per_sample.csv; report: results/demo/report.html"

test: setup
	$(RUN) python -m pytest

lint: setup
	$(RUN) snakefmt --check Snakefile workflow/rules
	$(RUN) snakemake --lint --dry-run

bench: setup
	$(RUN) python -m benchmarks

clean:
	rm -rf results/*/ .snakemake $(DEMO)
