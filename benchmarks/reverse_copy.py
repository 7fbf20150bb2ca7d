"""The reverse copy task (thesis §2.3.3, Fig 2.4): LSTM vs Mogrifier LSTM encoder-decoders, cross-entropy vs length.

Run as ``python benchmarks/reverse_copy.py [--lengths 5,10,15,20 --vocab V --hidden H --embedding E --steps N
--batch-size B --lrs 0.003,0.01 --schedule cosine --rounds R --rank K --out DIR --seed S --threads T]``, or
``--smoke`` for a
few-second check of the machinery (tiny sizes, a few steps; its numbers mean nothing).

The task: a sequence of ``L`` tokens drawn i.i.d. uniformly from ``V`` symbols is read by an encoder; a decoder,
started from the encoder's last state, reads a marker token and then, with teacher forcing, the reversed
sequence shifted by one, and must predict the input in reverse order (the reversal avoids the minimal time
lag problem, thesis §2.3.3). The score is the cross-entropy of those ``L`` predictions in nats per output
token on held-out sequences (``--eval-sequences``), between 0 (solved) and ``ln V`` (chance); the token
accuracy (argmax) is printed too.

Models (:class:`Seq2Seq`): an independent, unidirectional encoder and decoder, each one
:class:`models.mogrifier.RecurrentLayer` with cell ``lstm`` (capped input gate, as the language models'
default), each with its own input embedding (the decoder's has the extra marker token), and a softmax over the
``V`` symbols on the decoder's outputs. Both are LSTMs, or both are Mogrifier LSTMs (``--rounds`` rounds,
``--rank`` rank). Both use the same embedding size; the Mogrifier's hidden size is solved so that its
parameter count is closest to the LSTM's (both counts are printed). No dropout: with fresh sequences every
step there is nothing to overfit (the thesis: 500,000 training sequences, no dropout).

Training: Adam with its learning rate decayed to 0 by a cosine over the run (``--schedule constant`` keeps it;
the decay lets short sequences reach a cross-entropy near 0 within the budget), gradient norm clipped at
``--clip``, forget-gate bias initialised to ``--forget-bias``, fresh uniform sequences every step from a
generator seeded per length (the same batches for both models and every learning rate), the initialisation
seeded per length. With several ``--lrs`` every (model, length) is trained once per
learning rate, the one with the lowest validation cross-entropy is kept and its test cross-entropy (other
held-out sequences) is reported.

The thesis' shape (Fig 2.4a: vocabulary 1,000, 10M parameters, lengths 50 to 200, tuned lr, l2, embedding
size, rounds and rank): both models solve short sequences (cross-entropy near 0), and at the longer lengths
the Mogrifier is better. Printed as agree / disagree:

(a) at the shortest length both models are near 0 (cross-entropy <= ``--near-zero`` nats/token);
(b) at each length in the longer half of ``--lengths``, the Mogrifier's cross-entropy <= the LSTM's.

Outputs (``--out``): ``reverse_copy.csv`` (every run, every learning rate) and ``reverse_copy.png``
(cross-entropy vs length, one line per model, chance ``ln V`` dashed when the curves come near it). Printed:
the budget, the models' sizes, one line per run, the table length x model and the checks.

The default budget (vocabulary 16, LSTM hidden 128, embedding 64, lengths 5/10/15/20, 1,200 steps of 64
sequences, one learning rate) takes 6 to 9 minutes on 2 shared CPU cores with one torch thread; the
Mogrifier's steps cost 1.5 to 2 times the LSTM's. It is far below the thesis' (10M parameters, a vocabulary of
1,000, 500,000 sequences, tuned hyperparameters), so the lengths at which the models stop solving the task are
much shorter here, and what the longer lengths measure is mostly how fast each model learns within the budget.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.mogrifier import RecurrentLayer  # noqa: E402

DEFAULTS = dict(lengths="5,10,15,20", vocab=16, hidden=128, embedding=64, steps=1200, batch_size=64, lrs="0.01",
                eval_sequences=1000)
SMOKE = dict(lengths="3,6", vocab=8, hidden=16, embedding=8, steps=15, batch_size=16, lrs="0.01", eval_sequences=64)
THESIS_VOCAB = 1000


# ------------------------------------------------------------------------------------------------ model


class Seq2Seq(nn.Module):
    """Encoder-decoder for the reverse copy task: two :class:`~models.mogrifier.RecurrentLayer` s and a softmax.

    vocab: V symbols (ids 0..V-1); the decoder's input vocabulary adds the marker token (id V).
    embedding / hidden: input embedding size e and hidden size n of both layers.
    rounds / rank: the Mogrifier's rounds (0: plain LSTM) and the rank of its matrices (0: full rank).

    ``forward(source [L, B] int64)`` -> logits [L, B, V] of the targets ``source.flip(0)`` (teacher forcing:
    the decoder reads the marker, then the targets shifted by one).
    """

    def __init__(self, vocab: int, embedding: int, hidden: int, rounds: int, rank: int,
                 capped_input_gate: bool = True, forget_bias_init: float = 0.0) -> None:
        super().__init__()
        self.vocab = vocab
        self.hidden = hidden
        self.encoder_embedding = nn.Embedding(vocab, embedding)
        self.decoder_embedding = nn.Embedding(vocab + 1, embedding)
        layer = dict(mogrifier_rounds=rounds, mogrifier_rank=rank, capped_input_gate=capped_input_gate,
                     forget_bias_init=forget_bias_init)
        self.encoder = RecurrentLayer("lstm", embedding, hidden, **layer)
        self.decoder = RecurrentLayer("lstm", embedding, hidden, **layer)
        self.output = nn.Linear(hidden, vocab)

    def forward(self, source: Tensor) -> Tensor:
        length, batch = source.shape
        zeros = source.new_zeros(batch, self.hidden, dtype=self.output.weight.dtype)
        _, state = self.encoder(self.encoder_embedding(source), (zeros, zeros))
        targets = source.flip(0)
        marker = source.new_full((1, batch), self.vocab)
        decoder_inputs = torch.cat([marker, targets[:-1]])  # [L, B]
        outputs, _ = self.decoder(self.decoder_embedding(decoder_inputs), state)
        return self.output(outputs)


def count_parameters(vocab: int, embedding: int, hidden: int, rounds: int, rank: int) -> int:
    """Parameters of a :class:`Seq2Seq` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = Seq2Seq(vocab, embedding, hidden, rounds, rank)
    return sum(p.numel() for p in model.parameters())


