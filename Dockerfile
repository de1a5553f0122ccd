# syntax=docker/dockerfile:1.6
# synthperf images, one Dockerfile, three targets:
#   service     SCP + completion loop + dashboard/API (no torch at run time is needed, but the
#               package depends on it, so the CPU wheel is installed)
#   worker-cpu  Celery worker for the "cpu" queue (classify, load, measure, encode, push)
#   worker-gpu  Celery worker for the "gpu" queue (core + synthesis) on CUDA torch
# Build: docker build --target service -t synthperf-service .
#        docker build --target worker-gpu -t synthperf-worker-gpu .
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128

# ---------------------------------------------------------------- wheels of our package only
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build
COPY pyproject.toml README.md ./
COPY common ./common
COPY service ./service
COPY worker ./worker
COPY models ./models
COPY phantom ./phantom
COPY cli ./cli
RUN python -m build --wheel --outdir /wheels .

# ---------------------------------------------------------------- CPU runtime (service + cpu worker)
FROM python:${PYTHON_VERSION}-slim AS runtime-cpu
ARG TORCH_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SYNTHPERF_DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /data synthperf \
    && mkdir -p /data && chown synthperf /data
RUN pip install --no-cache-dir torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER synthperf
WORKDIR /data
VOLUME ["/data"]
ENTRYPOINT ["/usr/bin/tini", "--"]

FROM runtime-cpu AS service
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SYNTHPERF_API_PORT','8080'))"
CMD ["synthperf", "serve", "--no-worker"]

FROM runtime-cpu AS worker-cpu
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "cpu", "--concurrency", "2", "--loglevel", "INFO"]

# ---------------------------------------------------------------- CUDA runtime (gpu worker)
FROM ${CUDA_IMAGE} AS worker-gpu
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive \
    SYNTHPERF_DATA_DIR=/data SYNTHPERF_DEVICE=cuda \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --home /data synthperf \
    && mkdir -p /data && chown synthperf /data
RUN pip install --no-cache-dir torch==${TORCH_VERSION} --index-url ${TORCH_CUDA_INDEX}
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The weights travel as files (verified by sha256 at load); the registry accepts a folder path.
COPY models/weights /opt/synthperf/weights
ENV SYNTHPERF_MODEL_NAME=/opt/synthperf/weights/demo
USER synthperf
WORKDIR /data
VOLUME ["/data"]
ENTRYPOINT ["/usr/bin/tini", "--"]
# One process per GPU: the model is loaded once per worker process after fork.
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "--concurrency", "1", "--loglevel", "INFO"]
