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


def dots_by_gid(ax) -> dict:
    """gid -> value of the one-point lines (the dots of the final-value plots)."""
    return {line.get_gid(): float(line.get_ydata()[0]) for line in ax.get_lines()
            if line.get_gid() and len(line.get_ydata()) == 1}


def pixel_y(ax, value: float) -> float:
    return float(ax.transData.transform((0, value))[1])


def inside(ax, values) -> bool:
    low, high = ax.get_ylim()
    return all(low <= v <= high for v in values)


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
    # every validation point and every training point after the warm-up (10% of 1000 steps) is inside
    # the y range; only the first training point (step 0) runs off the top, and a note says so
    train_x, train_y = list(lines["train"].get_xdata()), list(lines["train"].get_ydata())
    assert inside(ax, [y for x, y in zip(train_x, train_y) if x >= 100])
    for gid in ("valid/raw", "valid/short", "valid/long", "valid/reported"):
        assert inside(ax, lines[gid].get_ydata())
    assert not inside(ax, train_y[:1]) and inside(ax, train_y[1:])
    (note,) = [t for t in ax.texts if t.get_gid() == "train-clipped"]
    assert note.get_text() == f"early train loss (step 0, up to {2.0 / LN2:.3g} bpc) runs off the top"


def test_learning_curves_keep_a_training_curve_above_validation():
    # With dropout the training loss stays above the validation loss all along: after the warm-up it
    # must all be inside the plot (it used to be cut off at the top of the validation curves).
    history = {
        "train/loss": [(0, 4.0), (10, 3.0)] + [(s, 1.6 - s / 10_000) for s in range(100, 2001, 100)],
        "valid/raw_loss": [(500, 1.3), (1000, 1.2), (1500, 1.15), (2000, 1.1)],
        "valid/reported_loss": [(500, 1.3), (1000, 1.19), (1500, 1.14), (2000, 1.09)],
    }
    for unit in ("char", "word"):
        (ax,) = plots.plot_learning_curves_figure(history, unit=unit).axes
        lines = lines_by_gid(ax)
        train = list(zip(lines["train"].get_xdata(), lines["train"].get_ydata()))
        assert inside(ax, [y for x, y in train if x >= 100])
        assert not inside(ax, [y for x, y in train if x < 100])  # the first steps (4 nats) are left out...
        assert [t for t in ax.texts if t.get_gid() == "train-clipped"]  # ...and said to be
        assert inside(ax, lines["valid/raw"].get_ydata())
    # without any validation point nothing is left out
    (ax,) = plots.plot_learning_curves_figure({"train/loss": history["train/loss"]}, unit="char").axes
    assert inside(ax, lines_by_gid(ax)["train"].get_ydata())
    assert not [t for t in ax.texts if t.get_gid() == "train-clipped"]


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
    # the logged lengths (after each evaluation adapted) as dots
    assert list(lengths["long_length"].get_ydata()) == [0, 250, 500, 750]
    assert list(lengths["short_length"].get_ydata()) == [0, 250, 0, 250]
    assert lengths["long_length"].get_linestyle() == "None"
    # the lengths each evaluation measured: the previous logged ones plus the 250 steps since
    assert list(lengths["long_length_evaluated"].get_ydata()) == [250, 250, 500, 750]
    assert list(lengths["short_length_evaluated"].get_ydata()) == [250, 250, 500, 250]
    # the sawtooth: growing one iterate per step, dropping at the evaluation
    xs, ys = lengths["short_length_path"].get_data()
    assert list(zip(xs, ys)) == [(0, 0), (250, 250), (250, 0), (500, 250), (500, 250), (750, 500), (750, 0),
                                 (1000, 250), (1000, 250)]
    # the reinitialisation at 250 (S' = L' = 250, raw weights better: both 0) and the switch at 750
    # (S' = L' = 500: L continues from S, S restarts) are marked in both panels
    for ax in (top, bottom):
        assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_gid() == "switch"] == [750]
        assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_gid() == "reinit"] == [250]
    assert {"switch (L \u2190 S', S \u2190 0)", "reinit (S, L \u2190 0: raw weights better)"} <= {
        t.get_text() for t in top.get_legend().get_texts()}
    assert "S restarts at 0" in top.get_title(loc="left")
    losses = lines_by_gid(bottom)
    assert set(losses) == {"valid/raw", "valid/short", "valid/long", "switch", "reinit"}
    # a *_bpc series is logged, so the losses are shown in bpc (converted where only nats exist)
    assert "bpc" in bottom.get_ylabel()
    assert list(losses["valid/long"].get_ydata()) == pytest.approx([1.22 / LN2, 1.18 / LN2])
    assert fig.get_suptitle() == "2TA"


