#!/usr/bin/env bash
# The benchmarks and GPU tests on a GPU host without network, whose Python 3.12 has PyTorch with CUDA.
#
#   benchmarks/gpu_host.sh pack              # here (with network): writes .gpu/ — the project's wheel, the
#                                            # wheels it needs beyond PyTorch, the tritonserver tree
#   source benchmarks/gpu_host.sh install    # there, from the checkout: installs .gpu/ into that Python,
#                                            # exports TRITONSERVER_HOME (and with PROFILE=1 the
#                                            # FLUX_TRITON_PROFILE_* of the servers it starts)
#
# Then run the scripts of benchmarks/ and `python3 -m pytest -m gpu` with that Python (benchmarks/README.md).
# Wheels are installed without their dependencies: the host's PyTorch, numpy, onnx and the rest stay.
# nvidia-cudnn-frontend (FP8 attention, model.fp8_attention) goes without its CuTe DSL dependencies: cuDNN's own FP8
# SDPA on Hopper needs none of them, only the libcudnn.so.9 of PyTorch's nvidia-cudnn wheel.
WHEELS=(diffusers==0.42.1 importlib_metadata==8.7.0 tritonclient==2.73.0 geventhttpclient==2.6.1 gevent==26.9.0
  greenlet==3.3.2 zope.event==6.2 zope.interface==8.7 python-rapidjson==1.25 brotli==1.2.1 pytest-timeout==2.4.0
  nvidia-cudnn-frontend==1.32.0)

pack() {
  set -euo pipefail
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local site tree
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -rf .gpu && mkdir -p .gpu/wheels .gpu/stage/tritonserver/lib .gpu/stage/tritonserver/python_backend_stubs
  "${UV:-uv}" build --wheel --out-dir .gpu/wheels
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels "${WHEELS[@]}"
  tree=.gpu/stage/tritonserver
  cp -r "$site/pytriton/tritonserver/bin" "$site/pytriton/tritonserver/backends" "$tree/"
  cp -r "$site/pytriton/tritonserver/python_backend_stubs/3.12" "$tree/python_backend_stubs/"
  find "$site/nvidia_pytriton.libs" -type f ! -name 'libpython3-*' -exec cp {} "$tree/lib/" \;
  tar -C .gpu/stage -cJf .gpu/tritonserver.tar.xz tritonserver && rm -rf .gpu/stage
  du -sh .gpu
}

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile .gpu/wheels/*.whl || return 1
  mkdir -p /tmp/tritonserver-home && tar -C /tmp/tritonserver-home -xJf .gpu/tritonserver.tar.xz || return 1
  export TRITONSERVER_HOME=/tmp/tritonserver-home/tritonserver PYTHONUNBUFFERED=1
  if [ -n "${PROFILE:-}" ]; then # the servers' step models profile in place (flux_triton/serving/profiling.py)
    rm -rf /tmp/profile
    export FLUX_TRITON_PROFILE_DIR=/tmp/profile FLUX_TRITON_PROFILE_TRACES=${PROFILE_TRACES:-5-8}
  fi
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'
}

spy() {
  # after $1 seconds, the native and Python stacks of every Triton Python stub and context-parallel worker (py-spy
  # on PATH): where a hung test waits
  sleep "$1"
  local pid
  for pid in $(pgrep -f 'triton_python_backend_stub|flux_triton[.]serving[.]worker'); do
    echo "== pid $pid: $(tr '\0' ' ' </proc/"$pid"/cmdline | cut -c1-160)"
    py-spy dump --native --pid "$pid"
  done
}

case "${1:-}" in
pack) (pack) ;;
install) install ;;
spy) spy "${2:-300}" ;;
*) echo "usage: benchmarks/gpu_host.sh pack | source benchmarks/gpu_host.sh install | benchmarks/gpu_host.sh spy SECONDS" >&2 ;;
esac
