"""A study's plots: optimisation history, parameter importances, the best trial's neighbourhood (thesis
Figs 2.5 / 2.6), and for a two-objective VAE study its Pareto front in the pipeline's Pareto plot.

:func:`neighbourhood_mask` is pure: which trials lie, on every parameter, within ``fraction`` of that
parameter's range (on the scale it is sampled on: log for log parameters) of the best trial - the thesis'
"restricted the range for each hyperparameter separately to about 15% of its entire tuning range". The
sensitivity plot draws every complete trial as a line across parallel axes (one per parameter, then the
objective), those neighbours in red: how much the objective moves when the hyperparameters jitter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tune.space import CategoricalParam, SearchSpace, param_unit

if TYPE_CHECKING:
    from pipeline.pareto.frontier import FrontierPoint
    from pipeline.tune.driver import StudyPlan

__all__ = [
    "NEIGHBOURHOOD_FRACTION",
    "neighbourhood_mask",
    "pareto_points",
    "plot_history",
    "plot_importances",
    "plot_sensitivity",
    "write_study_plots",
]

NEIGHBOURHOOD_FRACTION = 0.15


def neighbourhood_mask(trial_params: Sequence[Mapping[str, Any]], best_params: Mapping[str, Any],
                       space: SearchSpace, fraction: float = NEIGHBOURHOOD_FRACTION) -> list[bool]:
    """For each trial: does every parameter of ``space`` lie within ``fraction`` of its range of the best
    trial's value (a categorical one: the same choice)? A trial lacking a parameter is not a neighbour; the
    best trial is its own neighbour."""
    mask = []
    for params in trial_params:
        near = True
        for p in space.params:
            if p.name not in params or p.name not in best_params:
                near = False
                break
            if isinstance(p, CategoricalParam):
                near = params[p.name] == best_params[p.name]
            else:
                a, b = param_unit(p, params[p.name]), param_unit(p, best_params[p.name])
                near = a is not None and b is not None and abs(a - b) <= fraction + 1e-12
            if not near:
                break
        mask.append(near)
    return mask


def _complete(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def plot_history(study: Any, objectives: Sequence[str], path: Path) -> Path:
    """One panel per objective (each complete trial's value by trial number, and for one objective the best so
    far), plus the validation losses the trials reported while training (pruned ones dashed, ending in x)."""
    from optuna.trial import TrialState

    from pipeline.plots.common import new_figure, no_data, save_figure

    trials = study.get_trials(deepcopy=False)
    reported = [t for t in trials if t.intermediate_values]
    panels = len(objectives) + (1 if reported else 0)
    fig = new_figure(5.5 * panels, 4.2)
    complete = _complete(study)
    for i, metric in enumerate(objectives):
        ax = fig.add_subplot(1, panels, i + 1)
        ax.set_xlabel("trial")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} of each complete trial")
        if not complete:
            no_data(ax)
            continue
        xs, ys = [t.number for t in complete], [t.values[i] for t in complete]
        ax.scatter(xs, ys, color="C0", zorder=3, label="complete")
        if len(objectives) == 1:
            sign = 1 if study.directions[0].name == "MINIMIZE" else -1
            best, line = math.inf, []
            for x, y in zip(xs, ys):
                best = min(best, sign * y)
                line.append(sign * best)
            ax.step(xs, line, where="post", color="C3", label="best so far")
        ax.legend(loc="best", fontsize=8)
    if reported:
        ax = fig.add_subplot(1, panels, panels)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reported validation loss (nats/token)")
        ax.set_title("losses reported while training")
        for t in reported:
            steps = sorted(t.intermediate_values)
            values = [t.intermediate_values[s] for s in steps]
            pruned = t.state == TrialState.PRUNED
            ax.plot(steps, values, linestyle="--" if pruned else "-", color="0.6" if pruned else "C0", alpha=0.8,
                    linewidth=1)
            if pruned:
                ax.plot(steps[-1:], values[-1:], marker="x", color="C3")
        ax.plot([], [], color="C0", label="complete / running")
        ax.plot([], [], color="0.6", linestyle="--", marker="x", markeredgecolor="C3", label="pruned")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"study {study.study_name}: optimisation history")
    return save_figure(fig, path)


def plot_importances(importances: Mapping[str, float], path: Path, *, title: str) -> Path:
    """Horizontal bars of the parameters' importances (fANOVA: share of the objective's variance)."""
    from pipeline.plots.common import new_figure, save_figure

    names = list(importances)[::-1]
    fig = new_figure(7, 0.45 * max(3, len(names)) + 1.5)
    ax = fig.add_subplot()
    ax.barh(range(len(names)), [importances[n] for n in names], color="C0")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("importance (share of the objective's variance, fANOVA)")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_sensitivity(study: Any, space: SearchSpace, objective: str, path: Path, *, index: int = 0,
                     fraction: float = NEIGHBOURHOOD_FRACTION) -> Path:
    """Parallel coordinates of every complete trial (one axis per parameter, then ``objective``), the best
    trial's neighbourhood (:func:`neighbourhood_mask`) in red, the best trial bold (thesis Figs 2.5 / 2.6)."""
    from pipeline.plots.common import new_figure, no_data, save_figure

    complete = _complete(study)
    fig = new_figure(max(7.0, 1.6 * (len(space.params) + 1)), 5)
    ax = fig.add_subplot()
    ax.set_title(f"{objective}: trials near the best one (within {fraction:.0%} of each range) in red")
    if not complete:
        no_data(ax)
        return save_figure(fig, path)
    sign = 1 if study.directions[index].name == "MINIMIZE" else -1
    best = min(complete, key=lambda t: sign * t.values[index])
    mask = neighbourhood_mask([t.params for t in complete], best.params, space, fraction)
    values = [t.values[index] for t in complete]
    low, high = min(values), max(values)
    axes = [p.name for p in space.params] + [objective]
    for trial, near in sorted(zip(complete, mask), key=lambda pair: pair[1]):  # red lines on top
        ys = [param_unit(p, trial.params.get(p.name)) if p.name in trial.params else None for p in space.params]
        ys.append((trial.values[index] - low) / (high - low) if high > low else 0.5)
        xs = [x for x, y in enumerate(ys) if y is not None]
        ax.plot(xs, [y for y in ys if y is not None], color="C3" if near else "0.7", alpha=0.9 if near else 0.5,
                linewidth=2.5 if trial is best else 1.2, zorder=3 if near else 2)
    for x, name in enumerate(axes):
        ax.axvline(x, color="0.3", linewidth=0.8)
        if x < len(space.params):
            p = space.params[x]
            lo, hi = (p.choices[0], p.choices[-1]) if isinstance(p, CategoricalParam) else (p.low, p.high)
        else:
            lo, hi = low, high
        ax.annotate(_tick(lo), (x, 0), xytext=(3, -2), textcoords="offset points", fontsize=7, va="top")
        ax.annotate(_tick(hi), (x, 1), xytext=(3, 2), textcoords="offset points", fontsize=7, va="bottom")
    ax.set_xticks(range(len(axes)), [_short(a) for a in axes], rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.08)
    ax.plot([], [], color="C3", label=f"{sum(mask)} near the best (trial {best.number})")
    ax.plot([], [], color="0.7", label=f"{len(mask) - sum(mask)} other complete trials")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    return save_figure(fig, path)


