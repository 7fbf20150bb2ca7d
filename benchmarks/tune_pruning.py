"""Pruning a small Optuna study on 2TA's reported validation loss vs on the raw weights' loss.

The thesis argues (§3) that before averaging starts the raw loss says little about the final one, so early
stopping on it is unreliable, while Two-Tailed Averaging's reported loss approximates the optimal tail
average at every step, which makes early stopping - and so pruning a hyperparameter study - reliable.
This benchmark runs the same small study three times on PTB characters (``ptb_char_tiny``-sized trials,
fixed seeds, tracking off), through the real tune machinery (:mod:`pipeline.tune`: Optuna storage, the
in-trial reporting hook, the median pruner), each trial a whole pipeline run in this process:

* ``reference`` -- no pruning: every trial trains to ``--steps`` and is evaluated;
* ``reported`` -- median pruner on 2TA's reported loss at every evaluation (``tune.prune_on: reported``);
* ``raw`` -- median pruner on the raw weights' loss (``tune.prune_on: raw``).

The three studies evaluate the same configurations in the same order (drawn once at random from the
space and enqueued in each study), so only the pruning signal differs. Per mode it prints the trials
pruned, the training steps spent, the best final validation loss, and whether pruning killed the
configuration that ends best in the unpruned reference; then, from the reference's train logs, how well
each evaluation's raw and 2TA reported losses rank the trials by their final loss (Spearman), and how many
trials 2TA reported averaged weights for at that step (``2TA avg``: before that, with ``raw_fallback``, both
signals are the same number)::

    python benchmarks/tune_pruning.py --smoke                 # 3 trials x 6 steps (< 30 s)
    python benchmarks/tune_pruning.py                         # 10 trials x 300 steps: ~10 min on one core

Writes ``results.csv`` (one row per mode and trial) under ``--out``; use a fresh ``--out`` each time (an
existing study continues instead of running again).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import PipelineConfig, load_config
from pipeline.tune.driver import StudyPlan, run_study
from pipeline.tune.space import SearchSpace, parse_space
from pipeline.tune.study import PRUNED_ATTR, StudySettings, default_storage, open_study, study_key, tune_dir
from pipeline.tune.trials import InlineTrials

DEFAULT_PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"
MODES = ("reference", "reported", "raw")
SPACE = {
    "params": {
        "train.optimizer.lr": {"type": "float", "low": 2.0e-3, "high": 1.0e-1, "log": True},
        "model.input_dropout": {"type": "float", "low": 0.0, "high": 0.6},
        "model.state_dropout": {"type": "float", "low": 0.0, "high": 0.6},
        "model.output_dropout": {"type": "float", "low": 0.0, "high": 0.6},
    },
}


@dataclass
class ModeResult:
    """One study: its trials' outcomes in order."""

    mode: str
    directory: Path = Path()
    states: list[str] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)  # final valid NLL (None: pruned / failed)
    steps: list[int] = field(default_factory=list)  # optimizer steps trained
    seconds: float = 0.0

    @property
    def pruned(self) -> list[int]:
        return [i for i, s in enumerate(self.states) if s == "PRUNED"]

    @property
    def best(self) -> tuple[int | None, float]:
        done = [(v, i) for i, v in enumerate(self.values) if v is not None]
        if not done:
            return None, math.inf
        value, index = min(done)
        return index, value


