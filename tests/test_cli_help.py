"""The command line helps: grouped one-line option help, hidden cluster options, did-you-mean errors,
the config list with purposes, and --verbose on every command."""

from __future__ import annotations

import pytest

from pipeline import cli
from pipeline.cli import build_parser, main
from pipeline.cli_options import schema_overrides, schema_sections
from pipeline.config import ConfigError, config_purpose, shipped_config_names, shipped_config_purposes

STAGES = ("prepare", "train", "evaluate", "run")


@pytest.fixture(autouse=True)
def _fixed_width(monkeypatch):
    # argparse wraps descriptions to the terminal width: make the help text the same everywhere.
    monkeypatch.setenv("COLUMNS", "80")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _option_line(text: str, flag: str) -> str:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        words = line.split()
        if words and words[0] == flag:
            # A long invocation puts its help on the next line, indented.
            return line if len(words) > 2 else f"{line} {lines[i + 1].strip()}"
    raise AssertionError(f"{flag} is not in the help")


def test_stage_help_groups_options_by_section_with_one_line_each(capsys):
    text = _help(capsys, "train", "--help")
    assert text.startswith("usage: python -m pipeline train --config NAME|FILE")
    sections = {s.name: s for s in schema_sections()}
    for name in ("data", "model", "train", "train.optimizer", "train.averaging", "checkpoint", "evaluate",
                 "evaluate.temperature", "tracking"):
        assert f"\n{name}:\n" in text
    # The group description is the first line of the section class's docstring.
    assert "\ntrain.optimizer:\n  Optimizer and the gradient-side regularisers.\n" in text
    for option in sections["model"].options + sections["train.optimizer"].options:
        line = _option_line(text, option.flag)
        assert option.description and option.description in line
        assert f"[default {option.default}]" in line
    assert "Hidden size n of every layer" in _option_line(text, "--model.hidden_size")
    assert "[default 256]" in _option_line(text, "--model.hidden_size")
    assert "INT" in _option_line(text, "--model.hidden_size")
    assert "[required]" in _option_line(text, "--data.source")
    # Short: the 460-line help listed every option twice (usage and body) without descriptions.
    assert len(text.splitlines()) < 160


def test_cluster_options_are_hidden_from_local_stages_but_accepted(capsys):
    for stage in STAGES:
        text = _help(capsys, stage, "--help")
        assert not [line for line in text.splitlines() if line.lstrip().startswith("--cluster.")]
        assert "The --cluster.* options (Kubernetes runs) are accepted but not shown: --help-all shows them." in (
            " ".join(text.split()))
        assert "--help-all" in text
        args = build_parser().parse_args([stage, "--config", "demo", "--cluster.train.gpus", "4"])
        assert schema_overrides(args) == {"cluster.train.gpus": 4}


def test_help_all_shows_every_option_with_its_section_defaults(capsys):
    text = _help(capsys, "train", "--help-all")
    assert "\ncluster:\n  Running the pipeline on Kubernetes" in text
    for section in schema_sections():
        for option in section.options:
            assert option.flag in text
    # Per-pod defaults come from the pod's default instance, not the generic PodResources field default.
    assert "[default 250m]" in _option_line(text, "--cluster.driver.cpu")
    assert "[default 64Gi]" in _option_line(text, "--cluster.train.memory")
    assert "accepted but not shown" not in text
    flush = _help(capsys, "flush", "--help")
    assert "--train.max_steps" not in flush and "--help-all" in flush
    assert "--train.max_steps" in _help(capsys, "flush", "--help-all")


def test_unknown_option_is_reported_by_the_subcommand_with_the_closest_option(capsys):
    err = _error(capsys, "train", "--config", "demo", "--train.steps", "50")
    assert "usage: python -m pipeline train " in err
    assert "usage: python -m pipeline [-h]" not in err
    assert "error: unknown option --train.steps; did you mean --train.max_steps?" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("train", "--trian.max_steps", "5"), "unknown option --trian.max_steps; did you mean --train.max_steps?"),
        (("run", "--forse"), "unknown option --forse; did you mean --force?"),
        (("evaluate", "--verbos"), "unknown option --verbos; did you mean --verbose?"),
        (("train", "--train.lr", "0.1"), "unknown option --train.lr; did you mean --train.optimizer.lr?"),
        (("train", "--train.max=4"), "did you mean one of --train.max_steps, --train.max_divergence_restarts?"),
        (("train", "--batch_size", "8"), "did you mean one of --train.batch_size, --evaluate.batch_size?"),
        (("train", "--model.mogrifer_rank", "3"), "did you mean --model.mogrifier_rank?"),
        (("train", "--cluster.tran.gpus", "2"), "did you mean --cluster.train.gpus?"),
        (("train", "--evaluate.foo", "1"), "the evaluate.* options are --evaluate.batch_size, --evaluate.bptt"),
        (("train", "--train.foo", "1"), "unknown option --train.foo; see python -m pipeline train --help"),
        (("flush", "--train.zzz", "1"), "unknown option --train.zzz; see python -m pipeline flush --help-all"),
        (("train", "--train.max_steps", "5", "6"), "unexpected argument '6'"),
    ],
)
def test_unknown_option_messages(capsys, argv, message):
    stage = argv[0]
    err = _error(capsys, stage, "--config", "demo", *argv[1:])
    assert f"usage: python -m pipeline {stage} " in err
    assert message in err


