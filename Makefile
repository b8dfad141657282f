# Every target installs what it needs: uv (pinned), the locked virtualenv, the tiny models.
# The commands and their defaults are the package's own: `python -m flux_triton <command> --help`.
UV_VERSION := 0.13.9
UV := $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)
RUN := $(UV) run --locked --all-extras
FLUX := $(RUN) python -m flux_triton

# make engine / make repo: which engine and step cache (docs/engines.md); empty means the package's default.
ENGINE ?=
MODEL ?=
PRECISION ?=
ENGINE_ARGS ?=
CACHE ?=
SELECT = $(if $(ENGINE),--kind $(ENGINE)) $(if $(MODEL),--model $(MODEL)) $(if $(PRECISION),--precision $(PRECISION)) \
	$(if $(CACHE),--cache $(CACHE))

.PHONY: help setup tiny default-engine run serve standalone engine repo test test-unit test-gpu load lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

.tools/bin/uv:
	python3 -m venv .tools && .tools/bin/pip install -q uv==$(UV_VERSION)

setup: $(UV)  ## create .venv from uv.lock
	$(UV) sync --locked --all-extras

tiny: setup  ## write the embedded tiny FLUX transformers to models/
	$(FLUX) tiny

default-engine: tiny  ## build the default engine for model_repository/ if it is missing
	$(FLUX) engine --if-missing

run: tiny  ## start tritonserver, run a 4-step loop through dit_transformer and flux_dit, compare with diffusers
	$(FLUX) demo

engine: tiny  ## build an engine (ENGINE, MODEL, PRECISION, ENGINE_ARGS) into engines/, then its repository
	$(FLUX) engine $(SELECT) $(ENGINE_ARGS)

repo: setup  ## generate and check the flux_dit repository of a built engine (same variables)
	$(FLUX) repo $(SELECT)

serve: default-engine  ## serve model_repository/ on loopback (ports 8000/8001/8002)
	$(FLUX) serve

standalone: tiny  ## one denoising step outside Triton
	$(RUN) python model_repository/dit_transformer/1/model.py

test: tiny lint  ## lint, then every test (GPU tests skip without CUDA)
	$(RUN) pytest -q -rs

test-unit: tiny  ## the tests that start no server and compile no engine (under a minute on 2 cores)
	$(RUN) pytest -q -m "not server and not build and not gpu"

test-gpu: tiny  ## the GPU tests only
	$(RUN) pytest -q -m gpu

load: default-engine  ## bounded load test on its own loopback server: 16 clients, 800 mixed requests
	$(FLUX) load --clients 16 --requests 800

lint: setup  ## ruff check and format check
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: setup
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

clean:
	rm -rf .triton .pytest_cache .ruff_cache out
