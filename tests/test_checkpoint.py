"""Checkpoint storage seam + DCP checkpointer (single process; multi-process in test_distributed.py)."""

from __future__ import annotations

import io
import logging
import pickle
import uuid

import pytest
import torch

from pipeline.checkpoint import (
    COMMIT_FILE,
    CheckpointError,
    CheckpointStorage,
    DCPCheckpointer,
    RetryPolicy,
    retry_call,
)
from pipeline.distributed import DistContext

FAST = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0)


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "ckpt")
    return f"memory://ckpt-{uuid.uuid4().hex}"


def _checkpointer(url: str) -> DCPCheckpointer:
    return DCPCheckpointer.open(url, DistContext(), retry=FAST)


def _state(step: int) -> dict:
    return {
        "model": {"w": torch.full((3, 2), float(step)), "b": torch.arange(4.0) + step},
        "progress": {"step": step, "name": f"s{step}", "floats": [1.5, float("inf")], "none": None},
    }


def _template() -> dict:
    return {
        "model": {"w": torch.zeros(3, 2), "b": torch.zeros(4)},
        "progress": {"step": -1, "name": "", "floats": [0.0, 0.0], "none": 1},
    }


def test_dcp_round_trip_and_latest(url):
    ckpt = _checkpointer(url)
    assert ckpt.load_latest(_template()) is None
    rng = torch.get_rng_state()
    for step in (0, 10, 20):
        assert ckpt.save(step, _state(step), {"rng": rng, "hidden": [torch.ones(2, 2) * step]}, {"step": step, "loss": 1.0})
    assert [i.step for i in ckpt.storage.committed()] == [0, 10, 20]
    state = _template()
    info, per_rank = ckpt.load_latest(state)
    assert info.step == 20 and info.meta["world_size"] == 1
    assert torch.equal(state["model"]["w"], torch.full((3, 2), 20.0))
    assert torch.equal(state["model"]["b"], torch.arange(4.0) + 20)
    assert state["progress"] == {"step": 20, "name": "s20", "floats": [1.5, float("inf")], "none": None}
    assert torch.equal(per_rank["rng"], rng) and torch.equal(per_rank["hidden"][0], torch.ones(2, 2) * 20)


def test_folder_without_metadata_is_never_loaded_and_never_reused(url, caplog):
    ckpt = _checkpointer(url)
    ckpt.save(10, _state(10), {}, {"step": 10})
    # A save killed before DCP wrote .metadata: shards but no commit file.
    ckpt.storage.write_bytes("step-00000020", "__0_0.distcp", b"partial")
    with caplog.at_level(logging.WARNING):
        info, _ = ckpt.load_latest(_template())
    assert info.step == 10
    assert "never loaded" in caplog.text
    assert ckpt.storage.new_folder(20) == "step-00000020.1"
    ckpt.save(20, _state(20), {}, {"step": 20})
    names = [i.name for i in ckpt.storage.list()]
    assert "step-00000020.1" in names and "step-00000020" in names
    info, _ = ckpt.load_latest(_template())
    assert info.name == "step-00000020.1"
    # Pruning after the new commit removes the stale partial folder.
    ckpt.storage.prune(keep_last=2)
    assert "step-00000020" not in [i.name for i in ckpt.storage.list()]


def test_corrupt_checkpoint_falls_back_to_the_previous_one(url, caplog):
    ckpt = _checkpointer(url)
    ckpt.save(10, _state(10), {}, {"step": 10})
    ckpt.save(20, _state(20), {}, {"step": 20})
    # Truncate the data shard of step 20 (its .metadata still exists).
    folder = ckpt.storage.folder_path("step-00000020")
    shard = [p for p in ckpt.storage.fs.ls(folder, detail=False) if p.endswith(".distcp")][0]
    with ckpt.storage.fs.open(shard, "wb") as f:
        f.write(b"garbage")
    state = _template()
    with caplog.at_level(logging.WARNING):
        info, _ = ckpt.load_latest(state)
    assert info.step == 10 and torch.equal(state["model"]["w"], torch.full((3, 2), 10.0))
    assert "trying an older one" in caplog.text


