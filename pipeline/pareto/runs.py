"""The points of a Pareto plot, read from MLflow: one per finished VAE pipeline run of an experiment.

A run counts once its ``evaluate`` stage has copied the final metrics to the pipeline run
(``final/<split>_nll`` and ``final/<split>_mutual_information``); a run restarted by Kubernetes or by
hand keeps its one pipeline run, so it is never counted twice. Its group is the estimator, the number
of samples and the objective (``DReG 16 / KL``); λ, α and the perplexity travel with the point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pipeline.compare.lookup import KIND_TAG, PIPELINE_KIND, ComparisonError, find_pipeline_runs
from pipeline.pareto.frontier import FrontierPoint

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = ["ESTIMATOR_NAMES", "ParetoRuns", "collect_points", "frontier_point", "group_name", "run_point"]

Split = Literal["valid", "test"]

ESTIMATOR_NAMES = {"elbo": "ELBO", "iwae": "IWAE", "stl": "STL", "dreg": "DReG", "reinforce": "REINFORCE",
                   "vimco": "VIMCO", "vq": "VQ-VAE"}
_OBJECTIVE_NAMES = {"kl": "KL", "renyi": "Rényi", "power": "power"}
_EXTRA_PARAMS = {"lambda": "vae.objective.mi_weight", "alpha": "vae.objective.alpha", "latent": "vae.model.latent"}


def group_name(params: dict[str, str]) -> str:
    """``"<estimator> <samples>[/<kl samples>] / <objective>"`` from a run's flattened config params."""
    latent = params.get("vae.model.latent", "")
    if latent == "vq":
        return "VQ-VAE"
    estimator = params.get("vae.objective.estimator", "?")
    samples = params.get("vae.objective.samples", "?")
    kl_samples = params.get("vae.objective.kl_samples", "null")
    if kl_samples not in ("null", "None", "", samples):
        samples = f"{samples}/{kl_samples}"
    kind = params.get("vae.objective.kind", "?")
    return f"{ESTIMATOR_NAMES.get(estimator, estimator)} {samples} / {_OBJECTIVE_NAMES.get(kind, kind)}"


def frontier_point(metrics: Mapping[str, float], params: Mapping[str, str], *, split: Split, label: str,
                   extra: Mapping[str, float | str]) -> FrontierPoint | None:
    """The point of one run from its final metrics (``<split>_nll``, ``<split>_mutual_information``, ...)
    and its config params as MLflow stores them; None when it has no finite NLL and MI (not evaluated yet).
    ``extra`` starts the point's extra columns; λ, α, the latent type, ppl, KL and active units follow."""
    nll = metrics.get(f"{split}_nll")
    mi = metrics.get(f"{split}_mutual_information")
    if nll is None or mi is None or not (math.isfinite(nll) and math.isfinite(mi)):
        return None
    columns: dict[str, float | str] = dict(extra)
    for key, param in _EXTRA_PARAMS.items():
        if param in params:
            columns[key] = params[param]
    for metric in ("ppl", "kl_per_token", "active_units"):
        value = metrics.get(f"{split}_{metric}")
        if value is not None:
            columns[metric] = value
    return FrontierPoint(group=group_name(params), mutual_information=float(mi), nll=float(nll), label=label,
                         extra=columns)


def run_point(run: Run, split: Split = "valid") -> FrontierPoint | None:
    """The point of one pipeline run from MLflow (its ``final/*`` metrics), or None when not evaluated yet."""
    finals = {k[len("final/"):]: v for k, v in run.data.metrics.items() if k.startswith("final/")}
    name = run.data.tags.get("mlflow.runName") or run.info.run_name or ""
    return frontier_point(finals, run.data.params, split=split, label=run.info.run_id,
                          extra={"run_id": run.info.run_id, "run_name": name})


@dataclass
class ParetoRuns:
    """The points of an experiment's runs, and how many runs were left out because not evaluated."""

    experiment: str
    split: Split
    points: list[FrontierPoint] = field(default_factory=list)
    unevaluated: list[str] = field(default_factory=list)  # run ids without final metrics


def collect_points(client: MlflowClient, experiment: str, *, split: Split = "valid",
                   sweep_key: str | None = None) -> ParetoRuns:
    """Every VAE pipeline run of ``experiment`` (only those of sweep ``sweep_key`` when given) as a point.

    Raises :class:`~pipeline.compare.lookup.ComparisonError` (message names the fix) when the experiment
    does not exist or holds no pipeline runs.
    """
    runs: Iterable[Run] = find_pipeline_runs(client, experiment=experiment)
    result = ParetoRuns(experiment=experiment, split=split)
    for run in runs:
        tags: dict[str, Any] = run.data.tags
        if sweep_key is not None and tags.get("pipeline.sweep_key") != sweep_key:
            continue
        if tags.get(KIND_TAG, PIPELINE_KIND) != PIPELINE_KIND or run.data.params.get("task") != "vae":
            continue
        point = run_point(run, split)
        if point is None:
            result.unevaluated.append(run.info.run_id)
        else:
            result.points.append(point)
    if not result.points and not result.unevaluated:
        where = f" of sweep {sweep_key!r}" if sweep_key else ""
        raise ComparisonError(f"experiment {experiment!r} has no sentence-VAE pipeline runs{where}; train one "
                              "(`python -m pipeline run --config ptb_vae`) or sweep one (`python -m pipeline sweep`)")
    return result
