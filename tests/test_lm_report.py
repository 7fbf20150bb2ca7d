"""The LM evaluation report (table + plot), its metrics and results file, the temperature convention, and
the evaluate stage end to end with dynamic evaluation and MC dropout on a tiny prepared corpus."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from models import ModelConfig, RecurrentLM
from pipeline.config import PipelineConfig, TemperatureScan
from pipeline.tasks.lm_evaluation import EvaluationResult, temperature_grid
from pipeline.tasks.lm_report import (
    REPORT_CSV,
    REPORT_MARKDOWN,
    REPORT_PLOT,
    report_rows,
    write_report,
)

# deepmind/lamb multiplies the logits by its eval_softmax_temperature t; with eval_softmax_temperature=-0.8 (every
# experiment script, e.g. lamb/experiment/mogrifier/tune_*.sh and pushing-the-bounds/test.sh) lamb/evaluation.py
# (evaluate_all) tries t = 1.06 - 0.02 i down to 0.80; lamb's README example tunes t = 0.9. Here T = 1/t.
LAMB_SCANNED_MULTIPLIERS = tuple(round(1.06 - 0.02 * i, 2) for i in range(14))  # 1.06, 1.04, ..., 0.80
LAMB_README_TUNED_MULTIPLIER = 0.9

OLD_RESULT = {"unit": "char", "temperature": 0.97, "valid_nll": 1.0, "test_nll": 0.98, "valid_nll_tuned": 0.99,
              "test_nll_tuned": 0.975, "valid_tokens": 100, "test_tokens": 90}
OLD_METRICS = {"temperature", "valid_nll", "test_nll", "valid_nll_tuned_temperature", "test_nll_tuned_temperature",
               "valid_bpc", "test_bpc", "valid_bpc_tuned_temperature", "test_bpc_tuned_temperature"}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_temperature_scan_covers_lamb_values():
    assert LAMB_SCANNED_MULTIPLIERS[0] == 1.06 and LAMB_SCANNED_MULTIPLIERS[-1] == 0.8
    scan = TemperatureScan()
    grid = temperature_grid(scan.min, scan.max, scan.num)
    step = (scan.max - scan.min) / (scan.num - 1)
    for t in (*LAMB_SCANNED_MULTIPLIERS, LAMB_README_TUNED_MULTIPLIER):
        temperature = 1.0 / t  # lamb's multiplier as the divisor used here
        assert scan.min <= temperature <= scan.max, t
        assert min(abs(g - temperature) for g in grid) <= step / 2 + 1e-9, t
    assert 1.25 in grid and 1.0 in grid and step == pytest.approx(0.01)


def test_metrics_name_every_number_and_old_results_load_unchanged():
    old = EvaluationResult(**OLD_RESULT)
    assert set(old.metrics()) == OLD_METRICS and old.artifacts == []
    full = EvaluationResult(**OLD_RESULT, dynamic_valid_nll=0.9, dynamic_test_nll=0.88, dynamic_temperature=1.02,
                            dynamic_valid_nll_tuned=0.895, dynamic_test_nll_tuned=0.879, dynamic_lr=1e-4, dynamic_decay=1e-3,
                            dynamic_epsilon=1e-5, dynamic_window=50, mc_valid_nll_arithmetic=0.97,
                            mc_test_nll_arithmetic=0.96, mc_valid_nll_geometric=0.975, mc_test_nll_geometric=0.965,
                            mc_samples=200, mc_rate_multiplier=0.8)
    m = full.metrics()
    assert m["valid_bpc_dynamic"] == pytest.approx(0.9 / math.log(2))
    assert m["test_bpc_dynamic_tuned_temperature"] == pytest.approx(0.879 / math.log(2))
    assert m["valid_bpc_mc_arithmetic"] == pytest.approx(0.97 / math.log(2))
    assert m["test_nll_mc_geometric"] == 0.965 and m["dynamic_window"] == 50 and m["mc_samples"] == 200
    assert m["dynamic_lr"] == 1e-4 and m["dynamic_temperature"] == 1.02 and m["mc_rate_multiplier"] == 0.8
    words = EvaluationResult(**{**OLD_RESULT, "unit": "word"}, dynamic_valid_nll=4.0, dynamic_test_nll=3.9)
    assert words.metrics()["valid_ppl_dynamic"] == pytest.approx(math.exp(4.0))
    assert "valid_bpc_dynamic" not in words.metrics() and "mc_samples" not in words.metrics()


def test_report_table_csv_and_plot(tmp_path):
    result = EvaluationResult(**{**OLD_RESULT, "unit": "word"}, dynamic_valid_nll=4.0, dynamic_test_nll=3.9,
                              dynamic_temperature=1.0, dynamic_valid_nll_tuned=4.0, dynamic_test_nll_tuned=3.9,
                              dynamic_lr=2e-5, dynamic_decay=1e-3, dynamic_epsilon=1e-6, dynamic_window=20)
    metrics = result.metrics()
    rows = report_rows(metrics)
    assert [r.method for r in rows] == ["static (T = 1)", "static, tuned T", "dynamic (T = 1)", "dynamic, tuned T"]
    paths = write_report(metrics, tmp_path / "evaluation", unit="word", title="demo: final evaluation",
                         notes=["a note"])
    assert [p.name for p in paths] == [REPORT_MARKDOWN, REPORT_CSV, REPORT_PLOT]
    text = paths[0].read_text()
    assert text.startswith("# demo: final evaluation")
    assert "| method | valid ppl | test ppl | valid nll | test nll | settings |" in text
    assert f"| dynamic (T = 1) | {math.exp(4.0):.2f} | {math.exp(3.9):.2f} | 4.00000 | 3.90000 |" in text
    assert "lr = 2e-05, decay = 0.001, epsilon = 1e-06, window = 20" in text and "- a note" in text
    with open(paths[1]) as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == [r.method for r in rows]
    assert float(table[0]["valid_ppl"]) == pytest.approx(math.exp(1.0), rel=1e-12)
    assert float(table[3]["test_nll"]) == 3.9
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A dynamic evaluation that diverged is shown as such (and left out of the plot).
    diverged = {**metrics, "valid_nll_dynamic": math.nan, "valid_ppl_dynamic": math.nan}
    text = write_report(diverged, tmp_path / "nan", unit="word", title="t")[0].read_text()
    assert f"| dynamic (T = 1) | NaN (diverged) | {math.exp(3.9):.2f} | NaN (diverged) | 3.90000 |" in text

    from pipeline.plots import plot_lm_evaluation_figure

    fig = plot_lm_evaluation_figure({"static": {"valid": 1.2, "test": 1.1}, "dynamic": {"valid": 1.1, "test": None}},
                                    unit="char")
    (ax,) = fig.axes
    gids = {line.get_gid() for line in ax.get_lines()}
    assert gids == {"static|valid", "static|test", "dynamic|valid"}
    assert ax.get_ylabel() == "bits per character (bpc)"
    assert {t.get_gid() for t in ax.texts} == {"static|valid|value", "static|test|value", "dynamic|valid|value"}


def _corpus(path, n=9000, seed=0):
    """A small text with structure (words from a few letters), so that a tiny model learns something."""
    rng = np.random.default_rng(seed)
    words = ["ab", "abc", "cab", "bead", "dab", "aced", "bad"]
    text = " ".join(rng.choice(words) for _ in range(n // 4))
    path.write_text(text[:n])
    return path


def test_evaluate_stage_with_dynamic_evaluation_and_mc_dropout(tmp_path):
    from pipeline.data import prepare_dataset
    from pipeline.evaluate import (
        RESULTS_FILE,
        evaluation_fingerprint,
        previous_evaluation,
        run_evaluate,
    )
    from pipeline.final_model import save_final_model

    source = _corpus(tmp_path / "corpus.txt")
    data_dir = tmp_path / "data"
    manifest = prepare_dataset("text", str(source), data_dir, progress=False)
    model_cfg = dict(vocab_size=manifest.vocab_size, hidden_size=12, num_layers=1, output_dropout=0.2, state_dropout=0.1)
    config = PipelineConfig(
        name="tiny_eval", work_dir=str(tmp_path / "run"), tracking={"enabled": False},
        data={"dataset": "text", "source": str(source), "dir": str(data_dir)}, model=model_cfg,
        evaluate={"batch_size": 2, "bptt": 16, "max_tokens": 240, "temperature": {"num": 5},
                  "dynamic": {"enabled": True, "max_time_steps": 10, "trials": 2, "tune_tokens": 60,
                              "grad_batch_size": 4, "grad_tokens": 400},
                  "mc_dropout": {"samples": 3, "rate_multiplier": 0.5}})
    config.run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    model = RecurrentLM(ModelConfig(**model_cfg))
    save_final_model(config.run_dir / "final_model.pt", model, model.config, {"step": 0, "weights": "raw"})

    result, evaluated = run_evaluate(config)
    assert evaluated and result.valid_tokens == 2 * 119 and result.dynamic_window == 10 and result.mc_samples == 3
    for name in ("dynamic_valid_nll", "dynamic_test_nll_tuned", "mc_valid_nll_arithmetic", "mc_test_nll_geometric"):
        assert math.isfinite(getattr(result, name)), name
    assert 0.8 <= result.dynamic_temperature <= 1.25
    saved = json.loads((config.run_dir / RESULTS_FILE).read_text())
    metrics = saved["metrics"]
    assert OLD_METRICS <= set(metrics)
    assert {"valid_bpc_dynamic", "test_bpc_dynamic_tuned_temperature", "valid_bpc_mc_arithmetic",
            "test_bpc_mc_geometric", "dynamic_lr", "dynamic_window", "mc_rate_multiplier"} <= set(metrics)
    report = config.run_dir / "evaluation"
    assert sorted(p.name for p in report.iterdir()) == sorted([REPORT_CSV, REPORT_MARKDOWN, REPORT_PLOT])
    assert saved["artifacts"] == [str(report / REPORT_MARKDOWN), str(report / REPORT_CSV), str(report / REPORT_PLOT)]
    text = (report / REPORT_MARKDOWN).read_text()
    assert f"| MC dropout, geometric mean | {metrics['valid_bpc_mc_geometric']:.4f} |" in text
    assert "Optuna TPE" in text and "divides the logits" in text

    # The same model and settings again: nothing to do, the saved results (new fields included) come back.
    again, evaluated = run_evaluate(config)
    assert not evaluated and again == result
    # Results written before these fields existed still load (the new ones None).
    fingerprint = evaluation_fingerprint(config, config.run_dir / "final_model.pt")
    (config.run_dir / RESULTS_FILE).write_text(json.dumps({**OLD_RESULT, "fingerprint": fingerprint}))
    old = previous_evaluation(config, fingerprint)
    assert old is not None and old.dynamic_valid_nll is None and set(old.metrics()) == OLD_METRICS
