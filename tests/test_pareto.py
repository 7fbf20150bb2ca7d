"""Pareto frontiers: the dominance rule against a brute-force reference, and the ``pareto`` command on a
real MLflow store (SQLite in a temp folder) laid out as the tracker logs runs, sweeps included."""

from __future__ import annotations

import argparse
import csv
import random

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.compare import compare_runs
from pipeline.compare.lookup import ComparisonError
from pipeline.pareto import (
    FrontierPoint,
    collect_points,
    frontier_mask,
    group_frontiers,
    group_name,
    pareto_frontier,
    register_commands,
)
from pipeline.tracking.runs import find_or_create_sweep_run


def _dominated(i: int, usage: list[float], nll: list[float]) -> bool:
    return any(usage[j] >= usage[i] and nll[j] <= nll[i] and (usage[j] > usage[i] or nll[j] < nll[i])
               for j in range(len(usage)))


@pytest.mark.parametrize("seed", range(5))
def test_frontier_mask_matches_the_definition_of_dominance(seed):
    rng = random.Random(seed)
    # Few distinct values: many ties in usage, in NLL and whole duplicate points.
    usage = [rng.choice([0.0, 0.5, 1.0, 1.5, 2.0]) for _ in range(40)]
    nll = [rng.choice([4.0, 4.2, 4.5, 5.0]) for _ in range(40)]
    assert frontier_mask(usage, nll) == [not _dominated(i, usage, nll) for i in range(40)]


def test_non_finite_points_are_never_on_the_frontier_and_lengths_must_match():
    assert frontier_mask([1.0, float("nan"), 2.0], [5.0, 1.0, float("inf")]) == [True, False, False]
    with pytest.raises(ValueError, match="usage has 2 values but nll has 1"):
        frontier_mask([1.0, 2.0], [1.0])


def test_frontier_is_ordered_by_usage_and_groups_are_separate():
    points = [FrontierPoint("A", 2.0, 4.6), FrontierPoint("A", 0.0, 4.5), FrontierPoint("A", 1.0, 4.7),
              FrontierPoint("B", 1.0, 4.0)]
    assert [(p.mutual_information, p.nll) for p in pareto_frontier(points[:3])] == [(0.0, 4.5), (2.0, 4.6)]
    frontiers = group_frontiers(points)
    assert list(frontiers) == ["A", "B"] and len(frontiers["B"]) == 1


def test_group_names_say_estimator_samples_and_objective():
    assert group_name({"vae.objective.estimator": "dreg", "vae.objective.samples": "16",
                       "vae.objective.kind": "kl", "vae.objective.kl_samples": "None"}) == "DReG 16 / KL"
    assert group_name({"vae.objective.estimator": "vimco", "vae.objective.samples": "16",
                       "vae.objective.kind": "renyi", "vae.objective.kl_samples": "1"}) == "VIMCO 16/1 / Rényi"


# ---------------------------------------------------------------------------------------- from MLflow


def _vae_run(client, exp_id, name, estimator, lam, finals, *, parent=None, task="vae"):
    tags = {"pipeline.kind": "pipeline"}
    if parent:
        tags |= {"mlflow.parentRunId": parent, "pipeline.sweep_key": "k1"}
    rid = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    params = {"task": task, "vae.objective.estimator": estimator, "vae.objective.samples": "16",
              "vae.objective.kind": "kl", "vae.objective.mi_weight": str(lam), "vae.model.latent": "gaussian"}
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(f"final/{k}", v, 0, 0) for k, v in finals.items()])
    stage = client.create_run(exp_id, run_name="evaluate", tags={
        "pipeline.kind": "stage", "pipeline.stage": "evaluate", "mlflow.parentRunId": rid}).info.run_id
    client.set_terminated(stage)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pareto")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("vae", artifact_location=(root / "artifacts").as_uri())
    sweep = find_or_create_sweep_run(client, exp, "k1", name="sweep vae k1")
    assert find_or_create_sweep_run(client, exp, "k1", name="sweep vae k1") == sweep  # found again, not duplicated
    ids = {
        "a": _vae_run(client, exp, "a", "dreg", 0.0, {"valid_nll": 4.50, "valid_mutual_information": 0.1}),
        "b": _vae_run(client, exp, "b", "dreg", 0.5, {"valid_nll": 4.60, "valid_mutual_information": 2.0}, parent=sweep),
        "c": _vae_run(client, exp, "c", "dreg", 0.3, {"valid_nll": 4.70, "valid_mutual_information": 1.0}, parent=sweep),
        "d": _vae_run(client, exp, "d", "vimco", 0.5, {"valid_nll": 4.55, "valid_mutual_information": 1.5}),
        "pending": _vae_run(client, exp, "pending", "dreg", 0.9, {}),
        "lm": _vae_run(client, exp, "lm", "dreg", 0.9, {"valid_nll": 1.0, "valid_mutual_information": 9.0}, task="lm"),
    }
    return root, uri, client, ids, sweep


def test_points_are_the_evaluated_vae_pipeline_runs_nested_or_not(store):
    _, _, client, ids, sweep = store
    found = collect_points(client, "vae")
    by_label = {p.label: p for p in found.points}
    assert set(by_label) == {ids["a"], ids["b"], ids["c"], ids["d"]}  # not the sweep run, stages, the LM
    assert found.unevaluated == [ids["pending"]]
    assert by_label[ids["b"]].group == "DReG 16 / KL" and by_label[ids["d"]].group == "VIMCO 16 / KL"
    assert by_label[ids["b"]].extra["lambda"] == "0.5"
    only_sweep = collect_points(client, "vae", sweep_key="k1")
    assert {p.label for p in only_sweep.points} == {ids["b"], ids["c"]}
    # compare sees nested pipeline runs as pipeline runs too (not the sweep run)
    assert sweep not in {r.run_id for r in compare_runs(client, experiment="vae").runs}


def test_pareto_command_prints_frontiers_and_writes_plot_and_csv(store, capsys):
    root, uri, _, ids, _ = store
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="stage"))
    args = parser.parse_args(["pareto", "--experiment", "vae", "--tracking-uri", uri, "--output-dir", str(root / "out")])
    assert args.handler(args) == 0
    out, err = capsys.readouterr()
    assert "DReG 16 / KL: 2 of 3 runs on the frontier" in out  # c (MI 1.0, NLL 4.70) is dominated by b
    assert "not evaluated yet" in err and ids["pending"][:8] in err
    rows = list(csv.DictReader((root / "out" / "pareto-vae-valid.csv").open()))
    on = {r["label"]: r["on_frontier"] for r in rows}
    assert on[ids["c"]] in ("False", "false", "0") and on[ids["b"]] in ("True", "true", "1")
    assert (root / "out" / "pareto-vae-valid.png").stat().st_size > 0


def test_pareto_command_names_the_problem(store, capsys, tmp_path):
    _, uri, _, _, _ = store
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="stage"))
    args = parser.parse_args(["pareto", "--experiment", "nope", "--tracking-uri", uri])
    assert args.handler(args) == 2
    assert "experiment 'nope' does not exist" in capsys.readouterr().err
    args = parser.parse_args(["pareto", "--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"])
    assert args.handler(args) == 2
    assert "no MLflow store" in capsys.readouterr().err
    with pytest.raises(ComparisonError):
        collect_points(store[2], "vae", sweep_key="other")