def hidden_for_budget(budget: int, vocab: int, embedding: int, rounds: int, rank: int, largest: int) -> int:
    """The hidden size (<= ``largest``) whose model's parameter count is closest to ``budget``."""
    return min(range(1, largest + 1),
               key=lambda n: (abs(count_parameters(vocab, embedding, n, rounds, rank) - budget), -n))


# ------------------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class Variant:
    """One line of the plot: the cell's Mogrifier rounds and the hidden size that meets the budget."""

    name: str
    rounds: int
    hidden: int
    params: int


@dataclass
class Run:
    """One model trained at one length with one learning rate, and its held-out scores."""

    variant: Variant
    length: int
    lr: float
    train_loss: float = math.nan  # mean over the last 10 % of steps (nats/token)
    valid: float = math.nan  # cross-entropy, nats per output token
    test: float = math.nan
    test_accuracy: float = math.nan
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and math.isfinite(self.valid) and math.isfinite(self.test)


def sequences(count: int, length: int, vocab: int, seed: int) -> Tensor:
    """``count`` i.i.d. uniform sequences [length, count] from a generator seeded with ``seed``."""
    return torch.randint(vocab, (length, count), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate(model: Seq2Seq, data: Tensor, batch_size: int) -> tuple[float, float]:
    """Cross-entropy (nats per output token) and token accuracy of ``model`` on ``data`` [L, N]."""
    model.eval()
    total, correct = 0.0, 0
    for source in data.split(batch_size, dim=1):
        logits = model(source)
        targets = source.flip(0)
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
    model.train()
    return total / data.numel(), correct / data.numel()


def train_and_evaluate(run: Run, args: argparse.Namespace, held_out: dict[str, Tensor]) -> None:
    """Train ``run``'s model for ``args.steps`` steps at its length and learning rate; score it (fills ``run``)."""
    torch.manual_seed(args.seed * 1000 + run.length)  # the initialisation: per length, the same for every lr
    model = Seq2Seq(args.vocab, args.embedding, run.variant.hidden, run.variant.rounds, args.rank,
                    forget_bias_init=args.forget_bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=run.lr)
    # Cosine decay to 0 lets a run settle into the solution it found (a constant lr keeps the loss noisy).
    factor = (lambda step: 0.5 * (1.0 + math.cos(math.pi * step / args.steps))) if args.schedule == "cosine" \
        else (lambda step: 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    data = torch.Generator().manual_seed(args.seed * 1000 + run.length)  # the same batches for every run
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        source = torch.randint(args.vocab, (run.length, args.batch_size), generator=data)
        loss = F.cross_entropy(model(source).flatten(0, 1), source.flip(0).flatten())
        if not torch.isfinite(loss):
            run.error = f"diverged at step {step} (non-finite loss)"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    run.seconds = time.perf_counter() - start
    if losses:
        tail = losses[-max(1, len(losses) // 10):]
        run.train_loss = sum(tail) / len(tail)
    if run.error:
        return
    run.valid, _ = evaluate(model, held_out["valid"], args.eval_batch)
    run.test, run.test_accuracy = evaluate(model, held_out["test"], args.eval_batch)
    if not run.ok:
        run.error = "non-finite evaluation"


def best_runs(runs: list[Run]) -> dict[tuple[str, int], Run]:
    """Per (model, length): the run with the lowest validation cross-entropy over the learning rates."""
    best: dict[tuple[str, int], Run] = {}
    for run in runs:
        if not run.ok:
            continue
        key = (run.variant.name, run.length)
        if key not in best or run.valid < best[key].valid:
            best[key] = run
    return best


def checks(best: dict[tuple[str, int], Run], variants: list[Variant], lengths: list[int], near_zero: float
           ) -> list[tuple[str, bool | None, str]]:
    lstm, mog = variants[0].name, variants[1].name
    out: list[tuple[str, bool | None, str]] = []
    short = lengths[0]
    found = [best.get((name, short)) for name in (lstm, mog)]
    if None in found:
        out.append((f"(a) both near 0 at length {short}", None, "n/a (a run failed)"))
    else:
        out.append((f"(a) both near 0 at length {short}", all(r.test <= near_zero for r in found),
                    f"{lstm} {found[0].test:.4f}, {mog} {found[1].test:.4f} (needs <= {near_zero:g})"))
    for length in lengths[len(lengths) // 2:]:  # the longer half
        a, b = best.get((lstm, length)), best.get((mog, length))
        name = f"(b) {mog} <= {lstm} at length {length}"
        if a is None or b is None:
            out.append((name, None, "n/a (a run failed)"))
        else:
            out.append((name, b.test <= a.test, f"{mog} - {lstm} = {b.test - a.test:+.4f} nats/token"))
    return out


# ------------------------------------------------------------------------------------------------ output


def print_table(best: dict[tuple[str, int], Run], variants: list[Variant], lengths: list[int]) -> None:
    lstm, mog = variants[0].name, variants[1].name
    print("\ntest cross-entropy (nats per output token) and token accuracy, best learning rate by validation")
    print(f"{'length':>6}  {lstm + ' CE':>12}{'acc':>7}{'lr':>8}  {mog + ' CE':>20}{'acc':>7}{'lr':>8}  "
          f"{'Mog - LSTM':>11}")
    for length in lengths:
        a, b = best.get((lstm, length)), best.get((mog, length))
        cells = []
        for run, width in ((a, 12), (b, 20)):
            cells.append(f"{run.test:>{width}.4f}{run.test_accuracy:>7.3f}{run.lr:>8g}" if run
                         else f"{'failed':>{width}}{'':>7}{'':>8}")
        diff = f"{b.test - a.test:>+11.4f}" if a and b else f"{'n/a':>11}"
        print(f"{length:>6}  {cells[0]}  {cells[1]}  {diff}")


def write_csv(runs: list[Run], best: dict[tuple[str, int], Run], path: Path, args: argparse.Namespace) -> None:
    chosen = {id(r) for r in best.values()}
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "length", "lr", "rounds", "rank", "hidden", "embedding", "params", "vocab", "steps",
                         "batch_size", "train_loss", "valid_ce", "test_ce", "test_accuracy", "chosen", "seconds",
                         "error"])
        for r in runs:
            writer.writerow([r.variant.name, r.length, r.lr, r.variant.rounds, args.rank if r.variant.rounds else 0,
                             r.variant.hidden, args.embedding, r.variant.params, args.vocab, args.steps,
                             args.batch_size, r.train_loss, r.valid, r.test, r.test_accuracy, int(id(r) in chosen),
                             round(r.seconds, 3), r.error])


def plot(best: dict[tuple[str, int], Run], variants: list[Variant], lengths: list[int], vocab: int, path: Path,
         title: str) -> None:
    from pipeline.plots.common import new_figure, save_figure

    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    highest = 0.0
    for i, variant in enumerate(variants):
        points = [(length, best[(variant.name, length)].test) for length in lengths if (variant.name, length) in best]
        highest = max([highest, *(p[1] for p in points)])
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{i}",
                label=f"{variant.name} ({variant.params:,} params)", gid=f"line-{i}")
    chance = math.log(vocab)
    if highest > 0.5 * chance:  # otherwise the chance line would squash the curves against the axis
        ax.axhline(chance, color="0.4", linestyle="--", linewidth=1, label=f"chance ln {vocab}")
    else:
        title += f" (chance: ln {vocab} = {chance:.2f})"
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("cross-entropy (nats per output token)")
    ax.set_title(title)
    ax.set_xticks(lengths)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ main


def _ints(text: str) -> list[int]:
    return sorted({int(v) for v in text.split(",") if v.strip()})


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps, two lengths")
    parser.add_argument("--lengths", default=None, help=f"sequence lengths (default {DEFAULTS['lengths']})")
    parser.add_argument("--vocab", type=int, default=None,
                        help=f"symbols (default {DEFAULTS['vocab']}; the thesis: {THESIS_VOCAB})")
    parser.add_argument("--hidden", type=int, default=None,
                        help=f"the LSTM's hidden size (default {DEFAULTS['hidden']}); the Mogrifier's meets its budget")
    parser.add_argument("--embedding", type=int, default=None, help=f"embedding size (default {DEFAULTS['embedding']})")
    parser.add_argument("--rounds", type=int, default=5, help="Mogrifier rounds (default 5)")
    parser.add_argument("--rank", type=int, default=16, help="Mogrifier rank, 0 = full (default 16)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {DEFAULTS['steps']})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {DEFAULTS['batch_size']}")
    parser.add_argument("--lrs", default=None, help=f"Adam learning rates, comma-separated (default {DEFAULTS['lrs']})")
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                        help="learning rate: cosine decay to 0 over the run (default) or constant")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (default 1)")
    parser.add_argument("--forget-bias", type=float, default=1.0, help="initial forget-gate bias (default 1)")
    parser.add_argument("--eval-sequences", type=int, default=None,
                        help=f"held-out sequences in each of valid and test (default {DEFAULTS['eval_sequences']})")
    parser.add_argument("--eval-batch", type=int, default=250, help="sequences per evaluation batch")
    parser.add_argument("--near-zero", type=float, default=0.05, help="check (a): nats/token that count as solved")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/reverse_copy"),
                        help="folder for the CSV and plot [default runs/benchmarks/reverse_copy]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.lengths = _ints(args.lengths)
    args.lrs = _floats(args.lrs)
    if not args.lengths or args.lengths[0] < 1 or not args.lrs:
        parser.error("need one or more --lengths >= 1 and one or more --lrs")
    if args.steps < 1 or args.batch_size < 1 or args.vocab < 2 or args.rounds < 1:
        parser.error("need --steps >= 1, --batch-size >= 1, --vocab >= 2 and --rounds >= 1")
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
    wall = time.perf_counter()
    lstm_params = count_parameters(args.vocab, args.embedding, args.hidden, 0, 0)
    mog_hidden = hidden_for_budget(lstm_params, args.vocab, args.embedding, args.rounds, args.rank, args.hidden)
    variants = [Variant("LSTM", 0, args.hidden, lstm_params),
                Variant("Mogrifier LSTM", args.rounds, mog_hidden,
                        count_parameters(args.vocab, args.embedding, mog_hidden, args.rounds, args.rank))]
    print(f"reverse copy: {args.vocab} uniform symbols (chance ln {args.vocab} = {math.log(args.vocab):.3f} "
          f"nats/token), lengths {','.join(map(str, args.lengths))}; embedding {args.embedding}; "
          + "; ".join(f"{v.name}: hidden {v.hidden}, {v.params:,} params" for v in variants)
          + f" (Mogrifier {args.rounds} rounds, rank {args.rank})")
    runs = [Run(v, length, lr) for length in args.lengths for v in variants for lr in args.lrs]
    print(f"budget: {len(runs)} runs x {args.steps} steps x batch {args.batch_size}, Adam lr "
          f"{','.join(f'{lr:g}' for lr in args.lrs)} ({args.schedule}), clip {args.clip:g}, "
          f"forget bias {args.forget_bias:g}; "
          f"{args.eval_sequences} validation + {args.eval_sequences} test sequences; "
          f"{torch.get_num_threads()} torch thread(s); seed {args.seed}", flush=True)
    held_out: dict[int, dict[str, Tensor]] = {
        length: {split: sequences(args.eval_sequences, length, args.vocab, args.seed * 1000 + length + offset)
                 for split, offset in (("valid", 1_000_003), ("test", 2_000_003))}
        for length in args.lengths}
    for index, run in enumerate(runs):
        train_and_evaluate(run, args, held_out[run.length])
        status = run.error or (f"train {run.train_loss:.4f}  valid {run.valid:.4f}  test {run.test:.4f}  "
                               f"acc {run.test_accuracy:.3f}")
        print(f"[{index + 1}/{len(runs)}] {run.variant.name:<15} L={run.length:<4} lr {run.lr:<7g} "
              f"{run.seconds:6.1f} s  {status}", flush=True)
    best = best_runs(runs)
    print_table(best, variants, args.lengths)
    print("\nthesis checks (§2.3.3, Fig 2.4)")
    for name, ok, text in checks(best, variants, args.lengths, args.near_zero):
        verdict = "n/a" if ok is None else ("agree" if ok else "disagree")
        print(f"  {verdict:<9} {name}: {text}")
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out / "reverse_copy.csv", args.out / "reverse_copy.png"
    write_csv(runs, best, csv_path, args)
    plot(best, variants, args.lengths, args.vocab, png_path,
         f"reverse copy, V = {args.vocab}: {args.steps} steps x batch {args.batch_size}")
    print(f"\nwrote {csv_path} and {png_path}")
    print(f"wall time {time.perf_counter() - wall:.1f} s (training {sum(r.seconds for r in runs):.1f} s); "
          f"{len(runs)} runs; failed runs: {sum(not r.ok for r in runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
