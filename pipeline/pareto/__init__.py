"""Pareto frontiers of sentence VAEs: data fit (NLL) against latent usage (mutual information).

The thesis judges a VAE by this tradeoff, never by one number (§5.7). One concern per module:

* :mod:`~pipeline.pareto.frontier` -- pure: :class:`FrontierPoint`, which points are dominated, each
  group's frontier;
* :mod:`~pipeline.pareto.runs` -- the points of an experiment's finished VAE runs in MLflow;
* :mod:`~pipeline.pareto.command` -- ``python -m pipeline pareto`` (the table, plot and CSV).

The plot and the CSV are drawn by :mod:`pipeline.plots.pareto`.
"""

from pipeline.pareto.command import format_frontiers, register_commands, write_pareto
from pipeline.pareto.frontier import FrontierPoint, frontier_mask, group_frontiers, pareto_frontier
from pipeline.pareto.runs import ParetoRuns, collect_points, group_name, run_point

__all__ = [
    "FrontierPoint",
    "ParetoRuns",
    "collect_points",
    "format_frontiers",
    "frontier_mask",
    "group_frontiers",
    "group_name",
    "pareto_frontier",
    "register_commands",
    "run_point",
    "write_pareto",
]
