"""Inside a trial's training: report each evaluation's loss to the study and stop when it is pruned.

The thesis' argument (§3): before averaging starts, the raw loss says little about the final one, which
makes early stopping unreliable; Two-Tailed Averaging's reported loss approximates the optimal tail
average at every evaluation, so comparing trials on it at equal steps - what Optuna's median pruner
does - stops the right ones. ``tune.prune_on: raw`` reports the raw weights' loss instead (2TA evaluates
them only with ``raw_fallback``; otherwise they are evaluated here, one extra validation pass), for
comparison (``benchmarks/tune_pruning.py``).

:func:`report_evaluation` is called by :meth:`pipeline.trainer.Trainer._report` on every rank after every
evaluation of a trial (``tune.storage`` set). Rank 0 alone talks to the storage: it records the value as
the trial's intermediate value at this optimizer step and asks the pruner; the decision is broadcast, so
every rank stops together. A pruned trial commits a checkpoint of this step (it can be continued by hand),
tags its MLflow runs ``tune.pruned=true`` / ``tune.pruned_at_step``, records the step in the Optuna trial
(the tune driver reads it, also for Kubernetes trials) and raises :class:`~pipeline.errors.TrialPruned`:
the train stage ends KILLED, ``evaluate`` is skipped, the process exits with ``EXIT_PRUNED`` (8).

A storage that cannot be reached never stops training: the value is skipped with a warning (no pruning
without data). The trial is found by its slot (``tune.trial``) among the study's RUNNING trials, so a
trial the driver re-queued after a crash reports into its new Optuna trial; when none is RUNNING any
more (the driver told it pruned, failed or stale), training stops.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from pipeline.errors import TrialPruned
from pipeline.tune_config import TuneTrialConfig

__all__ = ["StudyReporter", "TrialDecision", "ensure_trial_running", "report_evaluation", "reporter_for"]

log = logging.getLogger("pipeline.tune")

_REPORTERS: dict[tuple[str, str, int], StudyReporter] = {}


@dataclass(frozen=True)
class TrialDecision:
    """What the study said about one report: stop (pruned, or no longer running) and why."""

    stop: bool = False
    message: str = ""
    pruned: bool = False


class StudyReporter:
    """One trial's connection to its study (rank 0): intermediate values in, pruning decisions out."""

    def __init__(self, config: TuneTrialConfig) -> None:
        if config.storage is None or config.study is None or config.trial is None:
            raise ValueError("a StudyReporter needs tune.storage, tune.study and tune.trial")
        self.config = config
        self._study: Any = None
        self._trial_id: int | None = None
        self._warned = False

    def _open(self) -> Any:
        if self._study is None:
            import optuna

            from pipeline.tune.study import _quiet_optuna, build_pruner, load_storage

            _quiet_optuna()
            cfg = self.config
            pruner = build_pruner(cfg.pruner, startup_trials=cfg.startup_trials, warmup_steps=cfg.warmup_steps,
                                  percentile=cfg.percentile)
            self._study = optuna.load_study(study_name=cfg.study, storage=load_storage(cfg.storage), pruner=pruner,
                                            sampler=optuna.samplers.RandomSampler())
        return self._study

    def _find_trial(self) -> int | None:
        """The id of the RUNNING trial of this slot (cached while it stays RUNNING)."""
        from optuna.trial import TrialState

        from pipeline.tune.study import trial_slot

        study = self._open()
        storage = study._storage
        if self._trial_id is not None and storage.get_trial(self._trial_id).state == TrialState.RUNNING:
            return self._trial_id
        self._trial_id = None
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial_slot(trial) == self.config.trial:
                self._trial_id = trial._trial_id
        return self._trial_id

    def _not_running(self) -> TrialDecision:
        return TrialDecision(True, f"trial {self.config.trial} of study {self.config.study!r} is not running in its "
                                   "study any more (its tune driver ended it: pruned, failed or re-queued); stopping")

    def check_running(self) -> TrialDecision:
        """Stop (before training) when the study holds no RUNNING trial of this slot: a re-created pod of a
        trial that was pruned. Unreachable storage: carry on."""
        try:
            return TrialDecision() if self._find_trial() is not None else self._not_running()
        except Exception as err:  # never stop training because the storage is away
            self._warn(err)
            return TrialDecision()

    def report(self, step: int, value: float, *, ask: bool = True) -> TrialDecision:
        """Record ``value`` at ``step`` and (``ask``) ask the pruner."""
        import optuna

        from pipeline.tune.study import PRUNED_ATTR

        if not math.isfinite(value):
            return TrialDecision()  # divergence recovery handles it; a NaN is no evidence for the pruner
        try:
            trial_id = self._find_trial()
            if trial_id is None:
                return self._not_running()
            trial = optuna.trial.Trial(self._open(), trial_id)
            trial.report(value, step)
            if not ask or not trial.should_prune():
                return TrialDecision()
            trial.set_user_attr(PRUNED_ATTR, step)
        except Exception as err:
            self._warn(err)
            return TrialDecision()
        cfg = self.config
        return TrialDecision(True, f"trial {cfg.trial} of study {cfg.study!r} pruned at step {step}: its "
                                   f"{cfg.prune_on} validation loss {value:.4f} is worse than the study's "
                                   f"{cfg.pruner} pruner allows", pruned=True)

    def _warn(self, err: BaseException) -> None:
        if not self._warned:
            log.warning("Optuna storage %s not usable (%s: %s): this trial's losses are not reported and it is not "
                        "pruned; training goes on", self.config.storage, type(err).__name__, err)
            self._warned = True


