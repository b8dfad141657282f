#!/usr/bin/env bash
# One call on a GPU host without network (device tool, carry .gpu): the GPU tests of a cached loop with CUDA graphs,
# then the served image per step cache with and without graphs (FP8, static scales, fast accumulation), diffusers'
# eager pipeline in process as the baseline. JSON and logs under $OUT. Environment: GRAPHS (on,off), CACHES
# (none,mag,mag-tuned,taylorseer), EAGER= (no eager baseline), IN_PROCESS=1 (the same speed-ups in process),
# SKIP_TESTS=1 (no GPU tests), RESTART=1 (the last server started again over its compile cache), PARALLEL (none; on a
# host of several GPUs e.g. none,ulysses2,ulysses4: one server per setting, each dit_transformer across the GPUs).
# PROFILE=1: the step models profile each execute in place (PROFILE_TRACES traced, default 5-8:
# MagCache's first skipped steps among full ones), in $OUT/profile.tgz.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
source benchmarks/gpu_host.sh install
export FLUX_MODEL_ROOT=/tmp/models
[ -n "${SKIP_TESTS:-}" ] || timeout 150 python3 -m pytest -q -m gpu tests/test_gpu_graphs.py -k "cached_loop or text_length" -p no:cacheprovider 2>&1 |
  tee "$OUT/pytest.log" | tail -4
python3 benchmarks/cache_loop.py --fp8 --fp8-scales fp8_scales.safetensors --fp8-fast-accum --graphs "${GRAPHS:-on,off}" \
  --parallel "${PARALLEL:-none}" --caches "${CACHES:-none,mag,mag-tuned,taylorseer}" --transport shm ${EAGER---eager} ${IN_PROCESS:+--in-process} ${RESTART:+--restart} --out "$OUT/served-image-fp8.json" 2>&1 |
  tee "$OUT/served-image.log" | grep -v "it/s]" | tail -25
for log in /tmp/served-image-*/graphs-*.log; do
  echo "== $log"
  tail -150 "$log"
done >"$OUT/server-logs.txt" 2>&1
[ -z "${PROFILE:-}" ] || tar -C /tmp -czf "$OUT/profile.tgz" profile