def test_averaging_lengths_switch_at_every_evaluation():
    # Early in training the short average wins every time: S is logged as 0 at every evaluation and L
    # as E. The plot must show that S reached E before each evaluation and say why it reads 0.
    history = {"averaging/short_length": [(n, 0) for n in range(100, 1001, 100)],
               "averaging/long_length": [(n, 100) for n in range(100, 1001, 100)]}
    lengths = plots.TwoTailedLengths.from_history(history)
    assert lengths.events == ["switch"] * 10
    assert lengths.short_evaluated == [100] * 10 and lengths.long_evaluated == [100] + [200] * 9
    assert lengths.looks_two_tailed()
    top, _ = plots.plot_averaging_lengths_figure(history).axes
    lines = lines_by_gid(top)
    assert list(lines["short_length_evaluated"].get_ydata()) == [100] * 10
    assert max(lines["long_length_path"].get_ydata()) == 200
    assert len([line for line in top.get_lines() if line.get_gid() == "switch"]) == 10
    note = top.get_title(loc="left")
    assert "S = 0 at every evaluation" in note and "S' = 100" in note
    low, high = top.get_ylim()
    assert low <= 0 and high >= 200


def test_averaging_lengths_other_methods_are_not_drawn_as_2ta():
    # EMA: S = 0 and L = step + 1 at every evaluation; TA before its start and no averaging: S = L = 0.
    ema = {"averaging/short_length": [(n, 0) for n in (100, 200, 300)],
           "averaging/long_length": [(n, n + 1) for n in (100, 200, 300)]}
    assert not plots.TwoTailedLengths.from_history(ema).looks_two_tailed()
    top, _ = plots.plot_averaging_lengths_figure(ema).axes
    lines = lines_by_gid(top)
    assert set(lines) == {"long_length", "short_length"}  # straight lines through the logged values
    assert list(lines["long_length"].get_ydata()) == [101, 201, 301]
    zeros = {k: [(n, 0) for n in (100, 200)] for k in ("averaging/short_length", "averaging/long_length")}
    top, _ = plots.plot_averaging_lengths_figure(zeros).axes
    assert "S = L = 0 at every evaluation" in top.get_title(loc="left")
    assert "long_length_path" not in lines_by_gid(top)
    # told it is 2TA, the same zeros are reinitialisations after evaluating S' = L' = 100
    top, _ = plots.plot_averaging_lengths_figure(zeros, method="two_tailed").axes
    assert list(lines_by_gid(top)["long_length_evaluated"].get_ydata()) == [100, 100]
    assert plots.TwoTailedLengths.from_history(zeros).events == ["reinit", "reinit"]


