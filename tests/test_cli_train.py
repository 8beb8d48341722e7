"""`slidemil train` from the command line: the model list, config files with flag overrides, input errors."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from conftest import runner
from slidemil.cli import app


def test_cli_models_lists_registry():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    for name in ("abmil", "clam_sb", "clam_mb", "transmil", "dsmil", "mean_pool", "max_pool", "instance_max"):
        assert name in res.stdout
    assert "Ilse" in res.stdout


def test_every_verb_is_in_the_architecture_docs_verb_table():
    """docs/architecture.md's table is the CLI contract newcomers read: a new verb must be added there."""
    import re
    from pathlib import Path

    import typer.main

    doc = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    table = doc.split("## The command line", 1)[1].split("\n\n", 3)[2]
    listed = set(re.findall(r"`([a-z-]+)`", table))
    verbs = set(typer.main.get_command(app).commands)
    assert verbs - listed == set(), f"verbs missing from docs/architecture.md: {sorted(verbs - listed)}"
    assert listed - verbs == set(), f"docs/architecture.md lists verbs that do not exist: {sorted(listed - verbs)}"


def test_a_setting_a_recipe_turns_on_can_be_turned_off_by_a_flag():
    """clam_sb and clam_mb sample classes balanced by default (and under --recipe paper): the CLI must be able
    to say no."""
    import typer.main

    train = typer.main.get_command(app).commands["train"]
    option = next(p for p in train.params if p.name == "balanced_sampling")
    assert option.opts == ["--balanced-sampling"] and option.secondary_opts == ["--no-balanced-sampling"]


def test_every_training_setting_is_a_flag_or_documented_as_yaml_only():
    import inspect

    from slidemil.cli import train
    from slidemil.train.config import TrainConfig

    missing = set(TrainConfig.model_fields) - set(inspect.signature(train).parameters)
    # given as repeated KEY=VALUE flags (--model-arg, ...) or in the YAML config only
    assert missing == {"model_args", "strategy_args", "reembed_args", "cache_features", "grad_clip", "warmup_epochs"}
    assert "instance_dropout" in inspect.signature(train).parameters


@pytest.mark.slow
def test_cli_train_config_file_and_flag_override(feature_cohort, tmp_path):
    root, _ = feature_cohort
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"features": str(root / "features"), "labels": str(root / "labels.csv"),
                                   "model": "mean_pool", "folds": 2, "epochs": 50, "bootstrap": 50}))
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--config", str(cfg), "--epochs", "2", "--out", str(out), "--quiet",
                              "--model-arg", "hidden_dim=64"])
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["model"] == "mean_pool" and saved["model_args"] == {"hidden_dim": 64}
    assert "AUROC" in res.stdout and "report.html" in res.stdout
    assert len(pd.read_csv(out / "fold_0" / "history.csv")) <= 2
    # evaluate recomputes from the run folder alone
    (out / "metrics.json").unlink()
    res = runner.invoke(app, ["evaluate", str(out), "--bootstrap", "50"])
    assert res.exit_code == 0 and (out / "metrics.json").exists()
    # predict writes one row per slide
    res = runner.invoke(app, ["predict", str(out), "--features", str(root / "features"), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(list((root / "features").glob("*.h5")))
    # the run's own config.yaml (as methods.md tells a reader) reruns it to the same predictions
    res = runner.invoke(app, ["train", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "predictions.csv"), pd.read_csv(out / "predictions.csv"))


def test_cli_reports_bad_input_without_traceback(tmp_path):
    (tmp_path / "labels.csv").write_text("slide,label\na,0\n")
    (tmp_path / "f").mkdir()
    res = runner.invoke(app, ["train", "--features", str(tmp_path / "f"), "--labels", str(tmp_path / "labels.csv"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "column 'slide_id' is missing" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--features", "f", "--labels", "l", "--out", "o", "--folds", "1"])
    assert res.exit_code == 1 and "folds" in res.output
    # a negative seed was numpy's "Seed must be between 0 and 2**32 - 1" traceback after the run folder was made
    res = runner.invoke(app, ["train", "--features", "f", "--labels", "l", "--out", str(tmp_path / "s"), "--seed", "-1"])
    assert res.exit_code == 1 and "seed: Input should be greater than or equal to 0" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "s").exists()


def test_cli_train_prints_progress_lines_when_not_on_a_terminal(feature_cohort, tmp_path):
    """Output to a file or pipe showed nothing for minutes (a rich bar draws only on a terminal)."""
    root, _ = feature_cohort
    res = runner.invoke(app, ["train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"),
                              "--out", str(tmp_path / "run"), "--model", "mean_pool", "--folds", "2", "--epochs", "5",
                              "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    assert "fold 0 epoch 1/5" in res.output and "fold 1 epoch 5/5" in res.output
