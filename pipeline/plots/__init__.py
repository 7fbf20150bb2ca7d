"""Plots of a pipeline run and of a comparison of runs, as PNG files.

Pure functions of plain data (no MLflow, no torch): each ``plot_*`` writes one PNG and returns its
path; each has a ``plot_*_figure`` twin that only builds the :class:`matplotlib.figure.Figure`
(tests and notebooks inspect its Axes). Figures are created with :class:`~matplotlib.figure.Figure`
on an Agg canvas, never through :mod:`matplotlib.pyplot`: no global figure registry, no backend
switch, nothing left open after a call.

The data is what the pipeline logs to MLflow (see :mod:`pipeline.train` and :mod:`pipeline.evaluate`):

* a *history* maps a metric name to its ``(step, value)`` points, ``step`` being the optimizer
  step: ``train/loss`` (nats per token, with dropout) at every log step; at every evaluation
  ``valid/raw_loss``, ``valid/short_loss``, ``valid/long_loss`` (nats per token of the raw weights
  and of the short and long Two-Tailed Averaging averages; short / long may be missing at an
  evaluation), ``valid/reported_loss`` (the loss of the weights 2TA reports), their ``*_bpc`` twins
  for character-level data, and ``averaging/short_length`` (S) / ``averaging/long_length`` (L);
* *final metrics* are the keys of :meth:`pipeline.evaluate.EvaluationResult.metrics` without the
  ``final/`` prefix: ``valid_bpc``, ``test_bpc_tuned_temperature``, ``valid_ppl``, ``temperature``, ...

Any series may be missing or empty, and non-finite values are skipped: the plot shows what there is
(an empty plot says "no data").

One concern per module:

* :mod:`~pipeline.plots.common` -- the data types (:data:`History`, :data:`Series`, :data:`Unit`),
  display units, figure creation and :func:`save_figure`;
* :mod:`~pipeline.plots.learning_curves` -- :func:`plot_learning_curves` (raw weights vs the 2TA
  averages, training loss);
* :mod:`~pipeline.plots.averaging_lengths` -- :class:`TwoTailedLengths` and
  :func:`plot_averaging_lengths` (thesis Fig. 3.4 style);
* :mod:`~pipeline.plots.summary` -- :func:`plot_final_summary` (one run) and :func:`plot_comparison`
  (runs side by side);
* :mod:`~pipeline.plots.latents` -- :func:`plot_latent_means` (a sentence VAE's posterior means by
  label, PCA and t-SNE side by side) and :func:`tsne_embedding`;
* :mod:`~pipeline.plots.vae_curves` -- :func:`plot_vae_training_curves` (NLL, KL, latent usage and
  the KL schedule of a VAE run; the metrics it reads are :data:`VAE_CURVES`);
* :mod:`~pipeline.plots.pareto` -- :func:`plot_pareto` (NLL against mutual information, Pareto
  frontiers per group) and :func:`write_frontier_csv`;
* :mod:`~pipeline.plots.lm_evaluation` -- :func:`plot_lm_evaluation` (a language model's valid / test
  by evaluation method: static, tuned temperature, dynamic evaluation, MC dropout).
"""

from pipeline.plots.averaging_lengths import (
    Method,
    TwoTailedLengths,
    plot_averaging_lengths,
    plot_averaging_lengths_figure,
)
from pipeline.plots.common import History, Series, Unit, save_figure
from pipeline.plots.latents import (
    plot_latent_means,
    plot_latent_means_figure,
    tsne_embedding,
)
from pipeline.plots.learning_curves import (
    WARMUP_FRACTION,
    plot_learning_curves,
    plot_learning_curves_figure,
)
from pipeline.plots.lm_evaluation import (
    plot_lm_evaluation,
    plot_lm_evaluation_figure,
)
from pipeline.plots.pareto import (
    plot_pareto,
    plot_pareto_figure,
    write_frontier_csv,
)
from pipeline.plots.summary import (
    plot_comparison,
    plot_comparison_figure,
    plot_final_summary,
    plot_final_summary_figure,
)
from pipeline.plots.vae_curves import (
    VAE_CURVES,
    plot_vae_training_curves,
    plot_vae_training_curves_figure,
)

__all__ = [
    "History",
    "Method",
    "Series",
    "TwoTailedLengths",
    "Unit",
    "plot_averaging_lengths",
    "plot_averaging_lengths_figure",
    "plot_comparison",
    "plot_comparison_figure",
    "plot_final_summary",
    "plot_final_summary_figure",
    "plot_latent_means",
    "plot_latent_means_figure",
    "plot_learning_curves",
    "plot_learning_curves_figure",
    "plot_lm_evaluation",
    "plot_lm_evaluation_figure",
    "plot_pareto",
    "plot_pareto_figure",
    "plot_vae_training_curves",
    "plot_vae_training_curves_figure",
    "VAE_CURVES",
    "WARMUP_FRACTION",
    "save_figure",
    "tsne_embedding",
    "write_frontier_csv",
]
