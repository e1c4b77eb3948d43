# preproc_service: tokenizer + task pre/postprocessing. CPU only, no torch.
#   docker build -f deploy/preproc_service.Dockerfile -t splitserve/preproc-service .
# Every setting comes from PREPROC_* variables (see docs/operations.md).
FROM python:3.11-slim
# pip's own variables, empty unless given (a CA bundle for a TLS-inspecting proxy, a wheel directory).
ARG PIP_CERT=""
ARG PIP_FIND_LINKS=""
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    PREPROC_PORT=8011 \
    PREPROC_HTTP_PORT=8010 \
    PREPROC_METRICS_PORT=8012 \
    PROBE_ADDRESS=127.0.0.1:8011
WORKDIR /app
COPY pyproject.toml README.md ./
COPY splitserve_pb ./splitserve_pb
COPY splitserve_common ./splitserve_common
COPY model_service ./model_service
COPY preproc_service ./preproc_service
COPY client ./client
# The preproc extra has no torch; the check fails the build if anything pulled it in.
RUN pip install --no-cache-dir ".[preproc]" \
    && ! python -c "import torch" 2>/dev/null \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin splitserve
USER 10001
EXPOSE 8010 8011 8012
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "splitserve_common.health_probe"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "preproc_service"]
