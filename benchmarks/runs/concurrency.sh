#!/usr/bin/env bash
# One call on a GPU host without network (device tool, carry .gpu): concurrent whole generations through
# flux_generate against the client-driven loop, FP8 with static scales and fast accumulation. JSON and log under
# $OUT. Environment: SIZES (512), CONCURRENCY (1,4), ROUNDS (1), CACHE (none; mag: every generation with MagCache,
# whose steps in lockstep merge).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
source benchmarks/gpu_host.sh install
export FLUX_MODEL_ROOT=/tmp/models
python3 benchmarks/concurrency.py --fp8 --fp8-scales fp8_scales.safetensors --fp8-fast-accum --sizes "${SIZES:-512}" \
  --concurrency "${CONCURRENCY:-1,4}" --rounds "${ROUNDS:-1}" --cache "${CACHE:-none}" \
  --out "$OUT/concurrency-${CACHE:-none}.json" 2>&1 | tee "$OUT/concurrency.log" | grep -v "it/s]" | tail -12
