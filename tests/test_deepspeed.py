"""A real DeepSpeed engine on CPU (DS_ACCELERATOR=cpu): torchrun with 2 gloo processes, ZeRO stage 1
and 2, checkpoints on a real S3 API (moto): exact resume after kill -9 of the whole job; the DeepSpeed
config derived from the typed schema; uncommitted folders skipped; divergence recovery."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PYTHON, multiprocess_env, pipeline_env, tiny_ptb_config, torchrun_train_command, train_log_entries

pytest.importorskip("deepspeed", reason="train.engine deepspeed needs the deepspeed package (a project dependency)")
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")

STEPS = 16
EVERY = 4


def _raw_config(tmp_path: Path, data_dir: Path, name: str, checkpoint_url: str, **train) -> dict:
    config = tiny_ptb_config(tmp_path / name, data_dir)
    config["train"].update({"max_steps": STEPS, "eval_every": EVERY, "eval_tokens": 2000, "device": "cpu",
                            "engine": "deepspeed", **train})
    config["checkpoint"] = {"url": checkpoint_url, "every": EVERY, "keep_last": 2, "retry_base_delay": 0.2}
    return config


def _config(tmp_path: Path, data_dir: Path, name: str, checkpoint_url: str, **train) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_raw_config(tmp_path, data_dir, name, checkpoint_url, **train)))
    return path


_torchrun = torchrun_train_command


def _env(s3_endpoint: dict) -> dict[str, str]:
    env = multiprocess_env(s3_endpoint)
    env.pop("DS_ACCELERATOR", None)  # the trainer sets it for train.device cpu
    return env


_records = train_log_entries


def _fs(url: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs, root


def _committed_steps(url: str) -> list[int]:
    """Steps of the committed folders under an s3:// URL (listed directly: no client-side cache)."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    steps = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            folder, _, name = item["Key"][len(prefix) + 1:].partition("/")
            if name == "COMMITTED" and folder.startswith("step-"):
                steps.append(int(folder.split("-")[1].split(".")[0]))
    return steps


def _kill_job(proc: subprocess.Popen) -> None:
    """kill -9 of the launcher and every rank at once. torchrun starts each worker in a session of its
    own, so killing the launcher's process group would leave the ranks running."""
    import psutil

    launcher = psutil.Process(proc.pid)
    procs = [launcher, *launcher.children(recursive=True)]
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL) if os.getpgid(p.pid) == p.pid else p.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, alive