def test_averaging_lengths_gaps_are_not_invented():
    # A history starting at a later evaluation (a continuation without its predecessor) or missing
    # evaluations: the lengths that were evaluated there are unknown, and the line is broken.
    history = {"averaging/short_length": [(1000, 0), (1100, 100), (1400, 100)],
               "averaging/long_length": [(1000, 300), (1100, 400), (1400, 700)]}
    lengths = plots.TwoTailedLengths.from_history(history)
    assert lengths.short_evaluated == [None, 100, None] and lengths.events == ["unknown", "none", "unknown"]
    top, _ = plots.plot_averaging_lengths_figure(history).axes
    xs, ys = lines_by_gid(top)["long_length_path"].get_data()
    assert math.isnan(ys[1]) and ys[2] == 300


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
    assert dots_by_gid(ax) == pytest.approx(
        {"valid/T=1": 1.4123, "test/T=1": 1.3876, "valid/tuned": 1.4101, "test/tuned": 1.3850}
    )
    texts = {t.get_text() for t in ax.texts}
    assert {"1.4123", "1.3876", "1.4101", "1.3850"} <= texts
    assert "bpc" in ax.get_ylabel()
    assert any("T=0.95" in t.get_text() for t in ax.get_legend().get_texts())
    assert inside(ax, dots_by_gid(ax).values())


def test_final_summary_tells_close_values_apart():
    # 2.3554 vs 2.3511 looked equal on bars from 0; on the zoomed axis they are far apart.
    finals = {"valid_bpc": 2.3554, "test_bpc": 2.3511, "valid_bpc_tuned_temperature": 2.3550,
              "test_bpc_tuned_temperature": 2.3509}
    (ax,) = plots.plot_final_summary_figure(finals, unit="char").axes
    low, high = ax.get_ylim()
    spread = 2.3554 - 2.3509
    assert low > 0 and high - low <= 2 * spread
    assert inside(ax, finals.values())
    height = ax.bbox.height
    assert pixel_y(ax, 2.3554) - pixel_y(ax, 2.3511) > 0.5 * height
    assert pixel_y(ax, 2.3554) - pixel_y(ax, 2.3550) > 0.05 * height  # even 0.0004 apart is visible
    # one value: still a sensible range around it
    (ax,) = plots.plot_final_summary_figure({"valid_bpc": 1.25}, unit="char").axes
    low, high = ax.get_ylim()
    assert low < 1.25 < high and high - low < 0.1


def test_final_summary_word_and_fallbacks(tmp_path):
    finals = {"valid_ppl": 80.0, "test_ppl": 77.5, "valid_nll_tuned_temperature": 4.3}  # no test tuned at all
    (ax,) = plots.plot_final_summary_figure(finals, unit="word").axes
    assert dots_by_gid(ax) == pytest.approx({"valid/T=1": 80.0, "test/T=1": 77.5, "valid/tuned": math.exp(4.3)})
    assert "perplexity" in ax.get_ylabel()
    (ax,) = plots.plot_final_summary_figure({"test_nll": 0.9}, unit="char").axes
    assert dots_by_gid(ax) == pytest.approx({"test/T=1": 0.9 / LN2})
    (ax,) = plots.plot_final_summary_figure({}, unit="char").axes
    assert not dots_by_gid(ax) and "no data" in [t.get_text() for t in ax.texts]
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
    assert dots_by_gid(right) == pytest.approx({"a (1111)|valid bpc": 1.4, "a (1111)|test bpc": 1.35,
                                                "b (2222)|valid bpc": 1.45})
    assert {"1.4000", "1.3500", "1.4500"} <= {t.get_text() for t in right.texts}
    assert [t.get_text() for t in right.get_xticklabels()] == ["a (1111)", "b (2222)", "c (3333)"]
    assert fig.get_suptitle() == "x"


def test_comparison_tells_close_runs_apart():
    finals = {"a": {"valid bpc": 2.3554}, "b": {"valid bpc": 2.3511}}
    _, right = plots.plot_comparison_figure({}, finals, metric_label="bpc").axes
    low, high = right.get_ylim()
    assert 2.3 < low < 2.3511 < 2.3554 < high < 2.4
    assert pixel_y(right, 2.3554) - pixel_y(right, 2.3511) > 0.5 * right.bbox.height


def test_comparison_empty(tmp_path):
    left, right = plots.plot_comparison_figure({}, {}, metric_label="m").axes
    assert "no data" in [t.get_text() for t in left.texts] and "no data" in [t.get_text() for t in right.texts]
    check_png(plots.plot_comparison({}, {}, tmp_path / "e.png", metric_label="m"), 1300, 500)
