"""Forward+backward throughput of our recurrent layers against torch.nn.LSTM.

Run as ``python benchmarks/cell_throughput.py [--hidden 512 --batch 64 --seq-len 100
--repeats 5 --device cpu --threads N]``. Measures one layer (input size = hidden
size) over a whole sequence: forward, sum of outputs, backward. Reports
tokens/s (batch * seq_len / median seconds) and checks two targets:

* Mogrifier LSTM (r=5, rank 64) >= 0.5x torch.nn.LSTM tokens/s
* RLSTM time <= 1.3x our LSTM time

This is a report: the exit code is 0 whether or not the targets are met.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.mogrifier import RecurrentLayer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd_seconds(run, params, device: torch.device) -> float:
    """Seconds of one forward + backward pass."""
    for p in params:
        p.grad = None
    _sync(device)
    start = time.perf_counter()
    out = run()
    out.sum().backward()
    _sync(device)
    return time.perf_counter() - start


def _benchmark(cases: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per case. Repeats are interleaved round-robin over the cases so
    that load fluctuations on a shared machine hit every case alike."""
    for run, params in cases.values():
        for _ in range(warmup):
            _fwd_bwd_seconds(run, params, device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (run, params) in cases.items():
            times[name].append(_fwd_bwd_seconds(run, params, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--mogrifier-rounds", type=int, default=5)
    parser.add_argument("--mogrifier-rank", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    n, b, t = args.hidden, args.batch, args.seq_len
    tokens = b * t

    x = torch.randn(t, b, n, device=device, requires_grad=True)
    h0 = torch.zeros(b, n, device=device)
    c0 = torch.zeros(b, n, device=device)

    baseline_name = "cuDNN nn.LSTM" if device.type == "cuda" else "torch.nn.LSTM"
    ref = nn.LSTM(n, n).to(device)

    def run_ref():
        return ref(x, (h0.unsqueeze(0), c0.unsqueeze(0)))[0]

    ours = {
        "LSTM": RecurrentLayer("lstm", n, n),
        f"Mogrifier LSTM (r={args.mogrifier_rounds}, k={args.mogrifier_rank})": RecurrentLayer(
            "lstm", n, n, args.mogrifier_rounds, args.mogrifier_rank
        ),
        "RLSTM": RecurrentLayer("rlstm", n, n),
        f"Mogrifier RLSTM (r={args.mogrifier_rounds}, k={args.mogrifier_rank})": RecurrentLayer(
            "rlstm", n, n, args.mogrifier_rounds, args.mogrifier_rank
        ),
    }

    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"hidden={n} input={n} batch={b} seq_len={t} warmup={args.warmup} repeats={args.repeats} "
        "(median, round-robin)"
    )
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        # CPU timings on a shared machine are only comparable within one run.
        print(f"load average before run: {os.getloadavg()[0]:.2f} (cpu count {os.cpu_count()})")
    cases = {baseline_name: (run_ref, [x, *ref.parameters()])}
    for name, layer in ours.items():
        layer.to(device)

        def run(layer=layer):
            return layer(x, (h0, c0))[0]

        cases[name] = (run, [x, *layer.parameters()])
    results = _benchmark(cases, device, args.warmup, args.repeats)

    base = results[baseline_name]
    width = max(len(k) for k in results) + 2
    print(f"\n{'model':<{width}}{'ms/iter':>10}{'tokens/s':>12}{'vs ' + baseline_name:>24}")
    for name, sec in results.items():
        print(f"{name:<{width}}{sec * 1e3:>10.1f}{tokens / sec:>12.0f}{base / sec:>23.2f}x")

    names = list(ours)
    mog_ratio = base / results[names[1]]  # tokens/s ratio
    rlstm_ratio = results[names[2]] / results[names[0]]  # time ratio
    print("\nTargets:")
    print(
        f"  Mogrifier LSTM tokens/s >= 0.5x {baseline_name}: {mog_ratio:.2f}x  "
        f"{'PASS' if mog_ratio >= 0.5 else 'FAIL'}"
    )
    print(
        f"  RLSTM time <= 1.3x our LSTM time:           {rlstm_ratio:.2f}x  "
        f"{'PASS' if rlstm_ratio <= 1.3 else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
