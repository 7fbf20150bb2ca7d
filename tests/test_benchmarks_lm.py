"""benchmarks/reverse_copy.py and benchmarks/averaging_ptb.py: the --smoke runs train, print their tables and
checks, and write their files; the pieces they are built from behave as documented. benchmarks/tokenise_throughput.py:
a run on tiny files prints both layouts and the verdicts."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------------ reverse copy


def test_reverse_copy_smoke_prints_the_table_and_writes_csv_and_plot(tmp_path, capsys) -> None:
    bench = _load("reverse_copy")
    start = time.perf_counter()
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert time.perf_counter() - start < 15
    out = capsys.readouterr().out
    assert "budget: 4 runs x 15 steps x batch 16" in out
    assert "LSTM: hidden 16" in out and "Mogrifier LSTM: hidden" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("length"))
    rows = [line.split() for line in lines[header + 1:header + 3]]
    assert [row[0] for row in rows] == ["3", "6"]  # one row per length, both models' CE, acc, lr and the gap
    assert all(len(row) == 8 and all(math.isfinite(float(v)) for v in row[1:]) for row in rows)
    verdicts = [line.split()[0] for line in lines if "(a) both near 0" in line or "(b) Mogrifier LSTM <= LSTM" in line]
    assert len(verdicts) == 2 and set(verdicts) <= {"agree", "disagree"}  # (b): the longer half, length 6
    assert "wall time" in out
    with (tmp_path / "reverse_copy.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["model"], r["length"]) for r in table] == [("LSTM", "3"), ("Mogrifier LSTM", "3"), ("LSTM", "6"),
                                                           ("Mogrifier LSTM", "6")]
    for row in table:
        assert not row["error"] and row["chosen"] == "1"
        for key in ("train_loss", "valid_ce", "test_ce", "test_accuracy"):
            assert math.isfinite(float(row[key]))
        assert 0 <= float(row["test_ce"]) < 2 * math.log(8)
    lstm, mog = int(table[0]["params"]), int(table[1]["params"])
    assert abs(mog - lstm) / lstm < 0.1  # the Mogrifier's hidden size was solved for the LSTM's budget
    assert _is_png(tmp_path / "reverse_copy.png")


def test_seq2seq_reads_the_sequence_and_predicts_it_reversed() -> None:
    bench = _load("reverse_copy")
    torch.manual_seed(0)
    model = bench.Seq2Seq(vocab=7, embedding=5, hidden=6, rounds=3, rank=2)
    source = torch.randint(7, (4, 3))
    assert model(source).shape == (4, 3, 7)
    assert bench.count_parameters(7, 5, 6, 3, 2) == sum(p.numel() for p in model.parameters())
    # The first input token is the last target, which the decoder never reads (teacher forcing feeds the
    # marker and the targets shifted by one): it reaches the first prediction through the encoder's state.
    changed = source.clone()
    changed[0] = (changed[0] + 1) % 7
    with torch.no_grad():
        assert not torch.allclose(model(source)[0], model(changed)[0])
    budget = bench.count_parameters(16, 8, 32, 0, 0)
    hidden = bench.hidden_for_budget(budget, 16, 8, 5, 4, 32)
    assert hidden <= 32 and abs(bench.count_parameters(16, 8, hidden, 5, 4) - budget) <= 2 * (4 * 8 + 16 + 64)
    ce, accuracy = bench.evaluate(model, source, batch_size=2)
    assert math.isfinite(ce) and 0 <= accuracy <= 1


# ------------------------------------------------------------------------------------------------ averaging


def test_averager_bank_reads_weights_only_and_scores_every_method() -> None:
    bench = _load("averaging_ptb")
    from pipeline.averaging import TwoTailedAveraging

    layer = torch.nn.Linear(3, 2)
    params = list(layer.parameters())
    bank = bench.AveragerBank.build(TwoTailedAveraging(params, eval_every=2), params, [0, 3], [0.5], eval_every=2)
    calls = []

    def evaluate() -> float:
        calls.append(1)
        return float(sum(p.detach().sum() for p in params))

    raw_trajectory = []
    for step in range(1, 5):
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * step)
        raw_trajectory.append([p.detach().clone() for p in params])
        bank.update()
        if step % 2 == 0:
            before = [p.detach().clone() for p in params]
            bank.evaluate_and_adapt(evaluate)
            assert all(torch.equal(a, b) for a, b in zip(before, params))  # the raw weights are restored
    assert [h.step for h in bank.history] == [2, 4]
    first = bank.history[0]
    assert first.tail[3] == first.raw  # TA before its start holds the raw weights: scored without a pass
    assert first.tail[0] != first.raw and first.ema[0.5] != first.raw
    assert bank.state_dict()["kind"] == "bank"
    saved = bank.state_dict()
    saved = {**saved, "step": 2}
    bank.load_state_dict(saved)
    assert [h.step for h in bank.history] == [2]  # back to a checkpoint: later evaluations are dropped


def test_averaging_smoke_prints_the_tables_and_writes_csv_and_plots(tmp_path, capsys, ptb_char_dir) -> None:
    bench = _load("averaging_ptb")
    start = time.perf_counter()
    assert bench.main(["--smoke", "--out", str(tmp_path), "--data-dir", str(ptb_char_dir)]) == 0
    assert time.perf_counter() - start < 15
    out = capsys.readouterr().out
    assert "budget: 20 steps x batch 16 x bptt 32" in out
    lines = out.splitlines()
    for method in ("2TA (defaults)", "TA start ", "EMA decay ", "raw weights"):
        row = next(line for line in lines if line.startswith(method) and len(line.split()) >= 5)
        assert all(math.isfinite(float(v)) for v in row.split()[-5:])
    assert sum(line.strip().startswith(("agree", "disagree", "n/a")) for line in lines) == 6
    assert "wall time" in out
    with (tmp_path / "averaging_ptb.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in table] == [5, 10, 15, 20]
    for row in table:
        for key in ("raw", "two_tailed", "tail_0", "tail_10", "ema_0.9", "ema_0.98"):
            assert math.isfinite(float(row[key])) and 0 < float(row[key]) < 10
        assert row["two_tailed_source"] in ("raw", "long")
    assert table[0]["tail_10"] == table[0]["raw"]  # TA from step 10: the raw weights before
    assert _is_png(tmp_path / "averaging_ptb_loss.png") and _is_png(tmp_path / "averaging_ptb_lengths.png")


# ------------------------------------------------------------------------------------------------ tokenise throughput


def test_tokenise_throughput_on_tiny_files_prints_both_layouts_and_verdicts(capsys) -> None:
    bench = _load("tokenise_throughput")
    start = time.perf_counter()
    assert bench.main(["--size-mb", "0.3", "--repeats", "2"]) == 0
    assert time.perf_counter() - start < 5
    out = capsys.readouterr().out
    assert "0.3 MB members, median of 2 repeats" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("enwik8", "text8"))}
    assert set(rows) == {"enwik8", "text8"}
    for row in rows.values():  # zip MB, prepare s, prepare MB/s, CPU s, unzip MB/s, sha256 MB/s, ratio
        assert len(row) == 8 and all(math.isfinite(float(v)) and float(v) >= 0 for v in row[1:])
        assert float(row[3]) > 0 and float(row[5]) > 0
    assert "target: prepare >= 200 MB/s" in out
    verdicts = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  ")}
    assert verdicts.keys() == {"enwik8", "text8"} and set(verdicts.values()) <= {"PASS", "FAIL"}
    temporary = Path(out.split("(temporary: ", 1)[1].split(")", 1)[0])
    assert not temporary.exists()  # the synthetic files and outputs are gone


def test_cell_throughput_smoke_checks_the_sequence_path_and_prints_targets(capsys) -> None:
    """Tiny sizes: the float64 check against the autograd reference passes and every case, the peak-memory
    column and the three targets are printed."""
    bench = _load("cell_throughput")
    code = bench.main(["--hidden", "8", "--batch", "2", "--seq-len", "3", "--repeats", "1", "--warmup", "0",
                       "--mogrifier-rank", "2", "--check", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "check passed" in out
    for name in ("torch.nn.LSTM", "LSTM [sequence]", "RLSTM [autograd]", "Mogrifier RLSTM (r=5, k=2) [sequence]"):
        assert name in out
    assert "peak B/token" in out and "RLSTM time <= 1.15x our LSTM time" in out
    assert "LSTM tokens/s >= 0.95x" in out and "Mogrifier LSTM tokens/s >= 0.75x" in out
