#!/usr/bin/env bash
# One call on a GPU host without network (device tool, carry .gpu): the GPU test of flux_dit holding each prompt in
# dit_engine (a tiny AOTI engine on GPU 0), then flux-dit.sh with the same environment (HOLDING="off on": a server
# with dit_engine holding prompts and one without; CACHES, IN_PROCESS and PROFILE as there). SKIP_TESTS=1 skips the
# test.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
source benchmarks/gpu_host.sh install
export CXX=/usr/bin/g++ # the test compiles an AOTI engine: see flux-dit.sh
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_gpu_aoti.py -k holds 2>&1 |
  tee "$OUT/gpu-test.log" | tail -4
bash benchmarks/runs/flux-dit.sh
