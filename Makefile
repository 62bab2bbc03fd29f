# Quick start: `make demo` (demo plate end to end) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# Jobs call `python -m metascreen`: put the venv first on PATH for Snakemake and its jobs.
RUN := PATH=$(BIN):$$PATH
DEMO := resources/demo

.PHONY: setup demo demo-data test test-cluster lint bench pretrain-segmenter clean

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

# The SLURM end to end on a one-node cluster of this machine (needs root: installs slurm-wlm).
# The cluster is stopped whatever the outcome; SIGINT bounds the run (Snakemake then cancels its jobs).
SLURM_TEST_DIR ?= /tmp/metascreen-slurm
AS_ROOT := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-cluster: setup
	$(AS_ROOT) env SLURM_TEST_DIR=$(SLURM_TEST_DIR) tests/cluster/slurm.sh start
	$(RUN) METASCREEN_TEST_SLURM_PARTITION=test \
		timeout -s INT 1800 python -m pytest tests/test_slurm.py; \
		status=$$?; $(AS_ROOT) env SLURM_TEST_DIR=$(SLURM_TEST_DIR) tests/cluster/slurm.sh stop; exit $$status

lint: setup
	$(RUN) snakefmt --check Snakefile workflow/rules
	$(RUN) snakemake --lint --dry-run

bench: setup
	$(RUN) python -m benchmarks

# Retrain the shipped segmentation weights from scratch on the synthetic world (deterministic for
# the seed on CPU; 69 min on 2 Intel AMX cores for the shipped ones, 82 min on 2 AMD Zen 4 cores
# (an experiment's run of the recipe); not yet timed on a GPU, see `python -m benchmarks gpu`;
# about 3 h on 2 AMD Zen 2 cores in float32, from the 4 h of the weights before on larger crops).
# Writes workflow/metascreen/segment/weights/; run again after an interruption, it resumes from
# its last checkpoint (every 500 steps).
SEGMENTER_SEED ?= 1
pretrain-segmenter: setup
	$(RUN) metascreen pretrain-segmenter --seed $(SEGMENTER_SEED)

clean:
	rm -rf results/*/ .snakemake $(DEMO)
