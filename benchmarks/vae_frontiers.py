"""Pareto frontiers of NLL vs mutual information on the synthetic task (thesis §5.7.1 and §5.A), in one process.

Run as ``python benchmarks/vae_frontiers.py [--steps N --lambdas 0.5,0.9 --groups dreg16-kl,vimco16-kl,...
--vq-grid 1x10,2x10 --vocab V --batch-size B --lr LR --out DIR --seed S --threads T]``, or ``--smoke`` for a
few-second check of the machinery (tiny vocabulary, a few steps, two groups; its numbers mean nothing).

The task (``pipeline/configs/synthetic_vae.yaml``): every "sentence" is one symbol drawn uniformly from a
vocabulary of ``V`` symbols (the thesis: 10,000), so the optimal NLL is ``ln V`` (ln 10000 = 9.210) and a
model that ignores its latents reaches it; the MI term (λ) makes using the latents worthwhile. Model: the
§5.7.1 MLP encoder/decoder (embedding and hidden size from the yaml, 128), built from ``VAEModelConfig``.
Training: fresh uniform symbols every step (the same stream for every run), Adam(β1 = 0, β2 = 0.999,
ε = 1e-8; thesis §5.C) on ``decoder_loss + encoder_loss`` of :func:`models.vae.estimators.estimate` with an
:class:`~models.vae.objectives.ObjectiveSpec`. Evaluation: :func:`pipeline.tasks.vae_evaluation.evaluate_vae`
on held-out symbols (``--eval-sentences``, ``--eval-samples`` importance samples, thesis: 100): the NLL
``-ln p̂(x)`` (IWAE estimate) and the mutual information ``Û^K - Ŝ^K`` (thesis eq. 5.9, the x axis).

Groups (``--groups``, keys in brackets):

* 40 Gaussian latents: ELBO [elbo] (the β-VAE with analytic KL, β = 1 - λ, Prop. 13), DReG 1 [dreg1],
  DReG 16 with the KL [dreg16-kl] and the Rényi [dreg16-renyi] objective;
* 8 categorical latents of 10 categories: REINFORCE 1 [reinforce1], VIMCO 16 with the KL [vimco16-kl] and
  the Rényi [vimco16-renyi] objective;
* VQ-VAE [vq] (no MI term, λ does not apply): one run per ``--vq-grid`` entry ``LATENTSxCATEGORIES``; its
  KL, and hence its MI estimate, is ``n ln m``, fixed by the latent space.

With one sample the KL and Rényi objectives are the same function (D̂_α = ln q/p for K = 1), so the
single-sample groups use the KL one. Rényi's α is the yaml's (0.9). Every non-VQ group is trained once per
λ of ``--lambdas``. A run that diverges (a non-finite loss) is reported and left out of the frontiers.

For each group the Pareto frontier (:func:`pipeline.pareto.frontier.group_frontiers`: maximise MI, minimise
NLL) is computed; then the thesis' statements are checked, each printed as agree / disagree (or n/a):

(a) VIMCO 16 is near-optimal: some VIMCO 16 frontier point has MI >= ``--high-mi`` (default ln V / 2) with
    NLL within ``--near-gap`` nats of ln V;
(b) multi-sample beats single-sample at equal MI: DReG 16 (KL, Rényi) vs DReG 1 and VIMCO 16 (KL, Rényi)
    vs REINFORCE 1;
(c) Rényi >= KL: the Rényi frontier's NLL <= the KL frontier's, for DReG 16 and VIMCO 16;
(d) the VQ-VAE is better than REINFORCE 1 but worse than VIMCO 16 (KL and Rényi).

Frontiers are compared by their NLL at common MI values: each frontier is a piecewise-linear curve
through its points (below its lowest MI it takes its first point's NLL: that point dominates there), read
at 9 MI values from the lower of the two frontiers' smallest MI to the lower of their largest MI; "A
better than B" means A's mean NLL over those values is lower.

Outputs (``--out``): ``frontiers.csv`` (every run), ``frontiers.png`` (NLL vs MI per group, frontiers drawn,
the optimum ln V dashed). Printed: the budget (steps, batch, samples, wall time), a line per run, the
table of every point, each group's frontier and the checks.

The default budget is sized for about 15 minutes on 2 CPU cores shared with other work (one torch thread):
the thesis trained every point for thousands of steps with tuned learning rates on the 10,000-symbol
vocabulary, which is far beyond that budget on a CPU, so the default vocabulary is smaller (``--vocab``;
the optimum is then ``ln V``) and the runs are short. The printed shapes are those of short, untuned runs.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.vae import SentenceVAE, VAEModelConfig  # noqa: E402
from models.vae.estimators import estimate  # noqa: E402
from models.vae.objectives import ObjectiveSpec  # noqa: E402
from pipeline.data.sentences import SentenceBatch  # noqa: E402
from pipeline.pareto.frontier import FrontierPoint, group_frontiers  # noqa: E402
from pipeline.tasks.vae_evaluation import evaluate_vae  # noqa: E402

SYNTHETIC_YAML = Path(__file__).resolve().parents[1] / "pipeline" / "configs" / "synthetic_vae.yaml"
THESIS_VOCAB = 10000


@dataclass(frozen=True)
class Group:
    """One curve of the plot: a latent family, an estimator with its number of samples and an objective."""

    key: str
    name: str
    latent: str  # gaussian, categorical, vq
    estimator: str
    samples: int
    kind: str  # standard (elbo / vq), kl, renyi


GROUPS: tuple[Group, ...] = (
    Group("elbo", "ELBO", "gaussian", "elbo", 1, "standard"),
    Group("dreg1", "DReG 1", "gaussian", "dreg", 1, "kl"),
    Group("dreg16-kl", "DReG 16 KL", "gaussian", "dreg", 16, "kl"),
    Group("dreg16-renyi", "DReG 16 Renyi", "gaussian", "dreg", 16, "renyi"),
    Group("reinforce1", "REINFORCE 1", "categorical", "reinforce", 1, "kl"),
    Group("vimco16-kl", "VIMCO 16 KL", "categorical", "vimco", 16, "kl"),
    Group("vimco16-renyi", "VIMCO 16 Renyi", "categorical", "vimco", 16, "renyi"),
    Group("vq", "VQ-VAE", "vq", "elbo", 1, "standard"),
)
BY_KEY = {g.key: g for g in GROUPS}
BY_NAME = {g.name: g for g in GROUPS}

DEFAULTS = dict(vocab=1000, steps=1200, batch_size=64, lr=0.003, lambdas="0.5,0.7,0.8,0.9", vq_grid="1x10,2x5,2x10,3x10",
                groups=",".join(g.key for g in GROUPS), eval_sentences=500, eval_samples=100)
SMOKE = dict(vocab=40, steps=4, batch_size=16, lr=0.003, lambdas="0.9", vq_grid="1x4", groups="reinforce1,vq",
             eval_sentences=24, eval_samples=4)


@dataclass
class Run:
    """One trained model and its evaluation."""

    group: Group
    mi_weight: float | None  # λ (None: VQ)
    num_latents: int | None = None  # VQ only
    num_categories: int | None = None
    mutual_information: float = math.nan
    nll: float = math.nan
    kl: float = math.nan
    mutual_information_aggregate: float = math.nan
    final_loss: float = math.nan
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: str = ""
    extra: dict[str, float | str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.group.latent == "vq":
            return f"{self.num_latents}x{self.num_categories}"
        return f"lambda={self.mi_weight:g}"

    @property
    def ok(self) -> bool:
        return not self.error and math.isfinite(self.nll) and math.isfinite(self.mutual_information)


# ------------------------------------------------------------------------------------------------ setup


def synthetic_settings() -> dict:
    """The synthetic task's model sizes, optimizer and Rényi α from ``synthetic_vae.yaml``."""
    config = yaml.safe_load(SYNTHETIC_YAML.read_text())
    model = config["vae"]["model"]
    optimizer = config["train"]["optimizer"]
    return dict(embedding_size=int(model["embedding_size"]), hidden_size=int(model["hidden_size"]),
                latent_size=int(model["latent_size"]), alpha=float(config["vae"]["objective"]["alpha"]),
                beta1=float(optimizer["beta1"]), beta2=float(optimizer["beta2"]), eps=float(optimizer["eps"]))


