"""Finding pipeline runs in MLflow: an experiment's parent runs, given run ids and unique id prefixes.

The layout read is the tracker's (:mod:`pipeline.tracking`): one *parent* run per pipeline run (no
``mlflow.parentRunId``, tag ``pipeline.kind=pipeline``) and one nested *stage* run per stage (tags
``pipeline.kind=stage``, ``pipeline.stage``, ``mlflow.parentRunId``). What cannot be found raises a
:class:`ComparisonError` whose message says how to fix it.

``mlflow`` is imported only inside the functions that talk to the store.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = [
    "KIND_TAG",
    "PARENT_TAG",
    "PIPELINE_KIND",
    "SWEEP_KIND",
    "STAGE_TAG",
    "ComparisonError",
    "NoRunsError",
    "UnknownExperimentError",
    "UnknownRunError",
    "find_pipeline_runs",
    "resolve_run_id",
    "search_active_runs",
]

PARENT_TAG = "mlflow.parentRunId"
"""The tag MLflow sets on a nested (stage) run: its parent's run id."""
KIND_TAG = "pipeline.kind"
"""``pipeline`` on a parent run, ``stage`` on a stage run."""
STAGE_TAG = "pipeline.stage"
"""The stage of a stage run: ``prepare``, ``train`` or ``evaluate``."""
PIPELINE_KIND = "pipeline"
"""``pipeline.kind`` of a pipeline run (top level or nested under a sweep run)."""
SWEEP_KIND = "sweep"
"""``pipeline.kind`` of a sweep (or study) run, whose nested runs are pipeline runs."""


class ComparisonError(LookupError, ValueError):
    """Nothing to compare; the message names the problem and the fix (the CLI prints it, exit code 2)."""


class UnknownExperimentError(ComparisonError):
    """No (active) MLflow experiment has the given name."""


class UnknownRunError(ComparisonError):
    """A given run id is not in the tracking store (or was deleted)."""


class NoRunsError(ComparisonError):
    """The experiment holds no pipeline runs, or no experiment / run ids were given."""


def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def search_active_runs(
    client: MlflowClient, experiment_ids: list[str], filter_string: str, order_by: list[str]
) -> Iterator[Run]:
    """Every active run of ``experiment_ids`` matching ``filter_string``, in ``order_by`` order, page by page."""
    from mlflow.entities import ViewType

    token = None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, run_view_type=ViewType.ACTIVE_ONLY, max_results=500,
            order_by=order_by, page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def _is_parent(run: Run) -> bool:
    """A pipeline run: tagged ``pipeline.kind=pipeline`` (top level, or nested under a sweep / study run),
    or an untagged top-level run of an older store."""
    tags = run.data.tags
    kind = tags.get(KIND_TAG)
    return kind == PIPELINE_KIND or (kind is None and PARENT_TAG not in tags)


def _is_stage(run: Run) -> bool:
    tags = run.data.tags
    return tags.get(KIND_TAG) == "stage" or (KIND_TAG not in tags and PARENT_TAG in tags)


def _experiment_names(client: MlflowClient) -> list[str]:
    try:
        return sorted(e.name for e in client.search_experiments())
    except Exception:  # only used to word an error message
        return []


def _unknown_experiment(client: MlflowClient, name: str, deleted: bool = False) -> UnknownExperimentError:
    names = _experiment_names(client)
    known = f"experiments in this store: {', '.join(names)}" if names else "this store has no experiments"
    why = "is deleted (restore it with `mlflow experiments restore`)" if deleted else "does not exist"
    return UnknownExperimentError(
        f"experiment {name!r} {why} in the tracking store ({client.tracking_uri}); {known}. "
        "Pass one of them with --experiment, or point --tracking-uri / MLFLOW_TRACKING_URI at the right store"
    )


def _parent_runs(client: MlflowClient, experiment: str, limit: int | None) -> list[Run]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        raise _unknown_experiment(client, experiment, deleted=exp is not None)
    runs: list[Run] = []
    for run in search_active_runs(client, [exp.experiment_id], "", ["attributes.start_time DESC"]):
        if _is_parent(run):
            runs.append(run)
            if limit is not None and len(runs) >= limit:
                break
    if not runs:
        raise NoRunsError(
            f"experiment {experiment!r} has no pipeline runs (active runs tagged {KIND_TAG}={PIPELINE_KIND}); "
            "run the pipeline first (`python -m pipeline run --config ...`) or pass --run-ids"
        )
    return runs


