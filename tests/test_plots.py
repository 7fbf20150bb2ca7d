"""pipeline.plots: each plot writes a readable PNG of the right size and plots the right numbers."""

from __future__ import annotations

import math

import matplotlib.image
import pytest
from matplotlib._pylab_helpers import Gcf

from pipeline import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LN2 = math.log(2)


def check_png(path, width: int, height: int) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width)


def lines_by_gid(ax) -> dict:
    return {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}


def bars_by_gid(ax) -> dict:
    return {p.get_gid(): p.get_height() for p in ax.patches if p.get_gid()}


HISTORY = {
    "train/loss": [(s, 2.0 - s / 1000) for s in range(0, 1001, 50)],
    "valid/raw_loss": [(250, 1.5), (500, 1.3), (750, 1.25), (1000, 1.2)],
    "valid/short_loss": [(500, 1.35), (750, 1.24), (1000, 1.19)],  # missing at the first evaluation
    "valid/long_loss": [(750, 1.22), (1000, 1.18)],
    "valid/reported_loss": [(250, 1.5), (500, 1.3), (750, 1.22), (1000, 1.18)],
    "valid/reported_bpc": [(250, 2.5), (500, 2.0), (750, 1.76), (1000, 1.70)],  # logged bpc wins over loss/ln2
    "valid/raw_bpc": [(250, 1.5 / LN2), (500, 1.3 / LN2), (750, 1.25 / LN2), (1000, 1.2 / LN2)],
    "averaging/short_length": [(250, 0), (500, 250), (750, 0), (1000, 250)],
    "averaging/long_length": [(250, 0), (500, 250), (750, 500), (1000, 750)],
}


def test_no_pyplot_figures_left_open(tmp_path):
    before = Gcf.get_num_fig_managers()
    plots.plot_learning_curves(HISTORY, tmp_path / "a.png", unit="char")
    plots.plot_averaging_lengths(HISTORY, tmp_path / "b.png")
    plots.plot_final_summary({"valid_bpc": 1.4}, tmp_path / "c.png", unit="char")
    plots.plot_comparison({"r": [(1, 1.0)]}, {"r": {"x": 1.0}}, tmp_path / "d.png", metric_label="bpc")
    assert Gcf.get_num_fig_managers() == before


# ------------------------------------------------------------------------------------- learning curves


def test_learning_curves_char_png_and_values(tmp_path):
    out = plots.plot_learning_curves(HISTORY, tmp_path / "sub" / "lc.png", unit="char", title="demo")
    assert out == tmp_path / "sub" / "lc.png"
    check_png(out, 900, 500)

    fig = plots.plot_learning_curves_figure(HISTORY, unit="char", title="demo")
    (ax,) = fig.axes
    lines = lines_by_gid(ax)
    assert set(lines) == {"train", "valid/raw", "valid/short", "valid/long", "valid/reported"}
    assert list(lines["valid/short"].get_xdata()) == [500, 750, 1000]
    assert list(lines["valid/long"].get_ydata()) == pytest.approx([1.22 / LN2, 1.18 / LN2])
    assert list(lines["valid/raw"].get_ydata()) == pytest.approx([v / LN2 for _, v in HISTORY["valid/raw_loss"]])
    assert list(lines["valid/reported"].get_ydata()) == pytest.approx([2.5, 2.0, 1.76, 1.70])  # the bpc series
    assert lines["valid/reported"].get_linestyle() == "None"  # marked, not a line
    assert list(lines["train"].get_ydata())[0] == pytest.approx(2.0 / LN2)
    assert "bpc" in ax.get_ylabel() and ax.get_xlabel() == "optimizer step"
    assert ax.get_title() == "demo"
    assert any("reported 1.7 bpc" in t.get_text() for t in ax.texts)
    # the y range fits the validation curves; the early training loss runs off the top
    low, high = ax.get_ylim()
    assert high < 2.0 / LN2 and high >= 2.5 and low <= 1.0 / LN2 + 1e-9


def test_learning_curves_word_in_perplexity(tmp_path):
    history = {k: v for k, v in HISTORY.items() if not k.endswith("_bpc")}
    check_png(plots.plot_learning_curves(history, tmp_path / "w.png", unit="word"), 900, 500)
    (ax,) = plots.plot_learning_curves_figure(history, unit="word").axes
    lines = lines_by_gid(ax)
    assert list(lines["valid/reported"].get_ydata()) == pytest.approx([math.exp(v) for _, v in history["valid/reported_loss"]])
    assert "perplexity" in ax.get_ylabel()


def test_learning_curves_missing_series_and_bad_points(tmp_path):
    history = {"valid/long_loss": [(300, 1.0), (100, float("nan")), (200, 2.0), (200, 1.5)], "valid/raw_loss": []}
    (ax,) = plots.plot_learning_curves_figure(history, unit="char").axes
    lines = lines_by_gid(ax)
    assert set(lines) == {"valid/long"}
    assert list(lines["valid/long"].get_xdata()) == [200, 300]  # sorted, NaN dropped, last value per step
    assert list(lines["valid/long"].get_ydata()) == pytest.approx([1.5 / LN2, 1.0 / LN2])
    check_png(plots.plot_learning_curves(history, tmp_path / "m.png", unit="char"), 900, 500)


def test_learning_curves_empty_history(tmp_path):
    (ax,) = plots.plot_learning_curves_figure({}, unit="word").axes
    assert not ax.get_lines()
    assert [t.get_text() for t in ax.texts] == ["no data"]
    check_png(plots.plot_learning_curves({}, tmp_path / "e.png", unit="word"), 900, 500)


def test_learning_curves_rejects_unknown_unit(tmp_path):
    with pytest.raises(ValueError, match="unit"):
        plots.plot_learning_curves(HISTORY, tmp_path / "x.png", unit="byte")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ averaging lengths


