"""Checkpoint integrity and divergence recovery through the real trainer, on real PTB characters, with
checkpoints on local disk and on a real S3 API (moto).

- Flipped bits in a model tensor, in a weight-averaging slot or in the per-rank RNG / hidden-state file
  are caught by the digests of the commit record: the run falls back to the previous committed
  checkpoint, sets the damaged ones aside (never deleted) and continues exactly as an uninterrupted run.
- When every checkpoint is unreadable the train command exits 4, names each checkpoint and why, and
  deletes nothing; ``--checkpoint.on_unreadable restart`` starts over with the old ones set aside.
- Divergence recovery goes back to the best checkpoint (thesis §4.4), can go back to step 0, and
  also fires when the loss explodes without becoming non-finite.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
import yaml

from conftest import PYTHON, diverge_once, pipeline_env, tiny_ptb_config
from pipeline.checkpoint import COMMIT_FILE, SET_ASIDE_FILE, SafeFsspecReader, UnreadableCheckpoints
from pipeline.config import validate_config
from pipeline.train import Trainer, TrainingDiverged

STEPS = 24
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _raw(tmp_path: Path, data_dir: Path, name: str, url: str | None = None, **train) -> dict:
    raw = tiny_ptb_config(tmp_path / name, data_dir)
    raw["train"].update({"max_steps": STEPS, "eval_every": 8, "eval_tokens": 2000, "device": "cpu", **train})
    raw["checkpoint"] = {"every": 4, "keep_last": 4, "retry_base_delay": 0.05, "retry_max_delay": 0.1}
    if url is not None:
        raw["checkpoint"]["url"] = url
    return raw


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _train(raw: dict):
    trainer = Trainer(validate_config(raw))
    return trainer, trainer.train()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ptb_char_dir) -> tuple[list[dict], dict]:
    """An uninterrupted run: its train log (every step and evaluation) and its final weights."""
    tmp_path = tmp_path_factory.mktemp("reference")
    _train(_raw(tmp_path, ptb_char_dir, "run"))
    final = torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)["state_dict"]
    return _records(tmp_path / "run"), final


def _flip_bit(fs, path: str, offset: int) -> None:
    data = bytearray(fs.cat_file(path))
    data[offset] ^= 0x10
    fs.pipe_file(path, bytes(data))


def _tensor_offset(folder_url: str, prefix: str) -> tuple[str, int]:
    """(file, byte offset) in the middle of the stored bytes of the largest tensor whose name starts with
    ``prefix`` (``model.`` or ``averager.``), from DCP's own metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = SafeFsspecReader(folder_url).read_metadata()
    tensors = {fqn for fqn, md in metadata.state_dict_metadata.items()
               if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    items = [(index, info) for index, info in metadata.storage_data.items() if index.fqn in tensors]
    index, info = max(items, key=lambda item: item[1].length)
    return info.relative_path, info.offset + info.length // 2


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_flipped_bits_fall_back_to_the_previous_checkpoint_and_continue_exactly(
    storage, reference, tmp_path, ptb_char_dir, request, caplog
):
    url = str(tmp_path / "ckpt")
    if storage == "s3":
        request.getfixturevalue("s3_endpoint")
        url = f"s3://checkpoints/integrity-{uuid.uuid4().hex[:8]}"
    # A run stopped at step 16 (checkpoints 0, 4, 8, 12, 16 kept) ...
    _train(_raw(tmp_path, ptb_char_dir, "run", url, max_steps=16))
    fs, root = fsspec.core.url_to_fs(url)
    # ... whose last three checkpoints each get one bit flipped in another kind of file.
    model_file, model_at = _tensor_offset(f"{url}/step-00000016", "model.")
    _flip_bit(fs, f"{root}/step-00000016/{model_file}", model_at)
    avg_file, avg_at = _tensor_offset(f"{url}/step-00000012", "averager.")
    _flip_bit(fs, f"{root}/step-00000012/{avg_file}", avg_at)
    rank_file = f"{root}/step-00000008/rank-00000.pt"
    _flip_bit(fs, rank_file, fs.size(rank_file) // 2)
    damaged = [p for step in (8, 12, 16) for p in fs.find(f"{root}/step-{step:08d}")]

    with caplog.at_level(logging.WARNING, logger="pipeline"):
        _, result = _train(_raw(tmp_path, ptb_char_dir, "run", url))
    assert result.step == STEPS

    # Each damaged checkpoint was reported in one line naming the file, and the run fell back past it.
    warnings = [r.getMessage() for r in caplog.records if "cannot load checkpoint" in r.getMessage()]
    assert len(warnings) == 3, warnings
    for step, filename, after in ((16, model_file, 12), (12, avg_file, 8), (8, "rank-00000.pt", 4)):
        [line] = [w for w in warnings if f"step-{step:08d}:" in w]
        assert filename in line and "recorded when it was committed" in line and f"falling back to step-{after:08d}" in line
        assert "\n" not in line and "Traceback" not in line
        marker = json.loads(fs.cat_file(f"{root}/step-{step:08d}/{SET_ASIDE_FILE}"))
        assert marker["kind"] == "corrupt" and filename in marker["reason"]
    # Nothing of the damaged checkpoints was deleted (pruning leaves set-aside checkpoints alone).
    fs.invalidate_cache()
    assert damaged and all(fs.exists(p) for p in damaged)

    # It resumed from step 4 and reproduced the uninterrupted run bit for bit, with no duplicated log lines.
    records, final = reference
    assert _records(tmp_path / "run") == records
    resumed = torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)["state_dict"]
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_all_checkpoints_unreadable_exits_4_lists_them_and_deletes_nothing(tmp_path, ptb_char_dir):
    raw = _raw(tmp_path, ptb_char_dir, "run", max_steps=8)
    _train(raw)
    ckpt = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ckpt.glob("step-*"))
    assert names == ["step-00000000", "step-00000004", "step-00000008"]
    for name in names:  # truncate every checkpoint's per-rank file
        path = ckpt / name / "rank-00000.pt"
        path.write_bytes(path.read_bytes()[:100])
    before = _snapshot(ckpt)
    raw["train"]["max_steps"] = STEPS
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    cmd = [PYTHON, "-m", "pipeline", "train", "--config", str(config)]

    proc = subprocess.run(cmd, cwd=tmp_path, env=pipeline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stderr[-3000:]  # non-retriable in the train Job's podFailurePolicy
    assert "Traceback" not in proc.stderr
    assert "no checkpoint under" in proc.stderr and "none was deleted" in proc.stderr
    for name in names:
        assert f"{ckpt / name}: rank-00000.pt: size 100 bytes" in proc.stderr
    assert "--checkpoint.on_unreadable restart" in proc.stderr
    # Nothing deleted, nothing changed: only SET_ASIDE.json markers were added next to the files.
    after = _snapshot(ckpt)
    assert {k: v for k, v in after.items() if not k.endswith(SET_ASIDE_FILE) and k != "LEASE.json"} == before
    steps = [r["step"] for r in _records(tmp_path / "run") if "loss" in r]
    assert steps == list(range(1, 9))  # the log of the earlier run is untouched too

    # A second try says the same (the set-aside checkpoints still block a silent fresh start).
    again = subprocess.run(cmd, cwd=tmp_path, env=pipeline_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 4 and "set aside earlier" in again.stderr, again.stderr[-3000:]

    # Starting over is an explicit choice: the old checkpoints stay, set aside, and training starts at step 0.
    restart = subprocess.run(cmd + ["--checkpoint.on_unreadable", "restart", "--train.max_steps", "4"], cwd=tmp_path,
                             env=pipeline_env(), capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "training starts again from step 0" in restart.stderr
    for name in names:
        assert json.loads((ckpt / name / SET_ASIDE_FILE).read_text())["kind"] == "restarted"
        assert (ckpt / name / "rank-00000.pt").read_bytes() == before[f"{name}/rank-00000.pt"]
    assert (ckpt / "step-00000004.1" / COMMIT_FILE).exists()
    assert [r["step"] for r in _records(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


def test_checkpoints_of_another_model_are_refused_not_replaced(tmp_path, ptb_char_dir):
    """A config change that makes every checkpoint unloadable (another hidden size) stops the run instead
    of starting over and pruning the old run away; those checkpoints are not set aside (they are fine)."""
    _train(_raw(tmp_path, ptb_char_dir, "run", max_steps=4))
    raw = _raw(tmp_path, ptb_char_dir, "run")
    raw["model"]["hidden_size"] = 32
    with pytest.raises(UnreadableCheckpoints) as err:
        Trainer(validate_config(raw)).train()
    assert "size" in str(err.value).lower() and "step-00000004" in str(err.value)
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000000", "step-00000004"]
    assert not list(ckpt.glob(f"*/{SET_ASIDE_FILE}"))


def test_divergence_reloads_the_best_checkpoint_not_the_newest(tmp_path, ptb_char_dir, monkeypatch, caplog):
    """Thesis §4.4: back to the best checkpoint by the reported validation loss; the newer checkpoints of the
    diverged run are set aside (a restart never resumes from them) and the best one is never pruned."""
    raw = _raw(tmp_path, ptb_char_dir, "run", eval_every=4)
    raw["checkpoint"]["keep_last"] = 2
    trainer = Trainer(validate_config(raw))
    real_evaluate = Trainer.evaluate_and_adapt
    scripted = {4: 3.0, 8: 2.0, 12: 5.0}  # step 12 got worse: the best checkpoint is step 8's

    def evaluate(self):
        report = real_evaluate(self)
        if self.step in scripted:
            report.loss = scripted[self.step]
        return report

    monkeypatch.setattr(Trainer, "evaluate_and_adapt", evaluate)
    poisoned = diverge_once(monkeypatch, 13)  # the 14th step diverges, after the step-12 checkpoint
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        result = trainer.train()
    assert poisoned["done"] and result.divergence_restarts == 1 and result.step == STEPS
    [warning] = [r.getMessage() for r in caplog.records if "divergence at step" in r.getMessage()]
    assert "reloaded the best checkpoint" in warning and "step-00000008 (step 8, reported validation loss 2.0000)" in warning
    records = _records(tmp_path / "run")
    [event] = [r["divergence"] for r in records if "divergence" in r]
    assert event["reloaded_step"] == 8 and event["at_step"] == 14
    steps = [r["step"] for r in records if "loss" in r]
    assert steps.count(9) == 2 and steps.count(13) == 2 and steps.count(14) == 1  # steps 9-13 trained again
    ckpt = tmp_path / "run" / "checkpoints"
    assert json.loads((ckpt / "step-00000012" / SET_ASIDE_FILE).read_text())["kind"] == "abandoned"
    # keep_last=2 pruned everything else, but the best checkpoint (step 8, loss 2.0) is still there.
    live = sorted(p.parent.name for p in ckpt.glob(f"*/{COMMIT_FILE}") if not (p.parent / SET_ASIDE_FILE).exists())
    assert "step-00000008" in live and live[-2:] == ["step-00000020", "step-00000024"]
    # A restart resumes from the new trajectory's newest checkpoint, never from the abandoned step 12.
    fresh = Trainer(validate_config(raw))
    assert fresh.resume() and fresh.step == STEPS and math.isclose(fresh.lr_scale, 0.9)


def test_divergence_can_go_back_to_the_step_0_checkpoint(tmp_path, ptb_char_dir, monkeypatch):
    """The step-0 checkpoint has no optimizer state: it must load into a trainer whose optimizer has some."""
    raw = _raw(tmp_path, ptb_char_dir, "run", max_steps=6)
    raw["checkpoint"]["every"] = 100  # only step 0 (and the final step) are checkpointed
    trainer = Trainer(validate_config(raw))
    poisoned = diverge_once(monkeypatch, 3)
    result = trainer.train()
    assert poisoned["done"] and result.divergence_restarts == 1 and result.step == 6
    [event] = [r["divergence"] for r in _records(tmp_path / "run") if "divergence" in r]
    assert event["reloaded_step"] == 0
    assert math.isclose(trainer._lr(), raw["train"]["optimizer"]["lr"] * 0.9)


def test_a_loss_that_explodes_without_going_non_finite_is_a_divergence(tmp_path, ptb_char_dir):
    """lr 1e6: the loss climbs to ~1e5-1e6 and stays finite. Each explosion reloads the best checkpoint
    with lr x 0.9; when that cannot tame it, the run stops (exit code 6) instead of finishing with garbage."""
    raw = _raw(tmp_path, ptb_char_dir, "run", max_divergence_restarts=2)
    raw["train"]["optimizer"]["lr"] = 1e6
    with pytest.raises(TrainingDiverged, match="loss exploded") as err:
        _train(raw)
    assert err.value.exit_code == 6
    events = [r["divergence"] for r in _records(tmp_path / "run") if "divergence" in r]
    assert len(events) == 2 and all("exploded" in e["reason"] for e in events)
    # Disabled, the same run "finishes" with a loss in the hundreds of thousands: what the guard prevents.
    raw = _raw(tmp_path, ptb_char_dir, "unguarded", max_steps=6, divergence_loss_factor=None)
    raw["train"]["optimizer"]["lr"] = 1e6
    _train(raw)
    assert max(r["loss"] for r in _records(tmp_path / "unguarded") if "loss" in r) > 1e4
