"""PTB character-level quality at equal small budgets: LSTM vs Mogrifier LSTM vs Mogrifier RLSTM.

Each model gets the same number of optimizer steps, batch, BPTT window and roughly the same number
of parameters (hidden sizes are solved for a common budget). Reports the validation bpc of each
with its reported (2TA) weights, and raw vs 2TA-long-average validation bpc at every evaluation.
Expected from the thesis (ch. 4, table 4.2): Mogrifier RLSTM < Mogrifier LSTM < LSTM, and 2TA better
than the raw weights early in training.

    python benchmarks/ptb_char_quality.py --steps 600 --params 1.0e6
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from models import ModelConfig, count_parameters
from pipeline.config import validate_config
from pipeline.data import prepare_dataset
from pipeline.evaluate import bits_per_token, evaluate_nll
from pipeline.train import Trainer

VARIANTS = {
    "LSTM": dict(cell="lstm", mogrifier_rounds=0),
    "Mogrifier LSTM": dict(cell="lstm", mogrifier_rounds=5),
    "Mogrifier RLSTM": dict(cell="rlstm", mogrifier_rounds=5),
}


def hidden_for_budget(base: dict, vocab: int, budget: float, rank: int, layers: int) -> int:
    def count(h: int) -> int:
        return count_parameters(ModelConfig(vocab_size=vocab, hidden_size=h, num_layers=layers, mogrifier_rank=rank, **base))

    return min(range(32, 2048, 8), key=lambda h: abs(count(h) - budget))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--params", type=float, default=1.0e6, help="parameter budget per model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bptt", type=int, default=100)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--valid-tokens", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="work folder (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="ptb_char_quality-"))
    data_dir = work / "data"
    manifest = prepare_dataset("ptb_char", args.source, data_dir, progress=False)

    rows = []
    for name, variant in VARIANTS.items():
        hidden = hidden_for_budget(variant, manifest.vocab_size, args.params, args.rank, args.layers)
        slug = name.lower().replace(" ", "_")
        config = validate_config({
            "name": slug, "work_dir": str(work / slug),
            "data": {"dataset": "ptb_char", "source": args.source, "dir": str(data_dir)},
            "model": {**variant, "hidden_size": hidden, "num_layers": args.layers, "mogrifier_rank": args.rank,
                      "input_dropout": 0.1, "state_dropout": 0.1, "cell_output_dropout": 0.1, "output_dropout": 0.1,
                      "chrono_t_max": 20.0},
            "train": {"batch_size": args.batch, "bptt": args.bptt, "max_steps": args.steps, "eval_every": args.eval_every,
                      "eval_tokens": args.valid_tokens, "eval_batch_size": 64, "log_every": 10**9, "seed": args.seed,
                      "optimizer": {"name": "radam", "lr": 3e-3}},
            "evaluate": {"batch_size": 64, "bptt": args.bptt, "max_tokens": args.valid_tokens},
            "tracking": {"enabled": False},
        })
        torch.manual_seed(args.seed)
        trainer = Trainer(config)
        params = sum(p.numel() for p in trainer.model.parameters())
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        evals = [json.loads(l)["eval"] for l in (config.run_dir / "train_log.jsonl").read_text().splitlines() if '"eval"' in l]
        with trainer.averager.reported_weights():
            (nll,), _ = evaluate_nll(trainer.model, trainer.valid_tokens, batch_size=64, bptt=args.bptt, max_tokens=args.valid_tokens)
        (raw_nll,), _ = evaluate_nll(trainer.model, trainer.valid_tokens, batch_size=64, bptt=args.bptt, max_tokens=args.valid_tokens)
        rows.append((name, hidden, params, seconds, bits_per_token(nll), bits_per_token(raw_nll), evals))

    print(f"\nPTB char, {args.steps} steps x batch {args.batch} x bptt {args.bptt}, ~{args.params:,.0f} params, "
          f"validation on the first {args.valid_tokens:,} tokens")
    print(f"{'model':<17}{'hidden':>7}{'params':>11}{'train s':>9}{'2TA bpc':>9}{'raw bpc':>9}")
    for name, hidden, params, seconds, bpc, raw_bpc, _ in rows:
        print(f"{name:<17}{hidden:>7}{params:>11,}{seconds:>9.0f}{bpc:>9.4f}{raw_bpc:>9.4f}")
    base = rows[0][4]
    print("ratios of bpc to LSTM: " + ", ".join(f"{r[0]} {r[4] / base:.4f}" for r in rows))
    order = [r[0] for r in sorted(rows, key=lambda r: r[4])]
    print("ordering (best first): " + " < ".join(order),
          "(thesis: Mogrifier RLSTM < Mogrifier LSTM < LSTM)", "MATCHES" if order == list(reversed(VARIANTS)) else "DIFFERS")

    print("\nraw vs 2TA validation bpc per evaluation (source = weights 2TA reports, L = long average length)")
    for name, *_, evals in rows:
        print(f"  {name}")
        for e, step in zip(evals, range(args.eval_every, args.steps + 1, args.eval_every)):
            raw = bits_per_token(e["raw_loss"]) if e["raw_loss"] is not None else math.nan
            long = bits_per_token(e["long_loss"]) if e["long_loss"] is not None and math.isfinite(e["long_loss"]) else math.nan
            print(f"    step {step:>6}  raw {raw:.4f}  long {long:.4f}  reported {bits_per_token(e['loss']):.4f} "
                  f"({e['source']}, L={e['long_length']})")


if __name__ == "__main__":
    main()