def _tick(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_study_plots(study: Any, space: SearchSpace, objectives: Sequence[str], directory: Path) -> tuple[
        list[Path], list[str]]:
    """``optimization_history.png``, ``param_importances.png`` and ``sensitivity.png`` under ``directory``
    (importances and sensitivity for the first objective); returns the files and notes on what was skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [plot_history(study, objectives, directory / "optimization_history.png")]
    notes: list[str] = []
    complete = _complete(study)
    target = objectives[0]
    if len(complete) < 2:
        notes.append(f"parameter importances need at least 2 complete trials ({len(complete)} so far): not drawn")
    else:
        import optuna

        try:
            importances = optuna.importance.get_param_importances(
                study, target=(lambda t: t.values[0]) if len(objectives) > 1 else None,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError) as err:
            notes.append(f"parameter importances not computed ({err})")
        else:
            paths.append(plot_importances(importances, directory / "param_importances.png",
                                          title=f"study {study.study_name}: importance for {target}"))
    paths.append(plot_sensitivity(study, space, target, directory / "sensitivity.png"))
    return paths, notes


def pareto_points(study: Any, plan: StudyPlan) -> list[FrontierPoint]:
    """The complete trials of a two-objective VAE study as points of the pipeline's Pareto plot (grouped by
    estimator and objective from each trial's config)."""
    from pipeline.pareto.runs import frontier_point
    from pipeline.tune.study import METRICS_ATTR, trial_slot

    points = []
    for trial in _complete(study):
        slot = trial_slot(trial)
        config = plan.config(slot, dict(trial.params))
        metrics = dict(trial.user_attrs.get(METRICS_ATTR) or {})
        for metric, value in zip(plan.settings.objectives, trial.values):
            metrics.setdefault(metric, value)
        point = frontier_point(metrics, config.mlflow_params(), split="valid", label=config.name,
                               extra={"run_name": config.name, "trial": trial.number})
        if point is not None:
            points.append(point)
    return points
