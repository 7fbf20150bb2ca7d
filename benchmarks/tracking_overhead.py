"""What MLflow tracking costs the training loop: a real ``mlflow server`` (mlflow/serve.sh) on
127.0.0.1, N metric logs of one training step each (the per-step metrics the trainer logs).

Baseline, measured in the same run: synchronous ``MlflowClient.log_batch`` per step (what
``mlflow.log_metrics`` does). Ours: ``Tracker.log_metrics`` (queued, sent by a background thread),
the time the training thread spends in the call, plus the time until everything has reached the
server. Prints the ratio of training-thread time (ours / baseline).

    .venv/bin/python benchmarks/tracking_overhead.py --steps 500
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_PORT": str(port), "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
           "MLFLOW_ARTIFACTS_DESTINATION": str(root / "artifacts"), "MLFLOW_WORKERS": "1", "MLFLOW_PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(REPO / "mlflow" / "serve.sh")], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(f"{uri}/health", timeout=1).status_code == 200:
                return proc, uri
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError("mlflow server did not start")


def step_metrics(step: int) -> dict[str, float]:
    return {"train/loss": 1.0 / step, "train/grad_norm": 0.5, "lr": 0.002, "tokens_per_second": 1e5, "epoch": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.config import validate_config
    from pipeline.tracking import Tracker

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proc, uri = start_server(root)
        try:
            client = MlflowClient(tracking_uri=uri)
            run_id = client.create_run(client.create_experiment("baseline")).info.run_id
            started = time.perf_counter()
            for step in range(1, args.steps + 1):
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in step_metrics(step).items()])
            baseline = time.perf_counter() - started

            config = validate_config({
                "name": "ours", "work_dir": str(root / "w"), "data": {"dataset": "text", "source": "sample"},
                "tracking": {"uri": uri, "system_metrics": False},
            })
            tracker = Tracker(config, command="train")
            tracker.start_stage("train")
            tracker.flush()
            in_loop = 0.0
            started_all = time.perf_counter()
            for step in range(1, args.steps + 1):
                t0 = time.perf_counter()
                tracker.log_metrics(step_metrics(step), step=step)
                in_loop += time.perf_counter() - t0
            tracker.flush()
            delivered = time.perf_counter() - started_all
            tracker.close(None)
            stage = next(r for r in client.search_runs([client.get_experiment_by_name("ours").experiment_id])
                         if r.data.tags.get("pipeline.kind") == "stage")
            assert len(client.get_metric_history(stage.info.run_id, "train/loss")) == args.steps
        finally:
            os.killpg(proc.pid, 15)
            proc.wait()

    print(f"{args.steps} steps of 5 metrics each against mlflow server at {uri}")
    print(f"baseline  synchronous log_batch per step: {baseline:8.3f} s in the training thread "
          f"({baseline / args.steps * 1e3:.2f} ms/step)")
    print(f"ours      Tracker.log_metrics (queued):   {in_loop:8.3f} s in the training thread "
          f"({in_loop / args.steps * 1e6:.1f} us/step); all delivered after {delivered:.3f} s "
          f"in {tracker.sent} requests")
    print(f"ratio (training-thread time, ours / baseline): {in_loop / baseline:.4f}")


if __name__ == "__main__":
    main()
