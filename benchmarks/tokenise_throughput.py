"""Throughput of the enwik8 / text8 prepare stage on synthetic files of the canonical layouts.

Run as ``python benchmarks/tokenise_throughput.py [--size-mb 100 --repeats 3]``. Makes, in a
temporary folder (deleted at the end), ``enwik8.zip`` holding a member ``enwik8`` of random bytes
and ``text8.zip`` holding a member ``text8`` of random lowercase letters and spaces, both
ZIP_DEFLATED at compresslevel 1, then times the real prepare stage (``prepare_dataset``: verify,
inflate, tokenise, split 90/5/5, write, manifest) into a fresh output folder per repeat. The facts
checked have the shape of the canonical ones: enwik8 archive size + member size and sha256, text8
archive size + member size. In the same run, two baselines on the same files: reading the member
with ``zipfile`` (inflate + CRC, nothing kept) and sha256 of the zip.

MB/s is member megabytes (10^6 bytes) per median second; ``CPU s`` is the process CPU time of one
prepare (all threads), which the load of a shared machine does not inflate the way it does wall
time. Target: prepare >= 200 MB/s for both layouts (the stage is a byte map: it should run at disk
speed). Repeats are interleaved round-robin over the cases so that load changes hit all alike.

This is a report: the exit code is 0 whether or not the target is met.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import FileFacts, SourceFacts, prepare_dataset  # noqa: E402
from pipeline.data.sources import sha256_file  # noqa: E402

TARGET_MB_S = 200.0
LAYOUTS = ("enwik8", "text8")
TEXT8_ALPHABET = np.frombuffer(b" abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)


@dataclass(frozen=True)
class Synthetic:
    """One synthetic archive and the facts it is checked against."""

    name: str  # dataset and member name
    archive: Path
    member_size: int
    facts: SourceFacts


def make_member(name: str, size: int, seed: int = 0) -> np.ndarray:
    """``size`` bytes of the layout: random bytes (enwik8) or random letters and spaces (text8)."""
    rng = np.random.default_rng(seed)
    if name == "enwik8":
        return rng.integers(0, 256, size, dtype=np.uint8)
    return TEXT8_ALPHABET[rng.integers(0, TEXT8_ALPHABET.size, size, dtype=np.uint8)]


def make_archive(folder: Path, name: str, size: int) -> Synthetic:
    """``folder/<name>.zip`` with one deflated member ``name`` of ``size`` bytes."""
    data = make_member(name, size)
    archive = folder / f"{name}.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(name, "w") as member:
            member.write(memoryview(data))
    # Shaped like CANONICAL_FACTS: enwik8 publishes the member's sha256, text8 only sizes.
    member_sha = hashlib.sha256(data).hexdigest() if name == "enwik8" else None
    facts = SourceFacts(archive=FileFacts(size=archive.stat().st_size), members={name: FileFacts(size, member_sha)})
    return Synthetic(name, archive, size, facts)


def unzip_member(synthetic: Synthetic) -> None:
    """Baseline: read the member with ``zipfile`` in 1 MiB reads (inflate + CRC), keeping nothing."""
    with zipfile.ZipFile(synthetic.archive) as zf, zf.open(synthetic.name) as member:
        while member.read(1 << 20):
            pass


def _timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(synthetics: list[Synthetic], work: Path, repeats: int) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(wall, CPU) seconds of every repeat of each (layout, case); case is prepare / unzip / sha256."""
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for repeat in range(repeats):
        for syn in synthetics:
            out = work / f"out-{syn.name}-{repeat}"

            def prepare(syn: Synthetic = syn, out: Path = out) -> None:
                prepare_dataset(syn.name, str(syn.archive), out, expected=syn.facts, progress=False)

            cases: dict[str, Callable[[], object]] = {
                "prepare": prepare,
                "unzip": lambda syn=syn: unzip_member(syn),
                "sha256": lambda syn=syn: sha256_file(syn.archive),
            }
            for case, run in cases.items():
                times.setdefault((syn.name, case), []).append(_timed(run))
            shutil.rmtree(out)  # outside the timed part; keeps the disk use to one output at a time
    return times


def report(synthetics: list[Synthetic], times: dict[tuple[str, str], list[tuple[float, float]]]) -> list[str]:
    """The table and the verdict lines."""
    def mb_s(syn: Synthetic, case: str) -> float:
        return syn.member_size / 1e6 / statistics.median(wall for wall, _ in times[(syn.name, case)])

    lines = [
        f"{'layout':<8}{'zip MB':>9}{'prepare s':>11}{'prepare MB/s':>14}{'CPU s':>8}"
        f"{'unzip MB/s':>12}{'sha256(zip) MB/s':>18}{'prepare/unzip':>15}"
    ]
    verdicts = []
    for syn in synthetics:
        prepare_walls = [wall for wall, _ in times[(syn.name, "prepare")]]
        prepare_cpu = statistics.median(cpu for _, cpu in times[(syn.name, "prepare")])
        speed, unzip = mb_s(syn, "prepare"), mb_s(syn, "unzip")
        lines.append(
            f"{syn.name:<8}{syn.archive.stat().st_size / 1e6:>9.1f}{statistics.median(prepare_walls):>11.3f}"
            f"{speed:>14.1f}{prepare_cpu:>8.2f}{unzip:>12.1f}{mb_s(syn, 'sha256'):>18.1f}{speed / unzip:>15.2f}"
        )
        each = ", ".join(f"{syn.member_size / 1e6 / wall:.0f}" for wall in prepare_walls)
        verdicts.append(
            f"  {syn.name:<7} {'PASS' if speed >= TARGET_MB_S else 'FAIL'}  {speed:.1f} MB/s (repeats: {each} MB/s)"
        )
    return [*lines, f"target: prepare >= {TARGET_MB_S:.0f} MB/s", *verdicts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="member size in MB (10^6 bytes; default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case; the median is reported")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="which layouts to time")
    args = parser.parse_args(argv)
    size = int(args.size_mb * 1e6)
    load = ", load average %.2f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(
        f"tokenise throughput: {size / 1e6:g} MB members, median of {args.repeats} repeats; python "
        f"{platform.python_version()}, numpy {np.__version__}, zlib {zlib.ZLIB_RUNTIME_VERSION}, "
        f"{os.cpu_count()} CPUs{load}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="tokenise-throughput-") as folder:
        work = Path(folder)
        start = time.perf_counter()
        synthetics = [make_archive(work, name, size) for name in args.layouts]
        print(f"synthetic archives written in {time.perf_counter() - start:.1f} s (temporary: {work})", flush=True)
        times = measure(synthetics, work, args.repeats)
        print("\n".join(report(synthetics, times)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
