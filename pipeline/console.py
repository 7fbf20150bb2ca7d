"""What a stage prints: quiet third-party output, progress, and the end-of-run summary.

* :func:`configure_output` -- called once by the CLI. Quiet by default: MLflow's INFO chatter, torch
  DCP's single-process warning, MLflow's pickle warning and GitPython's "no git" warning (images have
  no git) are hidden; ``--verbose`` shows them all and turns the pipeline's own debug lines on.
* :func:`progress` -- a tqdm bar on a terminal; in a pod or CI log (not a TTY) one plain line every
  ``RLM_PROGRESS_INTERVAL`` seconds (default 30) with done/total, rate, the stage's figures and ETA.
* :func:`print_summary` -- the short block a run ends with: outcome, metrics, where things are, and
  how to open the MLflow UI on it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "LineProgress",
    "RunSummary",
    "StageOutcome",
    "configure_output",
    "format_duration",
    "is_verbose",
    "mlflow_ui_hint",
    "print_summary",
    "progress",
]

log = logging.getLogger(__name__)

# Seconds between progress lines when the output is not a terminal.
PROGRESS_INTERVAL_ENV = "RLM_PROGRESS_INTERVAL"
_DEFAULT_INTERVAL = 30.0
_verbose = False

# Messages that say nothing actionable to a user of this pipeline (each was seen on every run).
_QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # DCP saving in one process: that is what a laptop run is.
    (r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning),
    # The final model is saved with pickle on purpose (see pipeline.tracking.calls) and only loaded by us.
    (r".*Pickle or CloudPickle format requires exercising caution", UserWarning),
)
# Loggers whose INFO lines are implementation detail (database migrations, alembic, botocore retries).
_CHATTY_LOGGERS = ("mlflow", "alembic", "sqlalchemy", "botocore", "urllib3", "git", "torch.distributed")


def configure_output(verbose: bool = False, log_level: str | None = None) -> None:
    """Set up logging for a CLI process; quiet unless ``verbose``.

    Must run before MLflow is imported so that GitPython, which MLflow imports, does not warn about a
    missing ``git`` (there is none in the image).
    """
    global _verbose
    _verbose = verbose
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    level = logging.DEBUG if verbose and log_level in (None, "INFO") else getattr(logging, log_level or "INFO")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    if verbose:
        return
    # MLflow configures its own logger when imported: the env var sets the level it uses.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    for message, category in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def is_verbose() -> bool:
    """Whether ``--verbose`` was given (third-party chatter shown)."""
    return _verbose


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(PROGRESS_INTERVAL_ENV, _DEFAULT_INTERVAL)))
    except ValueError:
        return _DEFAULT_INTERVAL


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` (or ``m:ss``); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _format_value(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


class LineProgress:
    """tqdm's interface (``update``, ``set_postfix``, ``close``, context manager) for logs that are not
    a terminal: one line per ``interval`` seconds, plus one at the end, through the ``pipeline`` logger.

    The line reads ``train  300/600 steps (50%)  loss 3.41  tok/s 14,003  elapsed 0:21  ETA 0:21``.
    """

    def __init__(self, total: float | None, desc: str, unit: str, *, initial: float = 0, interval: float | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.interval = _interval() if interval is None else interval
        self.postfix: dict[str, Any] = {}
        self._logger = logger or logging.getLogger("pipeline.progress")
        self._start_n = initial
        self._started = time.monotonic()
        self._last_line = self._started
        self._emitted_n: float | None = None
        self._closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._emit()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:  # noqa: ARG002
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def line(self) -> str:
        """The progress line as it would be printed now."""
        elapsed = time.monotonic() - self._started
        done = self.n - self._start_n
        if self.total:
            head = f"{_format_value(self.n)}/{_format_value(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            head = f"{_format_value(self.n)} {self.unit}"
        parts = [self.desc, head]
        parts += [f"{key} {_format_value(value)}" for key, value in self.postfix.items()]
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"ETA {format_duration(elapsed / done * (self.total - self.n))}")
        return "  ".join(parts)

    def _emit(self) -> None:
        self._emitted_n = self.n
        self._logger.info("%s", self.line())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._start_n and self.n != self._emitted_n:  # the final state, unless just printed
                self._emit()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: float | None, desc: str, unit: str = "it", *, initial: float = 0, disable: bool = False,
             stream: TextIO | None = None, **tqdm_kwargs: Any) -> Any:
    """A progress reporter for ``total`` units of work: tqdm on a terminal, :class:`LineProgress` otherwise.

    Both take ``update(n)``, ``set_postfix(**figures)`` and ``close()``; ``disable`` gives a silent one
    (other ranks, tiny inputs).
    """
    stream = stream or sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    if interactive or disable:
        return _Bar(total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=stream,
                    dynamic_ncols=True, **tqdm_kwargs)
    return LineProgress(total, desc, unit, initial=initial)


@functools.cache
def _bar_class() -> type:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    class Bar(tqdm):  # type: ignore[misc, valid-type]
        """tqdm that, used as a context manager, routes log lines above the bar instead of through it."""

        def __enter__(self):
            self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
            self._redirect.__enter__()
            return super().__enter__()

        def __exit__(self, *exc):
            try:
                return super().__exit__(*exc)
            finally:
                self._redirect.__exit__(*exc)

    return Bar


def _Bar(**kwargs: Any) -> Any:  # noqa: N802 - a class factory, imported lazily (tqdm is only needed here)
    return _bar_class()(**kwargs)


@dataclass
class StageOutcome:
    """What one stage of this process did: ``did_work`` False means it found nothing to do."""

    stage: str
    did_work: bool
    message: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunSummary:
    """The end-of-run block: stage outcomes, final metrics and where results live."""

    name: str
    outcomes: list[StageOutcome] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    tracking: str | None = None
    elapsed: float | None = None
    next_command: str | None = None  # what to run next, when the stage run was not the last one

    @property
    def nothing_done(self) -> bool:
        return bool(self.outcomes) and not any(o.did_work for o in self.outcomes)

    def render(self) -> str:
        took = f" in {format_duration(self.elapsed)}" if self.elapsed is not None else ""
        head = f"{self.name}: nothing to do{took}" if self.nothing_done else f"{self.name}: done{took}"
        lines = [head]
        for outcome in self.outcomes:
            lines.append(f"  {outcome.stage:<9} {outcome.message}")
        metrics = {k: v for o in self.outcomes for k, v in o.metrics.items()}
        if metrics:
            lines.append("  metrics   " + "  ".join(f"{k} {_format_value(v)}" for k, v in metrics.items()))
        width = max((len(k) for k in self.paths), default=0)
        for key, value in self.paths.items():
            lines.append(f"  {key:<{max(width, 9)}} {value}")
        if self.tracking:
            lines.append(f"  {'MLflow':<{max(width, 9)}} {self.tracking}")
        if self.next_command:
            lines.append(f"  {'next':<{max(width, 9)}} {self.next_command}")
        return "\n".join(lines)


def print_summary(summary: RunSummary, stream: TextIO | None = None) -> None:
    """Print ``summary`` (stdout by default: it is the command's result, logs go to stderr)."""
    print(summary.render(), file=stream or sys.stdout, flush=True)


def _shell_path(path: Path) -> str:
    """``path`` relative to the current folder when it is below it (shorter to type), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def mlflow_ui_hint(tracking_uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """Where to look at a run: its URL on an MLflow server, or the command that serves a local store.

    The command names the venv's own ``mlflow`` (next to this interpreter): a bare ``mlflow`` is not
    on the PATH of someone who did not activate the venv.
    """
    route = ""
    if experiment_id:
        route = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/") + route
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    command = _shell_path(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    return f"{command} ui --backend-store-uri {_quote(tracking_uri)}  then open http://127.0.0.1:5000{route}"


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
