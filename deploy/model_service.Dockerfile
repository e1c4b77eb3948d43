# model_service: weights, forward pass, batching, generation.
#   GPU (default): docker build -f deploy/model_service.Dockerfile -t splitserve/model-service:cuda .
#   CPU:           docker build -f deploy/model_service.Dockerfile --build-arg VARIANT=cpu -t splitserve/model-service:cpu .
# Every setting comes from MODEL_SERVICE_* variables (see docs/operations.md).
# Builds without a registry or behind a TLS-inspecting proxy: scripts/docker_smoke.py.
ARG VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ARG CUDA_TAG=cuda12.8-cudnn9-runtime
# The classic builder (no BuildKit) resolves every stage's base, so a CPU build there
# needs CUDA_IMAGE to name an image it has; BuildKit skips the unused stage.
ARG CUDA_IMAGE=pytorch/pytorch:${TORCH_VERSION}-${CUDA_TAG}

# CUDA variant: the official PyTorch runtime image already carries torch built for CUDA.
FROM ${CUDA_IMAGE} AS base-cuda

# CPU variant: slim Python with the CPU-only torch wheel (no CUDA libraries, ~5x smaller).
FROM python:3.11-slim AS base-cpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip's own variables, empty unless given: a CA bundle, a directory of wheels (e.g. the +cpu torch).
ARG PIP_CERT=""
ARG PIP_FIND_LINKS=""
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

FROM base-${VARIANT}
ARG PIP_CERT=""
ARG PIP_FIND_LINKS=""
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    MODEL_SERVICE_PORT=8001 \
    MODEL_SERVICE_HTTP_PORT=8000 \
    MODEL_SERVICE_METRICS_PORT=8002 \
    PROBE_ADDRESS=127.0.0.1:8001
WORKDIR /app
COPY pyproject.toml README.md ./
COPY splitserve_pb ./splitserve_pb
COPY splitserve_common ./splitserve_common
COPY model_service ./model_service
COPY preproc_service ./preproc_service
COPY client ./client
# torch is already in the base image and satisfies the project's pin, so pip keeps it.
RUN pip install --no-cache-dir ".[model]" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin splitserve
USER 10001
EXPOSE 8000 8001 8002
# The model directory is mounted here read-only (compose volume / Kubernetes volume).
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-m", "splitserve_common.health_probe"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "model_service"]
