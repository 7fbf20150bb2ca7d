"""pipeline.compare on a real MLflow store (SQLite in a temp folder) laid out as the tracker logs runs."""

from __future__ import annotations

import argparse
import math
import re
import shutil
from pathlib import Path
from dataclasses import dataclass

import matplotlib.image
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.compare import (
    DEFAULT_TRACKING_URI,
    Comparison,
    ComparisonError,
    NoRunsError,
    UnknownExperimentError,
    UnknownRunError,
    DEFAULT_WORK_ROOT,
    compare_runs,
    default_output,
    register_commands,
    resolve_run_id,
    resolve_tracking_uri,
    work_root,
)

LN2 = math.log(2)
T0 = 1_700_000_000_000  # ms


@dataclass
class Store:
    uri: str
    client: MlflowClient
    a: str  # parent run ids, oldest first
    b: str
    c: str
    a_train: str
    b_train: str
    b_eval: str
    deleted: str


SHARED = {"model.cell": "rlstm", "data.dataset": "ptb_char", "train.bptt": "64", "model.chrono_t_max": "null"}


def _parent(client, exp_id, name, start, params, finals=None, status="FINISHED"):
    run = client.create_run(exp_id, start_time=start, run_name=name,
                            tags={"pipeline.kind": "pipeline", "pipeline.run_key": f"key-{name}-{start}"})
    rid = run.info.run_id
    metrics = [Metric(f"final/{k}", v, start, 0) for k, v in (finals or {}).items()]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(rid, status=status, end_time=start + 1000)
    return rid


