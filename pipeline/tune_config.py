"""The ``tune`` section of a pipeline config: set by ``python -m pipeline tune`` on each trial's config.

A trial of a hyperparameter study is an ordinary pipeline run whose config carries this section. While
it trains, every evaluation's validation loss is reported to the study's Optuna storage and the study's
pruner decides whether to stop it (:mod:`pipeline.tune.reporting`). ``storage: null`` (the default)
means the run is not a trial that reports: nothing is reported and nothing is pruned.

No imports from :mod:`pipeline.config` (it imports this module).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from models.config import StrictConfig

__all__ = ["PRUNERS", "PruneOn", "PrunerKind", "TuneTrialConfig", "storage_has_password"]

PruneOn = Literal["reported", "raw"]
PrunerKind = Literal["median", "percentile", "hyperband", "none"]
PRUNERS: tuple[str, ...] = ("median", "percentile", "hyperband", "none")


def storage_has_password(url: str) -> bool:
    """Whether an RDB URL carries a password (``postgresql://user:secret@host/db``)."""
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


class TuneTrialConfig(StrictConfig):
    """An Optuna trial (set by `python -m pipeline tune`): where training reports its validation losses."""

    storage: str | None = Field(
        default=None, description="Optuna RDB storage URL the training reports each evaluation's loss to and asks "
        "whether to stop (set by `tune`); null = not a reporting trial.",
    )
    study: str | None = Field(default=None, description="Name of the Optuna study in that storage.")
    trial: int | None = Field(
        default=None, ge=0, description="The trial's slot in the study (work dir trial-<n>); a re-queued trial keeps "
        "its predecessor's slot, checkpoints and MLflow run.",
    )
    prune_on: PruneOn = Field(
        default="reported", description="Loss reported at each evaluation: reported (2TA's reported weights, thesis "
        "§3) or raw (the raw weights; evaluated extra when 2TA did not).",
    )
    pruner: PrunerKind = Field(
        default="median", description="Optuna pruner: median, percentile, hyperband or none (report only).",
    )
    startup_trials: int = Field(
        default=5, ge=0, description="median / percentile: no pruning until this many trials have finished.",
    )
    warmup_steps: int = Field(
        default=0, ge=0, description="median / percentile: no pruning before this optimizer step of a trial.",
    )
    percentile: float = Field(
        default=25.0, gt=0, lt=100, description="percentile: prune below this percentile of the other trials (25 = "
        "keep the best quarter).",
    )

    @model_validator(mode="after")
    def _complete(self) -> TuneTrialConfig:
        if self.storage is not None:
            if not self.study or self.trial is None:
                raise ValueError("tune.storage is set but tune.study or tune.trial is not: `python -m pipeline tune` "
                                 "sets all three on its trials' configs; leave tune.* unset otherwise")
            if storage_has_password(self.storage):
                raise ValueError("tune.storage holds a password, which would be logged with the config: give it "
                                 "to the database client through the environment instead (e.g. PGPASSWORD)")
        return self
