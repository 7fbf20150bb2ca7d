"""Hyperparameter studies with Optuna: ``python -m pipeline tune``, each trial a pipeline run.

One concern per module:

* :mod:`~pipeline.tune.space` -- pure: the search space YAML (any config fields; float / int / categorical),
  validated against the config's schema, and a trial's config values;
* :mod:`~pipeline.tune.study` -- the study's key, folder, storage (SQLite beside the trials by default, any
  Optuna RDB URL), sampler, pruner, resuming (stale trials re-queued in their slot) and driver lock;
* :mod:`~pipeline.tune.trials` -- each trial's config (laid out like a sweep's points) and the executors:
  local processes, Kubernetes driver Jobs, or in-process (benchmarks);
* :mod:`~pipeline.tune.driver` -- the ask / run / tell loop and the MLflow study run;
* :mod:`~pipeline.tune.reporting` -- inside a trial's training: each evaluation's 2TA reported (or raw) loss
  to the study, and stopping when the pruner says so;
* :mod:`~pipeline.tune.plots` -- optimisation history, importances, the best trial's neighbourhood (thesis
  Figs 2.5 / 2.6), a VAE study's Pareto front;
* :mod:`~pipeline.tune.command` -- ``python -m pipeline tune``.

MLflow layout: one sweep run tagged ``pipeline.study=<name>`` per study (run name ``study <experiment>
<key>``), the trials' pipeline runs nested under it (``tracking.sweep_key`` = the study key), each tagged
``tune.trial`` / ``tune.state``.
"""

from pipeline.tune.command import register_commands

__all__ = ["register_commands"]
