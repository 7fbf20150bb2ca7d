#!/usr/bin/env bash
# The MLflow tracking server of this project, the same locally and in Kubernetes (k8s/mlflow.yaml).
#
#   mlflow/serve.sh                      # SQLite in runs/mlflow.db, artifacts under runs/mlartifacts
#   MLFLOW_ARTIFACTS_DESTINATION=s3://mlflow-artifacts mlflow/serve.sh   # artifacts in S3 / MinIO
#
# Artifacts are proxied (--serve-artifacts): clients upload and download through the server and need
# no object-storage credentials; only the server holds them (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
# AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL from the environment, never from this file).
#
# Environment (all optional):
#   MLFLOW_BACKEND_STORE_URI      default sqlite:///$PWD/runs/mlflow.db; in Kubernetes a SQLite file on a
#                                 PersistentVolume or postgresql://user@host/db (password via PGPASSWORD)
#   MLFLOW_ARTIFACTS_DESTINATION  default $PWD/runs/mlartifacts; s3://bucket/prefix for object storage
#   MLFLOW_HOST / MLFLOW_PORT     default 127.0.0.1 / 5000 (0.0.0.0 in a container)
#   MLFLOW_WORKERS                default 2 (uvicorn workers)
#   MLFLOW_PYTHON                 the Python that has mlflow installed; default the project venv, else python3
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${MLFLOW_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi

backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/runs/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/runs/mlartifacts}"
if [[ "$backend" == sqlite:///* ]]; then
  mkdir -p "$(dirname "${backend#sqlite:///}")"
fi
if [[ "$artifacts" != *://* ]]; then
  mkdir -p "$artifacts"
fi

# The job-execution feature (scheduled GenAI jobs) starts extra workers: ~2.4 GB -> ~0.5 GB without it.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

exec "$python" -m mlflow server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  "$@"
