"""When a training step has diverged (thesis §4.4: reset to the best checkpoint and multiply the
learning rate by 0.9): a non-finite loss or gradient norm, or a loss that explodes while staying
finite (``train.divergence_loss_factor`` times the lowest smoothed training loss so far).

The reference is the minimum of an exponential moving average of the per-step training loss, not the
lowest single step: one unusually easy batch must not make an ordinary one look like an explosion.
Its state is checkpointed, so a resumed run takes exactly the decisions of an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DivergenceGuard"]


@dataclass
class DivergenceGuard:
    """``check(loss, grad_norm)`` names a divergence (or None); ``accept(loss)`` after every applied step.

    loss_factor: a finite loss above ``loss_factor * best_smoothed`` is a divergence (None: only
        non-finite values are).
    smoothing: decay of the moving average ``smoothed = smoothing * smoothed + (1 - smoothing) * loss``.
    """

    loss_factor: float | None = 5.0
    smoothing: float = 0.9
    smoothed: float | None = None
    best_smoothed: float = math.inf

    def check(self, loss: float, grad_norm: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"non-finite loss or gradient (loss={loss}, grad norm={grad_norm})"
        if self.loss_factor is not None and math.isfinite(self.best_smoothed) and loss > self.loss_factor * self.best_smoothed:
            return (f"loss exploded to {loss:.6g}, above train.divergence_loss_factor {self.loss_factor:g} x the lowest "
                    f"smoothed training loss {self.best_smoothed:.4g}")
        return None

    def accept(self, loss: float) -> None:
        self.smoothed = loss if self.smoothed is None else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
        self.best_smoothed = min(self.best_smoothed, self.smoothed)

    def state_dict(self) -> dict[str, float]:
        return {"smoothed": math.nan if self.smoothed is None else self.smoothed, "best_smoothed": self.best_smoothed}

    def load_state_dict(self, state: dict[str, float]) -> None:
        smoothed = float(state["smoothed"])
        self.smoothed = None if math.isnan(smoothed) else smoothed
        self.best_smoothed = float(state["best_smoothed"])
