"""Checkpoint save / restore time of the 48M-parameter enwik8 model, local disk vs S3 (moto), and the training
stall of asynchronous saves against synchronous ones.

Run as ``python benchmarks/checkpoint_io.py [--repeats 3 --bptt 2 --backends local,s3 --train-during-save 0]``.

The state is exactly what training checkpoints: a real :class:`pipeline.train.Trainer` is built from
the shipped ``enwik8_rlstm`` config (Mogrifier RLSTM, 6 x 1016, vocab 256: the byte-level ``text``
dataset made from the WikiText-2 excerpt shipped with the package stands in for enwik8, which has
the same 256-symbol vocabulary) and trained for two steps of the real global batch (128 stripes; a
short BPTT window, which does not change the state's size), so the RAdam state (``exp_avg``,
``exp_avg_sq``) exists and both Two-Tailed Averaging averages are filled. Then:

* save: ``Trainer.save_checkpoint()``: DCP through fsspec (``DCPCheckpointer``) into a fresh
  ``step-N`` folder plus the per-rank file and the commit record (sha256 of every file, hashed while
  written), then pruning (keep last 2 + best). A synchronous save: training stalls this long per
  checkpoint with ``checkpoint.async_save false``;
* async save: ``Trainer.checkpoint_step()`` with ``checkpoint.async_save`` (the training loop's call):
  the state is copied into CPU memory (buffers kept from the previous save) and the same save + commit +
  pruning runs on a background thread. The *stall* is how long that call blocks the training thread
  (waiting for a save still in flight - none here, saves are far apart in training - plus the copy);
  *commit* is the time from that call until the checkpoint has committed and old ones are pruned
  (``Trainer.wait_for_checkpoint()``). ``--train-during-save N`` runs N real training steps while the
  background save runs (they compete with it for the cores, as in training, and change the live state,
  which the restore check then shows did not leak into the checkpoint). The first async save of the
  process allocates the CPU copy (page faults of fresh memory cost several times the copy), so one
  untimed save to a scratch folder comes first; its stall is printed. The target: the stall is at most
  5% of the synchronous save of the same state, measured in the same run;
* restore: ``Trainer.restore_latest()`` on a second, freshly built Trainer (listing, every file read back
  and checked against its digest, DCP load with
  the safe planner, per-rank state, ``set_state_dict``), checked to give back identical weights,
  optimizer state and averages; timed after the synchronous save, and done (untimed) after the
  asynchronous one too, which must give back the state of the step it was taken at.

Backends: a local temp folder (the page cache absorbs the writes: DCP's fsspec writer does not
fsync, and a restore right after a save reads from memory) and a moto S3 server started in this
process (``ThreadedMotoServer`` on 127.0.0.1, so network cost is loopback + HTTP + moto, no real
WAN; the server's own CPU work, request parsing, checksums and storing the bytes, shares this
machine's cores and, by default, this process's GIL: ``--moto process`` runs the same server in a
child process). moto answers every ranged GET by reading and copying the whole object
(``moto.s3.models.FakeKey.value``) and DCP restores with ranged reads (s3fs read-ahead blocks), so
the S3 restore figure over-states what real S3, which serves ranges natively, would cost. Each backend saves
(synchronously, then asynchronously) and restores ``--repeats`` times; medians are reported.

This is a report: the exit code is 0 unless a save or a restore fails (a missed stall target is printed,
not an error: timings on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import SAMPLE_TEXT_PATH, prepare_dataset  # noqa: E402
from pipeline.train import Trainer  # noqa: E402

MB = 1e6


def _moto_child(conn) -> None:
    """Runs in a child process: a ThreadedMotoServer until the parent closes the pipe."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    conn.send(server.get_host_and_port())
    try:
        conn.recv()  # EOF when the parent is done (or gone)
    except EOFError:
        pass
    server.stop()


class Moto:
    """A moto S3 server on 127.0.0.1:<ephemeral> (in this process, or in a child process so that it
    does not share the client's GIL); the AWS_* environment points at it, bucket ``bench`` exists."""

    def __init__(self, where: str) -> None:
        self.where = where
        if where == "thread":
            from moto.server import ThreadedMotoServer

            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self.server.start()
            host, port = self.server.get_host_and_port()
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            self.conn, child_conn = ctx.Pipe()
            self.proc = ctx.Process(target=_moto_child, args=(child_conn,), daemon=True)
            self.proc.start()
            child_conn.close()
            if not self.conn.poll(60):
                raise SystemExit("the moto server process did not start within 60 s")
            host, port = self.conn.recv()
        os.environ.update({
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        })
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")

    def stop(self) -> None:
        if self.where == "thread":
            self.server.stop()
        else:
            self.conn.close()
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.terminate()


