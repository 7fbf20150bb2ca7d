"""The Optuna study of a ``tune`` command: its key, storage, sampler and pruner, and resuming it.

* **Key and folder.** A study's key hashes the resolved base config, the search space, the objectives and
  the pruning settings (:func:`study_key`): the same command finds the same study again. Its trials' work
  dirs, logs, plots and (by default) the study database live in ``<run dir>/tune-<key>/``.
* **Storage.** By default the SQLite database ``<run dir>/tune-<key>/study.db`` (one per study, beside the
  trials it describes; SQLite's locking is per file, so studies never wait on each other); ``--storage``
  takes any Optuna RDB URL (``postgresql://user@host/optuna``: a database of its own, not MLflow's, since
  both keep an ``alembic_version`` table).
* **Resuming.** ``--trials N`` is the number of finished trials (complete or pruned) the study should
  have; running the command again asks only for the rest. Trials left RUNNING by a driver that was
  killed are marked FAIL and re-queued with the same parameters and the same *slot* (work dir,
  checkpoints, MLflow run): the re-queued trial resumes from the killed one's last checkpoint
  (:func:`requeue_stale_trials`). One driver per study at a time (:class:`DriverLock`).
* **Sampler.** TPE (multi-objective TPE for two objectives), seeded with ``seed + trials so far`` so that
  a resumed study does not propose its first trials again; ``constant_liar`` when trials run in parallel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, PipelineConfig
from pipeline.errors import PipelineError
from pipeline.tune.space import Direction, SearchSpace

__all__ = [
    "METRICS_ATTR",
    "PRUNED_ATTR",
    "REQUEUED_ATTR",
    "SLOT_ATTR",
    "DriverLock",
    "StudyError",
    "StudySettings",
    "build_pruner",
    "build_sampler",
    "default_storage",
    "finished_count",
    "load_storage",
    "open_study",
    "requeue_stale_trials",
    "study_key",
    "trial_slot",
    "trials_table",
    "tune_dir",
]

log = logging.getLogger("pipeline.tune")

SLOT_ATTR = "rlm.trial"  # user attr: the trial's slot (work dir trial-<slot>, checkpoints, MLflow run)
PRUNED_ATTR = "rlm.pruned_at_step"  # user attr set by the trial's own training when the pruner stopped it
METRICS_ATTR = "rlm.metrics"  # user attr: the trial's final metrics (set by the driver before telling)
REQUEUED_ATTR = "rlm.requeued_from"  # user attr of a re-queued trial: the number of the killed one
SQLITE_TIMEOUT_S = 60.0  # trials and the driver share one SQLite file: wait for its lock, never fail on it


class StudyError(PipelineError):
    """The study cannot be opened or continued as asked; the message names the fix."""

    exit_code = 2


@dataclass(frozen=True)
class StudySettings:
    """What defines a study besides its space: objectives, pruning, seed."""

    objectives: tuple[str, ...]
    directions: tuple[Direction, ...]
    prune_on: str = "reported"  # reported | raw
    pruner: str = "median"  # median | percentile | hyperband | none
    startup_trials: int = 5
    warmup_steps: int = 0
    percentile: float = 25.0
    seed: int = 0

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def canonical(self) -> dict[str, Any]:
        return {"objectives": list(self.objectives), "prune_on": self.prune_on, "pruner": self.pruner,
                "startup_trials": self.startup_trials, "warmup_steps": self.warmup_steps,
                "percentile": self.percentile, "seed": self.seed}


def study_key(base: PipelineConfig, space: SearchSpace, settings: StudySettings) -> str:
    """A 10-hex-digit hash of the resolved base config, the space and the settings (not of ``--trials``:
    asking for more trials continues the same study)."""
    text = base.to_yaml() + json.dumps({"space": space.canonical(), "settings": settings.canonical()},
                                       sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def tune_dir(base: PipelineConfig, key: str) -> Path:
    """The study's folder: ``<run dir>/tune-<key>`` (trials' work dirs, configs, logs, plots, study.db)."""
    return base.run_dir / f"tune-{key}"


def default_storage(directory: Path) -> str:
    """``sqlite:///<directory>/study.db`` (absolute: trial processes run elsewhere)."""
    return f"sqlite:///{(directory / 'study.db').resolve()}"


def load_storage(url: str) -> Any:
    """An Optuna ``RDBStorage`` for ``url`` (SQLite waits up to a minute for its lock); :class:`StudyError`
    naming the URL and the fix when it cannot be opened."""
    import optuna

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StudyError(f"cannot open the Optuna storage {url}: cannot create its folder ({err.strerror}); "
                                 "point --storage at a writable place") from None
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except ModuleNotFoundError as err:
        raise StudyError(f"Optuna storage {url}: its database driver is not installed ({err.name}); install it "
                         "(e.g. psycopg2-binary for postgresql://) or use the default SQLite storage") from None
    except Exception as err:  # sqlalchemy OperationalError, ArgumentError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StudyError(f"cannot open the Optuna storage {url}: {first}; check the URL, that the database "
                         "server is reachable and its credentials (PGPASSWORD, ...), or drop --storage for the "
                         "default SQLite file") from None


