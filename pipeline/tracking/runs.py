"""The run tree: which MLflow experiment, parent run and stage runs a process's calls go to.

How a stage finds its parent, so that stages started separately, in other containers or on
other pods log into the same tree (first match wins):

1. ``$MLFLOW_RUN_ID`` names the parent run;
2. ``tracking.run_key`` / ``$PIPELINE_RUN_KEY``: the parent tagged ``pipeline.run_key=<key>``
   (created by whichever stage comes first; the Kubernetes driver sets one key per pipeline run);
3. the parent id kept in ``<work_dir>/mlflow_run_id`` (a laptop re-running stages in one folder);
4. otherwise a new parent run.

Stage runs: an unfinished run of the stage (a crash, a preempted pod) is reused, so a restarted
``train`` continues its curves. When the stage's newest run has FINISHED, a stage that has work again
(``train`` with a larger ``train.max_steps``) opens a new stage run named ``train (continued)``, tagged
``pipeline.continues=<previous run id>``, and tags the parent ``pipeline.continuations``: a finished run
is never rewritten. A training that starts again from step 0 under a finished parent (its checkpoints
were removed) gets a new parent run.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.tracking.ops import PARENT
from pipeline.tracking.tags import git_commit

__all__ = ["RUN_ID_FILE", "STUDY_TAG", "RunTree", "default_tracking_uri", "find_or_create_sweep_run", "study_run_name",
           "sweep_run_name"]

log = logging.getLogger("pipeline.tracking")

RUN_ID_FILE = "mlflow_run_id"
STUDY_TAG = "pipeline.study"
"""On a sweep run that holds an Optuna study's trials: the study's name (``pipeline.kind`` stays ``sweep``, so
``compare`` and ``pareto --sweep KEY`` treat a study's trials as a sweep's points)."""


def default_tracking_uri(run_dir: Path) -> str:
    """``sqlite:///<work root>/mlflow.db``: the local store next to the runs' folders."""
    return f"sqlite:///{(Path(run_dir).parent / 'mlflow.db').resolve()}"


