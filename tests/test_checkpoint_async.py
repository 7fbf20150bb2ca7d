"""Checkpoints saved in the background (``checkpoint.async_save``): real trainers on real PTB characters,
checkpoints in a local folder or on the moto S3 server, two gloo processes for the process-group part.

Where a test must hold a background save at a known point (to change the live state under it, or to
kill the process before its commit), it wraps one method of the real storage with a gate; everything
else runs as in training.
"""

from __future__ import annotations

import errno
import json
import logging
import signal
import subprocess
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import PYTHON, REPO, pipeline_env, tiny_ptb_config, train_log_entries
from pipeline.checkpoint import COMMIT_FILE, CheckpointSaveFailed, CheckpointStorage
from pipeline.config import ConfigError, validate_config
from pipeline.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

WAIT_S = 60.0  # upper bound of any wait on a background save (they take well under a second here)


def _raw_config(tmp_path: Path, data_dir: Path, name: str, *, async_save: bool = True, url: str | None = None,
                max_steps: int = 12, **checkpoint: Any) -> dict:
    config = tiny_ptb_config(tmp_path / name, data_dir)
    config["train"].update(max_steps=max_steps, eval_every=4, eval_tokens=1000, log_every=4)
    config["checkpoint"] = {"every": 4, "keep_last": 2, "async_save": async_save, "retry_base_delay": 0.0,
                            **({"url": url} if url else {}), **checkpoint}
    return config


def _config(*args: Any, **kwargs: Any):
    return validate_config(_raw_config(*args, **kwargs))


def _train(trainer: Trainer, steps: int) -> None:
    if trainer.step == 0:
        trainer._apply_lr()
    for _ in range(steps):
        trainer.train_step()


def _snapshot(trainer: Trainer) -> Any:
    """Everything a checkpoint holds of this trainer, copied (tensors cloned)."""
    return _clone({"dcp": trainer._dcp_state(), "per_rank": trainer._per_rank_state()})