def base_config(args: argparse.Namespace, out: Path) -> PipelineConfig:
    """``ptb_char_tiny`` at the benchmark's budget: tracking off, small evaluations, one checkpoint per trial."""
    overrides: dict[str, Any] = {
        "name": "tune_pruning", "work_dir": str(out / "runs" / "tune_pruning"),
        "data.source": str(args.data), "data.dir": str(args.data_dir or out / "data"),
        "train.max_steps": args.steps, "train.eval_every": args.eval_every, "train.log_every": args.eval_every,
        "train.eval_tokens": args.eval_tokens, "train.seed": args.seed,
        "checkpoint.every": max(args.eval_every, args.steps // 3),  # a divergence goes back a third, not to step 0
        "evaluate.max_tokens": args.eval_tokens, "evaluate.temperature.num": 3, "tracking.enabled": False,
    }
    if args.smoke:
        overrides |= {"model.hidden_size": 16, "model.num_layers": 1, "model.mogrifier_rounds": 0,
                      "train.dropout_samples": 1, "train.batch_size": 8, "train.bptt": 16}
    return load_config("ptb_char_tiny", overrides)


def draw_configurations(space: SearchSpace, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` configurations drawn at random from the space (log-uniform where it says log), in order."""
    rng = random.Random(seed)
    draws = []
    for _ in range(count):
        params: dict[str, Any] = {}
        for p in space.params:
            if getattr(p, "log", False):
                params[p.name] = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
            else:
                params[p.name] = rng.uniform(p.low, p.high)
        draws.append(params)
    return draws


def run_mode(mode: str, base: PipelineConfig, space: SearchSpace, draws: list[dict[str, Any]],
             args: argparse.Namespace) -> ModeResult:
    """One study over ``draws`` (enqueued in order) with the mode's pruning."""
    settings = StudySettings(objectives=("valid_nll",), directions=("minimize",),
                             prune_on="raw" if mode == "raw" else "reported",
                             pruner="none" if mode == "reference" else "median",
                             startup_trials=args.startup, warmup_steps=args.warmup, seed=args.seed)
    key = study_key(base, space, settings)
    directory = tune_dir(base, key)
    storage = default_storage(directory)
    name = f"tune_pruning-{mode}"
    study = open_study(name, storage, settings)
    if study.trials:
        raise SystemExit(f"{directory} holds a study already: use a fresh --out")
    for params in draws:
        study.enqueue_trial(params)
    plan = StudyPlan(base=base, space=space, settings=settings, key=key, study_name=name, directory=directory,
                     trial_storage=storage)
    started = time.perf_counter()
    run_study(study, plan, InlineTrials(directory), len(draws), max_failures=len(draws), poll_seconds=0,
              say=lambda text: None)
    result = ModeResult(mode, directory=directory, seconds=time.perf_counter() - started)
    for trial in sorted(study.trials, key=lambda t: t.number):
        result.states.append(trial.state.name)
        result.values.append(trial.value if trial.state.name == "COMPLETE" else None)
        result.steps.append(int(trial.user_attrs.get(PRUNED_ATTR, args.steps if trial.state.name == "COMPLETE"
                                                      else max(trial.intermediate_values, default=0))))
    return result


def report(results: dict[str, ModeResult], draws: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The table: per mode the trials pruned, steps spent, best final valid NLL, and whether the reference's
    best configuration was pruned."""
    reference = results["reference"]
    ref_best, ref_value = reference.best
    warmup = f" and step {args.warmup}" if args.warmup else ""
    lines = [f"budget: {len(draws)} trials x {args.steps} steps (eval every {args.eval_every}), median pruner "
             f"after {args.startup} trials{warmup}; reference best: trial {ref_best}, valid NLL {ref_value:.4f} "
             f"({ref_value / math.log(2):.4f} bpc)",
             f"{'mode':<10} {'pruned':>6} {'steps':>7} {'saved':>6} {'best trial':>10} {'best NLL':>9} "
             f"{'regret':>8} {'killed the best?':>17} {'wall s':>7}"]
    total = reference and sum(reference.steps)
    for mode in MODES:
        r = results[mode]
        best, value = r.best
        killed = "n/a" if mode == "reference" else ("YES" if ref_best in r.pruned else "no")
        steps = sum(r.steps)
        lines.append(f"{mode:<10} {len(r.pruned):>6} {steps:>7} {1 - steps / total:>6.0%} {best!s:>10} {value:>9.4f} "
                     f"{value - ref_value:>+8.4f} {killed:>17} {r.seconds:>7.0f}")
    for mode in MODES[1:]:
        r = results[mode]
        lines.append(f"{mode}: pruned trials {r.pruned or 'none'} (at steps "
                     f"{[r.steps[i] for i in r.pruned] or '-'}); reference rank of each pruned trial "
                     f"{[_rank(reference, i) for i in r.pruned] or '-'}")
    return lines


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than 3 pairs."""
    if len(xs) < 3:
        return math.nan

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else math.nan


def signal_quality(reference: ModeResult) -> list[str]:
    """How well each evaluation's raw and 2TA reported losses rank the trials by their final valid NLL (the
    unpruned reference's train logs hold both at every evaluation): the pruner's evidence, step by step."""
    finals = {i: v for i, v in enumerate(reference.values) if v is not None}
    by_step: dict[int, dict[str, dict[int, float]]] = {}
    for index in finals:
        log_file = reference.directory / f"trial-{index}" / "train_log.jsonl"
        for line in log_file.read_text().splitlines():
            record = json.loads(line)
            if "eval" in record:
                evaluation = record["eval"]
                step = by_step.setdefault(record["step"], {"raw": {}, "reported": {}, "source": {}})
                step["reported"][index] = evaluation["loss"]
                step["source"][index] = evaluation["source"]
                if evaluation["raw_loss"] is not None:
                    step["raw"][index] = evaluation["raw_loss"]
    head = "rank correlation with the final valid NLL (reference trials):"
    lines = [f"{head} {'step':>5} {'raw':>6} {'2TA':>6} {'2TA avg':>9}"]
    for step in sorted(by_step):
        row = by_step[step]
        corr = {}
        for signal in ("raw", "reported"):
            common = [i for i in finals if i in row[signal]]
            corr[signal] = rank_correlation([row[signal][i] for i in common], [finals[i] for i in common])
        averaged = sum(source != "raw" for source in row["source"].values())
        lines.append(f"{'':>{len(head) + 1}}{step:>5} {corr['raw']:>6.2f} {corr['reported']:>6.2f} "
                     f"{averaged:>6}/{len(row['source'])}")
    return lines


def _rank(reference: ModeResult, index: int) -> int:
    """1 = the best final valid NLL of the unpruned reference."""
    order = sorted((v, i) for i, v in enumerate(reference.values) if v is not None)
    return 1 + [i for _, i in order].index(index) if index in [i for _, i in order] else -1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="3 trials x 6 steps of a tiny model (a test)")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300, help="train.max_steps of every trial")
    parser.add_argument("--eval-every", type=int, default=25, help="evaluations (= pruning points) every N steps")
    parser.add_argument("--eval-tokens", type=int, default=4000, help="validation tokens per evaluation")
    parser.add_argument("--startup", type=int, default=2, help="median pruner: trials finished before pruning")
    parser.add_argument("--warmup", type=int, default=100,
                        help="median pruner: no pruning before this step (2TA reports the raw weights until its "
                        "averages beat them: before that both modes see the same loss)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DEFAULT_PTB, help="folder of ptb.char.*.txt")
    parser.add_argument("--data-dir", type=Path, default=None, help="prepared ptb_char arrays (default under --out)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.trials, args.steps, args.eval_every, args.eval_tokens, args.startup, args.warmup = 3, 6, 2, 400, 1, 0
    out = args.out or Path(tempfile.mkdtemp(prefix="tune_pruning-"))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    base = base_config(args, out)
    space = parse_space(SPACE, "benchmark space", name="tune_pruning")
    draws = draw_configurations(space, args.trials, args.seed)
    results = {mode: run_mode(mode, base, space, draws, args) for mode in MODES}
    for line in report(results, draws, args) + signal_quality(results["reference"]):
        print(line)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mode", "trial", "state", "steps", "valid_nll", *SPACE["params"]])
        for mode, r in results.items():
            for i, params in enumerate(draws):
                writer.writerow([mode, i, r.states[i], r.steps[i], "" if r.values[i] is None else repr(r.values[i]),
                                 *(params[p] for p in SPACE["params"])])
    print(f"results: {out / 'results.csv'}; wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
