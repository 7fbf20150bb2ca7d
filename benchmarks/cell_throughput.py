"""Forward+backward throughput and peak memory of our recurrent layers against torch.nn.LSTM.

Run as ``python benchmarks/cell_throughput.py [--hidden 512 --batch 64 --seq-len 100 --repeats 5
--device cpu|cuda --threads N --clock wall|process --impl sequence,autograd]``.

One layer (input size = hidden size) over a whole sequence: forward, a weighted sum of the outputs,
backward. Cases, run round-robin (load fluctuations on a shared machine hit every case alike; the
median of ``--repeats`` is reported):

* the baseline ``torch.nn.LSTM``: on CPU oneDNN's fused LSTM (``aten::mkldnn_rnn_layer``), on CUDA cuDNN;
* our LSTM, Mogrifier LSTM (r=5, k=64), RLSTM and Mogrifier RLSTM, each in the implementations named by
  ``--impl``: ``sequence`` (the hand-derived backward through time of :mod:`models.bptt`, the default in
  training) and ``autograd`` (the per-step reference).

Printed per case: ms per iteration, tokens/s (batch x seq_len / seconds), the ratio to the baseline's
tokens/s, and the peak memory the forward+backward allocates per token (bytes; CPU: from the
profiler's allocation events, CUDA: ``torch.cuda.max_memory_allocated``), measured in one extra pass.
Then the targets of issue 14, measured side by side in this run:

* Mogrifier LSTM (sequence) tokens/s >= 0.75x the baseline;
* LSTM (sequence) tokens/s >= 0.95x the baseline;
* RLSTM (sequence) time <= 1.15x our LSTM (sequence) time.

``--clock process`` times with the process's CPU time instead of wall time: on a machine whose cores
other jobs share it counts only this process's work (with ``--threads 1`` it is the work itself).
``--device cuda`` is the GPU run (cuDNN baseline; ``--compile-steps`` also times the sequence path
with its per-step pointwise work compiled by ``torch.compile``). ``--check`` first verifies, on the chosen
device in float64, that the sequence implementation (and, with ``--compile-steps``, its compiled steps)
gives the autograd reference's outputs and gradients for every layer kind, with a state mask and carried
states; the prepared GPU run is

    python benchmarks/cell_throughput.py --device cuda --compile-steps --check --repeats 20 --warmup 3

This is a report: the exit code is 0 whether or not the speed targets are met (1 if ``--check`` finds a
mismatch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.mogrifier import RecurrentLayer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Case:
    """One timed configuration: ``run()`` returns the outputs [T, B, n] whose weighted sum is backpropagated."""

    def __init__(self, run: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> None:
        self.run = run
        self.params = params

    def step(self, weights: torch.Tensor) -> None:
        for p in self.params:
            p.grad = None
        (self.run() * weights).sum().backward()


def _seconds(case: _Case, weights: torch.Tensor, device: torch.device, clock: Callable[[], float]) -> float:
    _sync(device)
    start = clock()
    case.step(weights)
    _sync(device)
    return clock() - start


def _benchmark(cases: dict[str, _Case], weights, device, warmup: int, repeats: int, clock) -> dict[str, float]:
    """Median seconds per case, repeats interleaved round-robin over the cases."""
    for case in cases.values():
        for _ in range(warmup):
            _seconds(case, weights, device, clock)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            times[name].append(_seconds(case, weights, device, clock))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _peak_bytes(case: _Case, weights: torch.Tensor, device: torch.device) -> int:
    """Peak memory allocated during one forward+backward, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        case.step(weights)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # CPU: the profiler records every allocation with the running total allocated since it started.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case.step(weights)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def check_against_reference(device: torch.device, compiled_steps: bool) -> float:
    """Largest difference (outputs, final state, every gradient) between the sequence implementation and the
    per-step autograd reference over LSTM / RLSTM x Mogrifier (none, low rank, full rank), float64."""
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    m, n, t, b = 5, 6, 9, 4
    for cell in ("lstm", "rlstm"):
        for rounds, rank in ((0, 0), (3, 2), (4, 0)):
            ref = RecurrentLayer(cell, m, n, rounds, rank, implementation="autograd").double().to(device)
            with torch.no_grad():
                for p in ref.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(device))
            variants = [False, True] if compiled_steps else [False]
            x = torch.randn(t, b, m, generator=gen, dtype=torch.float64).to(device).requires_grad_()
            h0 = torch.randn(b, n, generator=gen, dtype=torch.float64).to(device).requires_grad_()
            c0 = torch.randn(b, n, generator=gen, dtype=torch.float64).to(device).requires_grad_()
            mask = ((torch.rand(b, n, generator=gen) > 0.3).double() / 0.7).to(device)

            def run(layer):
                out, (h_last, c_last) = layer(x, (h0, c0), mask)
                loss = (out * out).sum() + h_last.sum() + (c_last * c_last).sum()
                return [out, h_last, c_last, *torch.autograd.grad(loss, [x, h0, c0, *layer.parameters()])]

            expected = run(ref)
            for compiled in variants:
                seq = RecurrentLayer(cell, m, n, rounds, rank, compile_steps=compiled).double().to(device)
                seq.load_state_dict(ref.state_dict())
                got = run(seq)
                diff = max((a - e).abs().max().item() for a, e in zip(got, expected))
                print(f"  check {cell} rounds={rounds} rank={rank} compiled_steps={compiled}: max |diff| {diff:.2e}")
                worst = max(worst, diff)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="wall time, or this process's CPU time (a shared machine: see the docstring)")
    parser.add_argument("--impl", default="sequence,autograd",
                        help="comma-separated implementations of our layers to time: sequence, autograd")
    parser.add_argument("--compile-steps", action="store_true",
                        help="also time the sequence path with torch.compile'd per-step pointwise work")
    parser.add_argument("--mogrifier-rounds", type=int, default=5)
    parser.add_argument("--mogrifier-rank", type=int, default=64)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--check", action="store_true",
                        help="first check the sequence implementation against the autograd reference (float64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    implementations = [s.strip() for s in args.impl.split(",") if s.strip()]
    for impl in implementations:
        if impl not in ("sequence", "autograd"):
            parser.error(f"--impl: unknown implementation {impl!r}; expected sequence and/or autograd")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    device = torch.device(args.device)
    if args.check:
        print(f"Checking the sequence implementation against the autograd reference on {device} (float64):")
        worst = check_against_reference(device, args.compile_steps)
        if worst > 1e-9:
            print(f"CHECK FAILED: max |diff| {worst:.2e} > 1e-9")
            return 1
        print(f"check passed (max |diff| {worst:.2e})\n")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.manual_seed(args.seed)
    n, b, t = args.hidden, args.batch, args.seq_len
    tokens = b * t

    x = torch.randn(t, b, n, device=device, requires_grad=True)
    h0 = torch.zeros(b, n, device=device)
    c0 = torch.zeros(b, n, device=device)
    weights = torch.randn(t, b, n, device=device)  # d loss / d outputs: not all ones

    baseline_name = "cuDNN nn.LSTM" if device.type == "cuda" else "torch.nn.LSTM"
    ref = nn.LSTM(n, n).to(device)
    cases: dict[str, _Case] = {
        baseline_name: _Case(lambda: ref(x, (h0.unsqueeze(0), c0.unsqueeze(0)))[0], [x, *ref.parameters()])
    }
    r, k = args.mogrifier_rounds, args.mogrifier_rank
    layers = {
        "LSTM": ("lstm", 0),
        f"Mogrifier LSTM (r={r}, k={k})": ("lstm", r),
        "RLSTM": ("rlstm", 0),
        f"Mogrifier RLSTM (r={r}, k={k})": ("rlstm", r),
    }
    variants = [(impl, False) for impl in implementations]
    if args.compile_steps:
        variants.append(("sequence", True))
    for label, (cell, rounds) in layers.items():
        for impl, compiled in variants:
            layer = RecurrentLayer(cell, n, n, rounds, k, implementation=impl).to(device)
            if compiled:
                layer.compile_steps = True
            name = f"{label} [{impl}{', compiled steps' if compiled else ''}]"
            cases[name] = _Case(lambda layer=layer: layer(x, (h0, c0))[0], [x, *layer.parameters()])

    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} clock={args.clock} "
        f"hidden={n} input={n} batch={b} seq_len={t} warmup={args.warmup} repeats={args.repeats} "
        "(median, round-robin)"
    )
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        # CPU timings on a shared machine are only comparable within one run.
        print(f"load average before run: {os.getloadavg()[0]:.2f} (cpu count {os.cpu_count()})")
    results = _benchmark(cases, weights, device, args.warmup, args.repeats, clock)
    peaks = {} if args.no_memory else {name: _peak_bytes(case, weights, device) for name, case in cases.items()}

    base = results[baseline_name]
    width = max(len(name) for name in results) + 2
    print(f"\n{'model':<{width}}{'ms/iter':>10}{'tokens/s':>11}{'vs ' + baseline_name:>20}{'peak B/token':>14}")
    for name, sec in results.items():
        peak = f"{peaks[name] / tokens:>14.0f}" if name in peaks else f"{'-':>14}"
        print(f"{name:<{width}}{sec * 1e3:>10.1f}{tokens / sec:>11.0f}{base / sec:>19.2f}x{peak}")

    if "sequence" not in implementations:
        return 0
    names = list(layers)
    seq = {label: results[f"{label} [sequence]"] for label in names}
    lstm_ratio = base / seq[names[0]]
    mog_ratio = base / seq[names[1]]
    rlstm_ratio = seq[names[2]] / seq[names[0]]
    print("\nTargets (sequence implementation):")
    print(f"  LSTM tokens/s >= 0.95x {baseline_name}:           {lstm_ratio:.2f}x  {'PASS' if lstm_ratio >= 0.95 else 'FAIL'}")
    print(f"  Mogrifier LSTM tokens/s >= 0.75x {baseline_name}: {mog_ratio:.2f}x  {'PASS' if mog_ratio >= 0.75 else 'FAIL'}")
    print(f"  RLSTM time <= 1.15x our LSTM time:                {rlstm_ratio:.2f}x  {'PASS' if rlstm_ratio <= 1.15 else 'FAIL'}")
    if "autograd" in implementations:
        print("\nSequence vs autograd reference (time ratio, lower is faster):")
        for label in names:
            print(f"  {label:<{width}}{results[f'{label} [sequence]'] / results[f'{label} [autograd]']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