def model_config(run: Run, vocab: int, settings: dict) -> VAEModelConfig:
    common = dict(architecture="mlp", vocab_size=vocab, embedding_size=settings["embedding_size"],
                  hidden_size=settings["hidden_size"])
    if run.group.latent == "gaussian":
        return VAEModelConfig(latent="gaussian", latent_size=settings["latent_size"], **common)
    if run.group.latent == "categorical":
        return VAEModelConfig(latent="categorical", num_latents=8, num_categories=10, **common)
    return VAEModelConfig(latent="vq", num_latents=run.num_latents, num_categories=run.num_categories, **common)


def objective_spec(run: Run, settings: dict) -> ObjectiveSpec:
    group = run.group
    if group.latent == "vq":
        return ObjectiveSpec(estimator="elbo")
    if group.estimator == "elbo":  # the β-VAE, β = 1 - λ (Prop. 13)
        return ObjectiveSpec(estimator="elbo", kl_weight=1.0 - run.mi_weight)
    alpha = settings["alpha"] if group.kind == "renyi" else None
    return ObjectiveSpec(estimator=group.estimator, kind=group.kind, mi_weight=run.mi_weight, alpha=alpha,
                         samples=group.samples)


def symbols(x: torch.Tensor) -> SentenceBatch:
    """One-symbol sentences ``x`` [B] as a time-major batch (targets [1, B]; the mlp decoder ignores inputs)."""
    targets = x.view(1, -1)
    return SentenceBatch(inputs=torch.zeros_like(targets), targets=targets,
                         mask=torch.ones_like(targets, dtype=torch.bool), lengths=torch.ones(x.numel(), dtype=torch.long))