def reporter_for(config: TuneTrialConfig) -> StudyReporter:
    """The process's reporter of this trial (one connection per process)."""
    key = (str(config.storage), str(config.study), int(config.trial or 0))
    if key not in _REPORTERS:
        _REPORTERS[key] = StudyReporter(config)
    return _REPORTERS[key]


def _stop(trainer: Any, decision: TrialDecision, step: int) -> None:
    """Commit a checkpoint of this step, tag the runs, raise :class:`TrialPruned` (on every rank)."""
    if trainer.ctx.is_main:
        log.info("%s", decision.message)
    trainer.save_checkpoint()
    if trainer.tracker is not None:
        trainer.tracker.set_tags({"tune.pruned": "true" if decision.pruned else "stopped",
                                  "tune.pruned_at_step": step})
    raise TrialPruned(decision.message)


def report_evaluation(trainer: Any, report: Any) -> None:
    """Report this evaluation of a trial (all ranks call it) and stop training when the study says so.

    ``trainer``: a :class:`pipeline.trainer.Trainer` whose config has ``tune.storage`` set; ``report``: the
    :class:`~pipeline.averaging.AveragingReport` of the evaluation just made.
    """
    from pipeline.distributed import on_main

    cfg: TuneTrialConfig = trainer.config.tune
    if cfg.storage is None:
        return
    value = report.loss
    if cfg.prune_on == "raw":
        value = report.raw_loss
        if value is None:  # 2TA scored no raw weights this time (raw_fallback off): the model holds them now
            value = trainer._validation_loss()
    step = trainer.step
    last = step >= trainer.train_cfg.max_steps  # a trial that trained to the end is evaluated, never pruned
    reporter = reporter_for(cfg)
    decision = on_main(trainer.ctx, lambda: reporter.report(step, float(value), ask=not last))
    if decision.stop:
        _stop(trainer, decision, step)


def ensure_trial_running(config: Any, ctx: Any) -> None:
    """Before training a trial (all ranks): raise :class:`TrialPruned` when its study no longer runs it (a
    Kubernetes train pod re-created after the trial was pruned), so it stops at once instead of training."""
    from pipeline.distributed import on_main

    cfg: TuneTrialConfig = config.tune
    if cfg.storage is None:
        return
    reporter = reporter_for(cfg)
    decision = on_main(ctx, reporter.check_running)
    if decision.stop:
        raise TrialPruned(decision.message)
