"""The study loop: ask Optuna for a trial, run it as a pipeline run, tell Optuna how it ended.

:func:`run_study` keeps up to the executor's capacity of trials running until the study has ``n_trials``
finished (complete or pruned) trials. A trial ends as

* **PRUNED** -- its training stopped on the pruner's decision (exit code 8, or the step recorded in the
  Optuna trial by its training: how a Kubernetes trial says so);
* **COMPLETE** -- its run evaluated: the objective values are its final metrics (``valid_nll``; a VAE study
  also ``valid_mutual_information``), also kept in the trial's user attrs;
* **FAIL** -- anything else (the log or Job is named); after ``max_failures`` failures in one run of the
  driver it stops asking for new trials.

:class:`StudyRun` keeps the MLflow side: the study run (a sweep run tagged ``pipeline.study``, which the
trials' pipeline runs nest under), each trial run's ``tune.*`` tags, and the study's running metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, PipelineConfig
from pipeline.tune.space import SearchSpace, distributions, objective_values
from pipeline.tune.study import METRICS_ATTR, PRUNED_ATTR, SLOT_ATTR, StudySettings, finished_count, trial_slot
from pipeline.tune.trials import TrialExecutor, TrialResult, trial_config

__all__ = ["StudyOutcome", "StudyPlan", "StudyRun", "run_study"]

log = logging.getLogger("pipeline.tune")


@dataclass(frozen=True)
class StudyPlan:
    """Everything a trial's config is built from, besides its parameters and slot."""

    base: PipelineConfig
    space: SearchSpace
    settings: StudySettings
    key: str
    study_name: str
    directory: Path
    trial_storage: str | None  # what the trials' training reports to (None: nothing)
    tracking_uri: str | None = None  # pinned in the trials' configs (local trials)

    def config(self, slot: int, params: dict[str, Any]) -> PipelineConfig:
        return trial_config(self.base, self.space, params, key=self.key, slot=slot, study=self.study_name,
                            settings=self.settings, storage=self.trial_storage, tracking_uri=self.tracking_uri)


@dataclass
class StudyOutcome:
    """What one run of the driver did."""

    started: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)  # where to look, per failed trial
    aborted: bool = False  # stopped asking after max_failures


class StudyRun:
    """The MLflow side of a study; every call is best-effort (an unreachable store never stops the study)."""

    def __init__(self, client: Any, run_id: str | None, *, experiment: str, key: str, study_name: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment = experiment
        self.key = key
        self.study_name = study_name

    @property
    def enabled(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _safely(self, what: str, call: Callable[[], Any]) -> None:
        if not self.enabled:
            return
        try:
            call()
        except Exception as err:
            log.warning("could not record %s in MLflow (%s)", what, err)

    def trial_ended(self, slot: int, number: int, state: str, values: list[float] | None,
                    objectives: tuple[str, ...], best: list[float] | None, told: int) -> None:
        """Tag the trial's pipeline run (``tune.trial``, ``tune.state``, ``tune.study``) and log the study's
        metrics: ``tune/<objective>`` at step = trial number, ``tune/best_<objective>`` at step = trials told so
        far (``told``: parallel trials end out of order, and MLflow shows a metric's value at its last step)."""

        def record() -> None:
            experiment = self.client.get_experiment_by_name(self.experiment)
            runs = self.client.search_runs(
                [experiment.experiment_id], max_results=1,
                filter_string=f"tags.`pipeline.run_key` = '{self.key}-{slot}' and tags.`pipeline.kind` = 'pipeline'")
            for run in runs:
                for tag, value in (("tune.trial", str(number)), ("tune.state", state), ("tune.study", self.study_name)):
                    self.client.set_tag(run.info.run_id, tag, value)
            stamp = int(time.time() * 1000)
            from mlflow.entities import Metric

            metrics = [Metric(f"tune/{m}", v, stamp, number) for m, v in zip(objectives, values or [])]
            metrics += [Metric(f"tune/best_{m}", v, stamp, told) for m, v in zip(objectives, best or [])]
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics)

        self._safely(f"trial {number}", record)

    def counts(self, study: Any) -> int:
        """Log the numbers of complete, pruned and failed trials at step = trials told so far; returns that step."""
        from mlflow.entities import Metric
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        counts = {s: sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in states}
        step = sum(counts.values())

        def record() -> None:
            stamp = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[
                Metric(f"tune/trials_{s.name.lower()}", float(n), stamp, step) for s, n in counts.items()])

        self._safely("the trial counts", record)
        return step

    def log_artifacts(self, paths: list[tuple[Path, str]]) -> None:
        for path, folder in paths:
            self._safely(str(path), lambda p=path, f=folder: self.client.log_artifact(self.run_id, str(p), f))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._safely("the study's tags", lambda: [self.client.set_tag(self.run_id, k, v) for k, v in tags.items()])

    def end(self, status: str) -> None:
        self._safely("the study's end", lambda: self.client.set_terminated(self.run_id, status))


