"""Data-parallel scaling of the training stage: tokens/s of 1 vs 2 processes (Mogrifier RLSTM).

Run as ``python benchmarks/ddp_scaling.py [--steps 60 --hidden 256 --layers 2 --batch 32 --bptt 64
--warmup-steps 10 --repeats 1 --reductions auto]``. Every configuration is a real training run of the pipeline,
``python -m torch.distributed.run --standalone --nproc-per-node=N -m pipeline train --config <yaml>``
(gloo on CPU), on the WikiText-2 excerpt shipped with the package, with the same *global* batch
(each of N ranks trains batch/N stripes), tracking disabled, checkpoints to a local temp folder and
no evaluation during the measured steps. CPU configurations:

* 1 process x 1 thread   (reference)
* 1 process x 2 threads  (intra-op parallelism: what one process gets from 2 cores)
* 2 processes x 1 thread (gloo; one configuration per ``--reductions`` entry, ``train.gradient_reduction``:
  ``flat`` = one all-reduce per step of one gradient buffer + the step's figures, ``ddp`` = torch DDP's
  bucketed all-reduces during backward + a second collective for the figures, ``auto`` = the default, flat)
* 2 independent x 1 thread (bound; ``--no-bound`` leaves it out): two single-process runs of batch/2 at the
  same time, without any communication. That is the most data parallelism can give on these two cores
  with this model: each rank's compute at half the batch, with both cores busy (shared caches, memory
  bandwidth). "2 processes / bound" is the cost of the all-reduce and of waiting for the slower rank.

Every process is pinned to its thread count (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``; torch reads them
for its intra-op pool and the pipeline sets no other count), so no configuration uses more threads than
the cores it is meant to have; gloo's own threads only wait on sockets. Tokens/s are the pipeline's own
``tok/s`` log lines (summed over ranks, and over the two runs of the bound; evaluation and checkpoint
time excluded) over the steps after ``--warmup-steps``: total tokens / total time of those log windows.
Every configuration trains the same global batch for the same steps, so the same tokens. With
``--repeats R`` the configurations run round-robin R times (load fluctuations on a shared machine hit all
of them alike) and the median is reported. The CPU time other processes used during each run is
measured (``/proc/stat`` minus this benchmark's children); a run is flagged as disturbed, and left out of
the median, when other processes used more than ``--max-other-load`` cores beyond those the run left idle
(a 1-thread run leaves one of two cores to others: work there does not take its core away). The ratio
2-proc/1-proc compares "2 processes x 1 thread" with "1 process x 2 threads" (the same two cores),
measured in this run.

The pipeline's tok/s lines are DEBUG log lines: the runs get ``--log-level DEBUG`` (without it the
quiet default console prints none, and the benchmark found no window).

``--device cuda`` instead runs a few hundred steps on the GPU(s) with NCCL (``--gpus N``, default 1:
one process per GPU) and reports tokens/s. Note: with one GPU torchrun starts a world of one, which
the pipeline runs without a process group (no DDP wrapper, no NCCL collectives; see
``pipeline.distributed.init_distributed``), so ``--gpus 1`` measures the single-GPU training loop as
a torchrun job; ``--gpus 2+`` exercises DDP over NCCL.

This is a report: the exit code is 0 unless a training run fails.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# "step 40  loss 3.1234  lr 0.003  12345 tok/s" (pipeline.train.Trainer.train)
_LOG_LINE = re.compile(r"step (\d+)\s+loss \S+\s+lr \S+\s+(\d+(?:\.\d+)?) tok/s")


def prepare_data(root: Path) -> Path:
    from pipeline.data import SAMPLE_TEXT_PATH, prepare_dataset

    out = root / "data"
    prepare_dataset("text", str(SAMPLE_TEXT_PATH), out, progress=False)
    return out


def write_config(root: Path, name: str, data_dir: Path, args: argparse.Namespace, device: str, *,
                 batch: int | None = None, reduction: str | None = None) -> Path:
    work = root / name
    config = {
        "name": f"ddp_scaling_{name}",
        "work_dir": str(work),
        "data": {"dataset": "text", "source": "sample", "dir": str(data_dir)},
        "model": {
            "cell": "rlstm", "hidden_size": args.hidden, "num_layers": args.layers,
            "mogrifier_rounds": args.mogrifier_rounds, "mogrifier_rank": args.mogrifier_rank,
            "input_dropout": 0.1, "state_dropout": 0.1, "cell_output_dropout": 0.1, "output_dropout": 0.1,
            "chrono_t_max": 20.0,
        },
        "train": {
            "batch_size": batch or args.batch, "bptt": args.bptt, "max_steps": args.steps, "dropout_samples": 1,
            "eval_every": 10**9,  # no evaluation during the measured steps
            "log_every": args.log_every, "device": device, "precision": args.precision,
            "optimizer": {"name": "radam", "lr": 0.003},
        },
        # Saved at step 0 and at the end only (excluded from tok/s by the trainer anyway).
        "checkpoint": {"url": str(work / "checkpoints"), "every": 10**9, "keep_last": 1, "keep_best": False},
        "tracking": {"enabled": False},
    }
    if reduction is not None:
        config["train"]["gradient_reduction"] = reduction
    if args.cell_implementation is not None:
        config["model"]["cell_implementation"] = args.cell_implementation
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), else None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_training(configs: list[Path], nproc: int, threads: int, cwd: Path) -> list[list[tuple[int, float]]]:
    """Run one training job per config, all at the same time (each a torchrun job of ``nproc`` processes);
    returns each job's (step, tok/s) log windows."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    cmds = [[
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "pipeline", "train", "--config", str(config), "--log-level", "DEBUG",
    ] for config in configs]
    with tempfile.TemporaryFile("w+") as err0, tempfile.TemporaryFile("w+") as err1:
        logs = [err0, err1] if len(cmds) == 2 else [err0]
        if len(cmds) > 2:
            raise ValueError("at most two jobs at once")
        procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
                 for cmd, log in zip(cmds, logs)]
        codes = [p.wait() for p in procs]
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
    for cmd, code, text in zip(cmds, codes, texts):
        if code != 0:
            sys.stderr.write(text[-4000:])
            raise SystemExit(f"training failed ({' '.join(cmd)}): exit code {code}")
    return [[(int(m.group(1)), float(m.group(2))) for m in _LOG_LINE.finditer(text)] for text in texts]