def make_config(tmp: Path, data_dir: Path, url: str, bptt: int):
    return load_config("enwik8_rlstm", {
        "work_dir": str(tmp / f"run-{uuid.uuid4().hex[:6]}"),
        "data.dataset": "text",
        "data.source": "sample",
        "data.dir": str(data_dir),
        "train.bptt": bptt,
        "train.device": "cpu",
        "tracking.enabled": False,
        "checkpoint.url": url,
    })


def state_tensors(trainer: Trainer) -> list[torch.Tensor]:
    """Every tensor of the checkpointed state, in a fixed order (for the equality check)."""
    out = []

    def walk(node):
        if isinstance(node, torch.Tensor):
            out.append(node)
        elif isinstance(node, dict):
            for key in sorted(node, key=str):
                walk(node[key])
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)

    walk(trainer._dcp_state())
    walk(trainer._per_rank_state()["hidden"])
    return out


def folder_bytes(trainer: Trainer) -> int:
    storage = trainer.checkpointer.storage
    latest = storage.latest()
    storage.fs.invalidate_cache()
    return int(storage.fs.du(storage.folder_path(latest.name)))


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), else None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds(moto: Moto | None) -> float:
    """CPU seconds of this process, its finished children and a running moto child process."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    if moto is not None and moto.where == "process" and moto.proc.is_alive():
        try:
            fields = Path(f"/proc/{moto.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return total


class OtherLoad:
    """Cores kept busy by other processes between start() and stop() (None where unknown)."""

    def __init__(self, moto: Moto | None) -> None:
        self.moto = moto

    def start(self) -> None:
        self.busy, self.own, self.t = _busy_cpu_seconds(), _own_cpu_seconds(self.moto), time.perf_counter()

    def stop(self) -> float | None:
        busy, own, wall = _busy_cpu_seconds(), _own_cpu_seconds(self.moto), time.perf_counter() - self.t
        if busy is None or self.busy is None:
            return None
        return max(0.0, (busy - self.busy) - (own - self.own)) / max(wall, 1e-9)


def snapshot(trainer: Trainer) -> list[torch.Tensor]:
    """A copy of every checkpointed tensor of ``trainer`` (what a restore must give back)."""
    return [t.clone() for t in state_tensors(trainer)]


def check_restore(name: str, reader: Trainer, step: int, expected: list[torch.Tensor], what: str) -> None:
    got = state_tensors(reader)
    if reader.step != step:
        raise SystemExit(f"{name}: restored step {reader.step} after the {what} save, expected {step}")
    if len(got) != len(expected) or not all(torch.equal(a, b) for a, b in zip(got, expected)):
        raise SystemExit(f"{name}: the state restored from the {what} save differs from the saved one")


def open_checkpointer(source: Trainer, config) -> None:
    """Point ``source`` at ``config``'s checkpoint location (its trained state stays)."""
    source.wait_for_checkpoint()
    source.config = config
    source.checkpointer = type(source.checkpointer).open(
        config.checkpoint_url, source.ctx, storage_options=config.checkpoint.storage_options,
        retry=source.checkpointer.storage.retry,
    )