def plan_runs(groups: list[Group], lambdas: list[float], vq_grid: list[tuple[int, int]]) -> list[Run]:
    runs = []
    for group in groups:
        if group.latent == "vq":
            runs += [Run(group, None, n, m) for n, m in vq_grid]
        else:
            runs += [Run(group, lam) for lam in lambdas]
    return runs


# ------------------------------------------------------------------------------------------------ train + evaluate


def train_and_evaluate(run: Run, args: argparse.Namespace, settings: dict, index: int) -> None:
    """Train ``run``'s model for ``args.steps`` steps, then evaluate it on held-out symbols (fills ``run``)."""
    torch.manual_seed(args.seed * 1000 + index)  # the model's initialisation and the latent samples
    try:
        spec = objective_spec(run, settings)
        model = SentenceVAE(model_config(run, args.vocab, settings))
    except ValueError as error:  # e.g. λ > 1 for the ELBO (β = 1 - λ < 0)
        run.error = f"invalid: {error}".splitlines()[0]
        return
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(settings["beta1"], settings["beta2"]),
                                 eps=settings["eps"])
    data = torch.Generator().manual_seed(args.seed)  # the same symbol stream for every run
    model.train()
    start = time.perf_counter()
    losses: list[float] = []
    for step in range(args.steps):
        batch = symbols(torch.randint(args.vocab, (args.batch_size,), generator=data))
        terms = model(batch.inputs, batch.targets, batch.mask, batch.lengths, spec.num_samples)
        result = estimate(terms, spec)
        loss = result.decoder_loss + result.encoder_loss
        if not torch.isfinite(loss):
            run.error = f"diverged at step {step} (non-finite loss)"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(-float(result.objective))
    run.train_seconds = time.perf_counter() - start
    if losses:
        tail = losses[-max(1, len(losses) // 10):]
        run.final_loss = sum(tail) / len(tail)
    if run.error:
        return
    start = time.perf_counter()
    held_out = torch.Generator().manual_seed(args.seed + 1_000_003)
    x = torch.randint(args.vocab, (args.eval_sentences,), generator=held_out)
    torch.manual_seed(args.seed + 7)  # the importance samples
    batches = [symbols(part) for part in x.split(args.eval_batch)]
    metrics = evaluate_vae(model, batches, num_samples=args.eval_samples,
                           chunk_size=max(1, min(args.eval_samples, args.eval_chunk))).metrics()
    run.eval_seconds = time.perf_counter() - start
    run.nll = metrics["nll_per_sentence"]
    run.mutual_information = metrics["mutual_information"]
    run.kl = metrics["kl_per_sentence"]
    run.mutual_information_aggregate = metrics["mutual_information_aggregate"]
    if not run.ok:
        run.error = "non-finite evaluation"


# ------------------------------------------------------------------------------------------------ frontiers + checks


def frontier_points(runs: list[Run]) -> list[FrontierPoint]:
    return [FrontierPoint(r.group.name, r.mutual_information, r.nll, label=r.label,
                          extra={"lambda": "" if r.mi_weight is None else r.mi_weight}) for r in runs if r.ok]


def nll_at(front: list[FrontierPoint], mi: float) -> float:
    """The frontier's NLL at ``mi`` (piecewise linear; its first point's NLL below its smallest MI)."""
    if mi <= front[0].mutual_information:
        return front[0].nll
    for a, b in itertools.pairwise(front):
        if mi <= b.mutual_information:
            t = (mi - a.mutual_information) / (b.mutual_information - a.mutual_information)
            return a.nll + t * (b.nll - a.nll)
    return front[-1].nll


def compare(fronts: dict[str, list[FrontierPoint]], better: str, worse: str) -> tuple[bool | None, str]:
    """Is ``better``'s frontier below ``worse``'s at common MI values? (None when either is missing.)"""
    if not fronts.get(better) or not fronts.get(worse):
        missing = [name for name in (better, worse) if not fronts.get(name)]
        return None, f"n/a (no points for {', '.join(missing)})"
    a, b = fronts[better], fronts[worse]
    low = min(a[0].mutual_information, b[0].mutual_information)
    high = min(a[-1].mutual_information, b[-1].mutual_information)
    grid = [low + (high - low) * i / 8 for i in range(9)]
    diff = sum(nll_at(b, u) - nll_at(a, u) for u in grid) / len(grid)
    return diff > 0, (f"mean NLL({worse}) - NLL({better}) = {diff:+.3f} nats over MI in [{low:.2f}, {high:.2f}]")


def checks(fronts: dict[str, list[FrontierPoint]], vocab: int, near_gap: float, high_mi: float
           ) -> list[tuple[str, bool | None, str]]:
    optimum = math.log(vocab)
    out: list[tuple[str, bool | None, str]] = []
    vimco = [p for name in ("VIMCO 16 KL", "VIMCO 16 Renyi") for p in fronts.get(name, [])]
    if vimco:
        near = [p for p in vimco if p.nll - optimum <= near_gap]
        best = max(near, key=lambda p: p.mutual_information) if near else min(vimco, key=lambda p: p.nll - optimum)
        ok = bool(near) and best.mutual_information >= high_mi
        text = (f"best: {best.group} {best.label} MI {best.mutual_information:.3f}, gap {best.nll - optimum:+.3f} "
                f"(needs MI >= {high_mi:.2f} with gap <= {near_gap:g})")
        out.append(("(a) VIMCO 16 near-optimal at high MI", ok, text))
    else:
        out.append(("(a) VIMCO 16 near-optimal at high MI", None, "n/a (no VIMCO 16 points)"))
    for better, worse in (("DReG 16 KL", "DReG 1"), ("DReG 16 Renyi", "DReG 1"),
                          ("VIMCO 16 KL", "REINFORCE 1"), ("VIMCO 16 Renyi", "REINFORCE 1")):
        out.append((f"(b) multi-sample beats single-sample: {better} < {worse}", *compare(fronts, better, worse)))
    for better, worse in (("DReG 16 Renyi", "DReG 16 KL"), ("VIMCO 16 Renyi", "VIMCO 16 KL")):
        ok, text = compare(fronts, better, worse)
        out.append((f"(c) Renyi >= KL: {better} <= {worse}", ok, text))
    out.append(("(d) VQ-VAE better than REINFORCE 1", *compare(fronts, "VQ-VAE", "REINFORCE 1")))
    for vimco_name in ("VIMCO 16 KL", "VIMCO 16 Renyi"):
        out.append((f"(d) VQ-VAE worse than {vimco_name}", *compare(fronts, vimco_name, "VQ-VAE")))
    return out


# ------------------------------------------------------------------------------------------------ output


def print_tables(runs: list[Run], fronts: dict[str, list[FrontierPoint]], optimum: float) -> None:
    on_front = {(p.group, p.label) for front in fronts.values() for p in front}
    header = f"{'group':<16}{'run':<16}{'MI':>8}{'NLL':>9}{'gap':>8}{'agg MI':>8}{'loss':>8}{'train s':>9}  frontier"
    print("\nall points (MI = Û-Ŝ nats, NLL nats/symbol, gap = NLL - ln V, agg MI = batch aggregate-posterior MI,"
          " loss = final training -objective)")
    print(header)
    for r in runs:
        if not r.ok:
            print(f"{r.group.name:<16}{r.label:<16}  {r.error}")
            continue
        mark = "*" if (r.group.name, r.label) in on_front else ""
        print(f"{r.group.name:<16}{r.label:<16}{r.mutual_information:>8.3f}{r.nll:>9.3f}{r.nll - optimum:>+8.3f}"
              f"{r.mutual_information_aggregate:>8.3f}{r.final_loss:>8.3f}{r.train_seconds:>9.1f}  {mark}")
    print("\nPareto frontiers (by increasing MI)")
    print(f"{'group':<16}{'run':<16}{'MI':>8}{'NLL':>9}{'gap':>8}")
    for name, front in fronts.items():
        for p in front:
            print(f"{name:<16}{p.label:<16}{p.mutual_information:>8.3f}{p.nll:>9.3f}{p.nll - optimum:>+8.3f}")


def write_csv(runs: list[Run], fronts: dict[str, list[FrontierPoint]], path: Path, optimum: float,
              args: argparse.Namespace) -> None:
    on_front = {(p.group, p.label) for front in fronts.values() for p in front}
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "run", "estimator", "samples", "kind", "latent", "lambda", "num_latents",
                         "num_categories", "mutual_information", "nll", "gap", "kl", "mutual_information_aggregate",
                         "final_loss", "on_frontier", "steps", "batch_size", "lr", "vocab", "train_seconds",
                         "eval_seconds", "error"])
        for r in runs:
            writer.writerow([r.group.name, r.label, r.group.estimator, r.group.samples, r.group.kind, r.group.latent,
                             "" if r.mi_weight is None else r.mi_weight, r.num_latents or "", r.num_categories or "",
                             r.mutual_information, r.nll, r.nll - optimum, r.kl, r.mutual_information_aggregate,
                             r.final_loss, int((r.group.name, r.label) in on_front), args.steps, args.batch_size,
                             args.lr, args.vocab, round(r.train_seconds, 3), round(r.eval_seconds, 3), r.error])


