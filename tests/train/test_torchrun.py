"""`torchrun --nproc_per_node 2 -m slidemil train`: folds spread over two CPU ranks, the same predictions as
one process, rank 0 owning the run folder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import run_config
from slidemil.train.cv import run_cv

pytestmark = pytest.mark.slow  # trains models in three processes


def test_two_ranks_give_the_predictions_of_one_process(feature_cohort, tmp_path):
    root, _ = feature_cohort
    opts = dict(folds=4, epochs=4, min_epochs=2, bootstrap=20)
    single = run_cv(run_config(root, tmp_path / "one", **opts))
    args = ["--features", str(root / "features"), "--labels", str(root / "labels.csv"), "--out", str(tmp_path / "two"),
            "--folds", "4", "--epochs", "4", "--min-epochs", "2", "--bootstrap", "20", "--lr", "1e-3",
            "--patience", "15", "--quiet"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
                           "-m", "slidemil", "train", *args], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    a = pd.read_csv(single / "predictions.csv").sort_values("slide_id").reset_index(drop=True)
    b = pd.read_csv(tmp_path / "two" / "predictions.csv").sort_values("slide_id").reset_index(drop=True)
    assert list(a["slide_id"]) == list(b["slide_id"]) and (a["fold"] == b["fold"]).all()
    np.testing.assert_allclose(a["prob_positive"], b["prob_positive"], atol=1e-4)
    assert (tmp_path / "two" / "metrics.json").is_file() and (tmp_path / "two" / "report.html").is_file()
    ranks = [json.loads((tmp_path / "two" / f"fold_{k}" / "done.json").read_text())["rank"] for k in range(4)]
    assert ranks == [0, 1, 0, 1]                                              # fold k on rank k % 2
    assert "AUROC" in done.stdout and done.stdout.count("report:") == 1      # only rank 0 reports
