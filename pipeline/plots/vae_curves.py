"""Training curves of a sentence VAE: data fit, KL, latent usage and the KL schedule against the step.

Four panels sharing the step axis:

* (a) NLL -- ``valid/reported_loss`` (importance-sampled NLL of the weights 2TA reports, nats per
  token) and ``train/loss`` (the negated training objective, nats per token, with dropout);
* (b) KL -- ``train/kl_analytic`` and ``train/kl_estimate`` (nats per sentence) and, on a second y
  axis, ``vae/kl_per_token`` (nats per token);
* (c) latent usage -- ``vae/mutual_information`` (nats) and, on a second y axis, ``vae/active_units``;
* (d) schedule -- ``train/kl_weight`` (the KL annealing weight), ``vae/soft_free_bits_gamma`` (γ) and
  λ (the MI weight of the objective, constant) as a horizontal line.

Missing series are skipped; a panel with nothing to draw says "no data".
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.plots.common import History, new_figure, no_data, save_figure, series_points

__all__ = ["VAE_CURVES", "plot_vae_training_curves", "plot_vae_training_curves_figure"]

# panel title, left y label, right y label, [(metric, legend label, colour, axis side, marker)]
_PANELS: tuple[tuple[str, str, str, tuple[tuple[str, str, str, str, str], ...]], ...] = (
    ("(a) NLL", "nats per token", "", (
        ("train/loss", "train: -objective (with dropout)", "tab:green", "left", ""),
        ("valid/reported_loss", "valid: importance-sampled NLL (2TA reported)", "black", "left", "o"),
    )),
    ("(b) KL(q(z|x) || p(z))", "nats per sentence", "nats per token", (
        ("train/kl_analytic", "train: analytic KL", "tab:blue", "left", ""),
        ("train/kl_estimate", "train: KL estimate (Û - Ŝ)", "tab:orange", "left", ""),
        ("vae/kl_per_token", "valid: KL per token (right axis)", "tab:purple", "right", "o"),
    )),
    ("(c) latent usage", "mutual information (nats)", "active units", (
        ("vae/mutual_information", "mutual information", "tab:red", "left", "o"),
        ("vae/active_units", "active units (right axis)", "tab:gray", "right", "s"),
    )),
    ("(d) schedule", "weight", "", (
        ("train/kl_weight", "KL weight (annealing)", "tab:blue", "left", ""),
        ("vae/soft_free_bits_gamma", "soft free bits γ", "tab:orange", "left", "o"),
    )),
)

_SCHEDULE_PANEL = 3  # the panel λ is drawn in

VAE_CURVES: tuple[str, ...] = tuple(metric for *_, series in _PANELS for metric, *_ in series)
"""Every metric :func:`plot_vae_training_curves` reads from the history."""

MI_WEIGHT_GID = "vae-mi-weight"
"""gid of the λ (MI weight) line in the schedule panel."""


def _gid(metric: str) -> str:
    return f"vae-curve-{metric}"


def _panel(ax: Axes, history: History, title: str, left_label: str, right_label: str,
           series: tuple[tuple[str, str, str, str, str], ...], mi_weight: float | None) -> None:
    twin: Axes | None = None
    drawn = False
    for metric, label, colour, side, marker in series:
        steps, values = series_points(history.get(metric))
        if not steps:
            continue
        if side == "right":
            if twin is None:
                twin = ax.twinx()
                twin.set_ylabel(right_label)
            target = twin
        else:
            target = ax
        target.plot(steps, values, color=colour, marker=marker or None, markersize=4, linewidth=1.2,
                    alpha=0.6 if metric == "train/loss" else 1.0, label=label, gid=_gid(metric))
        drawn = True
    if mi_weight is not None:
        ax.axhline(float(mi_weight), color="tab:red", linestyle="--", linewidth=1.2, label="λ (MI weight)",
                   gid=MI_WEIGHT_GID)
        drawn = True
    ax.set_title(title, loc="left")
    ax.set_ylabel(left_label)
    if not drawn:
        no_data(ax)
        return
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    (twin or ax).legend(handles, labels, fontsize=8, loc="best")  # on the twin, else its lines cover it
    ax.grid(True, alpha=0.3)


def plot_vae_training_curves_figure(history: History, *, title: str = "", mi_weight: float | None = None,
                                    alpha: float | None = None) -> Figure:
    """The four panels of the module docstring (2 x 2, shared step axis).

    ``history``: metric name -> ``[(step, value), ...]`` (:data:`VAE_CURVES` are read; sorted, last
    value per step, non-finite values dropped). ``mi_weight``: λ, drawn as a horizontal line (gid
    :data:`MI_WEIGHT_GID`, label "λ (MI weight)") in the schedule panel; ``alpha``: the α of a Rényi /
    power objective, shown in the title. Each line has gid ``vae-curve-<metric>``.
    """
    fig = new_figure(12, 8)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for index, (ax, (panel_title, left_label, right_label, series)) in enumerate(zip(axes, _PANELS)):
        _panel(ax, history, panel_title, left_label, right_label, series,
               mi_weight if index == _SCHEDULE_PANEL else None)
    for ax in axes[2:]:
        ax.set_xlabel("optimizer step")
    heading = title or "VAE training"
    if alpha is not None:
        heading += f" (α = {alpha:g})"
    fig.suptitle(heading)
    return fig


def plot_vae_training_curves(history: History, path: str | Path, *, title: str = "", mi_weight: float | None = None,
                             alpha: float | None = None) -> Path:
    """Write :func:`plot_vae_training_curves_figure` as a PNG to ``path``; returns the path."""
    return save_figure(plot_vae_training_curves_figure(history, title=title, mi_weight=mi_weight, alpha=alpha), path)