def plot(runs: list[Run], fronts: dict[str, list[FrontierPoint]], path: Path, optimum: float, vocab: int,
         title: str) -> None:
    from pipeline.plots.common import new_figure, save_figure

    fig = new_figure(8.0, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    colours = {g.name: f"C{i}" for i, g in enumerate(GROUPS)}
    for name, front in fronts.items():
        points = [r for r in runs if r.ok and r.group.name == name]
        ax.scatter([r.mutual_information for r in points], [r.nll for r in points], color=colours[name], alpha=0.35,
                   s=18)
        ax.plot([p.mutual_information for p in front], [p.nll for p in front], "o-", color=colours[name],
                label=name, markersize=5, gid=f"frontier-{BY_NAME[name].key}")
    ax.axhline(optimum, color="0.3", linestyle="--", linewidth=1, label=f"optimum ln {vocab} = {optimum:.3f}")
    ax.set_xlabel("mutual information Û - Ŝ (nats)")
    ax.set_ylabel("NLL (nats per symbol, IWAE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ main


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _grid(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        if item.strip():
            n, m = item.lower().split("x")
            out.append((int(n), int(m)))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps on a tiny vocabulary, two groups")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {DEFAULTS['steps']})")
    parser.add_argument("--lambdas", default=None, help=f"λ values, comma-separated (default {DEFAULTS['lambdas']})")
    parser.add_argument("--groups", default=None, help="groups, comma-separated: " + ",".join(BY_KEY))
    parser.add_argument("--vq-grid", default=None, help=f"VQ-VAE LATENTSxCATEGORIES (default {DEFAULTS['vq_grid']})")
    parser.add_argument("--vocab", type=int, default=None,
                        help=f"symbols (default {DEFAULTS['vocab']}; the thesis: {THESIS_VOCAB})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULTS['batch_size']}")
    parser.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {DEFAULTS['lr']})")
    parser.add_argument("--eval-sentences", type=int, default=None, help="held-out symbols")
    parser.add_argument("--eval-samples", type=int, default=None, help="importance samples K (thesis 100)")
    parser.add_argument("--eval-batch", type=int, default=125, help="held-out symbols per evaluation batch")
    parser.add_argument("--eval-chunk", type=int, default=50, help="importance samples per decoder pass")
    parser.add_argument("--near-gap", type=float, default=0.5, help="check (a): nats above ln V that count as near")
    parser.add_argument("--high-mi", type=float, default=None, help="check (a): MI that counts as high (ln V / 2)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/vae_frontiers"), help="folder for the CSV and plot [default runs/benchmarks/vae_frontiers]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    base = SMOKE if args.smoke else DEFAULTS
    for name, value in base.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = [k for k in args.groups.split(",") if k.strip() and k.strip() not in BY_KEY]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(BY_KEY)}")
    if args.steps < 1 or args.batch_size < 2 or args.vocab < 2:
        parser.error("need --steps >= 1, --batch-size >= 2 and --vocab >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> int:
    settings = synthetic_settings()
    groups = [BY_KEY[k.strip()] for k in args.groups.split(",") if k.strip()]
    runs = plan_runs(groups, _floats(args.lambdas), _grid(args.vq_grid))
    optimum = math.log(args.vocab)
    high_mi = args.high_mi if args.high_mi is not None else optimum / 2
    print(f"synthetic task: {args.vocab} uniform symbols (optimum NLL ln {args.vocab} = {optimum:.3f}; the thesis: "
          f"ln {THESIS_VOCAB} = {math.log(THESIS_VOCAB):.3f}), MLP size {settings['hidden_size']}, Rényi α "
          f"{settings['alpha']:g}")
    print(f"budget: {len(runs)} runs x {args.steps} steps, batch {args.batch_size}, Adam lr {args.lr:g} "
          f"(β1 {settings['beta1']:g}, β2 {settings['beta2']:g}, ε {settings['eps']:g}); evaluation "
          f"{args.eval_sentences} held-out symbols x {args.eval_samples} importance samples; "
          f"{torch.get_num_threads()} torch thread(s); seed {args.seed}")
    wall = time.perf_counter()
    for index, run in enumerate(runs):
        train_and_evaluate(run, args, settings, index)
        status = run.error or (f"MI {run.mutual_information:.3f}  NLL {run.nll:.3f}  gap {run.nll - optimum:+.3f}")
        print(f"[{index + 1}/{len(runs)}] {run.group.name:<15} {run.label:<13} train {run.train_seconds:6.1f} s  "
              f"eval {run.eval_seconds:5.1f} s  {status}", flush=True)
    fronts = group_frontiers(frontier_points(runs))
    print_tables(runs, fronts, optimum)
    print("\nthesis checks (§5.7.1, §5.A)")
    for name, ok, text in checks(fronts, args.vocab, args.near_gap, high_mi):
        verdict = "n/a" if ok is None else ("agree" if ok else "disagree")
        print(f"  {verdict:<9} {name}: {text}")
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out / "frontiers.csv", args.out / "frontiers.png"
    write_csv(runs, fronts, csv_path, optimum, args)
    plot(runs, fronts, png_path, optimum, args.vocab,
         f"synthetic task, V = {args.vocab}: {args.steps} steps x batch {args.batch_size}")
    elapsed = time.perf_counter() - wall
    train = sum(r.train_seconds for r in runs)
    evaluation = sum(r.eval_seconds for r in runs)
    print(f"\nwrote {csv_path} and {png_path}")
    print(f"wall time {elapsed:.1f} s (training {train:.1f} s, evaluation {evaluation:.1f} s); {len(runs)} runs x "
          f"{args.steps} steps x batch {args.batch_size}; failed runs: {sum(not r.ok for r in runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
