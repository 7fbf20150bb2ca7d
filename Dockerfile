# syntax=docker/dockerfile:1
# The pipeline's container images: the project and its pinned dependencies (constraints.txt, the
# lock file) in a venv on a slim Python base. Multi-stage: no build tools, caches or sources beyond
# the package end up in the final image; it holds no credentials (they come from Kubernetes Secrets
# at run time) and runs as a non-root user. Two variants (build arg TORCH):
#
# * cuda (default): torch==2.13.0 from PyPI, the CUDA build on Linux x86_64: the CUDA runtime comes
#   as nvidia-* wheels and the driver from the GPU node (NVIDIA container toolkit), so no CUDA base
#   image is needed. The train and evaluate pods (cluster.image).
# * cpu: the CPU-only build of the same torch, from TORCH_CPU_INDEX (or, with it empty, from a
#   folder of wheels given as the torch-wheels build context). The driver, prepare, bucket and MLflow
#   pods (cluster.cpu_image): they never touch a GPU, and the image is gigabytes smaller.
#
#   docker build -t ghcr.io/<org>/rlm-pipeline:0.1.0 .
#   docker build --build-arg TORCH=cpu -t ghcr.io/<org>/rlm-pipeline:0.1.0-cpu .
#   docker run --rm ghcr.io/<org>/rlm-pipeline:0.1.0 configs      # ENTRYPOINT: python -m pipeline
#   scripts/build-image.sh build                                  # both, with buildah (no Docker engine)

# Both stages use the same base (the venv's python links to it): BASE_IMAGE:BASE_TAG, a tag always
# given; pin it by digest for reproducible builds (BASE_TAG=3.11-slim-bookworm@sha256:...). Any
# Debian-based image with python3 (>= 3.11), its venv module and CA certificates works:
# scripts/build-image.sh --base debootstrap makes one where no container registry can be reached.
ARG BASE_IMAGE=python
ARG BASE_TAG=3.11-slim-bookworm

# Empty unless the build is given a folder of wheels: --build-context torch-wheels=DIR.
FROM scratch AS torch-wheels

FROM ${BASE_IMAGE}:${BASE_TAG} AS build
ARG TORCH=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src
# pip may get a pip.conf for the build only (a registry mirror, its credentials; a TLS proxy's CA as
# /run/secrets/build-ca.crt), as build secrets that no layer keeps; both are optional:
#   docker build --secret id=pip.conf,src=FILE [--secret id=build-ca.crt,src=FILE] ...
# Dependencies first, in their own layer: it is reused while only the code changes. The cpu variant
# installs the CPU torch first (no dependencies: they come from PyPI and the lock file next); the
# lock file's torch==2.13.0 then accepts the installed 2.13.0+cpu.
COPY pyproject.toml constraints.txt README.md ./
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf --mount=type=secret,id=build-ca.crt \
    --mount=type=bind,from=torch-wheels,target=/wheels \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && case "$TORCH" in \
         cuda) ;; \
         cpu) if [ -n "$TORCH_CPU_INDEX" ]; then set -- --index-url "$TORCH_CPU_INDEX"; \
              else set -- --no-index --find-links /wheels; fi \
              && /opt/venv/bin/pip install --no-cache-dir --no-deps "$@" "$(grep -E '^torch==' constraints.txt)" ;; \
         *) echo "build arg TORCH must be cuda or cpu, not '$TORCH'" >&2; exit 1 ;; \
       esac \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt -r requirements.txt
COPY models ./models
COPY pipeline ./pipeline
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf --mount=type=secret,id=build-ca.crt \
    /opt/venv/bin/pip install --no-cache-dir --no-deps -c constraints.txt . \
    && /opt/venv/bin/pip check

FROM ${BASE_IMAGE}:${BASE_TAG}
# The source commit, for MLflow's mlflow.source.git.commit tag (the image has no .git).
ARG GIT_COMMIT=unknown
ARG TORCH=cuda
LABEL org.rlm-pipeline.torch=$TORCH
# checkov:skip=CKV_DOCKER_2:a batch image (pipeline stages, driver); Kubernetes ignores HEALTHCHECK, the long-running MLflow Deployment has HTTP probes
ENV PATH=/opt/venv/bin:$PATH \
    GIT_COMMIT=$GIT_COMMIT \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
RUN groupadd --system --gid 10001 rlm \
    && useradd --system --uid 10001 --gid rlm --home-dir /work --no-create-home --shell /usr/sbin/nologin rlm \
    && mkdir -p /work \
    && chown rlm:rlm /work
COPY --from=build /opt/venv /opt/venv
# The MLflow server script (k8s/mlflow.yaml runs /app/mlflow/serve.sh in this image).
COPY mlflow /app/mlflow
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["python", "-m", "pipeline"]
CMD ["--help"]
