"""Experiment tracking in MLflow: one parent run per pipeline run, one nested run per stage.

The run tree (what the MLflow UI shows)::

    <config name>                      tags pipeline.kind=pipeline, pipeline.run_key, git commit, image,
    │                                  dataset checksum, world size; params = the resolved config;
    │                                  final/* metrics; plots/; pipeline.continuations
    ├── prepare                        tags pipeline.kind=stage, pipeline.stage, mlflow.parentRunId
    ├── train                          per-step and per-evaluation metrics, system/*, plots/, the logged
    │                                  and registered 2TA model (Logged models of the run and experiment)
    ├── evaluate                       final/* metrics, eval_results.json, plots/final_summary.png
    └── train (continued)              a later `train` with more steps: pipeline.continues=<train run id>

A sweep (``python -m pipeline sweep``; later an Optuna study) adds one level above: a run tagged
``pipeline.kind=sweep`` and ``pipeline.sweep_key``, whose nested runs are the pipeline runs of its points
(``tracking.sweep_key``), each with its own stages as above; the sweep run holds the Pareto plot::

    sweep <key>                        tags pipeline.kind=sweep, pipeline.sweep_key; params = the grid
    ├── <config name> (point 1)        a pipeline run as above, mlflow.parentRunId = the sweep run
    └── <config name> (point 2)

One concern per module:

* :mod:`~pipeline.tracking.tracker` -- :class:`Tracker`, the stages' API: a durable queue sent by a
  background thread, tentative stages that log nothing when they find nothing to do;
* :mod:`~pipeline.tracking.runs` -- :class:`RunTree`: which experiment, parent and stage runs calls go to;
* :mod:`~pipeline.tracking.calls` -- what each queued call does with the MLflow client (model, plots);
* :mod:`~pipeline.tracking.ops` -- the queued call, its spool file and which failures are retried;
* :mod:`~pipeline.tracking.tags`, :mod:`~pipeline.tracking.system_metrics` -- tags and system metrics.
"""

from pipeline.tracking.ops import (
    PENDING_FILE,
    PermanentError,
    TrackingOp,
    is_transient,
    iter_pending,
)
from pipeline.tracking.runs import RUN_ID_FILE, RunTree, default_tracking_uri
from pipeline.tracking.tags import dataset_checksum, dataset_tags, git_commit
from pipeline.tracking.tracker import Tracker, open_tracker

__all__ = [
    "PENDING_FILE",
    "RUN_ID_FILE",
    "PermanentError",
    "RunTree",
    "TrackingOp",
    "Tracker",
    "dataset_checksum",
    "dataset_tags",
    "default_tracking_uri",
    "git_commit",
    "is_transient",
    "iter_pending",
    "open_tracker",
]
