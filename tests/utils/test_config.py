"""Settings: every stage owns its pydantic config, flags take help and default from its fields, and
names and arguments are checked before anything is written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from slidemil.cli import app
from slidemil.errors import InputError
from slidemil.features.extract import ExtractConfig
from slidemil.preprocess import PreprocessConfig
from slidemil.slides.patching import PatchConfig
from slidemil.slides.tissue import TissueConfig
from slidemil.train.config import TrainConfig
from slidemil.utils.config import field_help, load_config

runner = CliRunner()


def test_preprocess_config_is_the_stage_configs_together():
    cfg = PreprocessConfig(slides="s", out="o", seg_mpp=4.0, patch_size=128, encoder="handcrafted")
    assert cfg.tissue() == TissueConfig(seg_mpp=4.0)
    assert cfg.patches() == PatchConfig(patch_size=128)
    for stage in (TissueConfig, PatchConfig, ExtractConfig):   # one default per field, owned by its stage
        for name, field in stage.model_fields.items():
            assert PreprocessConfig.model_fields[name].default == field.default, name


LR_HELP = ("Learning rate. (default: 0.0002; dsmil: 0.005; max_pool: 0.005; mean_pool: 0.001; ins: 0.001; "
           "acmil: 0.001)")   # models' measured defaults too


def test_flag_help_shows_the_field_default():
    assert field_help(TrainConfig, "lr") == LR_HELP
    assert field_help(TrainConfig, "epochs") == "Maximum epochs per fold. (default: 30)"
    assert field_help(PatchConfig, "min_tissue").endswith("(default: 0.25)")
    assert field_help(TrainConfig, "strategy").endswith("(default: none; transmil: feature_noise)")
    train = typer.main.get_command(app).commands["train"]
    assert next(p.help for p in train.params if p.name == "lr") == LR_HELP


def test_model_strategy_and_reembedding_arguments_are_checked_up_front():
    base = dict(features="f", labels="l", out="o")
    with pytest.raises(InputError, match=r"strategy 'mhim' takes no argument\(s\) mask_ratio_hh"):
        load_config(TrainConfig, None, {**base, "strategy": "mhim", "strategy_args": {"mask_ratio_hh": 0.1}})
    with pytest.raises(InputError, match="strategy_args given without --strategy"):
        load_config(TrainConfig, None, {**base, "strategy_args": {"lamda": 0.1}})
    with pytest.raises(InputError, match=r"re-embedding 'rrt' takes no argument\(s\) dimm"):
        load_config(TrainConfig, None, {**base, "reembed": "rrt", "reembed_args": {"dimm": 8}})
    with pytest.raises(InputError, match=r"unknown model 'abmli' \(did you mean 'abmil'\?\)"):
        load_config(TrainConfig, None, {**base, "model": "abmli"})


def test_unknown_strategy_argument_fails_before_the_run_folder_exists(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--features", str(tmp_path), "--labels", str(tmp_path / "l.csv"), "--out", str(out),
                              "--strategy", "aem", "--strategy-arg", "lambda=0.1"])
    assert res.exit_code == 1 and "takes no argument(s) lambda" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_importing_slidemil_leaves_the_plotting_backend_alone():
    code = ("import matplotlib; matplotlib.use('svg'); import slidemil.cli, slidemil.explain.heatmap, "
            "slidemil.evaluate.plots; print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "svg"
