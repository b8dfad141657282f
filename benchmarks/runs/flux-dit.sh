#!/usr/bin/env bash
# One call on a GPU host without network (device tool, carry .gpu): the AOTI FP8 engine built with static scales,
# then flux_dit on it (graphed; uncached and MagCache) beside dit_transformer with the same FP8 recipe, served over
# shared memory, and the same speed-ups in process. JSON and logs under $OUT. The model and the engine are kept
# (/tmp/models, the checkout's engines/), so a second call on a warm host skips both. IN_PROCESS= skips the
# in-process baseline; CACHES=none serves flux_dit without a step cache (whole-step graphs).
# PROFILE=1: the step models profile each execute in place (PROFILE_TRACES traced, default 5-8:
# MagCache's first skipped steps among full ones), in $OUT/profile.tgz. HOLDING="off on": a server each, dit_engine
# holding each generation's prompt or not (default on, as make repo writes it).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
source benchmarks/gpu_host.sh install
# the GPU host's CXX (/opt/gcc) links libstdc++ statically, which AOTInductor packages cannot (make engine says so)
export FLUX_MODEL_ROOT=/tmp/models FLUX_ENGINE_DIR=$PWD/engines CXX=/usr/bin/g++
sidecar=$FLUX_ENGINE_DIR/flux-dev-random-fp8.aoti-fp8.json
[ -f /tmp/models/flux-dev-random/transformer/config.json ] ||
  python3 -c "from flux_triton.model.presets import save_random; from pathlib import Path; save_random(Path('/tmp/models'))"
if [ ! -f "$sidecar" ]; then
  started=$(date +%s)
  python3 -m flux_triton engine --kind aoti-fp8 --model flux-dev-random --fp8-scales fp8_scales.safetensors \
    --engines-dir "$FLUX_ENGINE_DIR" --no-repo --no-verify 2>&1 | tee "$OUT/engine.log" | tail -3
  echo "engine built in $(($(date +%s) - started)) s"
fi
for holding in ${HOLDING:-on}; do
  python3 benchmarks/cache_loop.py --fp8 --fp8-scales fp8_scales.safetensors --fp8-fast-accum --graphs on \
    --caches "${CACHES:-none,mag}" --engine "$sidecar" ${IN_PROCESS---in-process} --transport shm \
    --engine-holding "$holding" --out "$OUT/flux-dit-fp8-holding-$holding.json" 2>&1 |
    tee "$OUT/flux-dit-holding-$holding.log" | grep -v "it/s]" | tail -16
done
[ -z "${PROFILE:-}" ] || tar -C /tmp -czf "$OUT/profile.tgz" profile
