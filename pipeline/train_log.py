"""``<work_dir>/train_log.jsonl``: one JSON line per training step (loss, gradient norm, lr) and per
evaluation (the 2TA report), written by rank 0.

On resume the log is cut back to the step the checkpoint holds, so that a resumed run's log reads
exactly like an uninterrupted one (the lines of steps that were trained again are not duplicated).
After a divergence recovery the abandoned steps are kept: they are the record of what happened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.errors import writing

__all__ = ["TRAIN_LOG_FILE", "TrainLog"]

TRAIN_LOG_FILE = "train_log.jsonl"


class TrainLog:
    """Append-only JSON lines, truncated to a step on resume (``enabled`` False: a rank that logs nothing)."""

    def __init__(self, path: str | Path, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def append(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with writing(self.path), self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop every line of a step after ``step`` (and any torn last line); returns how many were dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                dropped += 1
                continue
            if isinstance(record, dict) and int(record.get("step", 0)) > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                with writing(self.path):
                    tmp.write_text("".join(f"{line}\n" for line in kept))
                    os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
        return dropped