def _stage(client, exp_id, parent, stage, start, params, metrics=(), status="FINISHED"):
    run = client.create_run(exp_id, start_time=start, run_name=stage, tags={
        "pipeline.kind": "stage", "pipeline.stage": stage, "mlflow.parentRunId": parent})
    rid = run.info.run_id
    client.log_batch(rid, metrics=[Metric(k, v, start + i, step) for i, (k, v, step) in enumerate(metrics)],
                     params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(rid, status=status, end_time=start + 500)
    return rid


def _char_history(losses):
    out = []
    for step, loss in losses:
        out += [("valid/reported_loss", loss, step), ("valid/reported_bpc", loss / LN2, step),
                ("valid/raw_loss", loss + 0.01, step), ("valid/raw_bpc", (loss + 0.01) / LN2, step),
                ("averaging/long_length", step / 2, step), ("averaging/short_length", step / 4, step)]
    out += [("train/loss", 2.0, 10), ("lr", 0.002, 10)]
    return out


def _finals(valid_nll, test_nll, t=0.95):
    return {
        "temperature": t, "valid_nll": valid_nll, "test_nll": test_nll,
        "valid_nll_tuned_temperature": valid_nll - 0.01, "test_nll_tuned_temperature": test_nll - 0.01,
        "valid_bpc": valid_nll / LN2, "test_bpc": test_nll / LN2,
        "valid_bpc_tuned_temperature": (valid_nll - 0.01) / LN2, "test_bpc_tuned_temperature": (test_nll - 0.01) / LN2,
    }


@pytest.fixture(scope="module")
def blank_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite store to copy (creating one takes seconds, copying it does not)."""
    db = tmp_path_factory.mktemp("blank") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def _fresh_client(blank_db: Path, root: Path) -> MlflowClient:
    shutil.copyfile(blank_db, root / "mlflow.db")
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


@pytest.fixture(scope="module")
def store(tmp_path_factory, blank_db) -> Store:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = _fresh_client(blank_db, root)
    exp = client.create_experiment("ptb", artifact_location=(root / "artifacts").as_uri())
    client.create_experiment("empty", artifact_location=(root / "artifacts-empty").as_uri())

    # a: finished, lr 0.002, finals on the parent (and on the evaluate child).
    pa = {**SHARED, "train.optimizer.lr": "0.002", "train.seed": "0"}
    fa = _finals(1.00, 0.98)
    a = _parent(client, exp, "ptb_char_tiny", T0, pa, fa)
    _stage(client, exp, a, "prepare", T0 + 1, pa)
    a_train = _stage(client, exp, a, "train", T0 + 2, pa, _char_history([(100, 1.3), (200, 1.1), (300, 1.0)]))
    _stage(client, exp, a, "evaluate", T0 + 3, pa, [(f"final/{k}", v, 0) for k, v in fa.items()])

    # b: lr 0.003 and an extra param; finals only on the evaluate child; the train stage was resumed in a
    # second train run (step 200 re-evaluated), and only valid/reported_loss was logged (no *_bpc).
    pb = {**SHARED, "train.optimizer.lr": "0.003", "train.seed": "0", "train.grad_accum_steps": "2"}
    fb = _finals(0.90, 0.88, t=1.05)
    b = _parent(client, exp, "ptb_char_tiny", T0 + 10_000, pb)
    b_train = _stage(client, exp, b, "train", T0 + 10_001, pb,
                     [("valid/reported_loss", 1.2, 100), ("valid/reported_loss", 1.5, 200)], status="FAILED")
    _stage(client, exp, b, "train", T0 + 10_002, pb, [("valid/reported_loss", 1.0, 200), ("valid/reported_loss", 0.9, 300)])
    b_eval = _stage(client, exp, b, "evaluate", T0 + 10_003, pb, [(f"final/{k}", v, 0) for k, v in fb.items()])

    # c: newest, still running: no finals, no curve yet.
    pc = {**SHARED, "train.optimizer.lr": "0.002", "train.seed": "1"}
    c = _parent(client, exp, "ptb_char_tiny_seed1", T0 + 20_000, pc, status="RUNNING")
    _stage(client, exp, c, "prepare", T0 + 20_001, pc, status="RUNNING")

    # a deleted pipeline run: never listed.
    deleted = _parent(client, exp, "deleted", T0 + 30_000, {**SHARED, "train.optimizer.lr": "9"}, _finals(5, 5))
    client.delete_run(deleted)
    return Store(uri, client, a, b, c, a_train, b_train, b_eval, deleted)


def same_curve(actual, expected) -> bool:
    return [s for s, _ in actual] == [s for s, _ in expected] and [v for _, v in actual] == pytest.approx(
        [v for _, v in expected])


def _ids(comparison: Comparison) -> list[str]:
    return [run.run_id for run in comparison.runs]


# ---------------------------------------------------------------------------------------- compare_runs


def test_experiment_runs_newest_first_without_children_or_deleted(store):
    comparison = compare_runs(store.client, experiment="ptb")
    assert _ids(comparison) == [store.c, store.b, store.a]
    assert comparison.experiment == "ptb"
    assert _ids(compare_runs(store.client, experiment="ptb", limit=2)) == [store.c, store.b]


def test_run_summaries(store):
    c, b, a = compare_runs(store.client, experiment="ptb").runs
    assert (a.name, a.status, a.unit, a.short_id) == ("ptb_char_tiny", "FINISHED", "char", store.a[:8])
    assert a.label == f"ptb_char_tiny ({store.a[:8]})"
    assert a.params["train.optimizer.lr"] == "0.002" and a.params["model.chrono_t_max"] == "null"
    assert a.final_metrics == pytest.approx(_finals(1.00, 0.98))
    assert a.curve_metric == "valid/reported_bpc"
    assert same_curve(a.curve, [(100, 1.3 / LN2), (200, 1.1 / LN2), (300, 1.0 / LN2)])
    assert a.train_run_ids == (store.a_train,)

    # finals from the evaluate child; curve merged over both train runs (the resumed one wins at step 200)
    # and converted to bpc from valid/reported_loss
    assert b.final_metrics == pytest.approx(_finals(0.90, 0.88, t=1.05))
    assert b.evaluate_run_id == store.b_eval
    assert b.unit == "char" and b.curve_metric == "valid/reported_loss"
    assert same_curve(b.curve, [(100, 1.2 / LN2), (200, 1.0 / LN2), (300, 0.9 / LN2)])
    assert b.train_run_ids[0] == store.b_train and len(b.train_run_ids) == 2

    assert c.status == "RUNNING" and c.final_metrics == {} and c.curve == [] and c.curve_metric is None
    assert c.unit == "char"  # from data.dataset


def test_differing_params(store):
    comparison = compare_runs(store.client, experiment="ptb")  # c, b, a
    assert comparison.differing_params() == {
        "train.grad_accum_steps": [None, "2", None],
        "train.optimizer.lr": ["0.002", "0.003", "0.002"],
        "train.seed": ["1", "0", "0"],
    }
    assert compare_runs(store.client, run_ids=[store.a]).differing_params() == {}


def test_format_table(store):
    comparison = compare_runs(store.client, run_ids=[store.a, store.b])
    table = comparison.format_table()
    lines = table.splitlines()
    header = lines[0].split()
    assert header == ["run", "ptb_char_tiny", f"({store.a[:8]})", "ptb_char_tiny", f"({store.b[:8]})"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line and not line.startswith("-")}
    assert rows["train.optimizer.lr"] == ["0.002", "0.003"]
    assert rows["train.grad_accum_steps"] == ["-", "2"]
    assert rows["status"] == ["FINISHED", "FINISHED"]
    for shared in (*SHARED, "train.seed"):
        assert shared not in rows
    assert rows["final/valid_bpc"] == [f"{1.00 / LN2:.4f}", f"{0.90 / LN2:.4f}"]
    assert rows["final/test_bpc_tuned_temperature"] == [f"{0.97 / LN2:.4f}", f"{0.87 / LN2:.4f}"]
    assert rows["final/temperature"] == ["0.9500", "1.0500"]
    # params come before metrics, headline metrics first
    names = [line.split()[0] for line in lines[2:] if line and not line.startswith("-")]
    assert names.index("train.optimizer.lr") < names.index("final/valid_bpc") < names.index("final/temperature")
    # aligned: every column starts at the same offset in every row
    start = lines[0].index(f"ptb_char_tiny ({store.b[:8]})")
    lr_line = next(line for line in lines if line.startswith("train.optimizer.lr"))
    assert lr_line[start:].startswith("0.003")
    metric_line = next(line for line in lines if line.startswith("final/valid_bpc "))
    assert len(metric_line) == len(lines[1])  # right-aligned numbers end at the rule's end


def test_format_table_missing_metrics(store):
    table = compare_runs(store.client, run_ids=[store.c, store.a]).format_table()
    valid_row = next(line for line in table.splitlines() if line.startswith("final/valid_bpc "))
    assert valid_row.split()[1:] == ["-", f"{1.00 / LN2:.4f}"]
    assert "RUNNING" in table
    single = compare_runs(store.client, run_ids=[store.a]).format_table()
    assert "(one run: nothing to compare)" in single and "final/test_bpc" in single


def test_explicit_run_ids_child_ids_and_duplicates(store):
    comparison = compare_runs(store.client, run_ids=[store.a_train, store.b_eval, store.a])
    assert _ids(comparison) == [store.a, store.b]
    assert comparison.experiment is None


def test_write_plot(store, tmp_path):
    comparison = compare_runs(store.client, experiment="ptb")
    curves = comparison.curves()
    assert same_curve(curves[comparison.runs[1].label], [(100, 1.2 / LN2), (200, 1.0 / LN2), (300, 0.9 / LN2)])
    finals, label = comparison.headline_finals()
    assert finals[comparison.runs[2].label] == pytest.approx({"valid bpc": 1.00 / LN2, "test bpc": 0.98 / LN2})
    assert finals[comparison.runs[0].label] == {}
    assert "bits per character" in label and "bpc" in comparison.curve_label()
    out = comparison.write_plot(tmp_path / "plots" / "cmp.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out).shape[:2] == (500, 1300)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"experiment": "nope"}, UnknownExperimentError, r"'nope' does not exist.*empty, ptb"),
        ({"experiment": "empty"}, NoRunsError, "no pipeline runs"),
        ({"run_ids": ["0123456789abcdef0123456789abcdef"]}, UnknownRunError, "not in the tracking store"),
        ({}, NoRunsError, "--experiment NAME"),
        ({"experiment": "ptb", "run_ids": ["x"]}, ComparisonError, "not both"),
    ],
)
def test_errors(store, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        compare_runs(store.client, **kwargs)
    assert isinstance(info.value, LookupError) and isinstance(info.value, ValueError)


def test_deleted_run_given_explicitly(store):
    with pytest.raises(UnknownRunError, match="deleted"):
        compare_runs(store.client, run_ids=[store.deleted])


# ------------------------------------------------------------------------------------------------- CLI


def _parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="stage")
    register_commands(sub)
    return parser.parse_args(argv)


def test_cli_end_to_end(store, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    args = _parse(["compare", "--experiment", "ptb", "--tracking-uri", store.uri, "--output", str(out)])
    assert args.handler(args) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].split()[0] == "run"
    assert "train.optimizer.lr" in captured.out and f"({store.c[:8]})" in captured.out
    assert str(out) in captured.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    args = _parse(["compare", "--run-ids", store.b_train, store.a, "--tracking-uri", store.uri, "--output", str(out)])
    assert args.handler(args) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.index(store.b[:8]) < header.index(store.a[:8])


def test_cli_through_pipeline_main(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("pipeline.compare",))
    rc = cli.main(["compare", "--run-ids", store.a, "--tracking-uri", store.uri, "--output", str(tmp_path / "c.png")])
    assert rc == 0
    assert "final/valid_bpc" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--experiment", "nope"], "error: experiment 'nope' does not exist"),
        (["--run-ids", "0123456789abcdef0123456789abcdef"], "error: run '0123456789abcdef0123456789abcdef'"),
        ([], "error: nothing to compare"),
        (["--experiment", "ptb", "--limit", "0"], "error: --limit"),
    ],
)
def test_cli_errors(store, tmp_path, capsys, argv, match):
    args = _parse(["compare", *argv, "--tracking-uri", store.uri, "--output", str(tmp_path / "c.png")])
    assert args.handler(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(match)
    assert not (tmp_path / "c.png").exists()


def test_cli_missing_store_is_not_created(tmp_path, capsys, monkeypatch):
    db = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    args = _parse(["compare", "--experiment", "ptb"])
    assert args.tracking_uri is None and args.output is None and args.log_level == "WARNING"
    assert args.handler(args) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not db.exists()


def test_resolve_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri() == "http://mlflow:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


# ------------------------------------------------------------------------------------- run-id prefixes


def test_run_id_prefixes(store):
    # the 8 characters the table prints, a stage run's prefix, any longer prefix, upper case
    assert resolve_run_id(store.client, store.a[:8]) == store.a
    assert resolve_run_id(store.client, store.b[:12].upper()) == store.b
    assert resolve_run_id(store.client, store.a) == store.a
    assert resolve_run_id(store.client, store.b_eval[:8]) == store.b_eval  # a stage: compare_runs takes its parent
    comparison = compare_runs(store.client, run_ids=[store.b_eval[:8], store.a[:8], store.a_train[:10]])
    assert _ids(comparison) == [store.b, store.a]


def _absent_prefix(ids) -> str:
    return next(p for p in (f"{i:08x}" for i in range(1 << 20)) if not any(r.startswith(p) for r in ids))


def _all_ids(client) -> list[str]:
    from mlflow.entities import ViewType

    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return [r.info.run_id for r in client.search_runs(exps, run_view_type=ViewType.ALL, max_results=1000)]


def test_unknown_prefix_names_the_experiments_searched(store):
    prefix = _absent_prefix(_all_ids(store.client))
    with pytest.raises(UnknownRunError, match=rf"{prefix}.*no run id starts with it.*'Default', 'empty', 'ptb'"):
        compare_runs(store.client, run_ids=[store.a[:8], prefix])
    # SQL LIKE wildcards are not taken as such (they would match every run)
    for wildcard in ("%", "_", store.a[:4] + "%"):
        with pytest.raises(UnknownRunError, match="not in the tracking store"):
            resolve_run_id(store.client, wildcard)


def test_prefix_of_a_deleted_run(store):
    with pytest.raises(UnknownRunError, match=rf"matches only deleted runs \({store.deleted}\)"):
        resolve_run_id(store.client, store.deleted[:8])


@pytest.fixture(scope="module")
def crowded(tmp_path_factory, blank_db):
    """17 pipeline runs (each with a train stage) over two experiments: two of them share a first hex digit."""
    root = tmp_path_factory.mktemp("crowded")
    client = _fresh_client(blank_db, root)
    exps = [client.create_experiment(name, artifact_location=(root / name).as_uri()) for name in ("x", "y")]
    parents = []
    for i in range(17):
        exp = exps[i % 2]
        parent = _parent(client, exp, f"run{i}", T0 + i * 10, {"train.seed": str(i)})
        _stage(client, exp, parent, "train", T0 + i * 10 + 1, {"train.seed": str(i)})
        parents.append(parent)
    return client, parents


def test_ambiguous_prefix_lists_the_matching_runs(crowded):
    client, parents = crowded
    ids = _all_ids(client)
    # the shortest prefix that names runs of two different pipeline runs (exists: 17 parents, 16 digits)
    prefix = next(p for n in range(1, 33) for p in sorted({r[:n] for r in parents})
                  if len({r for r in parents if r.startswith(p)}) > 1)
    matching = [r for r in ids if r.startswith(prefix)]
    with pytest.raises(UnknownRunError, match="is ambiguous") as info:
        resolve_run_id(client, prefix)
    message = str(info.value)
    assert all(r in message for r in matching) and "give more characters" in message
    # the 8 characters the table prints tell them apart
    target = next(r for r in parents if r.startswith(prefix))
    assert compare_runs(client, run_ids=[target[:max(8, len(prefix) + 1)]]).runs[0].run_id == target


def test_prefix_shared_by_a_pipeline_run_and_its_stages_names_the_pipeline_run(tmp_path, blank_db):
    # A store holding one pipeline run and its stages only: stages are added until one shares the
    # parent's first hex digit. That digit matches several runs, all of them the one pipeline run.
    client = _fresh_client(blank_db, tmp_path)
    exp = client.create_experiment("solo", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = _parent(client, exp, "solo", T0, {"train.seed": "0"})
    for i in range(300):
        stage = _stage(client, exp, parent, "train", T0 + i + 1, {})
        if stage[0] == parent[0]:
            break
    else:
        pytest.fail("no stage run id shares the parent's first digit")
    assert resolve_run_id(client, parent[0]) == parent
    assert _ids(compare_runs(client, run_ids=[stage[:8], parent[0]])) == [parent]


# --------------------------------------------------------------------------------------- plot location


def test_default_output_under_the_work_root(tmp_path):
    comparison = Comparison(runs=[], experiment="ptb char/x")
    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    assert work_root(uri) == tmp_path / "work"
    assert work_root("sqlite:///runs/mlflow.db") == Path("runs") == DEFAULT_WORK_ROOT
    assert work_root("http://mlflow:5000") == DEFAULT_WORK_ROOT
    out = default_output(uri, comparison, now=0)
    assert out == tmp_path / "work" / "compare" / "compare-ptb_char_x-19700101-000000.png"


def test_cli_writes_the_plot_under_the_work_root(store, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # stands for the repository: nothing may land here
    args = _parse(["compare", "--run-ids", store.a[:8], store.b[:8], "--tracking-uri", store.uri])
    assert args.handler(args) == 0
    captured = capsys.readouterr()
    assert f"({store.a[:8]})" in captured.out.splitlines()[0]
    (line,) = [line for line in captured.err.splitlines() if line.startswith("plot written to ")]
    path = Path(line[len("plot written to "):])
    root = Path(store.uri[len("sqlite:///"):]).parent
    assert path.parent == root / "compare"
    assert re.fullmatch(rf"compare-{store.a[:8]}-{store.b[:8]}-\d{{8}}-\d{{6}}\.png", path.name)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == []


def test_cli_ambiguous_or_unknown_prefix(store, tmp_path, capsys):
    prefix = _absent_prefix(_all_ids(store.client))
    args = _parse(["compare", "--run-ids", prefix, "--tracking-uri", store.uri, "--output", str(tmp_path / "c.png")])
    assert args.handler(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: run '{prefix}' is not in the tracking store") and "'ptb'" in err
    assert not (tmp_path / "c.png").exists()
