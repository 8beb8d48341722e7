"""RunDir: the one reader and writer of a run folder's layout, and checkpoints of strategy-trained models."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from slidemil import models
from slidemil.errors import InputError
from slidemil.models.checkpoint import load_model, save_model
from slidemil.rundir import RunDir
from slidemil.train.strategies import apply_strategy


def test_paths_and_finished_folds(tmp_path):
    run = RunDir(tmp_path / "exp")
    assert run.fold_dir(2) == tmp_path / "exp" / "fold_2" and run.report_path.name == "report.html"
    with pytest.raises(InputError, match="no finished fold"):
        run.finished_folds()
    with pytest.raises(InputError, match="not a run folder"):
        run.config()
    for k in (1, 0, 10):
        run.fold_dir(k).mkdir(parents=True)
    run.mark_fold_done(10, {"fold": 10})
    run.mark_fold_done(1, {"fold": 1})
    assert run.finished_folds() == [1, 10] and run.is_fold_done(1) and not run.is_fold_done(0)


def test_tables_keep_ids_and_labels_as_text(tmp_path):
    run = RunDir(tmp_path)
    run.write_predictions(pd.DataFrame({"slide_id": ["007"], "case_id": ["01"], "label": ["1.0"], "fold": [0],
                                        "prob_a": [0.2], "pred": ["1.0"]}))
    back = run.predictions()
    assert back.loc[0, "slide_id"] == "007" and back.loc[0, "label"] == "1.0" and back.loc[0, "case_id"] == "01"
    run.write_splits(pd.DataFrame({"slide_id": ["a", "b", "c"], "fold": [0, 0, 1], "role": ["test", "train", "test"]}))
    assert run.test_ids(0) == {"a"}


@pytest.mark.parametrize("strategy,args", [("sc", {}), ("mhim", {}), ("aem", {})])
def test_a_strategy_trained_checkpoint_loads_as_its_aggregator(tmp_path, strategy, args):
    torch.manual_seed(0)
    wrapped = apply_strategy(models.create("abmil", in_dim=8, n_outputs=2), strategy, **args).eval()
    meta = {"model": "abmil", "model_args": {}, "strategy": strategy, "strategy_args": args, "in_dim": 8,
            "n_outputs": 2}
    save_model(tmp_path, wrapped, meta)
    loaded, _ = load_model(tmp_path)
    assert type(loaded).__name__ == "ABMIL"     # inference needs no training wrapper
    x = torch.randn(1, 30, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, wrapped(x).logits)


def test_a_fold_loads_with_the_arguments_it_was_built_with_after_a_default_changed(tmp_path):
    """acmil's width floor went from 128 to 512 (2026-12-03): a 64-d fold saved with `built_with` still loads
    at the width it was trained at; the arguments given win; one this version no longer has is dropped."""
    torch.manual_seed(0)
    old = models.create("acmil", in_dim=64, n_outputs=2, hidden_dim=128).eval()
    built = {"model_args": {**models.info("acmil").arguments(), "hidden_dim": 128, "retired_option": 1}}
    save_model(tmp_path, old, {"model": "acmil", "model_args": {}, "in_dim": 64, "n_outputs": 2, "built_with": built})
    loaded, _ = load_model(tmp_path)
    assert loaded.embed[0].out_features == 128
    x = torch.randn(1, 30, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, old(x).logits)
    save_model(tmp_path, old, {"model": "acmil", "model_args": {}, "in_dim": 64, "n_outputs": 2})   # no record
    with pytest.raises(InputError, match="does not fit the model"):
        load_model(tmp_path)


def test_an_ensemble_of_an_unfinished_run_says_which_folds_it_lacks(tmp_path, caplog):
    """predict and heatmap average the finished folds: a run stopped after 2 of 3 folds gave a 2-fold ensemble
    without a word. Now the missing folds are named with the command that finishes them."""
    run = RunDir(tmp_path / "exp")
    run.path.mkdir()
    run.write_splits(pd.DataFrame({"slide_id": list("abcdef"), "fold": [0, 0, 1, 1, 2, 2], "role": ["test", "train"] * 3}))
    for k in (0, 1):
        save_model(run.fold_dir(k), models.create("mean_pool", in_dim=8, n_outputs=2),
                   {"model": "mean_pool", "model_args": {}, "in_dim": 8, "n_outputs": 2})
        run.mark_fold_done(k, {"fold": k})
    with caplog.at_level("WARNING"):
        assert len(run.fold_models()) == 2
    assert "fold(s) 2 of 3 are not finished" in caplog.text and "--resume" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        run.fold_models(fold=0)                    # one fold asked for: nothing to warn about
    assert "not finished" not in caplog.text