def test_prune_keeps_the_last_k_and_the_best(url):
    ckpt = _checkpointer(url)
    losses = {0: None, 10: 3.0, 20: 1.0, 30: 2.0, 40: 2.5, 50: 2.2}
    for step, loss in losses.items():
        ckpt.save(step, _state(step), {}, {"step": step, "loss": loss})
    ckpt.storage.prune(keep_last=2, keep_best=True)
    assert [i.step for i in ckpt.storage.committed()] == [20, 40, 50]
    ckpt.storage.prune(keep_last=1, keep_best=False)
    assert [i.step for i in ckpt.storage.committed()] == [50]


def test_world_size_mismatch_is_a_clear_error(url):
    ckpt = _checkpointer(url)
    ckpt.save(5, _state(5), {}, {"step": 5})
    other = DCPCheckpointer(ckpt.storage, DistContext(rank=0, world_size=1))
    info = ckpt.storage.latest()
    info.meta["world_size"] = 4
    with pytest.raises(CheckpointError, match="same number of processes"):
        other._load(info, _template())


def test_storage_outage_is_retried_into_a_fresh_folder(tmp_path, monkeypatch, caplog):
    ckpt = _checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(10, _state(10), {}, {"step": 10})
    real = CheckpointStorage.write_bytes
    calls = {"n": 0}

    def flaky(self, name, filename, payload):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionError("storage unreachable")
        return real(self, name, filename, payload)

    monkeypatch.setattr(CheckpointStorage, "write_bytes", flaky)
    with caplog.at_level(logging.WARNING):
        assert ckpt.save(20, _state(20), {}, {"step": 20}) is not None
    assert "storage unreachable" in caplog.text
    assert ckpt.storage.latest().step == 20


def test_storage_outage_beyond_retries_keeps_the_last_committed(tmp_path, monkeypatch, caplog):
    ckpt = _checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(10, _state(10), {}, {"step": 10})

    def down(self, name, filename, payload):
        raise ConnectionError("storage unreachable")

    monkeypatch.setattr(CheckpointStorage, "write_bytes", down)
    with caplog.at_level(logging.WARNING):
        assert ckpt.save(20, _state(20), {}, {"step": 20}) is None
    assert "training continues" in caplog.text
    monkeypatch.undo()
    info, _ = ckpt.load_latest(_template())
    assert info.step == 10


def test_retry_call_backs_off_then_raises():
    attempts = []

    def always_fails():
        attempts.append(1)
        raise OSError("nope")

    with pytest.raises(OSError):
        retry_call(always_fails, "thing", RetryPolicy(attempts=3, base_delay=0.0))
    assert len(attempts) == 3
    assert RetryPolicy(attempts=5, base_delay=1.0, max_delay=3.0).delays() == [1.0, 2.0, 3.0, 3.0]


class _Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('arbitrary code ran')",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    ckpt = _checkpointer(str(tmp_path / "ckpt"))
    # A checkpoint whose non-tensor entry is an arbitrary pickled object.
    ckpt.save(1, {"model": {"w": torch.zeros(1)}, "progress": {"obj": _Evil()}}, {}, {"step": 1})
    with pytest.raises(Exception) as err:
        ckpt._load(ckpt.storage.latest(), {"model": {"w": torch.zeros(1)}, "progress": {"obj": None}})
    assert "arbitrary code ran" not in str(err.value)
    # A forged .metadata that names a callable is refused by the restricted unpickler.
    folder = ckpt.storage.folder_path(ckpt.storage.latest().name)
    with ckpt.storage.fs.open(f"{folder}/{COMMIT_FILE}", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(Exception) as err:
        ckpt._load(ckpt.storage.latest(), {"model": {"w": torch.zeros(1)}, "progress": {"obj": None}})
    assert "not allowed" in str(err.value)


def test_per_rank_state_is_loaded_with_weights_only(tmp_path):
    ckpt = _checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, _state(1), {"rng": torch.get_rng_state()}, {"step": 1})
    buffer = io.BytesIO()
    torch.save({"evil": _Evil()}, buffer)
    ckpt.storage.write_bytes(ckpt.storage.latest().name, "rank-00000.pt", buffer.getvalue())
    with pytest.raises(Exception) as err:
        ckpt._load(ckpt.storage.latest(), _template())
    assert "arbitrary code ran" not in str(err.value)


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(CheckpointError, match="cannot open checkpoint storage"):
        CheckpointStorage("nosuchproto://bucket/x", commit_file=COMMIT_FILE)
