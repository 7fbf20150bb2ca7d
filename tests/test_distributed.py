"""Real torchrun (2 gloo processes) with checkpoints on a real S3 API (moto): exact resume after kill -9; the flat
gradient all-reduce (the CPU default) trains the same weights as DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, multiprocess_env, tiny_ptb_config, torchrun_train_command, train_log_entries

STEPS = 24


def _config(tmp_path: Path, data_dir: Path, name: str, checkpoint_url: str, **train) -> Path:
    config = tiny_ptb_config(tmp_path / name, data_dir)
    config["train"].update({"max_steps": STEPS, "eval_every": 8, "eval_tokens": 2000, "device": "cpu", **train})
    config["checkpoint"] = {"url": checkpoint_url, "every": 4, "keep_last": 2, "retry_base_delay": 0.2}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


_torchrun = torchrun_train_command
_env = multiprocess_env


_losses = train_log_entries  # per-step training loss


def _committed_steps(prefix: str) -> list[int]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(prefix)
    fs.invalidate_cache()
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    return [int(n.split("-")[1].split(".")[0]) for n in names if n.startswith("step-") and fs.exists(f"{root}/{n}/COMMITTED")]


def _wait_for_checkpoint(prefix: str, min_step: int, proc: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        steps = _committed_steps(prefix)
        if steps and max(steps) >= min_step:
            return True
        time.sleep(0.1)
    return False


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in children] + [g for c in children for g in _descendants(int(c))]


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker (workers may run in sessions of their own)."""
    pids = [proc.pid] + _descendants(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, ptb_char_dir, s3_endpoint) -> Path:
    """An uninterrupted 2-process run (default gradient reduction: flat on gloo); returns its run folder."""
    tmp_path = tmp_path_factory.mktemp("reference")
    url = f"s3://checkpoints/reference-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, ptb_char_dir, "run", url)
    proc = subprocess.run([*_torchrun(config), "--log-level", "DEBUG"], cwd=tmp_path, env=_env(s3_endpoint),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "gradients averaged over 2 ranks by one flat all-reduce per step" in proc.stderr
    return tmp_path / "run"


@pytest.fixture(scope="module")
def reference(reference_run):
    """The uninterrupted run's per-step losses: what every resumed run must reproduce."""
    losses = _losses(reference_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_ddp_matches_a_single_process_run(reference, tmp_path, ptb_char_dir, s3_endpoint):
    """Same global batch and lr semantics: 2 ranks x 8 stripes follow the 1 x 16 run closely."""
    config = _config(tmp_path, ptb_char_dir, "single", f"s3://checkpoints/single-{uuid.uuid4().hex[:8]}")
    proc = subprocess.run([PYTHON, "-m", "pipeline", "train", "--config", str(config)], cwd=tmp_path,
                          env=_env(s3_endpoint), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = _losses(tmp_path / "single")
    # Step 1 sees the same data and weights; dropout masks differ per rank, so allow a small gap.
    assert abs(single[1] - reference[1]) < 0.05
    assert abs(single[STEPS] - reference[STEPS]) < 0.25


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_flat_gradient_reduction_trains_the_same_weights_as_ddp(reference_run, tmp_path, ptb_char_dir, s3_endpoint):
    """One flat all-reduce of gradients + loss sums per step (FlatGradients) vs torch DDP's bucketed all-reduce:
    the same averaged gradient bit for bit (DDP halves each rank's gradient, flat halves their sum: both exact),
    hence the same gradient norms, 2TA decisions and weights; the logged loss differs only by the float32 sum."""
    import torch

    config = _config(tmp_path, ptb_char_dir, "ddp", f"s3://checkpoints/ddp-{uuid.uuid4().hex[:8]}",
                     gradient_reduction="ddp")
    proc = subprocess.run([*_torchrun(config), "--log-level", "DEBUG"], cwd=tmp_path, env=_env(s3_endpoint),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "gradients averaged over 2 ranks by DDP" in proc.stderr
    flat, ddp = _records(reference_run), _records(tmp_path / "ddp")
    assert [r["step"] for r in flat] == [r["step"] for r in ddp]
    for a, b in zip(flat, ddp):
        if "loss" in a:
            assert a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"], (a, b)
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        else:
            assert a["eval"] == b["eval"]
    weights = [torch.load(run / "final_model.pt", map_location="cpu", weights_only=False)["state_dict"]
               for run in (reference_run, tmp_path / "ddp")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _flat_gradients_rank(rank: int, store_path: str, out: str) -> None:
    """One of two gloo ranks (spawned): FlatGradients against a hand-computed mean."""
    import torch
    import torch.distributed as dist

    from pipeline.distributed import DistContext, FlatGradients

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        ctx = DistContext(rank=rank, world_size=2, backend="gloo")
        torch.manual_seed(rank)  # different weights per rank: the constructor makes them rank 0's
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        flat = FlatGradients(ctx, model.parameters(), max_values=4)
        assert all(p.grad is None for p in model.parameters())  # nothing attached before the first step
        results = {"weights": [p.detach().clone() for p in model.parameters()]}
        for step in range(2):
            flat.zero_()
            for micro in range(2):  # accumulation into the buffer
                x = torch.full((5, 3), float(1 + rank + micro + step))
                model(x).pow(2).sum().backward()
            if step == 1:  # a gradient replaced outside backward is taken back into the buffer
                model[0].bias.grad = model[0].bias.grad.clone() * 2
            local = [p.grad.clone() for p in model.parameters()]
            values = [1.5 + rank, 2.0] if step == 0 else [float(i + rank) for i in range(6)]  # 6 > max_values
            summed = flat.all_reduce(values)
            results[f"local{step}"] = local
            results[f"reduced{step}"] = [p.grad.clone() for p in model.parameters()]
            results[f"values{step}"] = summed
            assert all(p.grad.data_ptr() >= flat.buffer.data_ptr() for p in model.parameters())
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _spawned_rank(rank: int, store_path: str, folder: str) -> None:
    _flat_gradients_rank(rank, store_path, f"{folder}/rank{rank}.pt")


def test_flat_gradients_average_over_ranks_in_one_all_reduce(tmp_path):
    import torch
    import torch.multiprocessing as mp

    mp.start_processes(_spawned_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))  # rank 0's weights everywhere
    for step in (0, 1):
        for a, b, g0, g1 in zip(r0[f"reduced{step}"], r1[f"reduced{step}"], r0[f"local{step}"], r1[f"local{step}"]):
            assert torch.equal(a, b) and torch.equal(a, (g0 + g1) / 2)
    assert r0["values0"] == r1["values0"] == [4.0, 4.0]
    assert r0["values1"] == [float(2 * i + 1) for i in range(6)]  # more figures than slots: summed all the same


def test_gradient_reduction_option_is_checked():
    from pipeline.config import ConfigError, validate_config

    raw = tiny_ptb_config(Path("/tmp/unused"), Path("/tmp/unused-data"))
    raw["train"].update(engine="deepspeed", gradient_reduction="flat")
    with pytest.raises(ConfigError, match="gradient_reduction flat is a ddp-engine option"):
        validate_config(raw)
    raw["train"]["gradient_reduction"] = "auto"
    assert validate_config(raw).train.gradient_reduction == "auto"


def test_kill_whole_job_and_resume_from_s3(reference, tmp_path, ptb_char_dir, s3_endpoint):
    url = f"s3://checkpoints/killed-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, ptb_char_dir, "run", url)
    env = _env(s3_endpoint)
    kills = 0
    for min_step in (8, 16):
        proc = subprocess.Popen(_torchrun(config), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        if _wait_for_checkpoint(url, min_step, proc):
            _kill_job(proc)  # kill -9 of the launcher and both ranks at once
            kills += 1
        proc.wait()
    assert kills >= 1
    proc = subprocess.run(_torchrun(config), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr
    assert _losses(tmp_path / "run") == reference  # bit-identical, step by step


def test_kill_one_rank_then_restart_resumes_from_s3(reference, tmp_path, ptb_char_dir, s3_endpoint):
    """kill -9 of a single worker: torchrun tears the job down; restarting it resumes exactly.

    (The restart is done by the caller, as the Kubernetes driver restarts the train Job; torchrun's
    own in-place restarts, --max-restarts, were seen to fail intermittently here in gloo's
    connectFullMesh of the new round, so the pipeline relies on job-level restarts.)
    """
    url = f"s3://checkpoints/one-rank-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, ptb_char_dir, "run", url)
    env = _env(s3_endpoint)
    proc = subprocess.Popen(_torchrun(config), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    assert _wait_for_checkpoint(url, 8, proc)
    # The workers are the launcher's children running `-m pipeline`; kill -9 one of them.
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "no worker processes found"
    os.kill(int(children[-1]), signal.SIGKILL)
    assert proc.wait(timeout=300) != 0  # the job failed, as it should
    for pid in children:  # torchrun stops the surviving rank; make sure nothing outlives the job
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc = subprocess.run(_torchrun(config), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr
    assert _losses(tmp_path / "run") == reference


def test_only_rank_zero_talks_to_mlflow(tmp_path, ptb_char_dir, s3_endpoint):
    """One MLflow run per job (never one per rank), with every rank's memory and the job's throughput."""
    url = f"s3://checkpoints/tracked-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, ptb_char_dir, "tracked", url, max_steps=8, log_every=4)
    raw = yaml.safe_load(config.read_text())
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "ddp-tracking"}
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(_torchrun(config), cwd=tmp_path, env=_env(s3_endpoint), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddp-tracking").experiment_id])
    # The `train` command: one parent run and its train stage, whatever the number of ranks.
    assert sorted(r.data.tags["pipeline.kind"] for r in runs) == ["pipeline", "stage"]
    run = next(r for r in runs if r.data.tags["pipeline.kind"] == "stage")
    assert run.data.tags["pipeline.stage"] == "train"
    assert run.data.tags["pipeline.world_size"] == "2"
    for rank in (0, 1):
        assert run.data.metrics[f"memory/rank{rank}/params_mib"] > 0
        assert run.data.metrics[f"memory/rank{rank}/averages_mib"] > 0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "tokens_per_second")] == [4, 8]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "valid/reported_loss")] == [8]
    # The final model is published next to the checkpoints, for an evaluate stage in another container.
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{url}/final/final_model.pt")
    assert fs.cat(root) == (tmp_path / "tracked" / "final_model.pt").read_bytes()
