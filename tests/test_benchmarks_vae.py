"""benchmarks/vae_frontiers.py: the --smoke run trains, evaluates, prints its tables and checks, writes its files."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("vae_frontiers", REPO / "benchmarks" / "vae_frontiers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vae_frontiers"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_run_prints_the_table_and_writes_csv_and_plot(tmp_path, capsys) -> None:
    bench = _load_benchmark()
    start = time.perf_counter()
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert time.perf_counter() - start < 15
    out = capsys.readouterr().out
    assert "budget: 2 runs x 4 steps, batch 16" in out
    assert "all points" in out and "Pareto frontiers" in out and "thesis checks" in out
    lines = out.splitlines()
    rows = [line for line in lines if line.startswith(("REINFORCE 1 ", "VQ-VAE "))]
    assert len(rows) >= 4  # each run in the table of all points and on its group's one-point frontier
    assert any(line.strip().startswith(("agree", "disagree")) and "VQ-VAE better than REINFORCE 1" in line
               for line in lines)
    assert sum(line.strip().startswith("n/a") for line in lines) >= 1  # groups that were not run
    assert "wall time" in out
    with (tmp_path / "frontiers.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["group"], r["run"]) for r in table] == [("REINFORCE 1", "lambda=0.9"), ("VQ-VAE", "1x4")]
    for row in table:
        assert math.isfinite(float(row["nll"])) and math.isfinite(float(row["mutual_information"]))
        assert row["on_frontier"] == "1"
    vq = table[1]
    assert float(vq["kl"]) == pytest.approx(math.log(4), abs=1e-6)  # a point mass: MI = KL = n ln m
    assert float(vq["mutual_information"]) == pytest.approx(math.log(4), abs=1e-6)
    png = tmp_path / "frontiers.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frontier_comparison_reads_both_curves_at_common_mi() -> None:
    bench = _load_benchmark()
    point = bench.FrontierPoint
    low = [point("A", 1.0, 5.0), point("A", 3.0, 6.0)]
    high = [point("B", 0.5, 5.5), point("B", 2.0, 7.0), point("B", 4.0, 9.0)]
    assert bench.nll_at(low, 0.2) == 5.0 and bench.nll_at(low, 2.0) == 5.5
    better, text = bench.compare({"A": low, "B": high}, "A", "B")
    assert better is True and "[0.50, 3.00]" in text
    assert bench.compare({"A": low}, "A", "B")[0] is None