def _clone(node: Any) -> Any:
    if isinstance(node, torch.Tensor):
        return node.detach().clone()
    if isinstance(node, dict):
        return {k: _clone(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_clone(v) for v in node]
    return node


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, (path, a, b)


def _restored(config) -> Trainer:
    trainer = Trainer(config)
    assert trainer.restore() is not None
    return trainer


def _committed(trainer: Trainer) -> list[int]:
    return [info.step for info in trainer.checkpointer.storage.committed()]


class Gate:
    """Holds every call of one storage method (on any thread) until ``open()``; ``entered`` is set once the
    first call is waiting."""

    def __init__(self, monkeypatch, method: str, when=lambda name, *args: True) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()
        real = getattr(CheckpointStorage, method)

        def gated(storage, name, *args, **kwargs):
            if when(name, *args):
                self.entered.set()
                assert self._open.wait(WAIT_S), "the test never opened the gate"
            return real(storage, name, *args, **kwargs)

        monkeypatch.setattr(CheckpointStorage, method, gated)

    def open(self) -> None:
        self._open.set()


# --------------------------------------------------------------------------- what is saved


@pytest.fixture(params=["local", "s3"])
def checkpoint_urls(request, tmp_path) -> tuple[str, str]:
    """Two checkpoint locations of one kind: (the async run's, the sync run's)."""
    if request.param == "local":
        return str(tmp_path / "async-ckpt"), str(tmp_path / "sync-ckpt")
    request.getfixturevalue("s3_endpoint")
    prefix = f"s3://checkpoints/async-{uuid.uuid4().hex[:8]}"
    return f"{prefix}/async", f"{prefix}/sync"


def test_an_async_save_commits_what_a_sync_save_commits(tmp_path, ptb_char_dir, checkpoint_urls):
    async_url, sync_url = checkpoint_urls
    async_config = _config(tmp_path, ptb_char_dir, "async", url=async_url)
    sync_config = _config(tmp_path, ptb_char_dir, "sync", async_save=False, url=sync_url)

    trainer = Trainer(async_config)
    assert trainer.background_saves is not None
    _train(trainer, 3)
    trainer.checkpoint_step()
    assert trainer.background_saves.stall_s < 5.0
    _train(trainer, 2)  # training goes on while the save is written
    trainer.wait_for_checkpoint()

    reference = Trainer(sync_config)  # the same seed and data: the same state after 3 steps
    assert reference.background_saves is None
    _train(reference, 3)
    expected = _snapshot(reference)
    reference.checkpoint_step()

    async_storage, sync_storage = trainer.checkpointer.storage, reference.checkpointer.storage
    assert _committed(trainer) == _committed(reference) == [3]
    async_info, sync_info = async_storage.latest(), sync_storage.latest()
    assert async_info.name == sync_info.name == "step-00000003"
    assert async_info.meta["step"] == 3 and async_info.meta["optimizer_state"] is True
    assert async_info.files.keys() == sync_info.files.keys()
    # The same bytes: the shards and the per-rank file (.metadata differs by DCP's random save id).
    for filename in async_info.files.keys() - {".metadata"}:
        assert async_info.files[filename] == sync_info.files[filename], filename
    _assert_same(_snapshot(_restored(async_config)), expected)
    _assert_same(_snapshot(_restored(sync_config)), expected)


def test_training_goes_on_during_the_save_and_its_changes_do_not_leak_into_it(tmp_path, ptb_char_dir, monkeypatch):
    config = _config(tmp_path, ptb_char_dir, "run")
    trainer = Trainer(config)
    _train(trainer, 2)
    expected = _snapshot(trainer)
    gate = Gate(monkeypatch, "write_bytes")  # the first file the save writes: nothing is written before it opens
    trainer.checkpoint_step()
    assert gate.entered.wait(WAIT_S) and trainer.background_saves.in_flight
    _train(trainer, 3)  # optimizer steps, averages, data position, RNG: all move on under the save
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(1000.0)
    assert _committed(trainer) == []
    gate.open()
    trainer.wait_for_checkpoint()
    assert _committed(trainer) == [2]
    _assert_same(_snapshot(_restored(config)), expected)


def test_one_save_in_flight_the_next_one_waits_for_its_commit(tmp_path, ptb_char_dir, monkeypatch):
    config = _config(tmp_path, ptb_char_dir, "run")
    trainer = Trainer(config)
    storage = trainer.checkpointer.storage
    _train(trainer, 1)
    seen: list[tuple[str, bool]] = []  # (folder, was step 1 committed when this save wrote its first file)
    real = CheckpointStorage.write_bytes

    def recording(self, name, filename, payload):
        if filename.startswith("rank-"):  # a save's first file
            seen.append((name, Path(storage.file_path("step-00000001", COMMIT_FILE)).exists()))
        return real(self, name, filename, payload)

    monkeypatch.setattr(CheckpointStorage, "write_bytes", recording)
    gate = Gate(monkeypatch, "write_commit")  # step 1 written, held just before its commit record
    trainer.checkpoint_step()
    assert gate.entered.wait(WAIT_S)
    _train(trainer, 1)
    second = threading.Thread(target=trainer.checkpoint_step)  # the training thread's next checkpoint
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive(), "a second save started while the first was in flight"
    assert [name for name, _ in seen] == ["step-00000001"]
    gate.open()
    second.join(timeout=WAIT_S)
    assert not second.is_alive()
    trainer.wait_for_checkpoint()
    assert not trainer.background_saves.in_flight
    assert seen == [("step-00000001", False), ("step-00000002", True)]
    assert _committed(trainer) == [1, 2]


# --------------------------------------------------------------------------- failures


def _failing_writes(monkeypatch, from_step: int, error: BaseException) -> list[str]:
    """Every file write into the folder of a step >= ``from_step`` raises ``error``; returns the folders tried."""
    real = CheckpointStorage.write_bytes
    tried: list[str] = []

    def write(self, name, filename, payload):
        if int(name.split("-")[1].split(".")[0]) >= from_step:
            tried.append(name)
            raise error
        return real(self, name, filename, payload)

    monkeypatch.setattr(CheckpointStorage, "write_bytes", write)
    return tried


def test_a_failing_background_save_is_retried_then_stops_the_run_at_the_next_checkpoint(
        tmp_path, ptb_char_dir, monkeypatch, caplog):
    config = _config(tmp_path, ptb_char_dir, "run", retry_attempts=2, max_failed_saves=2)
    trainer = Trainer(config)
    _train(trainer, 1)
    trainer.checkpoint_step()  # step 1 commits
    tried = _failing_writes(monkeypatch, 2, ConnectionError("storage unreachable"))
    _train(trainer, 1)
    with caplog.at_level(logging.WARNING):
        trainer.checkpoint_step()  # step 2: fails in the background (retried once: a network error)
        _train(trainer, 1)
        trainer.checkpoint_step()  # waits for step 2 (failure 1 of 2: logged, training goes on); starts step 3
        assert [name for name in tried if name.startswith("step-00000002")] == ["step-00000002"] * 2  # 2 attempts
        assert "checkpoint of step 2 failed (attempt 1/2: ConnectionError: storage unreachable)" in caplog.text
        assert "could not save the checkpoint of step 2" in caplog.text and "1 failed save(s) in a row" in caplog.text
        _train(trainer, 1)
        with pytest.raises(CheckpointSaveFailed, match="2 checkpoints in a row") as err:
            trainer.checkpoint_step()  # step 3 failed too: the run stops here, on the training thread
    assert err.value.exit_code == 1 and "storage unreachable" in str(err.value)
    assert "the background save of the checkpoint of step 3 failed" in caplog.text
    assert not trainer.background_saves.in_flight
    # The committed checkpoint is untouched; the failed saves left no folder behind.
    assert sorted(p.name for p in Path(config.checkpoint_url).iterdir()) == ["step-00000001"]
    assert _committed(trainer) == [1]


def test_a_background_save_that_failed_for_good_stops_the_run_at_its_end(tmp_path, ptb_char_dir, monkeypatch):
    config = _config(tmp_path, ptb_char_dir, "run", max_steps=8, retry_attempts=3, max_failed_saves=1)
    tried = _failing_writes(monkeypatch, 4, OSError(errno.ENOSPC, "No space left on device"))
    trainer = Trainer(config)
    with pytest.raises(CheckpointSaveFailed, match="No space left on device") as err:
        trainer.train()  # step 4 fails in the background; the end of training (step 8) raises it
    assert err.value.exit_code == 5  # permanent: a re-created Job would fail the same way
    assert tried == ["step-00000004"]  # a full device is not retried
    assert trainer.step == 8 and not (config.run_dir / "final_model.pt").exists()
    assert sorted(p.name for p in Path(config.checkpoint_url).iterdir()) == ["step-00000000"]


_KILLED_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from pipeline.checkpoint import CheckpointStorage
    from pipeline.config import load_config
    from pipeline.train import Trainer

    torch.set_num_threads(1)
    config_path, marker = sys.argv[1], Path(sys.argv[2])
    real = CheckpointStorage.write_commit

    def write_commit(self, name, meta, files):
        if name == "step-00000004":  # every file of step 4 written: the process dies before its commit
            marker.write_text(name)
            time.sleep(3600)
        return real(self, name, meta, files)

    CheckpointStorage.write_commit = write_commit
    Trainer(load_config(config_path)).train()
""")


def test_a_background_save_killed_before_its_commit_is_ignored_on_restore(tmp_path, ptb_char_dir, caplog):
    raw = _raw_config(tmp_path, ptb_char_dir, "run", max_steps=8)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    marker = tmp_path / "held"
    proc = subprocess.Popen([PYTHON, "-c", _KILLED_RUN, str(config_path), str(marker)], cwd=REPO, env=pipeline_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log_file = tmp_path / "run" / "train_log.jsonl"
    try:
        deadline = time.monotonic() + 120
        trained_on = False
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [json.loads(line).get("step", 0) for line in
                     (log_file.read_text().splitlines() if log_file.exists() else []) if line.endswith("}")]
            trained_on = marker.exists() and max(steps, default=0) >= 6  # training went on past the held save
            if trained_on:
                break
            time.sleep(0.05)
        assert trained_on, proc.stderr.read() if proc.poll() is not None else "timed out"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    folder = Path(validate_config(raw).checkpoint_url) / "step-00000004"
    assert {".metadata", "rank-00000.pt"} <= {p.name for p in folder.iterdir()}
    assert not (folder / COMMIT_FILE).exists()

    trainer = Trainer(validate_config(raw))
    with caplog.at_level(logging.WARNING):
        assert trainer.resume() and trainer.step == 0
    assert "step-00000004: no COMMITTED (a save was interrupted)" in caplog.text
    assert trainer.checkpointer.storage.new_folder(4) == "step-00000004.1"  # never reused


# --------------------------------------------------------------------------- exact resume


_losses = train_log_entries  # per-step training loss


def test_a_run_resumed_from_async_checkpoints_continues_bit_exactly(tmp_path, ptb_char_dir, monkeypatch):
    reference_config = _config(tmp_path, ptb_char_dir, "sync", async_save=False)
    Trainer(reference_config).train()
    expected = _losses(reference_config.run_dir)
    assert sorted(expected) == list(range(1, 13))

    config = _config(tmp_path, ptb_char_dir, "async")
    crashed = Trainer(config)
    real_step = Trainer.train_step

    def crash_at_step_7(self):
        if self.step == 6:
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    crashed.close()  # the save of step 4 still commits
    monkeypatch.undo()
    assert _committed(crashed) == [0, 4]

    resumed = Trainer(config)
    resumed.train()
    assert _losses(config.run_dir) == expected  # bit-identical floats, step by step
    a = torch.load(reference_config.run_dir / "final_model.pt", weights_only=True)["state_dict"]
    b = torch.load(config.run_dir / "final_model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- several ranks


_RANK = textwrap.dedent("""
    # One of two gloo ranks: background saves while the main thread all-reduces on the default group and
    # changes the live state.
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from pipeline.checkpoint import BackgroundSaver, DCPCheckpointer, RetryPolicy
    from pipeline.distributed import DistContext

    rank, init_file, url, results = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2, backend="gloo")
    checkpointer = DCPCheckpointer.open(url, ctx, retry=RetryPolicy(attempts=2, base_delay=0.0))
    saver = BackgroundSaver(ctx)
    weights = torch.arange(1000.0)
    for step in (1, 2, 3):
        saved = weights.clone()
        saver.save(checkpointer, step, {"model": {"w": weights}, "progress": {"step": step}},
                   {"hidden": torch.full((3,), float(rank + 10 * step))}, {"step": step}, keep_last=2, keep_best=False)
        for _ in range(20):  # training's collectives on the default group while the save runs
            total = torch.ones(1)
            dist.all_reduce(total)
            assert total.item() == 2
            weights.add_(1.0)  # and training's changes to the live state
    saver.wait()
    template = {"model": {"w": torch.zeros(1000)}, "progress": {"step": -1}}
    info, per_rank = checkpointer.load_latest(template)
    ok = (checkpointer.save_group is not None and info.step == 3 and info.meta["world_size"] == 2
          and torch.equal(template["model"]["w"], saved) and template["progress"]["step"] == 3
          and torch.equal(per_rank["hidden"], torch.full((3,), float(rank + 30))))
    committed = [i.step for i in checkpointer.storage.committed()]
    (results / f"rank{rank}").write_text(json.dumps({"ok": ok, "committed": committed}))
    saver.close()
    dist.destroy_process_group()
""")


def test_ranks_save_in_the_background_on_a_process_group_of_their_own(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    args = [str(tmp_path / "init"), str(tmp_path / "ckpt"), str(results)]
    ranks = [subprocess.Popen([PYTHON, "-c", _RANK, str(rank), *args], cwd=REPO, env=pipeline_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in ranks]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
    for rank, proc in enumerate(ranks):
        assert proc.returncode == 0, outputs[rank][-3000:]
        outcome = json.loads((results / f"rank{rank}").read_text())
        assert outcome == {"ok": True, "committed": [2, 3]}, (rank, outcome)


# --------------------------------------------------------------------------- the switch


def test_async_save_is_a_validated_config_switch(tmp_path, ptb_char_dir):
    raw = _raw_config(tmp_path, ptb_char_dir, "run")
    del raw["checkpoint"]["async_save"]
    assert validate_config(raw).checkpoint.async_save is True  # the default
    raw["checkpoint"]["async_save"] = "sometimes"
    with pytest.raises(ConfigError, match="checkpoint.async_save"):
        validate_config(raw)
    raw["checkpoint"]["async_save"] = False
    assert Trainer(validate_config(raw)).background_saves is None
