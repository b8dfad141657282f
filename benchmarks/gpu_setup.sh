#!/usr/bin/env bash
# On the GPU host (PyTorch present, no network), from the repository root: install the carried wheels
# (.whl/) where the Triton Python-backend stub also finds them, and unpack the bundled tritonserver
# (.gpu/). Source it: it exports TRITONSERVER_HOME.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
printf "/tmp/site\n%s\n" "$PWD" >"$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz_flux.pth"
mkdir -p /tmp/tr && tar -C /tmp/tr -xJf .gpu/tritonserver.tar.xz || return 1
export TRITONSERVER_HOME=/tmp/tr/tritonserver PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__)'
