#!/usr/bin/env bash
# One call on a GPU host without network (device tool, carry .gpu): one whole 1024² generation at a time through
# flux_generate (steps over BLS to dit_transformer, and placed --in-process) against FluxPipeline in process, FP8 with
# static scales and fast accumulation, CUDA graphs. JSON, log and the server's log under $OUT. RUNS (3), WAYS, CACHE.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
source benchmarks/gpu_host.sh install
export FLUX_MODEL_ROOT=/tmp/models
python3 benchmarks/whole_generation.py --fp8 --fp8-scales fp8_scales.safetensors --fp8-fast-accum \
  --runs "${RUNS:-3}" --cache "${CACHE:-none}" --ways "${WAYS:-bls,in-process,client,loop,pipeline}" --out "$OUT/whole-generation.json" 2>&1 |
  tee "$OUT/whole-generation.log" | grep -v "it/s]" | tail -12
cp /tmp/whole-generation-*/tritonserver.log "$OUT/" 2>/dev/null
grep -E "Signal|warmed up" "$OUT/tritonserver.log" | tail -5
