# syntax=docker/dockerfile:1.6
# synthperf images, one Dockerfile, three targets:
#   service     SCP + completion loop + dashboard/API (no torch at run time is needed, but the
#               package depends on it, so the CPU wheel is installed)
#   worker-cpu  Celery worker for the "cpu" queue (classify, load, measure, encode, push)
#   worker-gpu  Celery worker for the "gpu" queue (core + synthesis) on CUDA torch
# Build: docker build --target service -t synthperf-service .
#        docker build --target worker-gpu -t synthperf-worker-gpu .
# Base images are build arguments. The defaults are the public python:3.11-slim and CUDA images; any
# Debian or Ubuntu image works (python3 is installed from its own archive when missing): `make images`
# builds service and worker-cpu on a local debootstrap'd Debian bookworm (docs/operations.md, "Images").
# Every runtime target runs deploy/images/smoke_check.py as a build step: `synthperf --help`, the
# model weights' sha256 and `alembic upgrade head` on a throwaway SQLite file must pass, or the build fails.
ARG BASE_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
# How pip finds torch (installed --no-deps; its dependencies come with ours). Default: the CPU wheel
# index; a folder of wheels mounted into the build works too: --no-index --find-links /DIR
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128

# ---------------------------------------------------------------- Python in a venv, on any base
FROM ${BASE_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# python:3.11-slim has python3 (and CA certificates); a bare Debian base gets python3 from Debian
# (bookworm: 3.11).
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && apt-get clean && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

# ---------------------------------------------------------------- runtime dependencies (a list)
FROM python-base AS requirements
COPY pyproject.toml /src/
COPY deploy/images/requirements.py /src/deploy/images/
RUN python /src/deploy/images/requirements.py /src/pyproject.toml > /requirements.txt

# ---------------------------------------------------------------- the wheel of our package only
FROM python-base AS build
# PIP_CERT: a CA bundle for a TLS-intercepting proxy, mounted into the build (optional)
ARG PIP_CERT
WORKDIR /src
RUN pip install --no-cache-dir "setuptools>=68" wheel
COPY pyproject.toml README.md ./
COPY common ./common
COPY service ./service
COPY worker ./worker
COPY models ./models
COPY phantom ./phantom
COPY cli ./cli
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

# ---------------------------------------------------------------- CPU runtime (service + cpu worker)
FROM python-base AS runtime-cpu
ARG TORCH_VERSION
ARG TORCH_PIP_ARGS
ARG PIP_CERT
ENV SYNTHPERF_DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk tini \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /data synthperf \
    && mkdir -p /data && chown synthperf /data
# Dependencies before the wheel: a code change leaves this large layer cached.
COPY --from=requirements /requirements.txt /opt/synthperf/requirements.txt
RUN pip install --no-cache-dir --no-deps "torch==${TORCH_VERSION}" ${TORCH_PIP_ARGS} \
    && pip install --no-cache-dir -r /opt/synthperf/requirements.txt
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels && pip check
COPY deploy/images/smoke_check.py /opt/synthperf/smoke_check.py
RUN python /opt/synthperf/smoke_check.py
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
# Not built on the development machine (no CUDA base image there); same steps as runtime-cpu.
FROM ${CUDA_IMAGE} AS worker-gpu
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
ARG PIP_CERT
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive \
    SYNTHPERF_DATA_DIR=/data SYNTHPERF_DEVICE=cuda \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --home /data synthperf \
    && mkdir -p /data && chown synthperf /data
COPY --from=requirements /requirements.txt /opt/synthperf/requirements.txt
RUN pip install --no-cache-dir --no-deps "torch==${TORCH_VERSION}" --index-url ${TORCH_CUDA_INDEX} \
    && pip install --no-cache-dir -r /opt/synthperf/requirements.txt
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels && pip check
# The weights travel as files (verified by sha256 at load); the registry accepts a folder path.
COPY models/weights /opt/synthperf/weights
ENV SYNTHPERF_MODEL_NAME=/opt/synthperf/weights/demo
COPY deploy/images/smoke_check.py /opt/synthperf/smoke_check.py
RUN python /opt/synthperf/smoke_check.py
USER synthperf
WORKDIR /data
VOLUME ["/data"]
ENTRYPOINT ["/usr/bin/tini", "--"]
# One process per GPU: the model is loaded once per worker process after fork.
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "--concurrency", "1", "--loglevel", "INFO"]