def _best(study: Any, objectives: tuple[str, ...]) -> list[float] | None:
    if len(objectives) != 1:
        return None
    try:
        return [study.best_value]
    except ValueError:  # no complete trial yet
        return None


def _user_attrs(study: Any, trial: Any) -> dict[str, Any]:
    """The trial's user attrs as stored now (``Trial.user_attrs`` is a copy from when it was asked; the trial's
    own training sets ``rlm.pruned_at_step`` later)."""
    return study._storage.get_trial_user_attrs(trial._trial_id)


def _tell(study: Any, trial: Any, slot: int, result: TrialResult, plan: StudyPlan, outcome: StudyOutcome,
          mlflow: StudyRun | None, say: Callable[[str], None]) -> None:
    from optuna.trial import TrialState

    objectives = plan.settings.objectives
    attrs = _user_attrs(study, trial)
    values = objective_values(objectives, result.metrics) if result.returncode in (0, None) else None
    if result.pruned or PRUNED_ATTR in attrs:
        study.tell(trial, state=TrialState.PRUNED)
        state, text = "PRUNED", f"pruned at step {attrs.get(PRUNED_ATTR, '?')}"
        outcome.pruned += 1
    elif values is not None:
        trial.set_user_attr(METRICS_ATTR, result.metrics)
        study.tell(trial, values[0] if len(values) == 1 else values)
        state, text = "COMPLETE", ", ".join(f"{m} {v:.4f}" for m, v in zip(objectives, values))
        outcome.complete += 1
    else:
        study.tell(trial, state=TrialState.FAIL)
        missing = [m for m in objectives if m not in result.metrics]
        why = (f"exit code {result.returncode}" if result.returncode not in (0, None) else
               f"no final {', '.join(missing) or 'finite objective values'}")
        state, text = "FAIL", f"FAILED ({why}); see {result.where}"
        outcome.failed += 1
        outcome.failures.append(result.where)
    say(f"  trial {trial.number} (slot {slot}): {text}")
    if mlflow is not None:
        told = mlflow.counts(study)
        mlflow.trial_ended(slot, trial.number, state, values if state == "COMPLETE" else None, objectives,
                           _best(study, objectives), told)


def run_study(study: Any, plan: StudyPlan, executor: TrialExecutor, n_trials: int, *, max_failures: int = 3,
              poll_seconds: float = 0.5, mlflow: StudyRun | None = None,
              say: Callable[[str], None] = print) -> StudyOutcome:
    """Ask, run and tell until the study has ``n_trials`` finished trials (or ``max_failures`` trials failed).

    Trials the study holds as WAITING (re-queued after a crash) are asked first and keep their slot. A trial
    whose parameters make an invalid config is told FAIL at once, naming the value. Interrupting (Ctrl-C,
    SIGTERM) closes the executor and leaves the running trials RUNNING in the study: the next run of the
    driver re-queues them (:func:`pipeline.tune.study.requeue_stale_trials`).
    """
    from optuna.trial import TrialState

    dists = distributions(plan.space)
    outcome = StudyOutcome()
    in_flight: dict[int, Any] = {}  # slot -> optuna Trial
    stopped: set[int] = set()  # slots pruned while their executor still ran them
    try:
        while True:
            for result in executor.poll():
                trial = in_flight.pop(result.slot)
                stopped.discard(result.slot)
                _tell(study, trial, result.slot, result, plan, outcome, mlflow, say)
            for slot, trial in in_flight.items():
                if slot not in stopped and PRUNED_ATTR in _user_attrs(study, trial):
                    executor.stop(slot)  # Kubernetes: its pods stop once the Job is gone
                    stopped.add(slot)
            if outcome.failed >= max_failures and not outcome.aborted:
                outcome.aborted = True
                say(f"  {outcome.failed} trials failed in this run: asking for no new trials")
            remaining = n_trials - finished_count(study) - len(in_flight)
            while executor.has_room and remaining > 0 and not outcome.aborted:
                trial = study.ask(dists)
                slot = trial_slot(trial)
                if SLOT_ATTR not in trial.user_attrs:
                    trial.set_user_attr(SLOT_ATTR, slot)
                try:
                    config = plan.config(slot, trial.params)
                except ConfigError as err:
                    study.tell(trial, state=TrialState.FAIL)
                    outcome.failed += 1
                    outcome.failures.append(str(err).splitlines()[0])
                    say(f"  trial {trial.number}: FAILED, its parameters make an invalid config: {err}")
                    if outcome.failed >= max_failures:
                        outcome.aborted = True
                    continue
                where = executor.start(slot, config)
                in_flight[slot] = trial
                outcome.started += 1
                remaining -= 1
                shown = ", ".join(f"{name.rsplit('.', 1)[-1]}={_short(value)}" for name, value in trial.params.items())
                say(f"  trial {trial.number} (slot {slot}) started: {shown}; {where}")
            if not in_flight and executor.running == 0:
                return outcome
            time.sleep(poll_seconds if executor.running else 0)
    finally:
        executor.close()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
