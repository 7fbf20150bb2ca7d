"""Exact resume after `kill -9`, and divergence recovery (reload + lr x 0.9)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PYTHON, pipeline_env, tiny_ptb_config, train_log_entries

STEPS = 24


def _config(tmp_path: Path, data_dir: Path, name: str) -> Path:
    config = tiny_ptb_config(tmp_path / name, data_dir)
    config["train"].update(max_steps=STEPS, eval_every=8, eval_tokens=2000)
    config["checkpoint"] = {"every": 4, "keep_last": 2}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


_losses = train_log_entries  # per-step training loss


def _evals(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval" in record:
            out[record["step"]] = record["eval"]
    return out


def _train(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "pipeline", "train", "--config", str(config)],
        cwd=cwd, env=pipeline_env(), capture_output=True, text=True, timeout=600,
    )


def test_resume_after_kill_gives_identical_losses(tmp_path, ptb_char_dir):
    reference = _config(tmp_path, ptb_char_dir, "reference")
    proc = _train(reference, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _losses(tmp_path / "reference")
    assert sorted(expected) == list(range(1, STEPS + 1))

    killed = _config(tmp_path, ptb_char_dir, "killed")
    ckpt = tmp_path / "killed" / "checkpoints"
    kills = 0
    # Kill the run twice at arbitrary points after it has committed a checkpoint past step 0.
    for min_step in (8, 16):
        child = subprocess.Popen(
            [PYTHON, "-m", "pipeline", "train", "--config", str(killed)],
            cwd=tmp_path, env=pipeline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and child.poll() is None:
            done = [int(p.parent.name.split("-")[1].split(".")[0]) for p in ckpt.glob("step-*/COMMITTED")]
            if done and max(done) >= min_step:
                break
            time.sleep(0.05)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            kills += 1
        child.wait()
    assert kills >= 1, "the run finished before it could be killed; make it longer"
    proc = _train(killed, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    resumed = _losses(tmp_path / "killed")
    assert resumed == expected  # bit-identical floats, step by step
    # Each resume cut the log back to its checkpoint's step: every step and evaluation appears once.
    lines = [json.loads(line) for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in lines if "eval" in r] == [8, 16, 24]
    assert _evals(tmp_path / "killed") == _evals(tmp_path / "reference")
    a = torch.load(tmp_path / "reference" / "final_model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "final_model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_reloads_last_checkpoint_and_decays_lr(tmp_path, ptb_char_dir, monkeypatch):
    from pipeline.config import load_config
    from pipeline.train import Trainer

    config = load_config(_config(tmp_path, ptb_char_dir, "diverge"))
    trainer = Trainer(config)
    real_step = Trainer.train_step
    poisoned = {"done": False}

    def flaky_step(self):
        # The 11th step (after the step-8 checkpoint) produces a non-finite loss once.
        if self.step == 10 and not poisoned["done"]:
            poisoned["done"] = True
            return math.nan, math.nan
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", flaky_step)
    result = trainer.train()
    assert poisoned["done"]
    assert result.divergence_restarts == 1
    assert result.step == STEPS
    assert math.isclose(trainer.optimizer.param_groups[0]["lr"], config.train.optimizer.lr * 0.9)
    # Steps 9 and 10 were trained twice: before the NaN and again after reloading step 8.
    lines = [json.loads(l) for l in (tmp_path / "diverge" / "train_log.jsonl").read_text().splitlines()]
    steps = [l["step"] for l in lines if "loss" in l]
    assert steps.count(9) == 2 and steps.count(10) == 2 and steps.count(11) == 1
    lrs = {l["step"]: l["lr"] for l in lines if "loss" in l}
    assert math.isclose(lrs[11], config.train.optimizer.lr * 0.9)
    # The resumed lr scale is checkpointed: a restart keeps the decayed learning rate.
    fresh = Trainer(config)
    assert fresh.resume() and fresh.step == STEPS
    assert math.isclose(fresh.lr_scale, 0.9) and fresh.divergence_restarts == 1


def test_divergence_gives_up_after_max_restarts(tmp_path, ptb_char_dir, monkeypatch):
    from pipeline.config import load_config
    from pipeline.train import Trainer, TrainingDiverged

    config = load_config(_config(tmp_path, ptb_char_dir, "hopeless"))
    config.train.max_divergence_restarts = 2
    config.checkpoint.retry_base_delay = 0.0
    monkeypatch.setattr(Trainer, "train_step", lambda self: (math.inf, 1.0))
    with pytest.raises(TrainingDiverged, match="max_divergence_restarts"):
        Trainer(config).train()
