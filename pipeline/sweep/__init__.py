"""Sweeps: a grid of values of one config's fields (λ and α for a VAE's frontier), each point a pipeline run.

One concern per module:

* :mod:`~pipeline.sweep.grid` -- pure: the axes, the points, the sweep key and each point's config;
* :mod:`~pipeline.sweep.local` -- running the points as local processes, their final metrics;
* :mod:`~pipeline.sweep.kubernetes` -- submitting the points' driver Jobs (built by
  :func:`pipeline.k8s.builders.build_sweep_manifest`) to a cluster;
* :mod:`~pipeline.sweep.command` -- ``python -m pipeline sweep``.

MLflow layout: one run tagged ``pipeline.kind=sweep`` per sweep, the points' pipeline runs nested under
it (``tracking.sweep_key``), as the Optuna trials of a study (:mod:`pipeline.tune`) are.
"""

from pipeline.sweep.command import register_commands
from pipeline.sweep.grid import SweepAxis, SweepPoint, expand_grid, parse_axis, point_config, sweep_dir, sweep_key

__all__ = [
    "SweepAxis",
    "SweepPoint",
    "expand_grid",
    "parse_axis",
    "point_config",
    "register_commands",
    "sweep_dir",
    "sweep_key",
]
