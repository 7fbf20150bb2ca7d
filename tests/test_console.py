"""What a stage prints: progress lines, the end-of-run summary, quiet third-party output."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

from conftest import PYTHON
from pipeline.console import LineProgress, RunSummary, StageOutcome, format_duration, mlflow_ui_hint, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log(monkeypatch):
    from tqdm.auto import tqdm

    assert isinstance(progress(10, "train", "steps", stream=_Tty()), tqdm)
    monkeypatch.setenv("RLM_PROGRESS_INTERVAL", "30")
    line_progress = progress(10, "train", "steps", stream=io.StringIO())
    assert isinstance(line_progress, LineProgress) and line_progress.interval == 30


def test_a_progress_line_has_done_total_figures_and_eta(caplog, monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 20.0, 21.0, 22.0])
    monkeypatch.setattr("pipeline.console.time.monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    with LineProgress(600, "train", "steps", initial=100, interval=15) as bar:
        bar.set_postfix({"loss": 3.41234, "tok/s": 14003})
        bar.update(100)  # t=10: inside the interval, no line
        bar.update(100)  # t=20: a line
        bar.update(300)  # t=21: inside the interval again
    lines = [r.getMessage() for r in caplog.records]
    # 200 steps in 20 s, 300 to go: 30 s. Closing prints the final state once.
    assert lines == ["train  300/600 steps (50%)  loss 3.412  tok/s 14,003  elapsed 0:20  ETA 0:30",
                     "train  600/600 steps (100%)  loss 3.412  tok/s 14,003  elapsed 0:22"]


def test_durations():
    assert [format_duration(s) for s in (5, 65, 3725, None, float("nan"))] == ["0:05", "1:05", "1:02:05", "?", "?"]


def test_the_summary_says_what_happened_and_where_things_are():
    summary = RunSummary("demo", elapsed=65, tracking="http://mlflow:5000/#/experiments/1/runs/abc")
    summary.outcomes = [
        StageOutcome("train", True, "trained to step 600"),
        StageOutcome("evaluate", True, "evaluated the final model", {"valid_bpc": 2.35541, "test_bpc": 2.3511}),
    ]
    summary.paths["checkpoints"] = "runs/demo/checkpoints"
    text = summary.render()
    assert text.splitlines()[0] == "demo: done in 1:05"
    assert "valid_bpc 2.355  test_bpc 2.351" in text and "runs/demo/checkpoints" in text
    assert text.splitlines()[-1].split() == ["MLflow", "http://mlflow:5000/#/experiments/1/runs/abc"]
    nothing = RunSummary("demo", outcomes=[StageOutcome("train", False, "nothing to do")])
    assert nothing.render().startswith("demo: nothing to do")


def test_the_mlflow_hint_is_a_url_or_the_venv_command():
    assert mlflow_ui_hint("http://127.0.0.1:5000/", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    hint = mlflow_ui_hint("sqlite:////tmp/x/mlflow.db", "1", None)
    # The venv's own mlflow, never a bare `mlflow` that is not on the PATH of a venv left inactive.
    command = hint.split()[0]
    assert command.endswith("/mlflow") and command != "mlflow"
    assert "ui --backend-store-uri sqlite:////tmp/x/mlflow.db" in hint and hint.endswith("/#/experiments/1")


QUIET_PROBE = """
import sys, warnings, logging
from pipeline.console import configure_output
configure_output(verbose=len(sys.argv) > 1)
import os
warnings.warn("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to save", UserWarning)
logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
logging.getLogger("pipeline.train").info("eval @50: reported 3.3")
logging.getLogger("pipeline.train").debug("memory on rank 0")
print(os.environ.get("GIT_PYTHON_REFRESH"))
"""


def test_quiet_by_default_and_verbose_brings_everything_back():
    quiet = subprocess.run([PYTHON, "-c", QUIET_PROBE], capture_output=True, text=True, timeout=60)
    assert quiet.stdout.strip() == "quiet"  # no GitPython warning where there is no git (the image)
    assert "eval @50" in quiet.stderr
    assert "torch.distributed is disabled" not in quiet.stderr and "Creating initial" not in quiet.stderr
    assert "memory on rank 0" not in quiet.stderr
    verbose = subprocess.run([PYTHON, "-c", QUIET_PROBE, "-v"], capture_output=True, text=True, timeout=60)
    for text in ("torch.distributed is disabled", "Creating initial", "memory on rank 0", "eval @50"):
        assert text in verbose.stderr, verbose.stderr
    assert sys.executable
