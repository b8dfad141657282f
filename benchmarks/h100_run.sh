#!/usr/bin/env bash
# One device call per stage on the lent GPU, from the repository root, results under $OUT:
#   engines  save the random full-size model, `make engine`'s code for aoti and aoti-fp8 (max batch 8)
#   bench    gpu_bench.py, every path, the AOTI paths on the engines carried back in .engines-gpu/
#   served   served_step.py: dit_transformer and/or flux_dit on carried AOTI engines (arguments);
#            SERVER_ENV="NAME=VALUE ..." sets the server's environment (e.g. OMP_NUM_THREADS=1)
#   profile  profile_step.py: GPU kernel time by category, bf16 and FP8
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
# The image's default CXX (/opt/gcc/bin/g++) links libstdc++ statically: its AOTI packages crash at load.
python3 -c 'from export import aoti; aoti.check_compiler_runtime(); print("CXX as set: OK")' 2>&1 | tail -1
export CXX=/usr/bin/g++ FLUX_MODEL_ROOT=/tmp/models
case "$1" in
engines)
  python3 -m benchmarks.random_model --root /tmp/models
  for kind in aoti aoti-fp8; do
    python3 -m export.engine --kind "$kind" --model flux-dev-random --max-batch 8 --engines-dir "$OUT/engines" || exit 1
  done
  ls -la "$OUT"/engines/*
  ;;
bench)
  python3 benchmarks/gpu_bench.py --engines .engines-gpu --out "$OUT/bench.json"
  ;;
served)  # each further argument: dit_transformer, or an engine sidecar to serve through flux_dit
  shift
  for target in "${@:-dit_transformer}"; do
    engine=(); [[ $target == *.json ]] && engine=(--engine "$target")
    python3 benchmarks/served_step.py "${engine[@]}" ${SERVER_ENV:+--server-env $SERVER_ENV} --out "$OUT/served-$(basename "$target" .json).json" | tail -14
  done
  ;;
profile)
  python3 benchmarks/profile_step.py --out "$OUT/profile.json" | tail -16
  ;;
esac
