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
