# Every install step lives here so that a clean clone needs nothing but python3 (3.11+) and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-model test benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build; the project's own range (<3) then installs nothing more.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pipeline demo-data workflows/demo-data
	$(BIN)/pipeline run workflows/demo.yaml

# The demo's trained model (committed as models/demo_unet.safetensors + .json): synthetic
# training images the demo never evaluates on, then `pipeline train` (about 15 minutes on 2 cores).
demo-model: $(STAMP)
	for seed in 1 2 3; do $(BIN)/pipeline demo-data workflows/train-data/demo-$$seed --size 1024 --seed $$seed; done
	$(BIN)/pipeline train workflows/train_demo.yaml

# The house rules first (import contracts in .importlinter, types in mypy.ini), then the tests.
# The SLURM tests install and start a one-node SLURM cluster themselves (cluster/ci/slurm-up.sh).
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest

# Not part of the test suite: side-by-side measurements, written to docs/benchmarks.md.
# Run on an otherwise idle machine: throughput and scaling take one to two hours on 2 cores,
# and scaling writes up to ~8 GiB (uncompressed bound) into a temporary folder.
BENCH_STAMP := $(VENV)/.installed-benchmark

$(BENCH_STAMP): $(STAMP) pyproject.toml
	# monai asks torch>=2.8: the pinned CPU build already satisfies it, so pip leaves torch be.
	$(BIN)/python -m pip install --quiet -e '.[benchmark]'
	touch $(BENCH_STAMP)

benchmark: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.worker_passes --repeats 2 --json docs/benchmarks/worker_passes.json --out docs/benchmarks.md
	$(BIN)/python -m benchmarks.throughput --sizes 4096 8192 --models unet dilated --repeats 2 \
		--json docs/benchmarks/throughput.json --out docs/benchmarks.md
	$(BIN)/python -m benchmarks.scaling --sizes 8192 16384 32768 65536 \
		--json docs/benchmarks/scaling.json --out docs/benchmarks.md

clean:
	rm -rf $(VENV) workflows/demo-data workflows/out