def bench_backend(name: str, url: str, source: Trainer, tmp: Path, data_dir: Path, args,
                  moto: Moto | None) -> dict[str, float]:
    config = make_config(tmp, data_dir, url, args.bptt)
    # The trained state, saved through this backend's checkpointer.
    open_checkpointer(source, config)
    reader = Trainer(config)  # a fresh trainer (new random weights) to restore into
    saves, restores, sizes, stalls, commits = [], [], [], [], []
    other = OtherLoad(moto)
    for i in range(args.repeats):
        # Synchronous: training waits for the whole save.
        source.step += 1  # a new step-N folder per save, as in training
        expected = snapshot(source)
        other.start()
        started = time.perf_counter()
        source.save_checkpoint()
        saves.append(time.perf_counter() - started)
        sizes.append(folder_bytes(source))
        started = time.perf_counter()
        reader.restore_latest()
        restores.append(time.perf_counter() - started)
        check_restore(name, reader, source.step, expected, "synchronous")
        # Asynchronous: training waits for the copy only (training.py's loop calls checkpoint_step).
        source.step += 1
        saved_step, expected = source.step, snapshot(source)
        started = time.perf_counter()
        source.checkpoint_step()
        stalls.append(time.perf_counter() - started)
        for _ in range(args.train_during_save):
            source.train_step()
        source.wait_for_checkpoint()
        commits.append(time.perf_counter() - started)
        load = other.stop()
        reader.restore_latest()
        check_restore(name, reader, saved_step, expected, "asynchronous")
        print(f"  {name:<6} repeat {i + 1}/{args.repeats}: {sizes[-1] / MB:8.1f} MB  save {saves[-1]:6.2f} s  "
              f"restore {restores[-1]:6.2f} s  async: stall {stalls[-1]:6.3f} s, committed after {commits[-1]:6.2f} s "
              f"({stalls[-1] / saves[-1]:.1%} of the sync save)  "
              f"(other processes {'n/a' if load is None else f'{load:.2f}'} cores)", flush=True)
    del reader
    return {"mb": statistics.median(sizes) / MB, "save": statistics.median(saves),
            "restore": statistics.median(restores), "stall": statistics.median(stalls),
            "commit": statistics.median(commits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="saves + restores per backend (median reported)")
    parser.add_argument("--bptt", type=int, default=2, help="BPTT of the two training steps (state size unaffected)")
    parser.add_argument("--backends", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--train-during-save", type=int, default=0, metavar="N",
                        help="real training steps run while each asynchronous save is in flight (default 0)")
    parser.add_argument("--moto", choices=["thread", "process"], default="thread",
                        help="run the moto server as a thread of this process (ThreadedMotoServer, default) or in a "
                        "child process (no GIL shared with the checkpointing client)")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not set(backends) <= {"local", "s3"}:
        parser.error("--backends: local and/or s3")
    if args.repeats < 1 or args.train_during_save < 0:
        parser.error("--repeats must be >= 1 and --train-during-save >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # single process: expected

    tmp = Path(tempfile.mkdtemp(prefix="checkpoint_io_"))
    data_dir = tmp / "data"
    prepare_dataset("text", str(SAMPLE_TEXT_PATH), data_dir, progress=False)
    server = Moto(args.moto) if "s3" in backends else None
    try:
        config = make_config(tmp, data_dir, str(tmp / "unused"), args.bptt)
        started = time.perf_counter()
        trainer = Trainer(config)
        trainer._apply_lr()
        for _ in range(2):
            trainer.train_step()
        n_params = sum(p.numel() for p in trainer.model.parameters())
        opt_state = next(iter(trainer.optimizer.state.values()))
        print(f"checkpoint_io: enwik8_rlstm model, {n_params / 1e6:.1f}M parameters "
              f"(vocab {trainer.model_config.vocab_size}), "
              f"{type(trainer.optimizer).__name__} state {sorted(k for k in opt_state if k != 'step')}, "
              f"2TA S={trainer.averager.short_length} L={trainer.averager.long_length}, "
              f"hidden state of {config.train.batch_size} stripes; built and trained 2 steps in "
              f"{time.perf_counter() - started:.1f} s")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu count {os.cpu_count()}, "
              f"load average {os.getloadavg()[0]:.2f}; moto server: {args.moto}")
        if trainer.background_saves is None:
            raise SystemExit("the trainer has no background saver: checkpoint.async_save is off in enwik8_rlstm")
        # The first async save allocates the CPU copy; later ones copy into it (what training sees).
        open_checkpointer(trainer, make_config(tmp, data_dir, str(tmp / "warmup"), args.bptt))
        started = time.perf_counter()
        trainer.checkpoint_step()
        first_stall = time.perf_counter() - started
        trainer.wait_for_checkpoint()
        print(f"first async save of the process (allocates the {trainer.background_saves.stager.nbytes / MB:.0f} MB CPU "
              f"copy; untimed below): stall {first_stall:.2f} s, committed after "
              f"{time.perf_counter() - started:.2f} s")
        results = {}
        for backend in backends:
            url = str(tmp / "checkpoints") if backend == "local" else f"s3://bench/ckpt-{uuid.uuid4().hex[:8]}"
            results[backend] = bench_backend(backend, url, trainer, tmp, data_dir, args, server)
    finally:
        if server is not None:
            server.stop()

    print(f"\n{'backend':<8}{'MB written':>12}{'save s':>9}{'save MB/s':>11}{'restore s':>11}{'restore MB/s':>14}"
          f"{'stall/ckpt s':>14}{'async stall s':>15}{'async commit s':>16}{'stall/sync':>12}")
    for backend, r in results.items():
        print(f"{backend:<8}{r['mb']:>12.1f}{r['save']:>9.2f}{r['mb'] / r['save']:>11.0f}{r['restore']:>11.2f}"
              f"{r['mb'] / r['restore']:>14.0f}{r['save']:>14.2f}{r['stall']:>15.3f}{r['commit']:>16.2f}"
              f"{r['stall'] / r['save']:>12.1%}")
    print("\n(stall/ckpt s: the synchronous save; async stall s: the training thread blocked per asynchronous "
          "checkpoint; async commit s: until that checkpoint was committed and old ones pruned)")
    for backend, r in results.items():
        ratio = r["stall"] / r["save"]
        print(f"target stall <= 5% of the synchronous save, {backend}: {ratio:.1%} "
              f"({r['stall']:.3f} s vs {r['save']:.2f} s) - {'met' if ratio <= 0.05 else 'NOT met'}")
    if {"local", "s3"} <= results.keys():
        s3, local = results["s3"], results["local"]
        print(f"\nratio S3/local: save {s3['save'] / local['save']:.1f}x, "
              f"restore {s3['restore'] / local['restore']:.1f}x, "
              f"training stalled per checkpoint {s3['save']:.2f} s vs {local['save']:.2f} s "
              f"({s3['save'] / local['save']:.1f}x)")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
