"""Two-Tailed Averaging vs tuned Tail Averaging and EMA on PTB characters (thesis §3.6, Fig 3.3 and 3.4), small.

Run as ``python benchmarks/averaging_ptb.py [--steps N --eval-every E --eval-tokens T --ta-starts 0,0.25,0.5
--ema-decays 0.98,0.995 --hidden H --lr LR --batch-size B --bptt K --source DIR --data-dir DIR --out DIR
--seed S --threads T]``, or ``--smoke`` for a few-second check of the machinery (a few steps; its numbers mean
nothing).

One training run feeds every method. The real pipeline trains (:class:`pipeline.train.Trainer` on the
shipped ``ptb_char_tiny`` config: a 2-layer Mogrifier RLSTM, RAdam at a constant learning rate, dropout,
tracking disabled; ``--hidden``, ``--batch-size``, ``--bptt`` override it; the learning rate is ``--lr``,
0.003 by default, because the config's 0.01 collapses to a unigram-level loss after about 2,400 steps of
this budget), with its averager replaced by an :class:`AveragerBank`: the pipeline's own 2TA (the config's
defaults: reset heuristic, raw fallback) plus one :class:`~pipeline.averaging.TailAveraging` per start step
of the TA grid and one :class:`~pipeline.averaging.ExponentialAveraging` per decay of the EMA grid, all built
on the same model.
Averagers only read the weights (they swap an average in for an evaluation and restore the raw weights
bit-exactly), so the raw trajectory is the one every method would see in its own run with the same seed:
one run is exactly as good as one run per method, and several times cheaper. The 2TA drives what the
trainer reports and checkpoints, as in a normal run.

Every ``--eval-every`` (E) steps each method's weights are scored on the first ``--eval-tokens`` validation
characters (nats per character): the raw weights, 2TA's reported weights (its long average, or the raw
weights while they are at least as good), every TA (the raw weights before its start) and every EMA. As in
the thesis, TA's start step and EMA's decay are tuned to minimise the *final* validation loss (the same
validation characters that are reported, so the tuned baselines get a small selection advantage).

Printed: the budget, the final loss of every grid point, the losses of 2TA, tuned TA, tuned EMA and the raw
weights at 10 %, 25 %, 50 % and 100 % of training, the 2TA long-average lengths, and the thesis' statements
as agree / disagree:

(a) the final losses of 2TA, tuned TA and tuned EMA are close (within ``--close`` relative, default 1 %);
(b) early in training (10 %, 25 %, 50 %) 2TA is better than tuned TA and tuned EMA;
(c) averaging helps: 2TA's final loss is below the raw weights';
(d) Fig 3.4: the long average's length just before a switch (a peak) and just after it (a valley) grow almost
    monotonically from switch to switch (at least ``--monotone``, default 75 %, of consecutive peaks and of
    consecutive valleys do not decrease, and the last is above the first).

Outputs (``--out``): ``averaging_ptb.csv`` (one row per evaluation, every method), ``averaging_ptb_loss.png``
(Fig 3.3: validation loss vs step, 2TA / tuned TA / tuned EMA / raw, the other grid points faded) and
``averaging_ptb_lengths.png`` (Fig 3.4: the long-average length L and short length S vs evaluation, a
sawtooth through L just before and just after each evaluation).

The default budget (3,000 steps of batch 16 x 32 characters, evaluation every 50 steps on 15,000
characters, 4 TA starts and 4 EMA decays: about 10 validation passes per evaluation) takes about 5 minutes
on 2 shared CPU cores with one torch thread; the thesis trained a word-level model for far longer and
evaluated every 1,000 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.averaging import (  # noqa: E402
    AveragingReport,
    ExponentialAveraging,
    TailAveraging,
    TwoTailedAveraging,
)
from pipeline.config import validate_config  # noqa: E402
from pipeline.data import prepare_dataset  # noqa: E402
from pipeline.train import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "pipeline" / "configs" / "ptb_char_tiny.yaml"
DEFAULT_PTB = REPO.parent / "shared" / "data" / "ptb"
LN2 = math.log(2.0)
EARLY_FRACTIONS = (0.10, 0.25, 0.50)

DEFAULTS = dict(steps=3000, eval_every=50, eval_tokens=15000, ta_starts="0,0.25,0.5,0.75",
                ema_decays="0.99,0.995,0.998,0.999", lr=0.003)
SMOKE = dict(steps=20, eval_every=5, eval_tokens=1000, ta_starts="0,0.5", ema_decays="0.9,0.98", lr=0.003)


# ------------------------------------------------------------------------------------------------ the bank


@dataclass
class Evaluation:
    """Every method's validation loss (nats/char) at one evaluation.

    step: optimizer steps done. two_tailed: 2TA's report (``loss`` is what it reports; ``long_length`` is L
    after adaptation). long_before: L when the evaluation started (E more iterates than after the last one).
    raw: the raw weights' loss. tail / ema: the loss of each TA (by start step) and each EMA (by decay).
    """

    step: int
    two_tailed: AveragingReport
    long_before: int
    raw: float
    tail: dict[int, float]
    ema: dict[float, float]


@dataclass
class AveragerBank:
    """The :class:`~pipeline.averaging.Averager` protocol over several averagers of the same parameters.

    ``primary`` (the trainer's 2TA) is what the trainer sees: its report is returned by
    :meth:`evaluate_and_adapt`, its weights are the reported ones. The TA and EMA members are updated after
    every optimizer step and scored at every evaluation; ``history`` collects one :class:`Evaluation` each.
    """

    primary: TwoTailedAveraging
    tails: dict[int, TailAveraging]
    emas: dict[float, ExponentialAveraging]
    eval_every: int
    step: int = 0
    history: list[Evaluation] = field(default_factory=list)

    @classmethod
    def build(cls, primary: TwoTailedAveraging, params: Sequence[torch.nn.Parameter], tail_starts: Sequence[int],
              ema_decays: Sequence[float], eval_every: int) -> AveragerBank:
        """Members built now, so that TA from step 0 and every EMA start from the current (initial) weights."""
        params = list(params)
        return cls(primary, {s: TailAveraging(params, s) for s in tail_starts},
                   {d: ExponentialAveraging(params, d) for d in ema_decays}, eval_every)

    def update(self) -> None:
        self.primary.update()
        for member in (*self.tails.values(), *self.emas.values()):
            member.update()
        self.step += 1

    def evaluate_and_adapt(self, evaluate: Callable[[], float]) -> AveragingReport:
        long_before = self.primary.long_length
        report = self.primary.evaluate_and_adapt(evaluate)  # leaves the raw weights in the model
        # 2TA scores the raw weights itself with raw_fallback (the default); otherwise one more pass.
        raw = report.raw_loss if report.raw_loss is not None else float(evaluate())
        # A TA before its start holds the raw weights: its loss is the raw one, no pass needed.
        tail = {s: (ta.evaluate_and_adapt(evaluate).loss if ta.count > 0 else raw) for s, ta in self.tails.items()}
        ema = {d: e.evaluate_and_adapt(evaluate).loss for d, e in self.emas.items()}
        self.history.append(Evaluation(self.step, report, long_before, raw, tail, ema))
        return report

    def reported_weights(self) -> ContextManager[None]:
        return self.primary.reported_weights()

    def state_dict(self) -> dict[str, Any]:
        # Lists, not dicts keyed by the grid values: checkpoint keys must not contain dots.
        return {"kind": "bank", "step": self.step, "primary": self.primary.state_dict(),
                "tails": [ta.state_dict() for ta in self.tails.values()],
                "emas": [e.state_dict() for e in self.emas.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to a checkpoint (divergence recovery): every member, and the history up to its step."""
        self.primary.load_state_dict(state["primary"])
        for ta, saved in zip(self.tails.values(), state["tails"], strict=True):
            ta.load_state_dict(saved)
        for e, saved in zip(self.emas.values(), state["emas"], strict=True):
            e.load_state_dict(saved)
        self.step = int(state["step"])
        self.history = [h for h in self.history if h.step <= self.step]


# ------------------------------------------------------------------------------------------------ analysis


@dataclass
class Summary:
    """The tuned baselines and the series that are printed and plotted (losses in nats/char per evaluation)."""

    steps: list[int]
    two_tailed: list[float]
    raw: list[float]
    best_start: int
    tail: list[float]
    best_decay: float
    ema: list[float]


def summarise(history: list[Evaluation]) -> Summary:
    """Pick TA's start and EMA's decay by the final validation loss (thesis §3.6: tuned for the final loss)."""
    last = history[-1]
    best_start = min(last.tail, key=lambda s: (_key(last.tail[s]), s))
    best_decay = min(last.ema, key=lambda d: (_key(last.ema[d]), d))
    return Summary(steps=[h.step for h in history], two_tailed=[h.two_tailed.loss for h in history],
                   raw=[h.raw for h in history], best_start=best_start, tail=[h.tail[best_start] for h in history],
                   best_decay=best_decay, ema=[h.ema[best_decay] for h in history])


def _key(loss: float) -> float:
    return math.inf if math.isnan(loss) else loss


def index_at(steps: list[int], fraction: float) -> int:
    """The first evaluation at or after ``fraction`` of the last evaluation's step."""
    target = fraction * steps[-1]
    return next(i for i, s in enumerate(steps) if s >= target - 1e-9)


def peaks(history: list[Evaluation]) -> list[tuple[int, int, int]]:
    """(evaluation number, L just before, L just after) at every 2TA switch (Fig 3.4's peaks and valleys)."""
    return [(i, h.long_before, h.two_tailed.long_length) for i, h in enumerate(history, start=1)
            if h.two_tailed.event in ("switch", "stagnation_switch")]


def checks(summary: Summary, history: list[Evaluation], close: float, monotone: float = 0.75
           ) -> list[tuple[str, bool | None, str]]:
    out: list[tuple[str, bool | None, str]] = []
    final = {"2TA": summary.two_tailed[-1], "TA": summary.tail[-1], "EMA": summary.ema[-1]}
    gaps = {name: (final[name] - final["2TA"]) / final["2TA"] for name in ("TA", "EMA")}
    out.append((f"(a) final losses close (within {close:.0%})", all(abs(g) <= close for g in gaps.values()),
                ", ".join(f"{n} - 2TA = {final[n] - final['2TA']:+.4f} nats ({g:+.2%})" for n, g in gaps.items())))
    for fraction in EARLY_FRACTIONS:
        i = index_at(summary.steps, fraction)
        ta, ema, two = summary.tail[i], summary.ema[i], summary.two_tailed[i]
        raw = " (2TA reports the raw weights here)" if history[i].two_tailed.source == "raw" else ""
        out.append((f"(b) 2TA better early, {fraction:.0%} (step {summary.steps[i]})", two < ta and two < ema,
                    f"TA - 2TA = {ta - two:+.4f}, EMA - 2TA = {ema - two:+.4f} nats{raw}"))
    out.append(("(c) averaging helps: final 2TA < raw", final["2TA"] < summary.raw[-1],
                f"raw - 2TA = {summary.raw[-1] - final['2TA']:+.4f} nats"))
    switches = peaks(history)
    if len(switches) < 2:
        out.append(("(d) long-average peaks and valleys grow (Fig 3.4)", None, f"n/a ({len(switches)} switch(es))"))
    else:
        texts, ok = [], True
        for name, heights in (("peaks", [before for _, before, _ in switches]),
                              ("valleys", [after for _, _, after in switches])):
            rising = sum(b >= a for a, b in zip(heights, heights[1:]))
            ok = ok and rising >= monotone * (len(heights) - 1) and heights[-1] > heights[0]
            texts.append(f"{name} {heights[0]} -> {heights[-1]}, {rising} of {len(heights) - 1} steps non-decreasing")
        out.append((f"(d) long-average peaks and valleys grow almost monotonically (Fig 3.4, >= {monotone:.0%})", ok,
                    "; ".join(texts)))
    return out


# ------------------------------------------------------------------------------------------------ output


def print_tables(summary: Summary, history: list[Evaluation]) -> None:
    last = history[-1]
    print("\nfinal validation loss of every grid point (nats/char; * = tuned: lowest final loss)")
    for start, loss in last.tail.items():
        print(f"  TA start {start:<8d}{loss:>9.4f}{'  *' if start == summary.best_start else ''}")
    for decay, loss in last.ema.items():
        print(f"  EMA decay {decay:<7g}{loss:>9.4f}{'  *' if decay == summary.best_decay else ''}")
    columns = [index_at(summary.steps, f) for f in (*EARLY_FRACTIONS, 1.0)]
    print("\nvalidation loss (nats/char) during training; last column also in bits per char")
    header = f"{'method':<24}" + "".join(f"{f'{summary.steps[i]} ({summary.steps[i] / summary.steps[-1]:.0%})':>16}"
                                         for i in columns) + f"{'final bpc':>11}"
    print(header)
    rows = (("2TA (defaults)", summary.two_tailed), (f"TA start {summary.best_start}", summary.tail),
            (f"EMA decay {summary.best_decay:g}", summary.ema), ("raw weights", summary.raw))
    for name, series in rows:
        print(f"{name:<24}" + "".join(f"{series[i]:>16.4f}" for i in columns) + f"{series[-1] / LN2:>11.4f}")
    print("\n2TA per evaluation: L before -> after, S after, event, reported source")
    print("  " + "  ".join(f"{h.long_before}->{h.two_tailed.long_length}/{h.two_tailed.short_length}"
                           f"{'' if h.two_tailed.event == 'none' else ' ' + h.two_tailed.event}"
                           f"{' raw' if h.two_tailed.source == 'raw' else ''}" for h in history))
    switches = peaks(history)
    print("switches (evaluation: L peak -> valley): "
          + (", ".join(f"{n}: {a}->{b}" for n, a, b in switches) if switches else "none"))


def write_csv(history: list[Evaluation], path: Path) -> None:
    tails = list(history[0].tail)
    emas = list(history[0].ema)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "raw", "two_tailed", "two_tailed_source", "short", "long", "short_length",
                         "long_length_before", "long_length", "event", *(f"tail_{s}" for s in tails),
                         *(f"ema_{d:g}" for d in emas)])
        for h in history:
            r = h.two_tailed
            writer.writerow([h.step, h.raw, r.loss, r.source, "" if r.short_loss is None else r.short_loss,
                             "" if r.long_loss is None else r.long_loss, r.short_length, h.long_before,
                             r.long_length, r.event, *(h.tail[s] for s in tails), *(h.ema[d] for d in emas)])


