"""Every model and strategy trains through `slidemil train` on the demo cohort's features."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import runner
from slidemil.cli import app

pytestmark = pytest.mark.slow  # trains models or runs the slide pipeline

FAST = ["--folds", "2", "--epochs", "2", "--quiet", "--lr", "5e-4", "--bootstrap", "50"]


def _train(demo_run, out, *extra):
    root, _ = demo_run
    res = runner.invoke(app, ["train", "--features", str(root / "cohort" / "preprocessed" / "features_handcrafted"),
                              "--labels", str(root / "cohort" / "labels.csv"), "--classes", "normal,tumour",
                              "--out", str(out), *FAST, *extra])
    assert res.exit_code == 0, res.output
    assert "AUROC" in res.stdout
    preds = pd.read_csv(out / "predictions.csv")
    assert preds["prob_tumour"].between(0, 1).all() and len(preds) == len(pd.read_csv(root / "cohort" / "labels.csv"))
    return json.loads((out / "fold_0" / "model.json").read_text())


@pytest.mark.parametrize("name", ["rrt", "mambamil", "lbmamba", "acmil", "dtfd", "abmilx", "ins"])
def test_cli_trains_each_new_model(demo_run, tmp_path, name):
    meta = _train(demo_run, tmp_path / name, "--model", name)
    assert meta["model"] == name


def test_cli_reembed_rrt_in_front_of_transmil(demo_run, tmp_path):
    meta = _train(demo_run, tmp_path / "r", "--model", "transmil", "--reembed", "rrt", "--reembed-arg", "epeg_k=9")
    assert meta["reembed"] == "rrt" and meta["reembed_args"] == {"epeg_k": 9}
    # the saved fold reloads with its re-embedding (predict uses it)
    res = runner.invoke(app, ["predict", str(tmp_path / "r"), "--features",
                              str(demo_run[0] / "external" / "preprocessed" / "features_handcrafted"),
                              "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output


STRATEGY_ARGS = {"aem": [], "mhim": ["--strategy-arg", "baseline_epochs=1"], "sc": [],
                 "feature_noise": [], "feature_dropout": [], "instance_mixup": []}


@pytest.mark.parametrize("model", ["abmil", "transmil"])
@pytest.mark.parametrize("strategy", [*STRATEGY_ARGS, "histaug"])
def test_cli_trains_each_strategy(demo_run, tmp_path, request, model, strategy):
    extra = STRATEGY_ARGS.get(strategy, [])
    if strategy == "histaug":
        extra = ["--strategy-arg", f"generator={request.getfixturevalue('generator')}"]
    meta = _train(demo_run, tmp_path / "run", "--model", model, "--strategy", strategy, *extra)
    assert meta["strategy"] == strategy
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["strategy"] == strategy


def test_cli_mhim_teacher_from_a_baseline_run(demo_run, tmp_path):
    _train(demo_run, tmp_path / "base", "--model", "abmil")
    meta = _train(demo_run, tmp_path / "mhim", "--model", "abmil", "--strategy", "mhim",
                  "--strategy-arg", f"teacher_init={tmp_path / 'base'}")
    assert meta["strategy_args"]["teacher_init"] == str(tmp_path / "base")
    # a baseline with other folds is refused, naming the leak
    _train(demo_run, tmp_path / "other", "--model", "abmil", "--folds", "3")
    root, _ = demo_run
    res = runner.invoke(app, ["train", "--features", str(root / "cohort" / "preprocessed" / "features_handcrafted"),
                              "--labels", str(root / "cohort" / "labels.csv"), "--out", str(tmp_path / "bad"), *FAST,
                              "--model", "abmil", "--strategy", "mhim", "--strategy-arg",
                              f"teacher_init={tmp_path / 'other'}"])
    assert res.exit_code != 0 and "leakage" in res.output


def test_cli_histaug_without_generator_says_what_to_do(demo_run, tmp_path):
    root, _ = demo_run
    res = runner.invoke(app, ["train", "--features", str(root / "cohort" / "preprocessed" / "features_handcrafted"),
                              "--labels", str(root / "cohort" / "labels.csv"), "--out", str(tmp_path / "x"), *FAST,
                              "--strategy", "histaug"])
    assert res.exit_code != 0 and "histaug fit" in res.output


def test_cli_models_lists_strategies_and_reembeddings():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    for name in ("rrt", "mambamil", "lbmamba", "mhim", "sc", "histaug", "instance_mixup", "aem"):
        assert name in res.stdout
    # piped (CliRunner is not a terminal): one tab-separated line per entry, no token cut by wrapping
    lines = {line.split("\t")[0]: line.split("\t") for line in res.stdout.splitlines() if "\t" in line}
    assert "2403.06800" in lines["mambamil"][1] and "2303.13405" in lines["sc"][2]
    assert lines["abmil"][-1].startswith("hidden_dim=512") and "gated=" in lines["abmil"][-1]
    assert "Yang" in res.stdout and "Juyal" in res.stdout
