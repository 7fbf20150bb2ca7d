"""The sentence VAE through the one training loop: the stages, exact resume after kill -9, a two-process
DDP run equal to a one-process run, DeepSpeed, and the remedies' schedules inside training."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import PYTHON, multiprocess_env, pipeline_env, tiny_vae_config, torchrun_train_command

STEPS = 16


def _write(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]


def _pipeline(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "pipeline", *args], cwd=cwd, env=env or pipeline_env(), capture_output=True,
                          text=True, timeout=timeout)


class RecordingTracker:
    """Collects what the trainer logs (the trainer's side of the tracker: no MLflow involved)."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics, step=None, parent=False):
        self.metrics.append((step, dict(metrics)))

    def series(self, name: str) -> dict[int, float]:
        return {step: m[name] for step, m in self.metrics if name in m}

    def __getattr__(self, name):  # confirm_stage, log_model, log_training_plots, ...: nothing to record
        return lambda *args, **kwargs: None


def test_vae_run_prepares_trains_and_evaluates(tmp_path, ptb_word_dir):
    """`python -m pipeline run` on the tiny PTB VAE config: importance-sampled NLL, perplexity from it,
    ELBO, KL, mutual information and active units for valid and test; a re-run has nothing to do."""
    config = tiny_vae_config(tmp_path / "run", ptb_word_dir)
    config["train"].update(max_steps=STEPS, eval_every=8, log_every=4)
    path = _write(config, tmp_path / "vae.yaml")
    proc = _pipeline("run", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["task"] == "vae"
    metrics = results["metrics"]
    for split in ("valid", "test"):
        assert math.isclose(metrics[f"{split}_ppl"], math.exp(metrics[f"{split}_nll_per_token"]), rel_tol=1e-9)
        # IS NLL is at most the negative ELBO (IWAE >= ELBO, up to Monte-Carlo noise of the estimates)
        assert metrics[f"{split}_nll_per_sentence"] <= -metrics[f"{split}_elbo_per_sentence"] + 0.5
        for name in ("kl_per_token", "mutual_information", "mutual_information_aggregate", "active_units"):
            assert math.isfinite(metrics[f"{split}_{name}"])
    assert metrics["valid_samples"] == 10 and metrics["test_samples"] == 20  # ptb_vae_tiny's K
    assert metrics["valid_sentences"] == 128  # vae.evaluate.max_sentences
    assert 5.0 < metrics["valid_nll_per_token"] < math.log(10_000) + 1  # learnt something, still a tiny model
    payload = torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)
    assert payload["task"] == "vae" and payload["model_config"]["vocab_size"] == 10_000
    assert "valid_ppl" in proc.stdout and "mutual_information" in proc.stdout  # the summary
    again = _pipeline("run", "--config", str(path), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout + again.stderr


def test_vae_resume_after_kill_is_exact(tmp_path, ptb_word_dir):
    """kill -9 mid-run, resume: the same losses step by step and the same final weights - with the
    annealing weight, soft free bits' γ and the pretraining phase (decoder reset at step 4) all in play."""
    def config_for(name: str) -> Path:
        config = tiny_vae_config(tmp_path / name, ptb_word_dir)
        config["train"].update(max_steps=16, eval_every=4, log_every=4)
        config["checkpoint"] = {"every": 4, "keep_last": 2}
        config["vae"]["objective"] = {"estimator": "elbo", "samples": 2}
        config["vae"]["pretraining"] = {"steps": 4}
        config["vae"]["annealing"] = {"schedule": "linear", "warmup_steps": 8}
        config["vae"]["soft_free_bits"] = {"target_rate": 3.0, "threshold": 0.05, "multiplier": 0.2}
        return _write(config, tmp_path / f"{name}.yaml")

    proc = _pipeline("train", "--config", str(config_for("reference")), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _losses(tmp_path / "reference")
    assert sorted(expected) == list(range(1, 17))

    killed = config_for("killed")
    ckpt = tmp_path / "killed" / "checkpoints"
    child = subprocess.Popen([PYTHON, "-m", "pipeline", "train", "--config", str(killed)], cwd=tmp_path,
                             env=pipeline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        done = [int(p.parent.name.split("-")[1].split(".")[0]) for p in ckpt.glob("step-*/COMMITTED")]
        if done and max(done) >= 8:  # after the reset at step 4, mid annealing
            break
        time.sleep(0.05)
    assert child.poll() is None, "the run finished before it could be killed; make it longer"
    child.send_signal(signal.SIGKILL)
    child.wait()
    proc = _pipeline("train", "--config", str(killed), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    assert _losses(tmp_path / "killed") == expected  # bit-identical floats
    evals = lambda run: [r["eval"] for r in _records(tmp_path / run) if "eval" in r]  # noqa: E731
    assert evals("killed") == evals("reference")
    a, b = _weights(tmp_path / "reference"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_ddp_vae_equals_one_process(tmp_path, ptb_word_dir):
    """2 gloo ranks x 8 sentences follow the 1 x 16 run: same global batch, same latent noise per sentence
    (drawn from (seed, step) for the global batch), gradients averaged - equal up to float rounding."""
    def config_for(name: str) -> Path:
        config = tiny_vae_config(tmp_path / name, ptb_word_dir)
        config["train"].update(max_steps=8, eval_every=4, log_every=4, device="cpu")
        config["vae"]["model"]["word_dropout"] = 0.0  # dropout masks are drawn per rank
        return _write(config, tmp_path / f"{name}.yaml")

    env = multiprocess_env({})
    ddp = subprocess.run(torchrun_train_command(config_for("ddp")), cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = _pipeline("train", "--config", str(config_for("single")), cwd=tmp_path, env=env)
    assert single.returncode == 0, single.stderr[-4000:]
    ddp_losses, single_losses = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert sorted(ddp_losses) == list(range(1, 9))
    for step in ddp_losses:
        assert ddp_losses[step] == pytest.approx(single_losses[step], rel=1e-5, abs=1e-5)
    evals = lambda run: [r["eval"]["raw_loss"] for r in _records(tmp_path / run) if "eval" in r]  # noqa: E731
    assert evals("ddp") == pytest.approx(evals("single"), rel=1e-5)
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    # Adam with beta1 0 divides each gradient by its own running RMS: a rounding difference in an all-but-zero
    # gradient (summed in another order by the all-reduce) can move a weight by up to ~lr; a few do.
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-3)
    moved = sum(int((a[n] - b[n]).abs().gt(1e-5).sum()) for n in a)
    assert moved <= 1e-3 * sum(t.numel() for t in a.values())


def test_deepspeed_engine_trains_a_vae(tmp_path, ptb_word_dir):
    """A real DeepSpeed engine (ZeRO 1, CPU) runs the same loop on the VAE task (its own process: DeepSpeed
    keeps process-wide state); its checkpoints are DeepSpeed's and the final model evaluates."""
    from pipeline.config import validate_config
    from pipeline.evaluate import run_evaluate

    config = tiny_vae_config(tmp_path / "ds", ptb_word_dir)
    config["train"].update(max_steps=6, eval_every=3, log_every=3, engine="deepspeed", device="cpu")
    path = _write(config, tmp_path / "ds.yaml")
    proc = _pipeline("train", "--config", str(path), cwd=tmp_path, env={**pipeline_env(), "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(_losses(tmp_path / "ds")) == list(range(1, 7))
    assert any((tmp_path / "ds" / "checkpoints").glob("step-*6*/COMMITTED"))
    evaluation, evaluated = run_evaluate(validate_config(config))
    assert evaluated and math.isfinite(evaluation.metrics()["test_nll"])


def test_pretraining_anneals_and_restarts_optimization(tmp_path, ptb_word_dir):
    """The KL weight the trainer applies: 0 for the pretraining steps, then the linear warm-up from the
    decoder reset; the reset re-initialises only the decoder and restarts the averages."""
    from pipeline.config import validate_config
    from pipeline.train import Trainer

    config = tiny_vae_config(tmp_path / "pre", ptb_word_dir)
    config["train"].update(max_steps=8, eval_every=4, log_every=1)
    config["checkpoint"] = {"every": 8}
    config["vae"]["evaluate"].update(training_sentences=16)
    config["vae"]["objective"] = {"estimator": "elbo", "samples": 1}
    config["vae"]["pretraining"] = {"steps": 3}
    config["vae"]["annealing"] = {"schedule": "linear", "warmup_steps": 4}
    tracker = RecordingTracker()
    trainer = Trainer(validate_config(config), tracker)
    encoder_before = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    resets = []
    real_reset = trainer.model.reset_decoder
    trainer.model.reset_decoder = lambda seed=None: (resets.append(trainer.step), real_reset(seed))[-1]
    trainer.train()
    assert resets == [3]
    assert tracker.series("train/kl_weight") == pytest.approx({1: 0, 2: 0, 3: 0, 4: 0, 5: 0.25, 6: 0.5, 7: 0.75, 8: 1})
    assert any(not torch.equal(encoder_before[k], v) for k, v in trainer.model.encoder.state_dict().items())
    # The curves over training: latent usage of the reported (2TA) weights at each evaluation, on the
    # validation sentences and noise 2TA scores - the same figures an independent evaluation gives.
    from pipeline.tasks.vae_evaluation import evaluate_vae

    assert set(tracker.series("vae/mutual_information")) == {4, 8} == set(tracker.series("vae/active_units"))
    ev = trainer.config.vae.evaluate
    with trainer.averager.reported_weights():
        expected = evaluate_vae(trainer.model, trainer.task.valid_batches, num_samples=ev.training_samples,
                                chunk_size=ev.chunk_size, noise=trainer.task._valid_noise).metrics()
    for name in ("mutual_information", "kl_per_token", "active_units"):
        assert tracker.series(f"vae/{name}")[8] == pytest.approx(expected[name], rel=1e-9)


def test_synthetic_task_with_categorical_latents_and_vimco(tmp_path):
    """The synthetic task (thesis §5.7.1: one of 10,000 symbols per sentence, no <eos>) with the MLP model,
    8 x 10 categorical latents and VIMCO: trains and evaluates; NLL per token is per symbol."""
    from pipeline.config import validate_config
    from pipeline.evaluate import run_evaluate
    from pipeline.prepare_stage import run_prepare
    from pipeline.train import run_train

    config = tiny_vae_config(tmp_path / "syn", tmp_path / "data", name="synthetic_vae_tiny")
    config["train"].update(max_steps=10, eval_every=5)
    cfg = validate_config(config)
    manifest = run_prepare(cfg)
    assert manifest.vocab_size == 10_001
    run_train(cfg)
    evaluation, _ = run_evaluate(cfg)
    metrics = evaluation.metrics()
    assert metrics["valid_tokens"] == metrics["valid_sentences"] == 256  # one symbol each, <eos> not predicted
    assert math.log(10_000) - 0.5 < metrics["valid_nll_per_token"] < math.log(10_001) + 2


@pytest.mark.parametrize("raw, field", [
    ({"task": "vae", "train": {"bptt": 70}}, "train.bptt"),
    ({"task": "vae", "model": {"hidden_size": 64}}, "model.hidden_size"),
    ({"task": "vae", "evaluate": {"temperature": {"num": 3}}}, "evaluate.temperature.num"),
    ({"vae": {"objective": {"samples": 4}}}, "vae.objective.samples"),
    ({"task": "vae", "vae": {"objective": {"estimator": "dreg", "samples": 4}, "annealing": {
        "schedule": "linear", "warmup_steps": 10}}}, "vae.annealing"),
])
def test_the_other_familys_fields_are_refused_by_name(raw, field):
    from pipeline.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config({"name": "x", "data": {"dataset": "ptb_word", "source": "s"}, **raw})


def test_a_resolved_vae_config_is_valid_and_leaves_the_lm_fields_out():
    from pipeline.config import load_config, validate_config

    config = load_config("ptb_vae")
    text = config.to_yaml()
    assert "\nmodel:" not in text and "bptt" not in text and "\nvae:" in text
    assert validate_config(yaml.safe_load(text)) == config
    assert not [k for k in config.tracked_params() if k.startswith(("model.", "evaluate."))]


def test_help_of_a_vae_config_shows_the_vae_options(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--config", "ptb_vae", "--help"])
    text = capsys.readouterr().out
    assert "--vae.objective.estimator" in text and "--model.hidden_size" not in text
    with pytest.raises(SystemExit):
        main(["train", "--config", "demo", "--help"])
    text = capsys.readouterr().out
    assert "--vae.objective.estimator" not in text and "--model.hidden_size" in text


def test_a_labelled_corpus_trains_and_plots_its_latents_by_label(tmp_path):
    """A `sentences` corpus with a TAB label column (two 'authors' with different vocabularies) through
    prepare, train and evaluate; the evaluation draws the posterior means by label."""
    from pipeline.config import validate_config
    from pipeline.evaluate import run_evaluate
    from pipeline.plots.latents import plot_latent_means_figure, principal_components
    from pipeline.prepare_stage import run_prepare
    from pipeline.tasks.vae import LATENT_PLOT_FILE
    from pipeline.train import run_train

    rng = np.random.default_rng(0)
    corpus = tmp_path / "tweets"
    corpus.mkdir()
    for split, n in (("train", 400), ("valid", 60), ("test", 60)):
        lines = []
        for i in range(n):
            author, words = ("ann", ["a", "b", "c", "d"]) if i % 2 else ("bob", ["w", "x", "y", "z"])
            lines.append(" ".join(rng.choice(words, size=rng.integers(3, 8))) + f"\t{author}")
        (corpus / f"{split}.txt").write_text("\n".join(lines) + "\n")
    config = tiny_vae_config(tmp_path / "run", tmp_path / "data")
    config["data"] = {"dataset": "sentences", "source": str(corpus), "dir": str(tmp_path / "data")}
    config["train"].update(max_steps=30, eval_every=15, batch_size=20, eval_batch_size=20)
    config["vae"]["evaluate"].update(max_sentences=60)
    cfg = validate_config(config)
    assert run_prepare(cfg).extra_files["labels"].num_tokens == 520
    run_train(cfg)
    evaluation, _ = run_evaluate(cfg)
    plot = tmp_path / "run" / "plots" / LATENT_PLOT_FILE
    samples = tmp_path / "run" / "samples"
    assert evaluation.artifacts == [str(plot), str(samples / "vae_samples.txt"), str(samples / "vae_samples.html")]
    assert plot.stat().st_size > 0
    report = (samples / "vae_samples.txt").read_text()
    first_valid = (corpus / "valid.txt").read_text().splitlines()[0].split("\t")[0]
    assert first_valid in report and "interpolation" in report.lower()  # the report reconstructs valid sentences
    torch.rand(3)  # whatever used the global random state before, scoring again gives the same figures
    again, evaluated = run_evaluate(cfg, force=True)
    assert evaluated and again.valid == evaluation.valid and again.test == evaluation.test
    # The figure itself: one scatter per label, named with its count.
    means = rng.normal(size=(6, 3))
    figure = plot_latent_means_figure(means, ["ann", "bob", "ann", "bob", "ann", "cid"])
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert legend == ["ann (3)", "bob (2)", "cid (1)"]
    projected = principal_components(means)
    assert projected.shape == (6, 2) and abs(float(projected[:, 0] @ projected[:, 1])) < 1e-9  # orthogonal axes
