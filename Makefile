# Every target sets up .venv first (launch/setup.sh; a no-op when it is current).
.PHONY: setup quantize export release test test-fast gpu-wheels gpu-check clean

NPROC ?= 1
RECIPE ?= mamba_moe_fp8_conservative
ARGS ?=

setup:
	@bash launch/setup.sh

## The main job on the embedded default (tiny Nemotron-H, shipped calibration text).
quantize: setup
	.venv/bin/torchrun --nproc_per_node=$(NPROC) pipeline/quantize.py +quant=$(RECIPE) $(ARGS)

## Export the run `make quantize` made (same NPROC/RECIPE): FORMAT=modelopt (default) | gguf | compressed_tensors
FORMAT ?= modelopt
export: setup
	.venv/bin/torchrun --nproc_per_node=$(NPROC) pipeline/export.py \
		checkpoint=runs/quantize/tiny-$(RECIPE)-tp1pp1ep1etp1 output_dir=runs/export/tiny-$(RECIPE)-$(FORMAT) \
		export.format=$(FORMAT) export.overwrite=true $(ARGS)

## A release (quantize -> export -> evaluate -> model card + release.json): conf/experiment/$(EXPERIMENT).yaml
EXPERIMENT ?= tiny_fp8
release: setup
	.venv/bin/python pipeline/release.py experiment=$(EXPERIMENT) $(ARGS)

## The test suite (what CI runs): one worker per core, each test file on one worker.
WORKERS ?= 2
test: setup
	.venv/bin/python -m pytest tests -n $(WORKERS) --dist loadfile --durations=25

test-fast: setup
	.venv/bin/python -m pytest tests -m "not distributed and not slow"

## The GPU check (docs/gpu.md): wheels/gpu/ made here, then on a lent GPU machine the check itself.
gpu-wheels: setup
	bash bench/gpu_wheels.sh

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf runs outputs .pytest_cache
