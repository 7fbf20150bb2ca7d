"""Tests of truncated-BPTT batching (pipeline.data.batches)."""

from __future__ import annotations

from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import Batch, BatchStream, evaluation_windows, num_eval_targets


def same(a: Batch, b: Batch) -> bool:
    return torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and a.reset_state == b.reset_state


def test_stripes_and_targets_by_hand() -> None:
    tokens = np.arange(23, dtype=np.uint16)  # batch 3 -> stripes of 7, tokens 21 and 22 dropped
    stream = BatchStream(tokens, batch_size=3, bptt=4)
    assert stream.stripe_len == 7 and stream.batches_per_epoch == 2

    b1 = stream.next_batch()
    assert b1.inputs.dtype == torch.int64 and b1.targets.dtype == torch.int64
    assert b1.inputs.tolist() == [[0, 7, 14], [1, 8, 15], [2, 9, 16], [3, 10, 17]]
    assert b1.targets.tolist() == [[1, 8, 15], [2, 9, 16], [3, 10, 17], [4, 11, 18]]
    assert b1.reset_state is True
    assert (stream.epoch, stream.position) == (0, 4)

    b2 = stream.next_batch()  # last window of the epoch is shorter: 6 prediction positions - 4
    assert b2.inputs.tolist() == [[4, 11, 18], [5, 12, 19]]
    assert b2.targets.tolist() == [[5, 12, 19], [6, 13, 20]]
    assert b2.reset_state is False
    assert (stream.epoch, stream.position) == (1, 0)

    b3 = stream.next_batch()  # wraps: epoch 2 starts again at the top with a fresh state
    assert same(b3, b1) and b3.reset_state is True
    assert (stream.epoch, stream.position) == (1, 4)


def test_inputs_and_targets_do_not_alias() -> None:
    stream = BatchStream(np.arange(40, dtype=np.uint8), batch_size=2, bptt=5)
    b = stream.next_batch()
    expected = b.targets.clone()
    b.inputs.zero_()
    assert torch.equal(b.targets, expected)


def test_iteration_is_infinite_and_shares_position() -> None:
    tokens = np.arange(101, dtype=np.uint8)
    stream = BatchStream(tokens, batch_size=4, bptt=6)  # stripes of 25: 24 positions -> 4 windows
    batches = list(islice(iter(stream), 9))
    assert [b.reset_state for b in batches] == [True, False, False, False] * 2 + [True]
    assert stream.epoch == 2 and stream.position == 6
    assert all(b.inputs.shape == (6, 4) for b in batches)
    assert same(stream.next_batch(), batches[1])


def test_exact_resume_mid_epoch() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, size=1003).astype(np.uint16)
    original = BatchStream(tokens, batch_size=5, bptt=7)  # 200 per stripe -> 29 windows per epoch
    for _ in range(17):
        original.next_batch()
    state = original.state_dict()
    assert state["epoch"] == 0 and state["position"] == 17 * 7
    assert all(isinstance(v, int) for v in state.values())

    restored = BatchStream(tokens, batch_size=5, bptt=7)
    restored.load_state_dict(dict(state))
    assert (restored.epoch, restored.position) == (original.epoch, original.position)
    for _ in range(40):  # across the epoch boundary
        assert same(restored.next_batch(), original.next_batch())
    assert restored.epoch == original.epoch == 1

    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(tokens, batch_size=4, bptt=7).load_state_dict(state)
    with pytest.raises(ValueError, match="num_tokens"):
        BatchStream(tokens[:-10], batch_size=5, bptt=7).load_state_dict(state)


def test_world_size_two_shards_union_equals_single_process() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    single = BatchStream(tokens, batch_size=4, bptt=9)
    ranks = [BatchStream(tokens, batch_size=4, bptt=9, rank=r, world_size=2) for r in range(2)]
    # Each rank reads its own contiguous shard of the stream.
    stripe = 1000 // 4
    for r, stream in enumerate(ranks):
        first = stream.next_batch()
        assert first.inputs.shape[1] == 2
        assert first.inputs[0].tolist() == [2 * r * stripe, (2 * r + 1) * stripe]
    for s in (single, *ranks):
        s.load_state_dict({"epoch": 0, "position": 0})
    for _ in range(60):  # more than an epoch (28 windows)
        whole = single.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert torch.equal(torch.cat([p.inputs for p in parts], dim=1), whole.inputs)
        assert torch.equal(torch.cat([p.targets for p in parts], dim=1), whole.targets)
        assert all(p.reset_state == whole.reset_state for p in parts)
    assert [s.epoch for s in ranks] == [single.epoch] * 2


def test_invalid_arguments() -> None:
    tokens = np.arange(100, dtype=np.uint8)
    with pytest.raises(ValueError, match="divisible by world_size"):
        BatchStream(tokens, batch_size=5, bptt=4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BatchStream(tokens, batch_size=4, bptt=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="too few"):
        BatchStream(tokens, batch_size=60, bptt=4)
    with pytest.raises(ValueError, match="bptt"):
        BatchStream(tokens, batch_size=4, bptt=0)
    with pytest.raises(ValueError, match="bptt"):
        evaluation_windows(tokens, 4, 0)  # validated eagerly, not at the first next()


@pytest.mark.parametrize("n,batch_size,bptt", [(1000, 1, 64), (1003, 7, 10), (500, 10, 49), (64, 3, 100)])
def test_evaluation_windows_cover_each_position_once(n: int, batch_size: int, bptt: int) -> None:
    tokens = np.arange(n, dtype=np.uint16)  # token value == stream position
    windows = list(evaluation_windows(tokens, batch_size, bptt))
    stripe = n // batch_size
    assert [w.reset_state for w in windows] == [True] + [False] * (len(windows) - 1)
    assert all(w.inputs.shape[0] <= bptt and w.inputs.shape[1] == batch_size for w in windows)
    assert all(torch.equal(w.inputs + 1, w.targets) for w in windows)  # next-token targets, no stripe crossing
    counts = Counter(int(t) for w in windows for t in w.targets.reshape(-1))
    expected = {b * stripe + j for b in range(batch_size) for j in range(1, stripe)}
    assert set(counts) == expected and set(counts.values()) == {1}
    assert sum(counts.values()) == num_eval_targets(n, batch_size) == batch_size * (stripe - 1)
    assert list(evaluation_windows(tokens, batch_size, bptt))[0].inputs.tolist() == windows[0].inputs.tolist()


def test_evaluation_windows_too_short_yields_nothing() -> None:
    assert list(evaluation_windows(np.arange(5, dtype=np.uint8), 3, 4)) == []
    assert num_eval_targets(5, 3) == 0


def test_works_on_memory_maps(tmp_path: Path) -> None:
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(300, dtype=np.uint16))
    mm = np.load(path, mmap_mode="r")
    stream = BatchStream(mm, batch_size=3, bptt=8)
    for _ in range(20):
        b = stream.next_batch()
        assert b.inputs.dtype == torch.int64
    assert sum(w.targets.numel() for w in evaluation_windows(mm, 3, 8)) == 3 * 99
    assert np.array_equal(np.load(path), np.arange(300))  # never written
