"""Hyperparameter studies (`python -m pipeline tune`): the search space (pure), the study's storage, resuming
and re-queueing, the in-trial pruning hook on a real Optuna storage with real training, a real local study of
tiny PTB trials as processes nested in a real MLflow SQLite store (interrupted and resumed), Kubernetes trials
against kmock's API emulator, and a two-objective VAE study's Pareto front and plots."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import threading
import time
from pathlib import Path

import kubernetes_validate
import optuna
import pytest
import yaml
from conftest import PTB_DIR, tiny_ptb_config
from kmock_emulator import Emulator
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.config import ConfigError, load_config, validate_config
from pipeline.errors import EXIT_PRUNED, NON_RETRIABLE_EXIT_CODES
from pipeline.k8s.builders import LABEL
from pipeline.tune.driver import StudyPlan, StudyRun, run_study
from pipeline.tune.plots import neighbourhood_mask, pareto_points, write_study_plots
from pipeline.tune.space import (
    config_values,
    distributions,
    load_space,
    parse_space,
    shipped_space_names,
    validate_space,
)
from pipeline.tune.study import (
    PRUNED_ATTR,
    REQUEUED_ATTR,
    SLOT_ATTR,
    DriverLock,
    StudyError,
    StudySettings,
    build_pruner,
    load_storage,
    open_study,
    requeue_stale_trials,
    study_key,
)
from pipeline.tune.trials import KubernetesTrials, trial_config

LM = StudySettings(objectives=("valid_nll",), directions=("minimize",))
SPACE = {"params": {"train.optimizer.lr": {"type": "float", "low": 1.0e-3, "high": 2.0e-2, "log": True},
                    "model.output_dropout": {"type": "float", "low": 0.0, "high": 0.5}}}
# ptb_char_tiny cut down to seconds per trial on one core.
TINY = {"model.hidden_size": 16, "model.num_layers": 1, "model.mogrifier_rounds": 0, "train.dropout_samples": 1,
        "train.batch_size": 8, "train.bptt": 16, "train.max_steps": 4, "train.eval_every": 2,
        "train.eval_tokens": 400, "evaluate.max_tokens": 400, "evaluate.temperature.num": 3,
        "tracking.system_metrics": False, "tracking.register_model": False, "tracking.plots": False}


# ------------------------------------------------------------------------------------------------ the space


@pytest.mark.parametrize("name", shipped_space_names())
def test_every_shipped_space_validates_against_the_configs_it_is_meant_for(name):
    space = load_space(name)
    assert space.configs and space.description.startswith("Thesis Table")
    for config in space.configs:
        validate_space(space, load_config(config))


def test_space_errors_name_the_field_and_the_fix():
    base = load_config("ptb_char_tiny")
    cases = [
        ({"params": {"train.optimizer.lrr": {"type": "float", "low": 1e-3, "high": 1e-2}}}, "did you mean train.optimizer.lr"),
        ({"params": {"model.input_dropout": {"type": "float", "low": 0.0, "high": 1.5}}},
         r"model.input_dropout: high 1.5 does not make a valid ptb_char_tiny config .*must be in \[0, 1\).*narrow the range"),
        ({"params": {"model.mogrifier_rounds": {"type": "float", "low": 0, "high": 3}}}, "integer field.*use type: int"),
        ({"params": {"train.optimizer": {"type": "float", "low": 0, "high": 3}}}, "is a section, not a field"),
        ({"params": {"model.cell": {"choices": ["lstm", "transformer"]}}}, "choice 'transformer'"),
        ({"params": {"train.optimizer.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}}, "log spacing needs low > 0"),
        ({"params": {"train.optimizer.lr": {"low": 1e-3, "high": 1e-2}}}, "needs type: float or type: int"),
        ({"params": {"train.optimizer.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}}, "low 0.01 must be below high"),
        ({"prams": {}}, "unknown key.*prams"),
        ({"params": {"train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}, "objectives": ["test_nll"]},
         "must not select on the test split"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate_space(parse_space(raw, "bad.yaml"), base)
    with pytest.raises(ConfigError, match="unknown search space 'nope'.*lm_small_data"):
        load_space("nope")


def test_thesis_mogrifier_rank_is_clamped_to_our_full_rank_and_fixed_values_apply():
    space = load_space("lm_small_data")
    rank = space.param("model.mogrifier_rank")
    assert (rank.low, rank.high, rank.clamp_low) == (-20, 100, 0)
    params = {p.name: (-7 if p.name == "model.mogrifier_rank" else (p.low + p.high) / 2) for p in space.params}
    params["model.mogrifier_rounds"] = 3
    values = config_values(space, params)
    assert values["model.mogrifier_rank"] == 0 and values["model.mogrifier_rounds"] == 3
    assert config_values(space, {**params, "model.mogrifier_rank": 40})["model.mogrifier_rank"] == 40
    power = load_space("vae_power")
    assert config_values(power, {p.name: p.low for p in power.params})["vae.objective.kind"] == "power"
    dists = distributions(space)
    assert dists["train.optimizer.lr"].log and dists["model.mogrifier_rank"].low == -20


def test_the_neighbourhood_of_the_best_trial_is_within_15_percent_of_every_range():
    space = parse_space({"params": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
                                    "rounds": {"type": "int", "low": 0, "high": 10},
                                    "cell": {"choices": ["lstm", "rlstm"]}}})
    best = {"lr": 1e-2, "rounds": 5, "cell": "lstm"}
    trials = [best, {**best, "lr": 1.2e-2}, {**best, "lr": 3e-2}, {**best, "rounds": 6}, {**best, "rounds": 7},
              {**best, "cell": "rlstm"}, {"lr": 1e-2, "rounds": 5}]
    # log10(1.2)/2 = 0.04 and 0.1 of the ranges are near; log10(3)/2 = 0.24 and 0.2 are not.
    assert neighbourhood_mask(trials, best, space) == [True, True, False, True, False, False, False]
    assert neighbourhood_mask(trials, best, space, fraction=0.25) == [True, True, True, True, True, False, False]


# ------------------------------------------------------------------------------------------------ configs, study


def test_a_trial_is_a_pipeline_run_laid_out_like_a_sweep_point_with_a_tune_section():
    base = load_config("ptb_char_tiny", {"checkpoint.url": "s3://ckpt/tiny"})
    space = parse_space(SPACE)
    key = study_key(base, space, LM)
    assert key == study_key(load_config("ptb_char_tiny", {"checkpoint.url": "s3://ckpt/tiny"}), space, LM)
    assert key != study_key(base, space, StudySettings(("valid_nll",), ("minimize",), prune_on="raw"))
    config = trial_config(base, space, {"train.optimizer.lr": 0.005, "model.output_dropout": 0.2}, key=key, slot=3,
                          study="s", settings=LM, storage="sqlite:////tmp/s.db", tracking_uri="sqlite:///x.db")
    assert config.name == "ptb_char_tiny-trial3" and config.train.optimizer.lr == 0.005
    assert config.run_dir == base.run_dir / f"tune-{key}" / "trial-3"
    assert config.checkpoint_url == f"s3://ckpt/tiny/tune-{key}/trial-3"
    assert (config.tracking.sweep_key, config.tracking.run_key, config.tracking.uri) == (key, f"{key}-3", "sqlite:///x.db")
    assert config.cluster.run_name.endswith(f"-{key[:6]}-t3")
    assert (config.tune.storage, config.tune.study, config.tune.trial, config.tune.pruner) == (
        "sqlite:////tmp/s.db", "s", 3, "median")
    with pytest.raises(ConfigError, match=r"trial 3 \(.*model.output_dropout=1.5"):
        trial_config(base, space, {"train.optimizer.lr": 0.005, "model.output_dropout": 1.5}, key=key, slot=3,
                     study="s", settings=LM, storage=None)
    raw = base.model_dump(mode="json")
    raw["tune"] = {"storage": "sqlite:///x.db"}
    with pytest.raises(ConfigError, match="tune.study or tune.trial is not"):
        validate_config(raw)
    raw["tune"] = {"storage": "postgresql://me:secret@db/optuna", "study": "s", "trial": 0}
    with pytest.raises(ConfigError, match="holds a password"):
        validate_config(raw)


def test_study_storage_errors_directions_stale_trials_and_the_driver_lock(tmp_path):
    url = f"sqlite:///{tmp_path}/study.db"
    study = open_study("s", url, LM)
    with pytest.raises(StudyError, match="optimises minimize but this command asks for maximize.*--study NAME"):
        open_study("s", url, StudySettings(("valid_mutual_information",), ("maximize",)))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StudyError, match="cannot open the Optuna storage"):
        load_storage(f"sqlite:///{blocker}/sub/study.db")
    with pytest.raises(StudyError, match="not installed|cannot open the Optuna storage"):
        load_storage("postgresql://optuna@127.0.0.1:1/optuna")
    dists = distributions(parse_space(SPACE))
    done = study.ask(dists)
    study.tell(done, 3.0)
    stale = study.ask(dists)
    stale.set_user_attr(SLOT_ATTR, stale.number)
    assert requeue_stale_trials(study) == [(1, 1)]
    again = study.ask(dists)  # the re-queued one, same parameters and slot
    assert again.params == stale.params and again.user_attrs[SLOT_ATTR] == 1 and again.user_attrs[REQUEUED_ATTR] == 1
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "RUNNING"]
    with DriverLock(tmp_path) as lock:
        with pytest.raises(StudyError, match=f"another tune driver \\(pid {os.getpid()}"):
            DriverLock(tmp_path).acquire()
        assert lock.path.exists()
    (tmp_path / "driver.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    DriverLock(tmp_path).acquire().release()  # a dead driver's lock is taken over
    # Its own code, and one a Job never retries: running a pruned trial again cannot change the study's decision.
    assert EXIT_PRUNED not in (0, 1, 2, 3, 4, 5, 6, 7) and EXIT_PRUNED in NON_RETRIABLE_EXIT_CODES


# ------------------------------------------------------------------------------------------------ pruning hook


def test_a_trial_reports_to_its_study_and_is_pruned_by_the_real_pruner_then_stops_cleanly(tmp_path, ptb_char_dir):
    """Real training in this process; a median pruner (1 startup trial) that has seen a much better trial."""
    url = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="s", storage=load_storage(url), pruner=build_pruner("median", startup_trials=1))
    dists = distributions(parse_space(SPACE))
    study.add_trial(optuna.trial.create_trial(params={"train.optimizer.lr": 0.01, "model.output_dropout": 0.1},
                                              distributions=dists, value=0.5, intermediate_values={2: 0.5, 4: 0.5}))
    trials = {}
    for slot in (1, 2):
        trials[slot] = study.ask(dists)
        trials[slot].set_user_attr(SLOT_ATTR, slot)

    def run(slot: int, *extra: str, command: str = "run") -> tuple[int, Path]:
        config = tiny_ptb_config(tmp_path / f"trial-{slot}", ptb_char_dir)
        config["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "hook"}
        for dotted, value in TINY.items():
            section, _, leaf = dotted.rpartition(".")
            node = config
            for part in section.split("."):
                node = node.setdefault(part, {})
            node[leaf] = value
        config["tune"] = {"storage": url, "study": "s", "trial": slot, "pruner": "median", "startup_trials": 1}
        path = tmp_path / f"trial-{slot}.yaml"
        path.write_text(yaml.safe_dump(config))
        return cli.main([command, "--config", str(path), *extra]), tmp_path / f"trial-{slot}"

    code, work = run(1)
    assert code == EXIT_PRUNED
    frozen = study.trials[trials[1].number]
    assert frozen.user_attrs[PRUNED_ATTR] == 2 and set(frozen.intermediate_values) == {2}
    assert frozen.intermediate_values[2] > 0.5 and frozen.state.name == "RUNNING"  # the driver tells it
    committed = sorted(p.parent.name for p in (work / "checkpoints").glob("step-*/COMMITTED"))
    assert committed == ["step-00000000", "step-00000002"]  # the pruned step's checkpoint is kept
    assert not (work / "final_model.pt").exists() and not (work / "eval_results.json").exists()  # evaluate skipped
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("hook").experiment_id])
    (train,) = [r for r in runs if r.data.tags.get("pipeline.stage") == "train"]
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.kind") == "pipeline"]
    assert train.info.status == "KILLED" and train.data.tags["tune.pruned"] == "true"
    assert parent.data.tags["tune.pruned_at_step"] == "2"
    assert not [r for r in runs if r.data.tags.get("pipeline.stage") == "evaluate"]

    # Once the study has told it PRUNED, a re-created train (a Kubernetes pod) stops before training.
    study.tell(trials[1].number, state=optuna.trial.TrialState.PRUNED)
    assert run(1, command="train")[0] == EXIT_PRUNED
    assert sorted(p.parent.name for p in (work / "checkpoints").glob("step-*/COMMITTED")) == committed

    # prune_on raw without 2TA's raw fallback: the raw weights are evaluated for the report.
    code, work = run(2, "--tune.prune_on", "raw", "--train.averaging.raw_fallback", "false")
    assert code == EXIT_PRUNED
    evals = [json.loads(line)["eval"] for line in (work / "train_log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[0]["raw_loss"] is None
    assert math.isfinite(study.trials[trials[2].number].intermediate_values[2])


# ------------------------------------------------------------------------------------------------ a real study


@pytest.fixture(scope="module")
def local_study(tmp_path_factory, ptb_char_dir):
    """`tune --trials 1`, then a driver killed with a trial RUNNING, then `tune --trials 3` (twice)."""
    root = tmp_path_factory.mktemp("tune")
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    argv = ["tune", "--config", "ptb_char_tiny", "--space", str(space), "--log-level", "WARNING",
            "--work_dir", str(root / "runs" / "ptb_char_tiny"), "--data.dir", str(ptb_char_dir),
            "--data.source", str(PTB_DIR)]
    for dotted, value in TINY.items():
        argv += [f"--{dotted}", json.dumps(value)]
    outputs = []
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
            mp.delenv(name)
        mp.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.chdir(root)

        def tune(trials: int, parallel: int = 1) -> int:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = cli.main([*argv, "--trials", str(trials), "--parallel", str(parallel)])
            outputs.append(out.getvalue())
            return code

        assert tune(1) == 0, outputs[-1]
        (study_dir,) = (root / "runs" / "ptb_char_tiny").glob("tune-*")
        url = f"sqlite:///{study_dir}/study.db"
        (name,) = optuna.get_all_study_names(url)
        killed = optuna.load_study(study_name=name, storage=url).ask(distributions(parse_space(SPACE)))
        killed.set_user_attr(SLOT_ATTR, killed.number)  # what a driver killed mid-trial leaves behind
        assert tune(3, parallel=2) == 0, outputs[-1]
        runs_before = len(MlflowClient(f"sqlite:///{root}/runs/mlflow.db").search_runs(
            [MlflowClient(f"sqlite:///{root}/runs/mlflow.db").get_experiment_by_name("ptb_char_tiny").experiment_id]))
        assert tune(3) == 0, outputs[-1]
    return {"root": root, "dir": study_dir, "url": url, "name": name, "outputs": outputs, "runs_before": runs_before}


def test_an_interrupted_study_resumes_with_the_remaining_trials_and_requeues_the_stale_one(local_study):
    study = optuna.load_study(study_name=local_study["name"], storage=local_study["url"])
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].params == trials[1].params and trials[2].user_attrs[SLOT_ATTR] == 1
    assert [t.user_attrs[SLOT_ATTR] for t in trials] == [0, 1, 1, 3]
    for trial in (trials[0], trials[2], trials[3]):
        assert set(trial.intermediate_values) == {2, 4}  # every evaluation's 2TA loss, reported by the training
        assert trial.value == pytest.approx(trial.user_attrs["rlm.metrics"]["valid_nll"])
    first, second, third = local_study["outputs"]
    assert "0 of 1 trials finished" in first and "trial 0 (slot 0): valid_nll" in first
    assert "trial 1 was left running by a driver that stopped: failed, re-queued in slot 1" in second
    assert "1 of 3 trials finished; running 2 more, 2 at a time" in second
    assert "nothing to do: the study has 3 finished trials" in third
    assert f"best: trial {study.best_trial.number}" in second
    rows = list(csv.DictReader((local_study["dir"] / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert {p.name for p in (local_study["dir"] / "plots").iterdir()} == {
        "optimization_history.png", "param_importances.png", "sensitivity.png"}


def test_the_trials_are_pipeline_runs_nested_under_one_mlflow_study_run(local_study):
    client = MlflowClient(f"sqlite:///{local_study['root']}/runs/mlflow.db")
    experiment = client.get_experiment_by_name("ptb_char_tiny").experiment_id
    runs = client.search_runs([experiment])
    assert len(runs) == local_study["runs_before"]  # the third command added nothing
    (sweep,) = [r for r in runs if r.data.tags.get("pipeline.kind") == "sweep"]
    key = local_study["dir"].name[len("tune-"):]
    assert sweep.data.tags["pipeline.study"] == local_study["name"] and sweep.data.tags["pipeline.sweep_key"] == key
    assert sweep.info.run_name == f"study ptb_char_tiny {key}" and sweep.info.status == "FINISHED"
    assert sweep.data.params["tune.space.train.optimizer.lr"] == "float [0.001, 0.02] log"
    assert sweep.data.metrics["tune/trials_complete"] == 3
    assert {a.path for a in client.list_artifacts(sweep.info.run_id, "plots")} == {
        "plots/optimization_history.png", "plots/param_importances.png", "plots/sensitivity.png"}
    assert {a.path for a in client.list_artifacts(sweep.info.run_id, "tune")} == {"tune/trials.csv"}
    trials = [r for r in runs if r.data.tags.get("pipeline.kind") == "pipeline"]
    assert sorted(r.info.run_name for r in trials) == [f"ptb_char_tiny-trial{s}" for s in (0, 1, 3)]
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == sweep.info.run_id and run.data.tags["tune.state"] == "COMPLETE"
        assert run.info.status == "FINISHED" and "final/valid_nll" in run.data.metrics
        assert run.data.params["tune.study"] == local_study["name"]
    assert sorted(r.data.tags["tune.trial"] for r in trials) == ["0", "2", "3"]


# ------------------------------------------------------------------------------------------------ Kubernetes


def test_kubernetes_trials_are_driver_jobs_watched_through_the_api_and_told_from_mlflow(tmp_path):
    """The trials' pods are simulated: a thread plays the Job controller and the pipeline (MLflow run, pruning)."""
    base = load_config("ptb_char_tiny", {"cluster.train.gpus": 0})
    space = parse_space(SPACE)
    key = study_key(base, space, LM)
    plan = StudyPlan(base=base, space=space, settings=LM, key=key, study_name="tiny-k8s", directory=tmp_path,
                     trial_storage="postgresql://optuna@optuna.rlm-pipeline.svc/optuna")
    study = open_study("tiny-k8s", f"sqlite:///{tmp_path}/study.db", LM, parallel=2)
    mlflow_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("ptb_char_tiny")
    emulator = Emulator()
    try:
        api = emulator.api_client("tune-test")
        executor = KubernetesTrials(api, study_name="tiny-k8s", key=key, tracking_uri=mlflow_uri,
                                    experiment="ptb_char_tiny", parallel=2)
        from kubernetes import client as k8s

        pod_api = emulator.api_client("fake-pods")  # its own connections, as test_k8s_driver's controller
        batch, core = k8s.BatchV1Api(pod_api), k8s.CoreV1Api(pod_api)
        namespace = base.cluster.namespace
        seen, deleted, stop = set(), [], threading.Event()

        def pods() -> None:
            while not stop.is_set():
                for job in batch.list_namespaced_job(namespace).items:
                    name = job.metadata.name
                    if name in seen:
                        continue
                    seen.add(name)
                    cm = core.read_namespaced_config_map(f"{name}-config", namespace)
                    config = validate_config(yaml.safe_load(cm.data["config.yaml"]))
                    slot = config.tune.trial
                    if slot == 1:  # its training reports a bad loss and is pruned: the Job keeps running
                        running = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                                   if t.user_attrs.get(SLOT_ATTR) == 1]
                        study._storage.set_trial_user_attr(running[0]._trial_id, PRUNED_ATTR, 40)
                        deleted.append(name)
                        continue
                    run = client.create_run(experiment, run_name=config.name, tags={
                        "pipeline.kind": "pipeline", "pipeline.run_key": config.tracking.run_key})
                    client.log_metric(run.info.run_id, "final/valid_nll", 1.0 + config.train.optimizer.lr)
                    batch.patch_namespaced_job_status(name, namespace, {"status": {
                        "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
                time.sleep(0.02)

        controller = threading.Thread(target=pods, daemon=True)
        controller.start()
        outcome = run_study(study, plan, executor, 3, poll_seconds=0.05, say=lambda text: None,
                            mlflow=StudyRun(None, None, experiment="ptb_char_tiny", key=key, study_name="tiny-k8s"))
        stop.set()
        controller.join(5)
        assert (outcome.complete, outcome.pruned, outcome.failed) == (2, 1, 0)
        states = {t.user_attrs[SLOT_ATTR]: t for t in study.trials}
        assert states[1].state.name == "PRUNED"
        for slot in (0, 2):
            assert states[slot].value == pytest.approx(1.0 + states[slot].params["train.optimizer.lr"])
        jobs = {j.metadata.name for j in batch.list_namespaced_job(namespace).items}
        assert deleted and deleted[0] not in jobs and len(jobs) == 2  # the pruned trial's Job was deleted
        config = plan.config(0, states[0].params)
        objects = executor.objects(config)
        assert [o["kind"] for o in objects] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"]
        for obj in objects:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
            assert obj["metadata"]["labels"][f"{LABEL}/sweep"] == key
        assert yaml.safe_load(objects[3]["data"]["config.yaml"])["tune"]["storage"].startswith("postgresql://")
    finally:
        emulator.close()


def test_tune_manifest_and_dry_run_and_errors_on_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "study.yaml"
    assert cli.main(["tune", "--config", "ptb_vae", "--space", "vae_kl_renyi", "--trials", "4", "--parallel", "2",
                     "--on", "kubernetes", "--manifest", str(manifest), "--cluster.train.gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "maximize valid_mutual_information" in out and "Optuna cannot prune a multi-objective study" in out
    assert "cannot reach the SQLite storage" not in out  # a two-objective study reports nothing anyway
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding"] + ["ConfigMap", "Job"] * 2
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    assert not list(tmp_path.glob("runs/**/study.db"))  # a preview touches no storage
    assert cli.main(["tune", "--config", "ptb_char_tiny", "--space", "lm_small_data", "--trials", "2", "--dry-run",
                     "--on", "kubernetes", "--cluster.train.gpus", "0"]) == 0
    assert "the trials' pods cannot reach the SQLite storage" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  train.optimizer.lrr: {type: float, low: 0.001, high: 0.01}\n")
    assert cli.main(["tune", "--config", "ptb_char_tiny", "--space", str(bad), "--trials", "2"]) == 2
    assert "train.optimizer.lrr is not a config field; did you mean train.optimizer.lr?" in capsys.readouterr().err
    assert cli.main(["tune", "--config", "ptb_char_tiny", "--space", "lm_small_data", "--trials", "2",
                     "--objective", "valid_mutual_information", "test_nll"]) == 2
    assert "must not select on the test split" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ VAE studies


def test_a_two_objective_vae_study_feeds_its_pareto_front_into_the_pareto_plot(tmp_path):
    from pipeline.pareto.command import write_pareto

    base = load_config("synthetic_vae_tiny")
    space = load_space("vae_synthetic")
    settings = StudySettings(("valid_nll", "valid_mutual_information"), ("minimize", "maximize"))
    plan = StudyPlan(base=base, space=space, settings=settings, key="k", study_name="vae", directory=tmp_path,
                     trial_storage=None)
    study = open_study("vae", f"sqlite:///{tmp_path}/study.db", settings)
    dists = distributions(space)
    outcomes = [(0.003, 0.1, 8.0, 0.5), (0.001, 0.5, 8.2, 1.5), (0.002, 0.9, 8.1, 0.4), (0.005, 0.3, 8.5, 1.4)]
    for slot, (lr, lam, nll, mi) in enumerate(outcomes):
        study.add_trial(optuna.trial.create_trial(
            params={"train.optimizer.lr": lr, "vae.objective.mi_weight": lam}, distributions=dists,
            values=[nll, mi], user_attrs={SLOT_ATTR: slot}))
    front = sorted(t.number for t in study.best_trials)
    assert front == [0, 1]
    points = pareto_points(study, plan)
    assert {p.group for p in points} == {"VIMCO 4 / KL"} and len(points) == 4
    png, table = write_pareto(points, tmp_path, "pareto-valid", title="study")
    rows = list(csv.DictReader(table.open()))
    assert {r["label"] for r in rows if r["on_frontier"] == "True"} == {f"synthetic_vae_tiny-trial{n}" for n in front}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths, notes = write_study_plots(study, space, settings.objectives, tmp_path / "plots")
    assert [p.name for p in paths] == ["optimization_history.png", "param_importances.png", "sensitivity.png"]
    assert notes == []
    lone = open_study("lone", f"sqlite:///{tmp_path}/study.db", LM)
    lone.add_trial(optuna.trial.create_trial(params={"train.optimizer.lr": 0.003, "vae.objective.mi_weight": 0.1},
                                             distributions=dists, value=8.0))
    paths, notes = write_study_plots(lone, space, ("valid_nll",), tmp_path / "lone")
    assert len(paths) == 2 and "need at least 2 complete trials (1 so far)" in notes[0]
