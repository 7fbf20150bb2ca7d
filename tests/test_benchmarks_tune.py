"""benchmarks/tune_pruning.py: the --smoke run prunes on 2TA's reported and on the raw loss, and reports both
against an unpruned reference over the same configurations."""

from __future__ import annotations

import csv
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("tune_pruning", REPO / "benchmarks" / "tune_pruning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tune_pruning"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_run_prunes_in_both_modes_and_compares_with_the_unpruned_reference(tmp_path, capsys, ptb_char_dir):
    bench = _load_benchmark()
    start = time.perf_counter()
    assert bench.main(["--smoke", "--out", str(tmp_path), "--data-dir", str(ptb_char_dir)]) == 0
    assert time.perf_counter() - start < 30
    out = capsys.readouterr().out
    assert "budget: 3 trials x 6 steps (eval every 2), median pruner after 1 trials" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["reference"],
                                                                                               ["reported"], ["raw"])}
    assert set(rows) == {"reference", "reported", "raw"}
    assert rows["reference"][1] == "0" and rows["reference"][2] == "18"  # every trial ran its 6 steps
    assert rows["reference"][7] == "n/a" and rows["reported"][7] in ("no", "YES") and rows["raw"][7] in ("no", "YES")
    assert "rank correlation with the final valid NLL (reference trials):" in out  # the signals, step by step
    steps = [line.split() for line in out.splitlines() if line.startswith(" ") and line.split()[-1].endswith("/3")]
    assert [row[0] for row in steps] == ["2", "4", "6"]
    with (tmp_path / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["mode"], r["trial"]) for r in table] == [(m, str(i)) for m in ("reference", "reported", "raw")
                                                        for i in range(3)]
    assert all(r["state"] == "COMPLETE" and r["steps"] == "6" for r in table if r["mode"] == "reference")
    assert table[0]["state"] == table[3]["state"] == table[6]["state"] == "COMPLETE"  # the startup trial
    pruned = [r for r in table if r["state"] == "PRUNED"]
    assert pruned and all(int(r["steps"]) < 6 and r["valid_nll"] == "" for r in pruned)
    params = {k: v for k, v in table[1].items() if "." in k}
    assert params == {k: v for k, v in table[4].items() if "." in k}  # the same configurations in every mode
