# flux-triton on NVIDIA's Triton container (docs/deploy.md).
#
#   docker build -t flux-triton:0.1.0 .
#   docker run --gpus all --shm-size 8g -p 8000-8002:8000-8002 -v /data/flux:/models:ro \
#       -e FLUX_DIT_MODEL_DIR=FLUX.1-dev -e FLUX_ADMIN_KEY="$(openssl rand -base64 24)" flux-triton:0.1.0
#
# Base: Triton 26.09 (server 2.73.0, the release of the pinned tritonclient 2.73.0): Ubuntu 24.04 with Python 3.12,
# whose Python-backend stub runs the models (the project supports 3.11-3.12), and CUDA 13; the locked torch 2.13.0
# brings its own CUDA 13.0 libraries, so the host needs an NVIDIA driver of the R580 branch or newer.
# Weights are never in the image: they come from a volume at $FLUX_MODEL_ROOT (/models). Prebuilt engines come from
# a volume at $FLUX_ENGINE_DIR (/engines); docs/deploy.md has the step that builds them.
FROM nvcr.io/nvidia/tritonserver:26.09-py3

ARG UV_VERSION=0.13.9
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_NO_CACHE=1
RUN pip3 install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /opt/flux-triton

# The locked dependencies (the package, its serve extra; neither the bundled test server nor the dev tools) into
# the container's own Python, which the Python-backend stub embeds: first, so that code changes keep this layer.
COPY pyproject.toml uv.lock README.md ./
RUN uv export --locked --no-default-groups --extra serve --no-emit-project --format requirements.txt \
        --output-file /tmp/requirements.txt \
    && uv pip install --system --break-system-packages --require-hashes -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY flux_triton/ flux_triton/
COPY model_repository/ model_repository/
RUN uv pip install --system --break-system-packages --no-deps . \
    && mkdir -p /opt/flux-triton/served \
    && cp -r model_repository/dit_transformer /opt/flux-triton/served/

# model_repository/ is the source the repository of an engine is generated from (`python -m flux_triton repo`);
# served/ is what the default command serves: dit_transformer, with the weights from $FLUX_MODEL_ROOT.
ENV FLUX_TRITON_HOME=/opt/flux-triton \
    FLUX_MODEL_ROOT=/models \
    FLUX_ENGINE_DIR=/engines \
    FLUX_COMPILE_CACHE_DIR=/compile-cache \
    TRITONSERVER_HOME=/opt/tritonserver \
    HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/cache
VOLUME ["/models", "/engines", "/compile-cache"]
EXPOSE 8000 8001 8002

# Triton's image has this user (uid 1000) for running the server without root.
USER triton-server

# The project's launcher: tritonserver behind the guard, every model probed and healed (docs/reliability.md).
# Set FLUX_ADMIN_KEY: the liveness check (`health`) needs the key to list the models and probe the internal ones.
HEALTHCHECK --interval=30s --timeout=120s --start-period=1800s --retries=3 \
    CMD ["python3", "-m", "flux_triton", "health", "--url", "127.0.0.1:8000"]
ENTRYPOINT ["python3", "-m", "flux_triton", "serve"]
CMD ["--address", "0.0.0.0", "--model-repository", "/opt/flux-triton/served"]