def plot_losses(summary: Summary, history: list[Evaluation], path: Path, title: str) -> None:
    """Fig 3.3: validation loss vs step of 2TA, tuned TA, tuned EMA and the raw weights."""
    from pipeline.plots.common import new_figure, save_figure

    fig = new_figure(8.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    steps = summary.steps
    for start in history[0].tail:
        if start != summary.best_start:
            ax.plot(steps, [h.tail[start] for h in history], color="tab:orange", alpha=0.2, linewidth=0.8)
    for decay in history[0].ema:
        if decay != summary.best_decay:
            ax.plot(steps, [h.ema[decay] for h in history], color="tab:blue", alpha=0.2, linewidth=0.8)
    ax.plot(steps, summary.raw, color="0.5", linewidth=1.0, label="raw weights", gid="raw")
    ax.plot(steps, summary.ema, color="tab:blue", linewidth=1.6, label=f"EMA (decay {summary.best_decay:g}, tuned)",
            gid="ema")
    ax.plot(steps, summary.tail, color="tab:orange", linewidth=1.6, label=f"TA (start {summary.best_start}, tuned)",
            gid="ta")
    ax.plot(steps, summary.two_tailed, color="tab:green", linewidth=1.8, label="2TA", gid="2ta")
    # Zoom on the part of training where the methods differ: the first evaluations of the raw weights and of
    # a slow EMA are far above everything else.
    start = index_at(steps, EARLY_FRACTIONS[0])
    visible = [v for series in (summary.two_tailed, summary.tail, summary.ema, summary.raw) for v in series[start:]
               if math.isfinite(v)]
    if visible:
        low, high = min(visible), max(visible)
        ax.set_ylim(low - 0.05 * (high - low + 1e-6), high + 0.05 * (high - low + 1e-6))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_lengths(history: list[Evaluation], path: Path, title: str) -> None:
    """Fig 3.4: 2TA's long-average length L (just before and after each evaluation) and S vs evaluation."""
    from pipeline.plots.common import new_figure, save_figure

    fig = new_figure(8.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    xs, ls = [0.0], [0]
    for i, h in enumerate(history, start=1):
        xs += [i, i]
        ls += [h.long_before, h.two_tailed.long_length]
    ax.plot(xs, ls, color="tab:green", linewidth=1.5, label="L (long average)", gid="long")
    ax.plot(range(1, len(history) + 1), [h.two_tailed.short_length for h in history], ".", color="tab:orange",
            label="S after the evaluation", gid="short")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("averaging length (iterates)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ run


def build_config(args: argparse.Namespace, work: Path, data_dir: Path) -> Any:
    """The shipped tiny PTB-char config with this budget, in ``work``, tracking off, checkpoints at start and end."""
    config = yaml.safe_load(TINY_YAML.read_text())
    config["name"] = "averaging_ptb"
    config["work_dir"] = str(work)
    config["data"].update(source=str(args.source), dir=str(data_dir))
    if args.hidden is not None:
        config["model"]["hidden_size"] = args.hidden
    train = config["train"]
    train.update(max_steps=args.steps, eval_every=args.eval_every, eval_tokens=args.eval_tokens,
                 log_every=10**9, seed=args.seed)
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    if args.bptt is not None:
        train["bptt"] = args.bptt
    train["optimizer"]["lr"] = args.lr
    config["evaluate"]["max_tokens"] = args.eval_tokens
    # Only step 0 and the last step are checkpointed: nothing here resumes, and saves would cost time.
    config["checkpoint"] = {"every": args.steps, "keep_last": 1}
    config["tracking"] = {"enabled": False}
    return validate_config(config)


def tail_starts(text: str, steps: int) -> list[int]:
    """TA start steps: values < 1 are fractions of the budget, others step numbers; sorted, unique."""
    out = set()
    for item in text.split(","):
        if item.strip():
            value = float(item)
            out.add(int(round(value * steps)) if value < 1 else int(value))
    return sorted(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps and evaluations on a few characters")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULTS['steps']})")
    parser.add_argument("--eval-every", type=int, default=None, help=f"E (default {DEFAULTS['eval_every']})")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help=f"validation characters per evaluation (default {DEFAULTS['eval_tokens']})")
    parser.add_argument("--ta-starts", default=None,
                        help=f"TA start steps; < 1: fraction of --steps (default {DEFAULTS['ta_starts']})")
    parser.add_argument("--ema-decays", default=None, help=f"EMA decays (default {DEFAULTS['ema_decays']})")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default: ptb_char_tiny's)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"RAdam learning rate (default {DEFAULTS['lr']}; ptb_char_tiny's 0.01 collapses after "
                        "about 2,400 steps)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: ptb_char_tiny's")
    parser.add_argument("--bptt", type=int, default=None, help="default: ptb_char_tiny's")
    parser.add_argument("--close", type=float, default=0.01, help="check (a): relative gap that counts as close")
    parser.add_argument("--monotone", type=float, default=0.75,
                        help="check (d): share of consecutive peaks (valleys) that must not decrease")
    parser.add_argument("--source", type=Path, default=DEFAULT_PTB, help="folder with ptb.char.{train,valid,test}.txt")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder for the prepared (tokenised) data, reused when it is there "
                        "(default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/averaging_ptb"),
                        help="folder for the CSV and plots [default runs/benchmarks/averaging_ptb]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1 or args.eval_every < 1 or args.steps % args.eval_every:
        parser.error("need --steps >= 1 and --eval-every >= 1 dividing --steps (the last step is evaluated)")
    decays = [float(d) for d in args.ema_decays.split(",") if d.strip()]
    if not decays or not all(0 <= d < 1 for d in decays):
        parser.error("--ema-decays: one or more values in [0, 1)")
    args.ema_decays = sorted(set(decays))
    args.ta_starts = tail_starts(args.ta_starts, args.steps)
    if not args.ta_starts:
        parser.error("--ta-starts: one or more start steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The pipeline's INFO lines (one per evaluation) would bury the tables."""
    logger = logging.getLogger("pipeline")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _main(args: argparse.Namespace) -> int:
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="averaging_ptb-") as tmp, _quiet(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # single-process checkpoints
        # A fresh work folder every time: an existing one would resume from its checkpoints.
        data_dir = args.data_dir or Path(tmp) / "data"
        prepare_dataset("ptb_char", str(args.source), data_dir, progress=False)
        config = build_config(args, Path(tmp) / "run", data_dir)
        trainer = Trainer(config)
        if not isinstance(trainer.averager, TwoTailedAveraging):
            raise SystemExit(f"expected the config's 2TA averager, got {type(trainer.averager).__name__}")
        bank = AveragerBank.build(trainer.averager, list(trainer.model.parameters()), args.ta_starts, args.ema_decays,
                                  args.eval_every)
        trainer.averager = bank  # the trainer updates, evaluates, reports and checkpoints through the bank
        model = config.model
        params = sum(p.numel() for p in trainer.model.parameters())
        print(f"PTB characters, ptb_char_tiny model: {model.cell} x {model.num_layers} layers, hidden "
              f"{model.hidden_size}, Mogrifier {model.mogrifier_rounds} rounds rank {model.mogrifier_rank}, "
              f"{params:,} parameters")
        print(f"budget: {args.steps} steps x batch {config.train.batch_size} x bptt {config.train.bptt}, "
              f"{config.train.optimizer.name} lr {config.train.optimizer.lr:g} (constant); evaluation every "
              f"{args.eval_every} steps on {args.eval_tokens:,} validation characters; TA starts "
              f"{','.join(map(str, args.ta_starts))}; EMA decays {','.join(f'{d:g}' for d in args.ema_decays)}; "
              f"{torch.get_num_threads()} torch thread(s); seed {args.seed}", flush=True)
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        restarts = trainer.divergence_restarts
        trainer.close()
    history = bank.history
    summary = summarise(history)
    print_tables(summary, history)
    print("\nthesis checks (§3.6, Fig 3.3 / 3.4)")
    for name, ok, text in checks(summary, history, args.close, args.monotone):
        verdict = "n/a" if ok is None else ("agree" if ok else "disagree")
        print(f"  {verdict:<9} {name}: {text}")
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "averaging_ptb.csv"
    loss_png, lengths_png = args.out / "averaging_ptb_loss.png", args.out / "averaging_ptb_lengths.png"
    write_csv(history, csv_path)
    budget = f"PTB char, {args.steps} steps, E = {args.eval_every}"
    plot_losses(summary, history, loss_png, f"{budget}: validation loss")
    plot_lengths(history, lengths_png, f"{budget}: 2TA averaging lengths")
    print(f"\nwrote {csv_path}, {loss_png} and {lengths_png}")
    print(f"wall time {time.perf_counter() - wall:.1f} s (training with evaluations {train_seconds:.1f} s); "
          f"{len(history)} evaluations; divergence restarts: {restarts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