def _get_run(client: MlflowClient, run_id: str, *, given: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if not _not_found(err):
            raise
        what = "run" if run_id == given else f"parent run {run_id} of run"
        raise UnknownRunError(
            f"{what} {given!r} is not in the tracking store ({client.tracking_uri}); check the id "
            "(`mlflow runs list --experiment-id ...`) or point --tracking-uri / MLFLOW_TRACKING_URI at the right store"
        ) from None
    if run.info.lifecycle_stage != "active":
        raise UnknownRunError(
            f"run {run_id!r} is deleted; restore it (`mlflow runs restore --run-id {run_id}`) or leave it out"
        )
    return run


_FULL_ID = re.compile(r"[0-9a-f]{32}")
# A prefix is searched with SQL LIKE: wildcard and quote characters cannot be part of an MLflow run id
# (uuid4 hex) anyway, and would otherwise match other runs or break the filter.
_NOT_IN_ID = re.compile(r"[%_'\"\\\s]")
_MAX_LISTED = 10  # matching ids named in an ambiguity error


def _active_experiments(client: MlflowClient) -> list[Any]:
    from mlflow.entities import ViewType

    experiments: list[Any] = []
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        experiments += page
        token = page.token
        if not token:
            return experiments


def _pipeline_id(run: Run) -> str:
    """The id of the pipeline run ``run`` belongs to (its parent for a stage run, else itself)."""
    return run.data.tags[PARENT_TAG] if _is_stage(run) else run.info.run_id


def _describe(run: Run) -> str:
    """``"<id> (<run name>, stage <stage> of <parent id>)"`` for an error message."""
    tags = run.data.tags
    parts = [tags.get("mlflow.runName") or run.info.run_name or ""]
    if _is_stage(run):
        parts.append(f"stage {tags.get(STAGE_TAG, '?')} of {tags[PARENT_TAG][:8]}")
    return f"{run.info.run_id} ({', '.join(p for p in parts if p)})"


def resolve_run_id(client: MlflowClient, given: str) -> str:
    """The full run id that ``given`` names: the id itself, or the one run id it is a prefix of.

    A full 32-character id is looked up directly. Anything else is taken as a prefix (such as the
    8-character ids ``compare`` prints) and searched for in every active experiment; prefixes of
    several runs are accepted when the runs are one pipeline run and its stages (they stand for the same
    pipeline run, whose id is returned). Raises :class:`UnknownRunError` when no active run matches
    (naming the experiments searched, or the deleted runs that match) or when the runs that match belong
    to different pipeline runs (listing them).
    """
    from mlflow.entities import ViewType

    given = given.strip()
    if re.fullmatch(r"[0-9A-Fa-f]+", given):
        given = given.lower()  # MLflow writes run ids in lower-case hex; LIKE compares case-sensitively
    if _FULL_ID.fullmatch(given) or not given:
        return given  # looked up (and reported when missing) by _get_run
    experiments = _active_experiments(client)
    names = ", ".join(sorted(repr(e.name) for e in experiments)) or "none"
    not_found = UnknownRunError(
        f"run {given!r} is not in the tracking store ({client.tracking_uri}): no run id starts with it in the "
        f"experiments searched ({names}); check the id (`mlflow runs list --experiment-id ...`) or point "
        "--tracking-uri / MLFLOW_TRACKING_URI at the right store"
    )
    if _NOT_IN_ID.search(given) or not experiments:
        return _only_if_exact(client, given, not_found)
    page = client.search_runs(
        [e.experiment_id for e in experiments], f"attributes.run_id LIKE '{given}%'", run_view_type=ViewType.ALL,
        max_results=100,
    )
    matches = [run for run in page if run.info.lifecycle_stage == "active"]
    if not matches:
        deleted = [run.info.run_id for run in page]
        if deleted:
            raise UnknownRunError(
                f"run {given!r} matches only deleted runs ({', '.join(deleted[:_MAX_LISTED])}); restore one "
                "(`mlflow runs restore --run-id ID`) or leave it out"
            )
        return _only_if_exact(client, given, not_found)
    pipelines = {_pipeline_id(run) for run in matches}
    if len(pipelines) == 1 and not page.token:
        (only,) = pipelines
        return only if len(matches) > 1 else matches[0].info.run_id
    listed = [_describe(run) for run in matches[:_MAX_LISTED]]
    more = " and more" if page.token or len(matches) > _MAX_LISTED else ""
    raise UnknownRunError(
        f"run id prefix {given!r} is ambiguous: it matches {'; '.join(listed)}{more}; give more characters"
    )


def _only_if_exact(client: MlflowClient, given: str, not_found: UnknownRunError) -> str:
    """``given`` when it is itself a run id (ids outside the uuid form, runs in deleted experiments)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(given)
    except MlflowException as err:
        if not _not_found(err):
            raise
        raise not_found from None
    return given


def _given_parents(client: MlflowClient, run_ids: Sequence[str]) -> list[Run]:
    """The pipeline (parent) run of each id or unique id prefix, in order, without duplicates; a stage id
    gives its parent."""
    runs: list[Run] = []
    seen: set[str] = set()
    for given in run_ids:
        run_id = resolve_run_id(client, given)
        run = _get_run(client, run_id, given=run_id)
        if _is_stage(run):
            run = _get_run(client, run.data.tags[PARENT_TAG], given=given)
        if run.info.run_id not in seen:
            seen.add(run.info.run_id)
            runs.append(run)
    return runs


def find_pipeline_runs(
    client: MlflowClient,
    *,
    experiment: str | None = None,
    run_ids: Sequence[str] = (),
    limit: int | None = None,
) -> list[Run]:
    """The pipeline (parent) runs to compare, as MLflow runs.

    Either ``experiment`` (a name: all its pipeline runs -- active runs without
    ``mlflow.parentRunId`` or nested under a sweep run -- newest first, at most ``limit``) or ``run_ids`` (full ids or unique
    prefixes, see :func:`resolve_run_id`; in that order; the id of a stage run stands for its pipeline
    run; duplicates are dropped). Raises :class:`UnknownExperimentError`, :class:`UnknownRunError` or
    :class:`NoRunsError` (all :class:`ComparisonError`) with a message saying how to fix it; errors of
    the store itself (unreachable server) propagate as ``MlflowException``.
    """
    if experiment is not None and run_ids:
        raise ComparisonError("give either an experiment or run ids, not both")
    if experiment is not None:
        return _parent_runs(client, experiment, limit)
    if run_ids:
        return _given_parents(client, run_ids)
    names = _experiment_names(client)
    known = f" (experiments in this store: {', '.join(names)})" if names else ""
    raise NoRunsError(f"nothing to compare: give --experiment NAME{known} or --run-ids ID [ID ...]")
