"""Compare pipeline runs tracked in MLflow: a side-by-side table and a plot.

``python -m pipeline compare --experiment NAME`` (every pipeline run of an experiment, newest first)
or ``python -m pipeline compare --run-ids ID [ID ...]`` (full ids or unique prefixes, such as the
8-character ids the table shows) prints one column per run -- the config params that differ between
the runs, then the final metrics -- and writes a PNG with the validation curves overlaid and the final
bpc (or perplexity) per run as dots on a zoomed axis, by default under the work root
(``runs/compare/...``, see :func:`default_output`), and prints its path.

The MLflow layout read here is the tracker's (:mod:`pipeline.tracking`): one *parent* run per
pipeline run (tag ``pipeline.kind=pipeline``; params = the flattened resolved config, see
:func:`pipeline.config.flatten_config`; metrics ``final/<k>`` copied from the evaluate stage) and one
nested *stage* run per stage (tags ``pipeline.kind=stage``, ``pipeline.stage`` in prepare / train /
evaluate, ``mlflow.parentRunId``). The validation curve is the train stage's ``valid/reported_bpc``
(character-level data; converted from ``valid/reported_loss`` when only that was logged) or
``valid/reported_loss`` in nats per token (word-level data). A run without stage children (one flat
run holding everything) is read as its own train and evaluate stage.

``mlflow`` and ``matplotlib`` are imported only when a comparison is made, so registering the
command costs nothing to the other CLI stages.

One concern per module:

* :mod:`~pipeline.compare.lookup` -- finding the pipeline runs in MLflow (an experiment's parent runs,
  run ids and unique id prefixes, :func:`resolve_run_id`) and the :class:`ComparisonError` family;
* :mod:`~pipeline.compare.comparison` -- :class:`RunSummary` of each run, :class:`Comparison` (the
  table and the plot), :func:`compare_runs`;
* :mod:`~pipeline.compare.command` -- the ``compare`` CLI command (:func:`register_commands`), the
  tracking URI and where the plot goes (:func:`work_root`, :func:`default_output`).
"""

from pipeline.compare.command import (
    DEFAULT_TRACKING_URI,
    DEFAULT_WORK_ROOT,
    default_output,
    register_commands,
    resolve_tracking_uri,
    work_root,
)
from pipeline.compare.comparison import Comparison, RunSummary, compare_runs
from pipeline.compare.lookup import (
    ComparisonError,
    NoRunsError,
    UnknownExperimentError,
    UnknownRunError,
    resolve_run_id,
)

__all__ = [
    "DEFAULT_TRACKING_URI",
    "DEFAULT_WORK_ROOT",
    "Comparison",
    "ComparisonError",
    "NoRunsError",
    "RunSummary",
    "UnknownExperimentError",
    "UnknownRunError",
    "compare_runs",
    "default_output",
    "register_commands",
    "resolve_run_id",
    "resolve_tracking_uri",
    "work_root",
]