def throughput(windows: list[tuple[int, float]], warmup_steps: int, log_every: int) -> float:
    """Tokens/s over the log windows that start after ``warmup_steps``: total tokens / total time.

    Every full window holds ``log_every`` steps of the same global batch, so this is the harmonic
    mean of the windows' rates (the last window may be shorter: weighted by its step count).
    """
    steady, previous = [], 0
    for step, rate in windows:
        if previous >= warmup_steps:
            steady.append((step - previous, rate))
        previous = step
    if not steady:
        raise SystemExit(f"no log window after the {warmup_steps} warm-up steps; raise --steps")
    steps = sum(n for n, _ in steady)
    return steps / sum(n / rate for n, rate in steady)


@dataclass(frozen=True)
class Case:
    name: str
    nproc: int  # processes per job (torchrun --nproc-per-node)
    threads: int  # torch intra-op threads per process
    jobs: int = 1  # jobs run at the same time (the bound: 2 independent single-process runs)
    batch_divisor: int = 1  # each job trains batch / batch_divisor stripes
    reduction: str | None = None  # train.gradient_reduction (None: the config's default)

    @property
    def cores_used(self) -> int:
        return self.jobs * self.nproc * self.threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60 CPU, 300 CUDA)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--mogrifier-rounds", type=int, default=5)
    parser.add_argument("--mogrifier-rank", type=int, default=16)
    parser.add_argument("--cell-implementation", choices=["sequence", "autograd"], default=None,
                        help="model.cell_implementation (default: the model's default)")
    parser.add_argument("--batch", type=int, default=32, help="global batch (stripes), split over the processes")
    parser.add_argument("--bptt", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=10, help="steps per tok/s log window")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps not measured (default: one log window)")
    parser.add_argument("--repeats", type=int, default=1, help="round-robin repeats; the median is reported")
    parser.add_argument("--reductions", default="auto",
                        help="comma-separated train.gradient_reduction values (auto, flat, ddp): one 2-process "
                        "configuration each (default auto)")
    parser.add_argument("--no-bound", action="store_true",
                        help="leave out the bound (2 independent single-process runs of batch/2, no communication)")
    parser.add_argument("--max-other-load", type=float, default=0.25,
                        help="a run during which other processes kept more cores busy than this, beyond the cores "
                        "the run left idle, is flagged as disturbed and left out of the median (unless all runs of "
                        "a configuration are)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--gpus", type=int, default=1, help="cuda: processes (one per GPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: CUDA only")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (configs, logs, checkpoints)")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 300 if args.device == "cuda" else 60
    if args.warmup_steps is None:
        args.warmup_steps = args.log_every
    if args.precision == "bf16" and args.device != "cuda":
        parser.error("--precision bf16 needs --device cuda")
    if args.steps <= args.warmup_steps:
        parser.error("--steps must exceed --warmup-steps")
    reductions = list(dict.fromkeys(r.strip() for r in args.reductions.split(",") if r.strip()))
    if not reductions or any(r not in ("auto", "flat", "ddp") for r in reductions):
        parser.error(f"--reductions: comma-separated auto, flat, ddp; got {args.reductions!r}")

    def label(reduction: str) -> str:
        return {"auto": "", "flat": " (flat)", "ddp": " (DDP)"}[reduction]

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
        if torch.cuda.device_count() < args.gpus:
            parser.error(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPU(s) visible")
        if args.batch % args.gpus:
            parser.error(f"--batch {args.batch} must be divisible by --gpus {args.gpus}")
        print(f"GPU: {torch.cuda.get_device_name(0)} x {args.gpus}, torch {torch.__version__}")
        if args.gpus > 1:
            cases = [Case(f"{args.gpus} GPU processes (NCCL){label(r)}", args.gpus, 1, reduction=r) for r in reductions]
        else:
            cases = [Case("1 GPU process (world of one)", 1, 1)]
    else:
        if args.batch % 2:
            parser.error("--batch must be even (split over 2 processes)")
        cases = [Case("1 process x 1 thread", 1, 1), Case("1 process x 2 threads", 1, 2)]
        cases += [Case(f"2 processes x 1 thread{label(r)}", 2, 1, reduction=r) for r in reductions]
        if not args.no_bound:
            cases.append(Case("2 independent x 1 thread (bound)", 1, 1, jobs=2, batch_divisor=2))

    tmp = Path(tempfile.mkdtemp(prefix="ddp_scaling_"))
    cpus = os.cpu_count() or 1
    print(f"ddp_scaling: Mogrifier RLSTM hidden {args.hidden} x {args.layers} layers (r={args.mogrifier_rounds}, "
          f"rank {args.mogrifier_rank}), global batch {args.batch} x bptt {args.bptt}, {args.steps} steps "
          f"(first {args.warmup_steps} not measured), device {args.device}, repeats {args.repeats}")
    print(f"cpu count {cpus}, load average before run {os.getloadavg()[0]:.2f}")
    data_dir = prepare_data(tmp)
    rates: dict[str, list[float]] = {case.name: [] for case in cases}
    foreign: dict[str, list[float]] = {case.name: [] for case in cases}
    disturbed: dict[str, list[bool]] = {case.name: [] for case in cases}
    for repeat in range(args.repeats):
        for i, case in enumerate(cases):
            configs = [
                write_config(tmp, f"r{repeat}_c{i}_j{j}", data_dir, args, args.device,
                             batch=args.batch // case.batch_divisor, reduction=case.reduction)
                for j in range(case.jobs)
            ]
            busy0, mine0, started = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
            jobs = run_training(configs, case.nproc, case.threads, tmp)
            wall = time.perf_counter() - started
            busy1, mine1 = _busy_cpu_seconds(), _children_cpu_seconds()
            # Cores kept busy by *other* processes during this run (0 on a quiet machine).
            other = None if busy0 is None else max(0.0, (busy1 - busy0) - (mine1 - mine0)) / wall
            rates[case.name].append(sum(throughput(windows, args.warmup_steps, args.log_every) for windows in jobs))
            foreign[case.name].append(0.0 if other is None else other)  # unknown (no /proc/stat): counted as calm
            # Only what exceeds the cores this run left idle can have taken CPU from it.
            idle = max(0, cpus - case.cores_used) if args.device == "cpu" else 0
            disturbed[case.name].append(foreign[case.name][-1] - idle >= args.max_other_load)
            flag = "  * disturbed" if disturbed[case.name][-1] else ""
            other_text = "n/a" if other is None else f"{other:.2f}"
            print(f"  run {repeat + 1}/{args.repeats} {case.name:<34} {rates[case.name][-1]:>10.0f} tok/s "
                  f"({wall:.1f} s wall incl. start-up; other processes {other_text} cores, {idle} left idle)"
                  f"{flag}", flush=True)

    # Median over the runs not disturbed by other processes (all runs if every one was).
    median = {}
    for name, r in rates.items():
        calm = [rate for rate, bad in zip(r, disturbed[name]) if not bad]
        median[name] = statistics.median(calm or r)
        if not calm:
            print(f"  note: every run of '{name}' shared the machine with other processes; its figure is unreliable")
    width = max(len(n) for n in median) + 2
    print(f"\n{'configuration':<{width}}{'procs':>6}{'threads':>9}{'tokens/s':>12}{'vs 1x1':>9}{'calm runs':>11}")
    base = median[cases[0].name]
    for case in cases:
        calm = sum(not bad for bad in disturbed[case.name])
        print(f"{case.name:<{width}}{case.jobs * case.nproc:>6}{case.threads:>9}{median[case.name]:>12.0f}"
              f"{median[case.name] / base:>8.2f}x{calm:>7}/{len(disturbed[case.name])}")
    if args.device == "cpu":
        two = [case.name for case in cases if case.nproc == 2]
        print()
        for name in two:
            print(f"ratio 2-proc/1-proc ({name} vs 1 process x 2 threads, same 2 cores): "
                  f"{median[name] / median['1 process x 2 threads']:.2f}")
        print(f"ratio 2-proc/1-proc-1-thread: {median[two[0]] / base:.2f}")
        if not args.no_bound:
            bound = median["2 independent x 1 thread (bound)"]
            print(f"bound (2 independent runs of batch/2, no communication) vs 1 process x 2 threads: "
                  f"{bound / median['1 process x 2 threads']:.2f}")
            for name in two:
                print(f"{name} / bound: {median[name] / bound:.2f} (the rest: all-reduce and waiting for the "
                      "slower rank)")
    print(f"load average after run {os.getloadavg()[0]:.2f}")
    if args.keep:
        print(f"files kept in {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
