# Every target installs what it needs: uv (pinned), the locked virtualenv, the tiny models.
UV_VERSION := 0.13.9
UV := $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)
RUN := $(UV) run --locked

.PHONY: help setup tiny run serve standalone engine repo test test-gpu load lint format clean

# make engine / make repo: which engine (docs/engines.md).
ENGINE ?= onnxruntime
MODEL ?= tiny-flux-dev
# aoti: the build device's model dtype (bf16 with an NVIDIA GPU, fp32 without); aoti-fp8: fp8.
HAS_GPU = $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
PRECISION ?= $(or $(if $(filter tensorrt,$(ENGINE)),bf16),$(if $(filter aoti-fp8,$(ENGINE)),fp8),$(if $(filter aoti,$(ENGINE)),$(if $(HAS_GPU),bf16,fp32)),fp32)
ENGINE_ARGS ?=
SIDECAR := engines/$(notdir $(MODEL))-$(PRECISION).$(ENGINE).json

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

.tools/bin/uv:
	python3 -m venv .tools && .tools/bin/pip install -q uv==$(UV_VERSION)

setup: $(UV)  ## create .venv from uv.lock
	$(UV) sync --locked

tiny: setup  ## write the embedded tiny FLUX transformers to models/
	$(RUN) python -m flux_triton.model_store

run: tiny  ## start tritonserver, run a 4-step denoising loop through it, compare with diffusers
	$(RUN) python -m flux_triton.demo

engines/tiny-flux-dev-fp32.onnxruntime.json: | tiny
	$(RUN) python -m export.engine

engine: tiny  ## build ENGINE=onnxruntime|tensorrt|aoti|aoti-fp8 (PRECISION, MODEL) into engines/, then make repo
	$(RUN) python -m export.engine --kind $(ENGINE) --model $(MODEL) --precision $(PRECISION) $(ENGINE_ARGS)
	$(MAKE) --no-print-directory repo ENGINE=$(ENGINE) MODEL=$(MODEL) PRECISION=$(PRECISION)

repo: setup  ## generate and validate the flux_dit repository for the engine in engines/ (same variables)
	$(RUN) python -m flux_triton.repository --engine $(SIDECAR)

serve: tiny engines/tiny-flux-dev-fp32.onnxruntime.json  ## serve model_repository/ on loopback (ports 8000/8001/8002)
	$(RUN) python -m flux_triton.server --model-repository model_repository

standalone: tiny  ## one denoising step outside Triton
	$(RUN) python model_repository/dit_transformer/1/model.py

test: tiny lint  ## lint, then every test (GPU tests skip without CUDA)
	$(RUN) pytest -q -rs

test-gpu: tiny  ## the GPU tests only
	$(RUN) pytest -q -m gpu

load: tiny  ## bounded load test on its own loopback server: 16 clients, 800 mixed requests, cross-talk checked
	$(RUN) python -m flux_triton.loadtest --clients 16 --requests 800

lint: setup  ## ruff check and format check
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: setup
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

clean:
	rm -rf .triton .pytest_cache .ruff_cache out
