#!/usr/bin/env bash
# Pack what the GPU benchmarks need on a host with PyTorch but no network and no diffusers:
# wheels for Python 3.12 (.whl/) and the bundled tritonserver tree with its libraries
# (.gpu/tritonserver.tar.xz, unpacked there and used through TRITONSERVER_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf .gpu/stage && mkdir -p .gpu/stage/tritonserver/lib .gpu/stage/tritonserver/python_backend_stubs .whl
tree=.gpu/stage/tritonserver
cp -r "$site/pytriton/tritonserver/bin" "$site/pytriton/tritonserver/backends" "$tree/"
cp -r "$site/pytriton/tritonserver/python_backend_stubs/3.12" "$tree/python_backend_stubs/"
find "$site/nvidia_pytriton.libs" -type f ! -name 'libpython3-*' -exec cp {} "$tree/lib/" \;
tar -C .gpu/stage -cJf .gpu/tritonserver.tar.xz tritonserver
rm -rf .gpu/stage
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata==8.7.0 tritonclient==2.73.0 geventhttpclient==2.6.1 gevent==26.9.0 \
  greenlet==3.3.2 zope.event==6.2 zope.interface==8.7 python-rapidjson==1.25 brotli==1.2.1 pytest-timeout==2.4.0
du -sh .gpu .whl