def test_an_option_before_the_command_says_where_it_goes(capsys):
    err = _error(capsys, "--verbose", "train", "--config", "demo")
    assert "unknown option --verbose here; give it after the command" in err


def test_abbreviations_are_not_silently_expanded(capsys):
    # `--train.max_step` must not quietly mean --train.max_steps (nor an ambiguous prefix fail oddly).
    assert "did you mean --train.max_steps?" in _error(capsys, "train", "--config", "demo", "--train.max_step", "5")


def test_configs_lists_each_shipped_config_with_its_purpose(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == shipped_config_names()
    width = max(len(name) for name in shipped_config_names()) + 2  # one aligned column of purposes
    assert ("demo".ljust(width) + "The laptop demo: the whole pipeline (prepare -> train with 2TA -> evaluate) in a "
            "few minutes on a CPU") in lines
    assert ("enwik8_rlstm".ljust(width) + "enwik8, Mogrifier RLSTM, 6 layers, ~48M parameters (thesis ch. 4, §4.6 and "
            "table 4.2)") in lines
    purposes = shipped_config_purposes()
    assert all(purposes.values()) and all(len(p) <= 110 for p in purposes.values())


def test_config_purpose_is_the_first_sentence_of_the_leading_comment():
    assert config_purpose("# Short one. Second sentence.\n# more\nname: x\n") == "Short one"
    assert config_purpose("\n# A run (see ch. 4, e.g. here).\nname: x\n") == "A run (see ch. 4, e.g. here)"
    assert config_purpose("name: x\n# not leading\n") == ""
    long = "# " + "word " * 30 + "(a parenthesis, with a comma), tail"
    assert config_purpose(long, width=40) == ("word " * 7).strip() + "..."
    # A colon or parenthesis that keeps half the width wins over a later comma; an early one does not.
    assert config_purpose("# Alpha beta gamma: delta epsilon, zeta eta theta iota", width=30) == "Alpha beta gamma"
    assert config_purpose("# Alpha: beta gamma delta epsilon, zeta eta theta iota", width=40) == (
        "Alpha: beta gamma delta epsilon")


def test_verbose_on_every_command():
    parser = build_parser()
    for command in (*STAGES, "flush", "drive", "fetch-data"):
        assert parser.parse_args([command, "--config", "demo", "--verbose"]).verbose is True
        assert parser.parse_args([command, "--config", "demo"]).verbose is False
    assert parser.parse_args(["compare", "--verbose"]).verbose is True
    assert parser.parse_args(["k8s-manifest", "--what", "namespace", "--verbose"]).verbose is True


def test_main_configures_the_output_with_verbose_and_log_level(monkeypatch, capsys):
    import pipeline.console

    calls = []
    monkeypatch.setattr(pipeline.console, "configure_output", lambda **kw: calls.append(kw))

    def no_config(*args, **kwargs):
        raise ConfigError("stop here")

    monkeypatch.setattr(cli, "load_config", no_config)
    assert main(["train", "--config", "demo", "--verbose", "--log-level", "WARNING"]) == 2
    assert main(["evaluate", "--config", "demo"]) == 2
    assert calls == [{"verbose": True, "log_level": "WARNING"}, {"verbose": False, "log_level": "INFO"}]
    assert "stop here" in capsys.readouterr().err


def test_schema_options_keeps_its_dotted_name_and_help_pairs():
    options = dict(cli.schema_options())
    assert options["train.max_steps"] == "Train until this optimizer step (counted across resumes). [INT; default 1000]"
    assert options["name"].endswith("[TEXT; required]")
    assert options["cluster.driver.cpu"].endswith("[TEXT; default 250m]")