def build_pruner(kind: str, *, startup_trials: int = 5, warmup_steps: int = 0, percentile: float = 25.0) -> Any:
    """The Optuna pruner of ``tune.pruner`` (``none``: never prunes; intermediate values are still recorded)."""
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(percentile, n_startup_trials=startup_trials,
                                               n_warmup_steps=warmup_steps)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {kind!r}: use median, percentile, hyperband or none")


def build_sampler(settings: StudySettings, trials_so_far: int, *, parallel: int = 1) -> Any:
    """TPE (multi-objective TPE for two objectives), seeded with ``seed + trials_so_far``."""
    import optuna

    return optuna.samplers.TPESampler(seed=settings.seed + trials_so_far, constant_liar=parallel > 1,
                                      multivariate=True)


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()  # into the pipeline's own log lines
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_study(name: str, storage_url: str, settings: StudySettings, *, parallel: int = 1,
               create: bool = True) -> Any:
    """The study ``name`` in ``storage_url``, created with ``settings.directions`` when missing.

    Raises :class:`StudyError` when the storage cannot be opened, or the study exists with other
    directions (another objective: name a new study with ``--study``).
    """
    import optuna

    _quiet_optuna()
    storage = load_storage(storage_url)
    pruner = build_pruner("none" if settings.multi_objective else settings.pruner,
                          startup_trials=settings.startup_trials, warmup_steps=settings.warmup_steps,
                          percentile=settings.percentile)
    directions = list(settings.directions)
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        have = [d.name.lower() for d in existing.directions]
        if have != directions:
            raise StudyError(f"study {name!r} in {storage_url} optimises {', '.join(have)} but this command asks for "
                             f"{', '.join(directions)} ({', '.join(settings.objectives)}); name a new study with "
                             "--study NAME, or use the objectives it was created with")
        trials = len(existing.trials)
    elif not create:
        raise StudyError(f"no study {name!r} in {storage_url}")
    else:
        trials = 0
    sampler = build_sampler(settings, trials, parallel=parallel)
    if existing is None:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions, sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
        study.set_user_attr("rlm.objectives", list(settings.objectives))
        return study
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


def trial_slot(trial: Any) -> int:
    """The slot of a trial (its work dir ``trial-<slot>``): its own number unless it re-runs a killed one."""
    return int(trial.user_attrs.get(SLOT_ATTR, trial.number))


def finished_count(study: Any) -> int:
    """Trials that count towards ``--trials``: complete or pruned (failed ones are tried again)."""
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def requeue_stale_trials(study: Any) -> list[tuple[int, int]]:
    """Trials left RUNNING (their driver was killed) are marked FAIL and re-queued with the same parameters
    and slot, so that the re-queued trial resumes the killed one's checkpoints and MLflow run. Trials the
    study holds as WAITING already are left for ``ask``. Returns ``[(killed trial number, slot)]``.

    Only call with the study's :class:`DriverLock` held: a RUNNING trial of a live driver is not stale.
    """
    from optuna.trial import TrialState

    requeued = []
    waiting_slots = {trial_slot(t) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        slot = trial_slot(trial)
        study.tell(trial.number, state=TrialState.FAIL)
        if slot not in waiting_slots:
            study.enqueue_trial(dict(trial.params), user_attrs={SLOT_ATTR: slot, REQUEUED_ATTR: trial.number})
            waiting_slots.add(slot)
        requeued.append((trial.number, slot))
    return requeued


class DriverLock:
    """``<study folder>/driver.lock``: one tune driver per study at a time (pid and host inside).

    A lock whose process is gone (same host) is taken over; one held by a live process, or written on
    another host, is refused with the way out (wait, or remove the file when that driver is gone).
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "driver.lock"
        self.held = False

    def acquire(self) -> DriverLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if other is not None and not self._stale(other):
                    raise StudyError(f"another tune driver (pid {other.get('pid')} on {other.get('host')}) is running "
                                     f"this study (lock {self.path}); wait for it, or remove the lock file if that "
                                     "driver is gone") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise StudyError(f"could not take the study lock {self.path}; remove it if no tune driver is running")

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _stale(other: dict[str, Any]) -> bool:
        if other.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(other.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, TypeError, OverflowError):
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> DriverLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def trials_table(study: Any, objectives: Sequence[str]) -> list[dict[str, Any]]:
    """One row per trial (number, slot, state, objective values, last reported step, params): ``trials.csv``."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "slot": trial_slot(t), "state": t.state.name}
        values = t.values or []
        for i, metric in enumerate(objectives):
            row[metric] = values[i] if i < len(values) else ""
        steps = sorted(t.intermediate_values)
        row["last_step"] = steps[-1] if steps else ""
        row["pruned_at_step"] = t.user_attrs.get(PRUNED_ATTR, "")
        for name, value in t.params.items():
            row[name] = value
        rows.append(row)
    return rows
