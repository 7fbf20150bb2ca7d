"""pipeline.plots for sentence VAEs: the latent map (PCA and t-SNE), the training curves, the Pareto plot and CSV."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from matplotlib._pylab_helpers import Gcf

from pipeline import plots
from pipeline.pareto.frontier import FrontierPoint, frontier_mask
from pipeline.plots.latents import MIN_TSNE_POINTS
from pipeline.plots.pareto import DOMINATED_ALPHA, FRONTIER_CSV_COLUMNS
from pipeline.plots.vae_curves import MI_WEIGHT_GID

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def panel(fig, method: str):
    (ax,) = [ax for ax in fig.axes if ax.get_gid() == f"latent-{method}"]
    return ax


def scatters(ax) -> dict:
    """gid -> [N, 2] offsets of the scatters of ``ax``."""
    return {c.get_gid(): np.asarray(c.get_offsets()) for c in ax.collections if c.get_gid()}


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def blobs(n: int = 25, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Two well-separated Gaussian blobs, interleaved, labelled "a" and "b"."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(2 * n, dim))
    labels = ["a", "b"] * n
    means[1::2] += 8.0
    return means, labels


# ------------------------------------------------------------------------------------------ latent map


def test_tsne_panel_separates_two_blobs(tmp_path):
    means, labels = blobs()
    fig = plots.plot_latent_means_figure(means, labels, title="demo", seed=0)
    assert [ax.get_gid() for ax in fig.axes] == ["latent-pca", "latent-tsne"]
    assert fig.get_suptitle() == "demo"
    tsne = scatters(panel(fig, "tsne"))
    assert set(tsne) == {"label-a", "label-b"} and len(tsne["label-a"]) == len(tsne["label-b"]) == 25
    centroids = {label: xy.mean(axis=0) for label, xy in tsne.items()}
    for label, xy in tsne.items():
        other = "label-b" if label == "label-a" else "label-a"
        own = np.linalg.norm(xy - centroids[label], axis=1)
        far = np.linalg.norm(xy - centroids[other], axis=1)
        assert (own < far).all()
    assert set(scatters(panel(fig, "pca"))) == {"label-a", "label-b"}
    # the same colour for a label in both panels; the legend (counts over all points) on the first
    pca_colours = {c.get_gid(): tuple(c.get_facecolor()[0]) for c in panel(fig, "pca").collections}
    tsne_colours = {c.get_gid(): tuple(c.get_facecolor()[0]) for c in panel(fig, "tsne").collections}
    assert pca_colours == tsne_colours and pca_colours["label-a"] != pca_colours["label-b"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a (25)", "b (25)"]
    out = plots.plot_latent_means(means, labels, tmp_path / "sub" / "latents.png", title="demo")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_tsne_is_deterministic_for_a_seed():
    means, _ = blobs(n=20)
    first = plots.tsne_embedding(means, seed=3)
    assert first.shape == (40, 2)
    assert np.array_equal(first, plots.tsne_embedding(means, seed=3))
    again = [scatters(panel(plots.plot_latent_means_figure(means, None, seed=1), "tsne"))["unlabelled"]
             for _ in range(2)]
    assert np.array_equal(*again)


def test_tsne_subsamples_at_most_max_points():
    means, labels = blobs(n=100)
    fig = plots.plot_latent_means_figure(means, labels, max_points=30, seed=5)
    tsne, pca = panel(fig, "tsne"), panel(fig, "pca")
    assert sum(len(xy) for xy in scatters(tsne).values()) == 30
    assert sum(len(xy) for xy in scatters(pca).values()) == 200  # PCA is cheap: every point
    assert "30 of 200 points" in tsne.get_title()
    # the same seed draws the same sentences
    again = plots.plot_latent_means_figure(means, labels, max_points=30, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(scatters(tsne).values(), scatters(panel(again, "tsne")).values()))


def test_tiny_inputs_show_no_data():
    rng = np.random.default_rng(0)
    few = rng.normal(size=(MIN_TSNE_POINTS - 1, 3))
    fig = plots.plot_latent_means_figure(few, ["a", "b", "a", "b"])
    assert texts(panel(fig, "tsne")) == ["no data"] and not panel(fig, "tsne").collections
    assert texts(panel(fig, "pca")) == [] and sum(len(xy) for xy in scatters(panel(fig, "pca")).values()) == 4
    for means in (rng.normal(size=(1, 3)), np.zeros((0, 3))):
        fig = plots.plot_latent_means_figure(means, ["a"] * len(means))
        assert [texts(ax) for ax in fig.axes] == [["no data"], ["no data"]]
    with pytest.raises(ValueError, match="at least"):
        plots.tsne_embedding(few, seed=0)
    # just enough points: the perplexity is clipped to (N - 1) / 3
    fig = plots.plot_latent_means_figure(rng.normal(size=(6, 3)), ["a", "b", "a", "b", "a", "c"])
    assert "perplexity 1.67" in panel(fig, "tsne").get_title()
    assert sum(len(xy) for xy in scatters(panel(fig, "tsne")).values()) == 6


def test_degenerate_means_do_not_break_tsne():
    # a collapsed VAE: every posterior mean equal (sklearn itself crashes on these), or one latent dimension
    assert np.array_equal(plots.tsne_embedding(np.ones((12, 4)), seed=0), np.zeros((12, 2)))
    one_dim = plots.tsne_embedding(np.random.default_rng(0).normal(size=(12, 1)), seed=0)
    assert one_dim.shape == (12, 2) and np.isfinite(one_dim).all()
    fig = plots.plot_latent_means_figure(np.ones((8, 2)), None, methods=("tsne",))
    assert len(fig.axes) == 1 and len(scatters(fig.axes[0])["unlabelled"]) == 8


def test_unlabelled_map_has_one_colour_and_no_legend():
    means, _ = blobs(n=10)
    for labels in ([""] * 20, None):
        fig = plots.plot_latent_means_figure(means, labels)
        assert "unlabelled" in fig.get_suptitle()
        for ax in fig.axes:
            assert ax.get_legend() is None
            assert set(scatters(ax)) == {"unlabelled"}
    fig = plots.plot_latent_means_figure(means, [""] * 20, title="run x: validation posterior means")
    assert fig.get_suptitle() == "run x: validation posterior means (unlabelled)"


def test_latent_map_options_are_checked():
    means, labels = blobs(n=5)
    assert [ax.get_gid() for ax in plots.plot_latent_means_figure(means, labels, methods=("pca",)).axes] == [
        "latent-pca"]
    with pytest.raises(ValueError, match="methods"):
        plots.plot_latent_means_figure(means, labels, methods=("umap",))
    with pytest.raises(ValueError, match="labels"):
        plots.plot_latent_means_figure(means, labels[:-1])


# ------------------------------------------------------------------------------------- training curves


def curve_lines(fig) -> dict:
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


def test_vae_curves_draw_exactly_the_series_present(tmp_path):
    history = {
        "train/loss": [(s, 5.0 - s / 100) for s in range(0, 101, 10)],
        "valid/reported_loss": [(50, 4.6), (100, 4.2)],
        "train/kl_analytic": [(s, s / 10) for s in range(0, 101, 10)],
        "vae/mutual_information": [(50, 0.5), (100, 1.0), (75, float("nan"))],
        "vae/active_units": [(50, 3), (100, 5)],
        "train/kl_weight": [(s, min(1.0, s / 50)) for s in range(0, 101, 10)],
        "valid/raw_loss": [(50, 4.7)],  # not read by this plot
    }
    fig = plots.plot_vae_training_curves_figure(history, title="vae", mi_weight=0.5, alpha=0.8)
    lines = curve_lines(fig)
    expected = {f"vae-curve-{k}" for k in history if k in plots.VAE_CURVES}
    assert set(lines) == expected | {MI_WEIGHT_GID}
    assert list(lines["vae-curve-vae/mutual_information"].get_xdata()) == [50, 100]  # NaN dropped
    assert list(lines["vae-curve-valid/reported_loss"].get_ydata()) == [4.6, 4.2]
    assert list(lines[MI_WEIGHT_GID].get_ydata()) == [0.5, 0.5]
    assert lines[MI_WEIGHT_GID].get_label() == "λ (MI weight)"
    assert "α = 0.8" in fig.get_suptitle() and fig.get_suptitle().startswith("vae")
    # the KL panel still shows the analytic KL; nothing says "no data"
    assert not any("no data" in texts(ax) for ax in fig.axes)
    # λ goes with the schedule, not with another panel
    (schedule,) = [ax for ax in fig.axes if MI_WEIGHT_GID in {line.get_gid() for line in ax.get_lines()}]
    assert "vae-curve-train/kl_weight" in {line.get_gid() for line in schedule.get_lines()}
    out = plots.plot_vae_training_curves(history, tmp_path / "curves.png", mi_weight=0.5)
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_vae_curves_every_series_and_none():
    full = {metric: [(10, 1.0), (20, 2.0)] for metric in plots.VAE_CURVES}
    assert set(curve_lines(plots.plot_vae_training_curves_figure(full))) == {
        f"vae-curve-{m}" for m in plots.VAE_CURVES}
    assert len(plots.VAE_CURVES) == len(set(plots.VAE_CURVES)) == 9
    fig = plots.plot_vae_training_curves_figure({"valid/raw_loss": [(1, 1.0)]})
    assert not curve_lines(fig)
    assert [texts(ax) for ax in fig.axes] == [["no data"]] * 4
    # λ alone fills the schedule panel
    fig = plots.plot_vae_training_curves_figure({}, mi_weight=1.0)
    assert set(curve_lines(fig)) == {MI_WEIGHT_GID}
    assert [texts(ax) for ax in fig.axes] == [["no data"]] * 3 + [[]]


# -------------------------------------------------------------------------------------------- pareto

POINTS = [
    FrontierPoint("DReG", 1.0, 5.0, "d1", {"lambda": 0.1}),
    FrontierPoint("DReG", 2.0, 4.5, "d2", {"lambda": 0.5}),
    FrontierPoint("DReG", 1.5, 5.5, "d3", {"lambda": 1.0}),
    FrontierPoint("DReG", 3.0, 4.8, "d4"),
    FrontierPoint("IWAE", 0.5, 4.9, "i1", {"alpha": 0.5}),
    FrontierPoint("IWAE", 2.5, 4.6, "i2"),
    FrontierPoint("IWAE", 2.0, 4.7, "i3"),
    FrontierPoint("IWAE", 0.2, 4.4, "i4"),
    FrontierPoint("IWAE", float("nan"), 4.0, "broken"),
]


def expected_frontier() -> dict[tuple[str, str], bool]:
    """(group, label) -> on the frontier, from frontier_mask per group."""
    out = {}
    for group in {p.group for p in POINTS}:
        members = [p for p in POINTS if p.group == group]
        mask = frontier_mask([p.mutual_information for p in members], [p.nll for p in members])
        out.update({(group, p.label): on for p, on in zip(members, mask)})
    return out


def test_pareto_fades_exactly_the_dominated_points(tmp_path):
    on = expected_frontier()
    assert sum(on.values()) == 4  # d2, d4, i2, i4
    fig = plots.plot_pareto_figure(POINTS, title="frontiers", highlight="d2")
    (ax,) = fig.axes
    collections = {c.get_gid(): c for c in ax.collections}
    assert set(collections) == {"pareto-group-DReG", "pareto-group-IWAE", "pareto-highlight"}
    by_xy = {(p.mutual_information, p.nll): (p.group, p.label) for p in POINTS}
    for group in ("DReG", "IWAE"):
        scatter = collections[f"pareto-group-{group}"]
        offsets, alphas = np.asarray(scatter.get_offsets()), scatter.get_facecolors()[:, 3]
        drawn = [by_xy[(float(x), float(y))] for x, y in offsets]
        assert sorted(drawn) == sorted(k for k in on if k[0] == group and k[1] != "broken")  # NaN not drawn
        for key, alpha in zip(drawn, alphas):
            assert alpha == pytest.approx(1.0 if on[key] else DOMINATED_ALPHA)
        frontier = ax.get_lines()[[line.get_gid() for line in ax.get_lines()].index(f"pareto-frontier-{group}")]
        expected = sorted(p.mutual_information for p in POINTS if on[(p.group, p.label)] and p.group == group)
        assert list(frontier.get_xdata()) == expected
    ring = collections["pareto-highlight"]
    assert np.asarray(ring.get_offsets()).tolist() == [[2.0, 4.5]]
    assert any("this run" in t for t in texts(ax))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "DReG (2 of 4 on the frontier)", "IWAE (2 of 4 on the frontier)"]
    assert ax.get_title() == "frontiers"
    # no highlight (or one that matches no run): no ring
    for highlight in (None, "nobody"):
        (ax,) = plots.plot_pareto_figure(POINTS, highlight=highlight).axes
        assert "pareto-highlight" not in {c.get_gid() for c in ax.collections}
        assert not any("this run" in t for t in texts(ax))
    out = plots.plot_pareto(POINTS, tmp_path / "p" / "pareto.png", highlight="i1")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_frontier_csv_round_trips(tmp_path):
    path = plots.write_frontier_csv(POINTS, tmp_path / "out" / "frontier.csv")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == [*FRONTIER_CSV_COLUMNS, "alpha", "lambda"]
        rows = list(reader)
    assert len(rows) == len(POINTS)
    on = expected_frontier()
    for row in rows:
        assert row["on_frontier"] == str(on[(row["group"], row["label"])])
    by_label = {p.label: p for p in POINTS}
    for row in rows:
        point = by_label[row["label"]]
        assert float(row["nll"]) == point.nll
        mi = float(row["mutual_information"])
        assert mi == point.mutual_information or (math.isnan(mi) and math.isnan(point.mutual_information))
        assert row["lambda"] == str(point.extra.get("lambda", "")) and row["alpha"] == str(point.extra.get("alpha", ""))
    # groups sorted; in each group its frontier first, each part by mutual information
    assert [row["label"] for row in rows] == ["d2", "d4", "d1", "d3", "i4", "i2", "i1", "i3", "broken"]


def test_pareto_empty(tmp_path):
    (ax,) = plots.plot_pareto_figure([]).axes
    assert texts(ax) == ["no data"] and not ax.collections and not ax.get_lines()
    assert plots.plot_pareto([], tmp_path / "e.png").read_bytes()[:8] == PNG_SIGNATURE
    path = plots.write_frontier_csv([], tmp_path / "e.csv")
    assert path.read_text().splitlines() == [",".join(FRONTIER_CSV_COLUMNS)]


def test_no_pyplot_figures_left_open(tmp_path):
    before = Gcf.get_num_fig_managers()
    means, labels = blobs(n=5)
    plots.plot_latent_means(means, labels, tmp_path / "a.png")
    plots.plot_vae_training_curves({"train/loss": [(1, 1.0)]}, tmp_path / "b.png")
    plots.plot_pareto(POINTS, tmp_path / "c.png")
    assert Gcf.get_num_fig_managers() == before
