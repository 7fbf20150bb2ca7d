"""Checkpoint store over fsspec: commit markers, corruption handling, pruning, safe loading."""

from __future__ import annotations

import logging
import uuid

import pytest
import torch

from pipeline.checkpoint import COMMIT_MARKER, STATE_FILE, CheckpointError, CheckpointStore


RNG = torch.get_rng_state()


def _state(step: int) -> dict:
    return {"step": step, "w": torch.full((3,), float(step)), "nested": {"rng": RNG}, "lst": [1, 2.5, None]}


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> CheckpointStore:
    if request.param == "local":
        return CheckpointStore(str(tmp_path / "ckpt"))
    return CheckpointStore(f"memory://ckpt-{uuid.uuid4().hex}")


def test_round_trip_and_latest(store):
    assert store.latest_step() is None and store.load_latest() is None
    for step in (0, 10, 20):
        store.save(step, _state(step))
    assert store.committed_steps() == [0, 10, 20]
    step, state = store.load_latest()
    assert step == 20
    assert torch.equal(state["w"], torch.full((3,), 20.0))
    assert state["lst"] == [1, 2.5, None]
    assert torch.equal(state["nested"]["rng"], RNG)


def test_uncommitted_folder_is_skipped_with_a_warning(store, caplog):
    store.save(10, _state(10))
    # A save killed after writing the payload but before the marker.
    folder = f"{store.root}/step-{20:08d}"
    store.fs.makedirs(folder, exist_ok=True)
    with store.fs.open(f"{folder}/{STATE_FILE}", "wb") as f:
        f.write(b"partial")
    with caplog.at_level(logging.WARNING):
        assert store.latest_step() == 10
    assert "no commit marker" in caplog.text
    with pytest.raises(CheckpointError, match="not committed"):
        store.load(20)


def test_corrupt_payload_falls_back_to_previous(store, caplog):
    store.save(10, _state(10))
    store.save(20, _state(20))
    with store.fs.open(f"{store.root}/step-{20:08d}/{STATE_FILE}", "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        store.load(20)
    with caplog.at_level(logging.WARNING):
        step, state = store.load_latest()
    assert step == 10 and state["step"] == 10
    assert "corrupt" in caplog.text


def test_prune_keeps_the_newest(store):
    for step in range(0, 50, 10):
        store.save(step, _state(step))
    store.prune(2, protect={10})
    assert store.committed_steps() == [10, 30, 40]


def test_resaving_a_step_replaces_leftovers(store):
    folder = f"{store.root}/step-{5:08d}"
    store.fs.makedirs(folder, exist_ok=True)
    with store.fs.open(f"{folder}/stray", "wb") as f:
        f.write(b"x")
    store.save(5, _state(5))
    assert not store.fs.exists(f"{folder}/stray")
    assert store.fs.exists(f"{folder}/{COMMIT_MARKER}")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    store.save(1, {"ok": torch.zeros(1)})
    # Forge a checkpoint holding an arbitrary pickled object, with a matching marker.
    import hashlib
    import io
    import json

    buffer = io.BytesIO()
    torch.save({"evil": _Evil()}, buffer)
    payload = buffer.getvalue()
    folder = tmp_path / "ckpt" / f"step-{2:08d}"
    folder.mkdir()
    (folder / STATE_FILE).write_bytes(payload)
    (folder / COMMIT_MARKER).write_text(json.dumps({"step": 2, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}))
    with pytest.raises(Exception) as err:
        store.load(2)
    assert "weights_only" in str(err.value) or "Unsupported" in str(err.value) or "global" in str(err.value).lower()


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(CheckpointError, match="cannot open checkpoint storage"):
        CheckpointStore("nosuchproto://bucket/x")
