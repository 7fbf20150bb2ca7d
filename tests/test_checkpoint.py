"""Checkpoint storage seam + DCP checkpointer (single process; multi-process in test_distributed.py)."""

from __future__ import annotations

import io
import logging
import pickle
import subprocess
import time
import uuid

import pytest
import torch

from pipeline.checkpoint import (
    COMMIT_FILE,
    DCP_METADATA_FILE,
    SET_ASIDE_FILE,
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
    # One readable line naming the checkpoint, the file and why, and where it falls back to.
    [warning] = [r.getMessage() for r in caplog.records if "cannot load checkpoint" in r.getMessage()]
    assert "\n" not in warning and "Traceback" not in warning
    assert "step-00000020" in warning and shard.rsplit("/", 1)[-1] in warning and "falling back to step-00000010" in warning
    # It is set aside (never loaded again, never deleted), not removed.
    assert ckpt.storage.fs.exists(f"{folder}/{SET_ASIDE_FILE}") and ckpt.storage.fs.exists(shard)
    assert [i.step for i in ckpt.storage.committed()] == [10]


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
    # A forged .metadata that names a callable: its digest no longer matches the commit record ...
    info = ckpt.storage.latest()
    folder = ckpt.storage.folder_path(info.name)
    with ckpt.storage.fs.open(f"{folder}/{DCP_METADATA_FILE}", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(Exception) as err:
        ckpt._load(info, {"model": {"w": torch.zeros(1)}, "progress": {"obj": None}})
    assert "recorded when it was committed" in str(err.value) and DCP_METADATA_FILE in str(err.value)
    # ... and even without a record (a checkpoint of an earlier version) the restricted unpickler refuses it.
    info.files = None
    with pytest.raises(Exception) as err:
        ckpt._load(info, {"model": {"w": torch.zeros(1)}, "progress": {"obj": None}})
    assert "not allowed" in str(err.value)


def test_per_rank_state_is_loaded_with_weights_only(tmp_path):
    ckpt = _checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, _state(1), {"rng": torch.get_rng_state()}, {"step": 1})
    buffer = io.BytesIO()
    torch.save({"evil": _Evil()}, buffer)
    ckpt.storage.write_bytes(ckpt.storage.latest().name, "rank-00000.pt", buffer.getvalue())
    info = ckpt.storage.latest()
    info.files = None  # past the integrity check (which catches the forged file first): weights_only refuses it
    with pytest.raises(Exception) as err:
        ckpt._load(info, _template())
    assert "arbitrary code ran" not in str(err.value)


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(CheckpointError, match="cannot open checkpoint storage"):
        CheckpointStorage("nosuchproto://bucket/x")


# --------------------------------------------------------------------------- integrity, failures, leases


def test_commit_record_holds_the_digest_of_every_file(url):
    import hashlib
    import json

    ckpt = _checkpointer(url)
    ckpt.save(3, _state(3), {"rng": torch.get_rng_state()}, {"step": 3, "loss": 1.5})
    info = ckpt.storage.latest()
    record = json.loads(ckpt.storage.read_bytes(info.name, COMMIT_FILE))
    assert record["meta"]["step"] == 3 and record["meta"]["loss"] == 1.5 and record["meta"]["world_size"] == 1
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in ckpt.storage.fs.ls(ckpt.storage.folder_path(info.name), detail=False)}
    assert set(record["files"]) == names - {COMMIT_FILE}  # every other file: shards, .metadata, per-rank state
    for name, digest in record["files"].items():  # hashed while written, checked here by reading them back
        payload = ckpt.storage.read_bytes(info.name, name)
        assert digest == {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}


def test_a_damaged_commit_record_rejects_the_checkpoint(url, caplog):
    ckpt = _checkpointer(url)
    ckpt.save(1, _state(1), {}, {"step": 1})
    ckpt.save(2, _state(2), {}, {"step": 2})
    ckpt.storage.write_bytes("step-00000002", COMMIT_FILE, b'{"format": 1, "files": ')
    with caplog.at_level(logging.WARNING):
        info, _ = ckpt.load_latest(_template())
    assert info.step == 1 and "COMMITTED: the commit record is not valid JSON" in caplog.text


def test_missing_per_rank_file_is_not_retried_as_if_the_network_were_down(tmp_path):
    ckpt = DCPCheckpointer.open(str(tmp_path / "ckpt"), DistContext(), retry=RetryPolicy(attempts=5, base_delay=2.0))
    ckpt.save(1, _state(1), {"rng": torch.get_rng_state()}, {"step": 1})
    ckpt.save(2, _state(2), {"rng": torch.get_rng_state()}, {"step": 2})
    (tmp_path / "ckpt" / "step-00000002" / "rank-00000.pt").unlink()
    started = time.monotonic()
    info, _ = ckpt.load_latest(_template())
    assert info.step == 1
    assert time.monotonic() - started < 1.5  # one backoff delay alone would be 2 s