class RunTree:
    """Finds or creates the experiment, the parent run and the stage runs (on the tracker's thread)."""

    def __init__(self, client: Any, config: PipelineConfig, *, tracking_uri: str, experiment_name: str,
                 run_key: str | None, command: str) -> None:
        self.client = client
        self.config = config
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_key = run_key
        self.command = command
        self.run_dir = config.run_dir
        self.run_ids: dict[str, str] = {}
        self.experiment_id: str | None = None

    # ------------------------------------------------------------------------------------------

    def resolve(self, run: str) -> str:
        """The run id of ``"parent"`` or ``"stage:<name>"``, found or created once per process."""
        if run not in self.run_ids:
            self.run_ids[run] = self._find_or_create_parent() if run == PARENT else self._find_or_create_stage(run)
        return self.run_ids[run]

    def experiment(self) -> str:
        if self.experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                self.experiment_id = experiment.experiment_id
            else:
                artifact_location = None
                if self.tracking_uri.startswith("sqlite:"):
                    # A local store keeps artifacts next to it; a server decides (proxied or its default root).
                    artifact_location = (Path(self.tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
                self.experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=artifact_location)
        return self.experiment_id

    def existing_parent(self) -> str | None:
        """The parent this process would log into, if it exists already (never creates one)."""
        if PARENT in self.run_ids:
            return self.run_ids[PARENT]
        explicit = os.environ.get("MLFLOW_RUN_ID")
        if explicit:
            return explicit
        experiment_id = self.experiment()
        if self.run_key:
            return self._oldest_run(
                experiment_id, f"tags.`pipeline.run_key` = '{self.run_key}' and tags.`pipeline.kind` = 'pipeline'"
            )
        id_file = self.run_dir / RUN_ID_FILE
        if not id_file.exists():
            return None
        run_id = id_file.read_text().strip()
        try:
            run = self.client.get_run(run_id)
        except Exception:
            run = None
        if run is None or run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
            log.warning("MLflow run %s from %s not found in %s; starting a new run", run_id, id_file, self.tracking_uri)
            return None
        return run_id

    def stage_runs(self, parent_id: str, stage: str) -> list[Any]:
        """The runs of ``stage`` under ``parent_id``, oldest first."""
        experiment_id = self.client.get_run(parent_id).info.experiment_id
        return self.client.search_runs(
            [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`pipeline.stage` = '{stage}'",
            order_by=["attributes.start_time ASC"],
        )

    def has_stage_run(self, stage: str) -> bool:
        """Whether the parent exists and already has a run of ``stage`` (a stage with nothing to do then
        logs nothing)."""
        parent = self.existing_parent()
        return parent is not None and bool(self.stage_runs(parent, stage))

    def start_new_parent_if_trained(self, stage: str) -> None:
        """A training from step 0 under a parent that already holds a finished ``stage`` run is a new
        pipeline run (its checkpoints were removed): the next call creates a new parent."""
        if self.run_key or os.environ.get("MLFLOW_RUN_ID"):
            return  # the parent is named from outside
        parent = self.existing_parent()
        if parent is None or not any(r.info.status == "FINISHED" for r in self.stage_runs(parent, stage)):
            return
        log.info("training starts again from step 0: a new MLflow pipeline run instead of continuing %s", parent)
        self.run_ids.clear()
        (self.run_dir / RUN_ID_FILE).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------

    def _oldest_run(self, experiment_id: str, filter_string: str) -> str | None:
        """The id of the first-created run matching ``filter_string`` (stable if a race made two)."""
        found = self.client.search_runs(
            [experiment_id], filter_string=filter_string, order_by=["attributes.start_time ASC"], max_results=1
        )
        return found[0].info.run_id if found else None

    def _find_or_create_parent(self) -> str:
        explicit = os.environ.get("MLFLOW_RUN_ID")
        if explicit:
            self.client.get_run(explicit)  # RESOURCE_DOES_NOT_EXIST -> dropped with a clear warning
            return explicit
        found = self.existing_parent()
        if found:
            return found
        tags = {"pipeline.kind": "pipeline", "mlflow.runName": self.config.name, **self.common_tags()}
        if self.run_key:
            tags["pipeline.run_key"] = self.run_key
        sweep_key = self.config.tracking.sweep_key
        if sweep_key:
            # A point of a sweep (a trial of a study): nested under the sweep's run, found by its key.
            study = self.config.tune.study  # a trial of an Optuna study (`python -m pipeline tune`)
            sweep_id = find_or_create_sweep_run(
                self.client, self.experiment(), sweep_key,
                name=(study_run_name if study else sweep_run_name)(self.experiment_name, sweep_key),
                tags={**self.common_tags(), **({STUDY_TAG: study} if study else {})})
            tags |= {"mlflow.parentRunId": sweep_id, "pipeline.sweep_key": sweep_key}
        run = self.client.create_run(self.experiment(), run_name=self.config.name, tags=tags)
        if not self.run_key:
            (self.run_dir / RUN_ID_FILE).write_text(run.info.run_id)
        log.info("MLflow parent run %s in experiment %r at %s", run.info.run_id, self.experiment_name, self.tracking_uri)
        return run.info.run_id

    def _find_or_create_stage(self, run: str) -> str:
        stage = run.split(":", 1)[1]
        parent_id = self.resolve(PARENT)
        client = self.client
        experiment_id = client.get_run(parent_id).info.experiment_id
        runs = self.stage_runs(parent_id, stage)
        tags = {"pipeline.kind": "stage", "pipeline.stage": stage, "mlflow.parentRunId": parent_id, **self.common_tags()}
        if runs and runs[-1].info.status != "FINISHED":
            return runs[-1].info.run_id  # a crashed or preempted attempt: continue its curves
        name = stage
        if runs:
            # The stage finished before and has work again: a new run, visibly a continuation.
            previous = runs[-1]
            name = f"{stage} (continued)"
            tags |= {"pipeline.continues": previous.info.run_id, "pipeline.continuation": str(len(runs))}
            continuations = int(client.get_run(parent_id).data.tags.get("pipeline.continuations", "0")) + 1
            client.set_tag(parent_id, "pipeline.continuations", str(continuations))
            log.info("%s stage of MLflow run %s finished before: continuing in a new stage run", stage, parent_id)
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def common_tags(self) -> dict[str, str]:
        """Tags set when a run is created: where it came from (source, user, host, image, commit)."""
        tags = {
            "mlflow.source.type": "JOB",
            "mlflow.source.name": f"python -m pipeline {self.command}",
            "mlflow.user": _user(),
            "pipeline.config": self.config.name,
            "pipeline.image": os.environ.get("PIPELINE_IMAGE", "local"),
            "pipeline.host": socket.gethostname(),
        }
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        return tags


def sweep_run_name(experiment: str, key: str) -> str:
    """The MLflow run name of a sweep: ``sweep <experiment> <key>``."""
    return f"sweep {experiment} {key}"


def study_run_name(experiment: str, key: str) -> str:
    """The MLflow run name of an Optuna study (a sweep run tagged :data:`STUDY_TAG`): ``study <experiment> <key>``."""
    return f"study {experiment} {key}"


def find_or_create_sweep_run(client: Any, experiment_id: str, key: str, *, name: str,
                             tags: dict[str, str] | None = None) -> str:
    """The id of the sweep run tagged ``pipeline.sweep_key=<key>`` in ``experiment_id``, created if missing.

    A sweep run (``pipeline.kind=sweep``) is the parent of the pipeline runs of one sweep or study; its
    points may start in any order and on any machine (Kubernetes pods), so each looks it up by key. Two
    that create it at once both settle on the oldest, and the younger duplicate is deleted.
    """
    where = f"tags.`pipeline.sweep_key` = '{key}' and tags.`pipeline.kind` = 'sweep'"
    found = client.search_runs([experiment_id], filter_string=where, order_by=["attributes.start_time ASC"],
                               max_results=1)
    if found:
        return found[0].info.run_id
    created = client.create_run(experiment_id, run_name=name, tags={
        **(tags or {}), "pipeline.kind": "sweep", "pipeline.sweep_key": key, "mlflow.runName": name}).info.run_id
    oldest = client.search_runs([experiment_id], filter_string=where, order_by=["attributes.start_time ASC"],
                                max_results=1)[0].info.run_id
    if oldest != created:
        client.delete_run(created)  # lost a race: an empty duplicate, never holding anyone's results
    return oldest


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry for the uid (containers)
        return str(os.getuid())
