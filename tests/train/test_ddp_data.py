"""`--ddp data`: one fold trained by two CPU ranks together (gloo), each on its share of every step's bags."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.metrics import roc_auc_score

import slidemil.models as models
from conftest import bag_dataset, fit_config, planted_bags
from slidemil.train.trainer import RankShare, fit
from slidemil.utils.dist import leave_process_group

pytestmark = pytest.mark.slow  # starts process groups


def _fit(batch_size: int, ddp: str = "folds"):
    torch.manual_seed(0)
    model = models.create("abmil", 32, 2, hidden_dim=16, dropout=0.0)
    cfg = fit_config(epochs=2, batch_size=batch_size, scheduler="none", select="last", ddp=ddp, lr=1e-3)
    fit(model, bag_dataset(planted_bags(12, seed=3, bag_size=(30, 31))), None, cfg, torch.device("cpu"),
        torch.Generator().manual_seed(0))
    return model.state_dict()


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    state = _fit(batch_size=1, ddp="data")
    torch.save(state, f"{out}/rank{rank}.pt")
    leave_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_share_splits_one_order_evenly():
    order = list(range(7))
    shares = [list(RankShare(order, r, 2)) for r in range(2)]
    assert shares == [[0, 2, 4, 6], [1, 3, 5, 0]]            # padded by the order's start: equal step counts


def test_two_data_parallel_ranks_step_as_one_process_with_both_bags(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    one = _fit(batch_size=2)                                  # the same pairs of bags, one padded batch per step
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k, v in one.items():
        torch.testing.assert_close(ranks[0][k], ranks[1][k], atol=0, rtol=0, msg=f"ranks differ in {k}")
        if k != "attention.w.bias":   # softmax ignores a shift: its gradient is round-off, which Adam scales up
            torch.testing.assert_close(ranks[0][k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_torchrun_ddp_data_trains_every_fold_on_both_ranks_and_rank0_writes(feature_cohort, tmp_path):
    root, _ = feature_cohort
    out = tmp_path / "ddp"
    args = ["--features", str(root / "features"), "--labels", str(root / "labels.csv"), "--out", str(out),
            "--folds", "3", "--epochs", "8", "--min-epochs", "2", "--bootstrap", "20", "--lr", "1e-3",
            "--ddp", "data", "--quiet"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "slidemil", "train", *args], capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"fold_{k}" / "done.json").read_text())["rank"] for k in range(3)]
    assert ranks == [0, 0, 0]                                  # every fold written by rank 0
    preds = pd.read_csv(out / "predictions.csv")
    assert roc_auc_score(preds["label"] == "positive", preds["prob_positive"]) >= 0.85
    assert done.stdout.count("report:") == 1