def test_averaging_lengths(tmp_path):
    check_png(plots.plot_averaging_lengths(HISTORY, tmp_path / "al.png", title="2TA"), 900, 600)
    fig = plots.plot_averaging_lengths_figure(HISTORY, title="2TA")
    top, bottom = fig.axes
    lengths = lines_by_gid(top)
    assert list(lengths["long_length"].get_ydata()) == [0, 250, 500, 750]
    assert list(lengths["short_length"].get_ydata()) == [0, 250, 0, 250]
    assert lengths["long_length"].get_drawstyle() == "steps-post"
    losses = lines_by_gid(bottom)
    assert set(losses) == {"valid/raw", "valid/short", "valid/long"}
    # a *_bpc series is logged, so the losses are shown in bpc (converted where only nats exist)
    assert "bpc" in bottom.get_ylabel()
    assert list(losses["valid/long"].get_ydata()) == pytest.approx([1.22 / LN2, 1.18 / LN2])
    assert top.get_title() == "2TA"


def test_averaging_lengths_nats_and_missing(tmp_path):
    history = {"valid/long_loss": [(10, 2.0)], "averaging/long_length": [(10, 5)]}
    top, bottom = plots.plot_averaging_lengths_figure(history).axes
    assert set(lines_by_gid(top)) == {"long_length"}
    assert list(lines_by_gid(bottom)["valid/long"].get_ydata()) == [2.0]
    assert "nats" in bottom.get_ylabel()
    top, bottom = plots.plot_averaging_lengths_figure({}).axes
    assert [t.get_text() for t in top.texts] == ["no data"] and [t.get_text() for t in bottom.texts] == ["no data"]
    check_png(plots.plot_averaging_lengths({}, tmp_path / "e.png"), 900, 600)


# ---------------------------------------------------------------------------------------- final summary

CHAR_FINALS = {
    "temperature": 0.95, "valid_nll": 1.0, "test_nll": 0.98,
    "valid_bpc": 1.4123, "test_bpc": 1.3876, "valid_bpc_tuned_temperature": 1.4101, "test_bpc_tuned_temperature": 1.3850,
}


def test_final_summary_char(tmp_path):
    check_png(plots.plot_final_summary(CHAR_FINALS, tmp_path / "f.png", unit="char"), 700, 450)
    (ax,) = plots.plot_final_summary_figure(CHAR_FINALS, unit="char", title="t").axes
    assert bars_by_gid(ax) == pytest.approx(
        {"valid/T=1": 1.4123, "test/T=1": 1.3876, "valid/tuned": 1.4101, "test/tuned": 1.3850}
    )
    texts = {t.get_text() for t in ax.texts}
    assert {"1.4123", "1.3876", "1.4101", "1.3850"} <= texts
    assert "bpc" in ax.get_ylabel()
    assert any("T=0.95" in t.get_text() for t in ax.get_legend().get_texts())


def test_final_summary_word_and_fallbacks(tmp_path):
    finals = {"valid_ppl": 80.0, "test_ppl": 77.5, "valid_nll_tuned_temperature": 4.3}  # no test tuned at all
    (ax,) = plots.plot_final_summary_figure(finals, unit="word").axes
    assert bars_by_gid(ax) == pytest.approx({"valid/T=1": 80.0, "test/T=1": 77.5, "valid/tuned": math.exp(4.3)})
    assert "perplexity" in ax.get_ylabel()
    (ax,) = plots.plot_final_summary_figure({"test_nll": 0.9}, unit="char").axes
    assert bars_by_gid(ax) == pytest.approx({"test/T=1": 0.9 / LN2})
    (ax,) = plots.plot_final_summary_figure({}, unit="char").axes
    assert not bars_by_gid(ax) and "no data" in [t.get_text() for t in ax.texts]
    check_png(plots.plot_final_summary({}, tmp_path / "e.png", unit="word"), 700, 450)


# ------------------------------------------------------------------------------------------- comparison


def test_comparison(tmp_path):
    curves = {"a (1111)": [(100, 1.6), (200, 1.4)], "b (2222)": [(100, 1.7), (200, 1.5), (300, 1.45)], "c (3333)": []}
    finals = {"a (1111)": {"valid bpc": 1.4, "test bpc": 1.35}, "b (2222)": {"valid bpc": 1.45}, "c (3333)": {}}
    out = plots.plot_comparison(curves, finals, tmp_path / "cmp.png", metric_label="validation bpc")
    check_png(out, 1300, 500)
    fig = plots.plot_comparison_figure(curves, finals, metric_label="validation bpc", final_label="final bpc", title="x")
    left, right = fig.axes
    lines = lines_by_gid(left)
    assert set(lines) == {"a (1111)", "b (2222)"}
    assert list(lines["b (2222)"].get_ydata()) == [1.7, 1.5, 1.45]
    assert left.get_ylabel() == "validation bpc" and right.get_ylabel() == "final bpc"
    assert bars_by_gid(right) == pytest.approx({"a (1111)|valid bpc": 1.4, "a (1111)|test bpc": 1.35,
                                                "b (2222)|valid bpc": 1.45})
    assert [t.get_text() for t in right.get_xticklabels()] == ["a (1111)", "b (2222)", "c (3333)"]
    assert fig.get_suptitle() == "x"


def test_comparison_empty(tmp_path):
    left, right = plots.plot_comparison_figure({}, {}, metric_label="m").axes
    assert "no data" in [t.get_text() for t in left.texts] and "no data" in [t.get_text() for t in right.texts]
    check_png(plots.plot_comparison({}, {}, tmp_path / "e.png", metric_label="m"), 1300, 500)