def _wait_for_checkpoint(url: str, min_step: int, proc: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        steps = _committed_steps(url)
        if steps and max(steps) >= min_step:
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------------------------- config


def test_deepspeed_config_is_derived_from_the_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from pipeline.config import validate_config
    from pipeline.deepspeed_engine import DeepSpeedTrainer, deepspeed_config
    from pipeline.train import Trainer, trainer_class

    raw = _raw_config(tmp_path, tmp_path / "data", "cfg", "memory://unused", batch_size=32, grad_accum_steps=4,
                      zero_stage=2)
    raw["train"]["optimizer"]["clip_norm"] = 0.25
    config = validate_config(raw)
    ds = deepspeed_config(config.train, world_size=2, device="cpu")
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4  # 32 stripes / 2 ranks / 4 micro-batches
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == ds["train_batch_size"]
    assert ds["gradient_clipping"] == 0.25
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": False}
    assert ds["zero_allow_untested_optimizer"] is True  # our torch RAdam, not an optimizer DeepSpeed builds

    one = deepspeed_config(config.train.model_copy(update={"zero_stage": 1, "grad_accum_steps": 1}), world_size=1)
    assert (one["train_micro_batch_size_per_gpu"], one["gradient_accumulation_steps"]) == (32, 1)
    assert one["zero_optimization"]["stage"] == 1
    no_clip = config.train.optimizer.model_copy(update={"clip_norm": None})
    assert deepspeed_config(config.train.model_copy(update={"optimizer": no_clip}), 2)["gradient_clipping"] == 0.0
    bf16 = config.train.model_copy(update={"precision": "bf16"})
    assert deepspeed_config(bf16, 2, device="cuda")["bf16"] == {"enabled": True}
    assert deepspeed_config(bf16, 2, device="cpu")["bf16"] == {"enabled": False}
    with pytest.raises(ValueError, match="not divisible by the 3 ranks"):
        deepspeed_config(config.train, world_size=3)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        deepspeed_config(config.train.model_copy(update={"grad_accum_steps": 3}), world_size=2)

    # DeepSpeed's own parser accepts it (it checks batch = micro x accumulation x world itself).
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(one)
    assert (parsed.train_batch_size, parsed.gradient_clipping, parsed.zero_optimization_stage) == (32, 0.25, 1)

    # The engine is chosen by the config.
    assert trainer_class(config) is DeepSpeedTrainer
    assert trainer_class(validate_config({**raw, "train": {**raw["train"], "engine": "ddp"}})) is Trainer


# --------------------------------------------------------------------------------------------- checkpointer


def test_uncommitted_deepspeed_folder_is_skipped_and_world_size_is_checked(s3_endpoint):
    from pipeline.checkpoint import CheckpointError
    from pipeline.checkpoint.ds import COMMIT_FILE, DeepSpeedCheckpointer
    from pipeline.distributed import DistContext

    url = f"s3://checkpoints/ds-unit-{uuid.uuid4().hex[:8]}"
    ckpt = DeepSpeedCheckpointer.open(url, DistContext(), retry=None)
    files = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt", "trainer_state.pt", "rank-00000.pt", "rank-00001.pt"]

    def writer(step):
        def write_local(folder: Path, tag: str) -> None:
            (folder / tag).mkdir(parents=True)
            for name in files:
                (folder / tag / name).write_text(f"{name} of step {step}")
        return write_local

    for step in (4, 8):
        assert ckpt.save(step, writer(step), {"step": step, "engine": "deepspeed"}) == f"{url}/step-{step:08d}"
    fs, root = _fs(url)
    assert fs.exists(f"{root}/step-00000008/{COMMIT_FILE}")
    record = json.loads(fs.cat(f"{root}/step-00000008/{COMMIT_FILE}"))
    assert record["meta"]["world_size"] == 1 and sorted(record["files"]) == sorted(files)

    # A newer folder without COMMITTED (a save that was interrupted): never loaded.
    fs.pipe(f"{root}/step-00000012/mp_rank_00_model_states.pt", b"half-written")
    seen = {}

    def read_local(folder: Path, tag: str):
        seen[tag] = sorted(p.name for p in (folder / tag).iterdir())
        return (folder / tag / "trainer_state.pt").read_text()

    info, payload = ckpt.load_latest(read_local)
    assert info.name == "step-00000008" and payload == "trainer_state.pt of step 8"
    # Rank 0 downloads the shared files and its own shards only.
    assert seen == {"step-00000008": ["mp_rank_00_model_states.pt", "rank-00000.pt", "trainer_state.pt",
                                      "zero_pp_rank_0_mp_rank_00_optim_states.pt"]}
    # A save never reuses a folder name, not even the uncommitted one's.
    assert ckpt.save(12, writer(12), {"step": 12, "engine": "deepspeed"}).endswith("step-00000012.1")

    # Without COMMITTED the newest folder is skipped in favour of the previous committed one.
    fs.rm(f"{root}/step-00000012.1/{COMMIT_FILE}")
    assert ckpt.load_latest(read_local)[0].name == "step-00000008"

    # Another number of ranks: a clear error, not a silent mis-load.
    two = DeepSpeedCheckpointer.open(url, DistContext(rank=0, world_size=2), retry=None)
    with pytest.raises(CheckpointError, match="written by 1 ranks and this job has 2"):
        two.load_latest(read_local)


# --------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def references(tmp_path_factory, ptb_char_dir, s3_endpoint):
    """Uninterrupted 2-process runs (ZeRO 1 and 2, each rank's batch in 2 micro-batches): the losses every
    resumed run must reproduce."""
    out = {}
    for stage, accum in ((1, 2), (2, 2)):
        tmp_path = tmp_path_factory.mktemp(f"reference-zero{stage}")
        url = f"s3://checkpoints/ds-reference-{uuid.uuid4().hex[:8]}"
        config = _config(tmp_path, ptb_char_dir, "run", url, zero_stage=stage, grad_accum_steps=accum)
        proc = subprocess.run(_torchrun(config), cwd=tmp_path, env=_env(s3_endpoint), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        run_dir = tmp_path / "run"
        losses = _records(run_dir, "loss")
        assert sorted(losses) == list(range(1, STEPS + 1))
        assert all(math.isfinite(v) for v in losses.values())
        assert sorted(_committed_steps(url)) == [STEPS - EVERY, STEPS]  # keep_last 2 (+ best, one of them)
        out[stage] = {"losses": losses, "evals": _records(run_dir, "eval"), "run_dir": run_dir}
    return out


def test_zero_stages_train_the_same_model(references):
    """ZeRO 1 and ZeRO 2 follow the same trajectory (same data and dropout masks; float rounding aside)."""
    one, two = references[1]["losses"], references[2]["losses"]
    assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (one, two)
    assert two[STEPS] < two[1]


@pytest.mark.parametrize("stage,accum", [(1, 2), (2, 2)], ids=["zero1", "zero2"])
def test_kill_whole_job_and_resume_from_s3(references, stage, accum, tmp_path, ptb_char_dir, s3_endpoint):
    url = f"s3://checkpoints/ds-killed-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, ptb_char_dir, "run", url, zero_stage=stage, grad_accum_steps=accum)
    env = _env(s3_endpoint)
    proc = subprocess.Popen(_torchrun(config), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed = _wait_for_checkpoint(url, EVERY, proc)
    if killed:
        _kill_job(proc)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    # A newer, uncommitted folder (as a save interrupted mid-upload leaves): must be skipped.
    newest = max(_committed_steps(url))
    fs, root = _fs(url)
    planted = f"step-{newest + EVERY:08d}"
    fs.pipe(f"{root}/{planted}/mp_rank_00_model_states.pt", b"not a checkpoint")

    proc = subprocess.run(_torchrun(config), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", proc.stderr)
    assert resumed and int(resumed.group(1)) < STEPS, "the job was not killed mid-run"
    assert f"skipping checkpoint {url}/{planted}" in proc.stderr
    reference = references[stage]
    assert _records(tmp_path / "run", "loss") == reference["losses"]  # bit-identical, step by step
    assert _records(tmp_path / "run", "eval") == reference["evals"]  # 2TA decisions too
    a = torch.load(reference["run_dir"] / "final_model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_divergence_reloads_the_deepspeed_checkpoint_and_decays_lr(tmp_path, ptb_char_dir, monkeypatch):
    """A real non-finite loss (and gradient) inside the engine: ZeRO skips the update, the trainer reloads
    the last committed DeepSpeed checkpoint and continues with lr x divergence_lr_decay (one process)."""
    for key, value in (("DS_ACCELERATOR", "cpu"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    from pipeline.config import validate_config
    from pipeline.deepspeed_engine import DeepSpeedTrainer

    raw = _raw_config(tmp_path, ptb_char_dir, "diverge", str(tmp_path / "ckpt"), max_steps=12, zero_stage=2)
    config = validate_config(raw)
    trainer = DeepSpeedTrainer(config)
    real_objective = DeepSpeedTrainer._objective
    poisoned = {"done": False}

    def objective(self, loss):
        if self.step == 9 and not poisoned["done"]:  # the 10th step, after the step-8 checkpoint
            poisoned["done"] = True
            return real_objective(self, loss * math.nan)
        return real_objective(self, loss)

    monkeypatch.setattr(DeepSpeedTrainer, "_objective", objective)
    # DeepSpeed's own files are loaded with weights_only=True too: a pickle naming other globals is refused.
    evil = tmp_path / "evil.pt"
    torch.save({"optimizer_state_dict": _Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        trainer.engine.checkpoint_engine.load(str(evil))
    try:
        result = trainer.train()
        assert poisoned["done"] and result.divergence_restarts == 1 and result.step == 12
        assert math.isclose(trainer._lr(), config.train.optimizer.lr * 0.9)
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    finally:
        trainer.close()
    lines = [json.loads(l) for l in (tmp_path / "diverge" / "train_log.jsonl").read_text().splitlines()]
    steps = [l["step"] for l in lines if "loss" in l]
    assert steps.count(9) == 2 and steps.count(10) == 1  # step 9 trained again after reloading step 8
    assert math.isclose(_records(tmp_path / "diverge", "lr")[10], config.train.optimizer.lr * 0.9)


def test_a_damaged_deepspeed_checkpoint_is_set_aside_and_the_previous_one_loaded(tmp_path, ptb_char_dir):
    """One flipped bit in DeepSpeed's module states: caught by its digest after download, reported in one
    line, set aside (not deleted); the run resumes from the previous committed checkpoint instead. (Separate
    processes: DeepSpeed caches its process groups, so one engine per process.)"""
    from pipeline.checkpoint import SET_ASIDE_FILE

    raw = _raw_config(tmp_path, ptb_char_dir, "damaged", str(tmp_path / "ckpt"), max_steps=8)
    config = tmp_path / "damaged.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = pipeline_env()
    env.pop("DS_ACCELERATOR", None)
    cmd = [PYTHON, "-m", "pipeline", "train", "--config", str(config)]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    states = tmp_path / "ckpt" / "step-00000008" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0x01
    states.write_bytes(bytes(data))
    again = subprocess.run(cmd + ["--train.max_steps", "12"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    [warning] = [line for line in again.stderr.splitlines() if "cannot load checkpoint" in line]
    assert "step-00000008: mp_rank_00_model_states.pt: sha256" in warning and "falling back to step-00000004" in warning
    assert re.search(r"resumed from \S+step-00000004 at step 4", again.stderr)
    assert json.loads((states.parent / SET_ASIDE_FILE).read_text())["kind"] == "corrupt"
    assert states.exists()
    steps = [r for r in _records(tmp_path / "damaged", "loss")]
    assert steps == list(range(1, 13))