def test_retry_call_retries_transient_errors_only():
    import errno

    for permanent in (FileNotFoundError("gone"), PermissionError("denied"), OSError(errno.ENOSPC, "No space left"),
                      OSError(errno.EROFS, "Read-only file system"), ValueError("bad bytes")):
        calls: list[int] = []

        def fails(err=permanent, calls=calls):
            calls.append(1)
            raise err

        with pytest.raises(type(permanent)):
            retry_call(fails, "thing", RetryPolicy(attempts=4, base_delay=0.0))
        assert len(calls) == 1, permanent
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert retry_call(flaky, "thing", RetryPolicy(attempts=4, base_delay=0.0)) == "ok" and len(calls) == 3


def test_failed_saves_leave_no_folder_and_stop_the_run_after_max_failed_saves(tmp_path, monkeypatch, caplog):
    import errno

    from pipeline.checkpoint import CheckpointSaveFailed

    ckpt = DCPCheckpointer.open(str(tmp_path / "ckpt"), DistContext(), retry=RetryPolicy(attempts=3, base_delay=0.0),
                                max_failed_saves=2)
    ckpt.save(10, _state(10), {}, {"step": 10})
    real = CheckpointStorage.write_bytes
    calls = []

    def full(self, name, filename, payload):
        calls.append(name)
        real(self, name, filename, payload[: len(payload) // 2])  # a partial file, as a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(CheckpointStorage, "write_bytes", full)
    with caplog.at_level(logging.WARNING):
        assert ckpt.save(20, _state(20), {}, {"step": 20}) is None  # the first failure: training goes on
    assert len(calls) == 1  # a full device is not retried
    assert "1 failed save(s) in a row" in caplog.text
    with pytest.raises(CheckpointSaveFailed, match="No space left on device") as err:
        ckpt.save(30, _state(30), {}, {"step": 30})
    assert err.value.exit_code == 5 and "2 checkpoints in a row" in str(err.value)
    # The failed saves' folders were removed; the committed checkpoint is untouched.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000010"]
    monkeypatch.undo()
    assert ckpt.save(40, _state(40), {}, {"step": 40}) is not None and ckpt.failed_saves == 0  # a success resets


def test_a_stop_request_during_a_save_stops_the_job_instead_of_failing_the_save(tmp_path, monkeypatch):
    """SIGTERM mid-save is a SystemExit inside DCP, which wraps it into a CheckpointException: it must not be
    taken for a failed save (the job would train on after being told to stop)."""
    import traceback

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt = DCPCheckpointer.open(str(tmp_path / "ckpt"), DistContext(), retry=RetryPolicy(attempts=3, base_delay=0.0))

    def stopped(*args, **kwargs):
        raise CheckpointException("save", {0: (SystemExit(143), traceback.StackSummary())})

    monkeypatch.setattr(dcp, "save", stopped)
    with pytest.raises(SystemExit) as exit_info:
        ckpt.save(10, _state(10), {}, {"step": 10})
    assert exit_info.value.code == 143 and ckpt.failed_saves == 0


def test_the_final_save_must_succeed(tmp_path, monkeypatch):
    from pipeline.checkpoint import CheckpointSaveFailed

    ckpt = DCPCheckpointer.open(str(tmp_path / "ckpt"), DistContext(), retry=RetryPolicy(attempts=2, base_delay=0.0))

    def down(self, name, filename, payload):
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(CheckpointStorage, "write_bytes", down)
    with pytest.raises(CheckpointSaveFailed, match="the final checkpoint") as err:
        ckpt.save(5, _state(5), {}, {"step": 5}, final=True)
    assert err.value.exit_code == 1  # an outage may end: a re-created Job resumes from the last checkpoint


def test_prune_never_deletes_set_aside_checkpoints(url):
    ckpt = _checkpointer(url)
    for step in (10, 20, 30, 40):
        ckpt.save(step, _state(step), {}, {"step": step, "loss": float(step)})
    ckpt.storage.set_aside("step-00000020", "corrupt", "test")
    ckpt.storage.set_aside("step-00000040", "abandoned", "test")
    ckpt.storage.prune(keep_last=1, keep_best=False)
    assert [i.name for i in ckpt.storage.list()] == ["step-00000020", "step-00000030", "step-00000040"]
    assert [i.step for i in ckpt.storage.committed()] == [30]


def test_checkpoint_of_an_earlier_version_loads_unverified(tmp_path, caplog):
    """Folders written before commit records (DCP's .metadata + meta.json, no COMMITTED) are still found."""
    import json

    ckpt = _checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(7, _state(7), {"rng": torch.get_rng_state()}, {"step": 7})
    folder = tmp_path / "ckpt" / "step-00000007"
    (folder / COMMIT_FILE).unlink()
    (folder / "meta.json").write_text(json.dumps({"step": 7, "world_size": 1}))
    with caplog.at_level(logging.WARNING):
        info, _ = ckpt.load_latest(_template())
    assert info.step == 7 and info.files is None and "loaded unverified" in caplog.text


def _lease(url: str, **kwargs):
    from pipeline.checkpoint import CheckpointLease

    return CheckpointLease(CheckpointStorage(url, retry=FAST), **kwargs)


def _foreign(url: str, *, host: str = "other-host", pid: int = 1, age: float = 0.0, ttl: float = 60.0) -> None:
    import json

    lease = _lease(url)
    record = {"owner": "someone-else", "host": host, "pid": pid, "job": "other-job", "acquired": time.time() - age,
              "heartbeat": time.time() - age, "ttl": ttl}
    lease.storage.fs.makedirs(lease.storage.root, exist_ok=True)
    lease.storage.fs.pipe_file(lease.path, json.dumps(record).encode())


@pytest.fixture(params=["local", "memory", "s3"])
def lease_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "ckpt")
    if request.param == "memory":
        return f"memory://lease-{uuid.uuid4().hex}"
    request.getfixturevalue("s3_endpoint")
    return f"s3://checkpoints/lease-{uuid.uuid4().hex[:8]}"


def test_a_live_lease_keeps_a_second_job_out(lease_url):
    from pipeline.checkpoint import CheckpointLocked

    _foreign(lease_url)  # another host heartbeat just now
    with pytest.raises(CheckpointLocked, match="in use by job 'other-job'") as err:
        _lease(lease_url, ttl=60, wait=0.3).acquire()
    assert err.value.exit_code == 7


def test_a_stale_lease_is_taken_over(lease_url):
    _foreign(lease_url, ttl=1.0, age=0.0)  # alive now, stale after 1 s without a heartbeat
    started = time.monotonic()
    lease = _lease(lease_url, ttl=30, wait=10).acquire()
    try:
        assert 0.5 < time.monotonic() - started < 8
        assert lease._read().owner == lease.owner
    finally:
        lease.release()
    assert lease._read() is None  # released: the next job takes it at once


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(lease_url):
    import socket

    proc = subprocess.Popen(["true"])  # a process that has exited: its pid is free
    proc.wait()
    _foreign(lease_url, host=socket.gethostname(), pid=proc.pid)
    started = time.monotonic()
    with _lease(lease_url, ttl=60, wait=30):
        assert time.monotonic() - started < 3


def test_a_job_notices_when_its_lease_was_taken_over(lease_url):
    from pipeline.checkpoint import CheckpointLeaseLost

    lease = _lease(lease_url, ttl=1.2).acquire()  # heartbeat every 0.2 s
    try:
        _foreign(lease_url)
        deadline = time.monotonic() + 10
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(CheckpointLeaseLost, match="taken over by job 'other-job'"):
            lease.check()
        # A checkpointer holding the lost lease refuses to write another checkpoint.
        ckpt = DCPCheckpointer.open(lease_url, DistContext(), retry=FAST, lease=lease)
        with pytest.raises(CheckpointLeaseLost):
            ckpt.save(1, _state(1), {}, {"step": 1})
        assert ckpt.storage.list() == []
    finally:
        lease.release()
    assert _lease(lease_url)._read().owner == "someone-else"  # release never deletes another job's lease


def test_a_lease_caught_mid_write_is_read_again_not_taken_over(lease_url):
    """A heartbeat being written while another job reads the lease is not a damaged lease."""
    import threading

    from pipeline.checkpoint import CheckpointLocked

    _foreign(lease_url)
    lease = _lease(lease_url, ttl=60, wait=0.3)
    whole = lease.storage.fs.cat_file(lease.path)
    lease.storage.fs.pipe_file(lease.path, whole[: len(whole) // 2])  # torn: the writer is halfway
    threading.Timer(0.05, lambda: lease.storage.fs.pipe_file(lease.path, whole)).start()
    with pytest.raises(CheckpointLocked, match="in use by job 'other-job'"):
        lease.acquire()


def test_the_local_lease_is_replaced_whole(tmp_path):
    """On a local disk the lease is written beside and renamed into place: never seen half written."""
    import json

    lease = _lease(str(tmp_path / "ckpt"), ttl=60).acquire()
    try:
        assert json.loads((tmp_path / "ckpt" / "LEASE.json").read_text())["owner"] == lease.owner
        assert not list((tmp_path / "ckpt").glob("*.tmp"))
    finally:
        lease.release()
