# syntax=docker/dockerfile:1
# The pipeline's container image: the project and its pinned dependencies (constraints.txt, the
# lock file) in a venv on a slim Python base. torch==2.13.0 from PyPI is the CUDA build on Linux
# x86_64: the CUDA runtime comes as nvidia-* wheels and the driver from the GPU node (NVIDIA
# container toolkit), so no CUDA base image is needed. Multi-stage: no build tools, caches or
# sources beyond the package end up in the final image; it holds no credentials (they come from
# Kubernetes Secrets at run time) and runs as a non-root user.
#
#   docker build -t ghcr.io/<org>/rlm-pipeline:0.1.0 .
#   docker run --rm ghcr.io/<org>/rlm-pipeline:0.1.0 configs      # ENTRYPOINT: python -m pipeline

# Both stages use the same base (the venv's python links to it); pin it by digest for reproducible
# builds (python:3.11-slim-bookworm@sha256:...).
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, in their own layer: it is reused while only the code changes.
COPY pyproject.toml constraints.txt README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt -r requirements.txt
COPY models ./models
COPY pipeline ./pipeline
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps -c constraints.txt . \
    && /opt/venv/bin/pip check

FROM python:3.11-slim-bookworm
# The source commit, for MLflow's mlflow.source.git.commit tag (the image has no .git).
ARG GIT_COMMIT=unknown
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
