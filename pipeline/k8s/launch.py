"""``python -m pipeline.k8s.launch [torchrun options] -m pipeline train ...``: torchrun that keeps
the workers' exit code.

torchrun itself exits with 1 whenever a worker failed, whatever the worker's own exit code was.
The train Job's ``podFailurePolicy`` tells a bad configuration (the CLI's exit code 2: no retry can
fix it) from everything else by the container's exit code, so this launcher runs torchrun's own
``main`` (same options, same ``PET_*`` environment variables) and, when every failed worker
exited with the same non-retriable code, exits with that code.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterable, Sequence

from pipeline.k8s.builders import NON_RETRIABLE_EXIT_CODES

__all__ = ["exit_code_for", "main"]


# How a worker ends when torchrun stops it after another worker failed: SIGTERM (our handler exits 143).
_STOPPED_BY_LAUNCHER = {-signal.SIGTERM, 128 + signal.SIGTERM}


def exit_code_for(worker_exit_codes: Iterable[int]) -> int:
    """The launcher's exit code for the exit codes of the failed workers.

    Workers that torchrun stopped (SIGTERM) because another one failed do not count; when every other
    failed worker exited with the same non-retriable code, that code is kept.
    """
    codes = set(worker_exit_codes)
    if codes - _STOPPED_BY_LAUNCHER:
        codes -= _STOPPED_BY_LAUNCHER
    if len(codes) == 1:
        (code,) = codes
        if code in NON_RETRIABLE_EXIT_CODES:
            return code
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(list(argv) if argv is not None else None)
    except ChildFailedError as err:
        codes = {rank: failure.exitcode for rank, failure in err.failures.items()}
        code = exit_code_for(codes.values())
        print(f"pipeline.k8s.launch: workers failed (rank: exit code) {codes}; exiting with {code}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
