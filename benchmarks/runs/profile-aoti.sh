#!/usr/bin/env bash
# One call on a GPU host without network (device tool, carry .gpu): GPU kernel time per 1024² b1 step of
# dit_transformer's fastest FP8 path (regional compile) against the aoti-fp8 engine's packages, compiled over the
# default profile and for that shape alone. JSON (every kernel's time) and log under $OUT.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
source benchmarks/gpu_host.sh install
export CXX=/usr/bin/g++ # the host's default compiler links libstdc++ statically, which AOTI packages cannot
python3 benchmarks/profile_step.py --paths "${PATHS:-fp8-static-fast,aoti-fp8,aoti-fp8-opt}" \
  --out "$OUT/profile-aoti.json" 2>&1 | tee "$OUT/profile-aoti.log" | tail -30
