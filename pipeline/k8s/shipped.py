"""The manifests shipped in ``k8s/``, generated from the builders so that they never drift.

``python -m pipeline.k8s.shipped`` rewrites them; ``--check`` exits 1 when one differs from what
the code generates (tests/test_k8s_manifests.py does the same check).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

__all__ = ["REPO", "SHIPPED_MANIFESTS", "generate"]

REPO = Path(__file__).resolve().parents[2]

# Two nodes x 4 GPUs for the 48M-parameter char models (batch 128 -> 16 stripes per GPU).
_GPU_SHAPE = ("--cluster.nodes", "2", "--cluster.train.gpus", "4", "--cluster.train.cpu", "32",
              "--cluster.train.memory", "256Gi", "--cluster.shm_size", "32Gi")

# file under k8s/ -> arguments of `python -m pipeline.k8s k8s-manifest`
SHIPPED_MANIFESTS: dict[str, tuple[str, ...]] = {
    "namespace.yaml": ("--what", "namespace"),
    "minio.yaml": ("--what", "minio"),
    "mlflow.yaml": ("--what", "mlflow"),
    "enwik8_rlstm.yaml": ("--config", "enwik8_rlstm", *_GPU_SHAPE),
    "text8_rlstm.yaml": ("--config", "text8_rlstm", *_GPU_SHAPE),
    # The sentence VAE of thesis §5.7.2 (~1.5M parameters): one GPU.
    "ptb_vae.yaml": ("--config", "ptb_vae", "--cluster.train.gpus", "1", "--cluster.train.cpu", "8",
                     "--cluster.train.memory", "32Gi"),
    # A λ sweep of the PTB VAE (thesis §5.7.2 traces its frontier this way): one driver Job per point.
    "ptb_vae_sweep.yaml": ("sweep", "--config", "ptb_vae", "--lambda", "0", "0.25", "0.5", "0.75", "0.9",
                           "--cluster.train.gpus", "1", "--cluster.train.cpu", "8", "--cluster.train.memory", "32Gi"),
    # The nightly run: the enwik8 pipeline, shortened to a regression-sized run (~1 GPU-hour per GPU).
    "nightly-enwik8_rlstm.yaml": ("--config", "enwik8_rlstm", "--what", "nightly", "--schedule", "0 3 * * *",
                                  *_GPU_SHAPE, "--train.max_steps", "20000"),
}


def generate(args: tuple[str, ...]) -> str:
    """The manifest text `k8s-manifest` prints for ``args`` (``sweep ...``: what `sweep --on kubernetes` writes)."""
    if args and args[0] == "sweep":
        from pipeline.sweep.command import render_sweep_manifest

        return render_sweep_manifest(args[1:])
    from pipeline.k8s.commands import render_manifest

    return render_manifest(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.k8s.shipped", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file differs")
    parser.add_argument("--print", dest="print_name", metavar="NAME", choices=sorted(SHIPPED_MANIFESTS),
                        help="print one shipped manifest instead, with any further k8s-manifest options appended "
                             "(e.g. --cluster.image repo@sha256:... --cluster.cpu_image repo@sha256:...; the nightly workflow "
                             "does this)")
    args, extra = parser.parse_known_args(argv)
    if args.print_name:
        sys.stdout.write(generate((*SHIPPED_MANIFESTS[args.print_name], *extra)))
        return 0
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (only with --print)")
    stale = []
    for name, manifest_args in SHIPPED_MANIFESTS.items():
        path = REPO / "k8s" / name
        text = generate(manifest_args)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
            how = (f"python -m pipeline {shlex.join(manifest_args)} --on kubernetes" if manifest_args[0] == "sweep"
                   else f"python -m pipeline.k8s k8s-manifest {shlex.join(manifest_args)}")
            print(f"wrote k8s/{name}: {how}")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python -m pipeline.k8s.shipped", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
