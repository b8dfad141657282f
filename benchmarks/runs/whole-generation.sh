#!/usr/bin/env bash
# One call on a GPU host without network (device tool, carry .gpu): one whole 1024² generation at a time through
# flux_generate (steps over BLS to dit_transformer, and placed --in-process) against FluxPipeline in process, FP8 with
# static scales and fast accumulation, CUDA graphs. JSON, log and the server's log under $OUT. RUNS (3), WAYS, CACHE,
# QUEUE_DELAYS (the client loop against a dit_transformer per batcher delay, µs), TRACE=1 (the server traces every
# request: where the served ways' time goes), CLIENT (the client loop's variants: host,idle-held,one-thread,gpu),
# STEPS_AHEAD (the loop way's bounds on the host's lead over the GPU, e.g. 1,4,28).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
source benchmarks/gpu_host.sh install
export FLUX_MODEL_ROOT=/tmp/models
python3 benchmarks/whole_generation.py --fp8 --fp8-scales fp8_scales.safetensors --fp8-fast-accum \
  --runs "${RUNS:-3}" --cache "${CACHE:-none}" --ways "${WAYS:-bls,in-process,client,loop,pipeline}" \
  --queue-delays "${QUEUE_DELAYS:-100}" ${TRACE:+--trace} --client-variants "${CLIENT:-host}" \
  ${STEPS_AHEAD:+--steps-ahead "$STEPS_AHEAD"} \
  --out "$OUT/whole-generation.json" 2>&1 |
  tee "$OUT/whole-generation.log" | grep -v "it/s]" | tail -45
cp /tmp/whole-generation-*/tritonserver.log "$OUT/" 2>/dev/null
grep -E "Signal|warmed up" "$OUT/tritonserver.log" | tail -5
