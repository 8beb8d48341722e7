"""`slidemil certify`: train each model on each algorithmic unit test through the normal trainer and
give a verdict (Raff & Holt, NeurIPS 2023, Sec. 4: the protocol of the authors' notebook).

Protocol: instances standardised with statistics of the training instances; AdamW, lr 1e-3, batch 16
padded bags, 10 epochs, gradient-norm clip 5 (the notebook clamps gradient values to [-5, 5]); no
validation split (the verdict reads the last epoch's train and test AUROC, as the notebook does).
Per seed: PASS when test AUROC >= 0.9, FAIL when <= 0.5, WEAK in between. Over seeds: PASS or FAIL
when every seed agrees, SEED-DEPENDENT when some pass and some fail, WEAK otherwise.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import roc_auc_score

from slidemil.certify.generators import TESTS
from slidemil.data.bags import BagDataset
from slidemil.models.registry import MODELS
from slidemil.train.config import TrainConfig
from slidemil.train.trainer import fit, infer
from slidemil.utils.device import resolve_device
from slidemil.utils.seed import seed_everything

log = logging.getLogger(__name__)
PASS_AT, FAIL_AT = 0.9, 0.5


class CertifySettings(BaseModel):
    """The protocol's settings (`slidemil certify` flags take help and defaults from here)."""

    model_config = ConfigDict(extra="forbid")

    n_train: int = Field(1000, ge=2, description="Training bags per test.")
    n_test: int = Field(500, ge=2, description="Test bags per test.")
    dim: int = Field(16, ge=1, description="Instance dimension (the paper's 16).")
    epochs: int = Field(10, ge=1, description="Training epochs.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    batch_size: int = Field(16, ge=1, description="Padded bags per step.")
    min_size: Optional[int] = Field(None, ge=1, description="Fill bags with background up to this size.")
    seeds: int = Field(2, ge=1, description="Seeds per model and test.")
    poisoned: bool = Field(True, description="The poisoned tests (False: the unpoisoned sanity variants).")
    device: str = Field("auto", description="auto | cpu | cuda (bf16 autocast on a GPU; docs/certification.md was "
                                            "measured on the CPU).")


def seed_verdict(test_auc: float) -> str:
    if test_auc >= PASS_AT:
        return "PASS"
    if test_auc <= FAIL_AT:
        return "FAIL"
    return "WEAK"


def combine(verdicts: list[str]) -> str:
    kinds = set(verdicts)
    if kinds == {"PASS"}:
        return "PASS"
    if kinds == {"FAIL"}:
        return "FAIL"
    if {"PASS", "FAIL"} <= kinds:
        return "SEED-DEPENDENT"
    return "WEAK"


def standardise(train_bags, test_bags):
    inst = np.concatenate(train_bags)
    mean, std = inst.mean(0), inst.std(0) + 1e-6
    return [(b - mean) / std for b in train_bags], [(b - mean) / std for b in test_bags]


def run_one(model_name: str, model_args: dict, test: str, seed: int, s: CertifySettings) -> dict:
    task = TESTS.info(test).obj(s.n_train, s.n_test, s.dim, seed, s.min_size, s.poisoned)
    train_bags, test_bags = standardise(task.train_bags, task.test_bags)
    gen = seed_everything(seed)
    model = MODELS.create(model_name, in_dim=s.dim, n_outputs=2, **model_args)
    cfg = TrainConfig(features="-", labels="-", out="-", epochs=s.epochs, lr=s.lr, batch_size=s.batch_size,
                      scheduler="none", warmup_epochs=0, grad_clip=5.0, seed=seed)
    t0 = time.perf_counter()
    train_ds = BagDataset.from_arrays(train_bags, task.train_y)
    device = resolve_device(s.device)
    fit(model, train_ds, None, cfg, device, gen)
    aucs = {}
    for split, bags, y in (("train", train_bags, task.train_y), ("test", test_bags, task.test_y)):
        probs = infer(model, BagDataset.from_arrays(bags, y), device).probs[:, 1]
        aucs[split] = float(roc_auc_score(y, probs))
    return {"model": model_name, "test": test, "seed": seed, "train_auroc": aucs["train"],
            "test_auroc": aucs["test"], "verdict": seed_verdict(aucs["test"]), "seconds": time.perf_counter() - t0}


def certify(models: list[tuple[str, dict]] | None = None, tests: list[str] | None = None,
            settings: CertifySettings | None = None, progress=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-seed rows, summary table). `models` are (registry name, constructor arguments)."""
    s = settings or CertifySettings()
    models = models or [(m, {}) for m in MODELS.available()]
    tests = tests or TESTS.available()
    for name, args in models:
        MODELS.check_args(name, args)
    for t in tests:
        TESTS.info(t)
    rows = []
    for name, args in models:
        for test in tests:
            for seed in range(s.seeds):
                rows.append(run_one(name, args, test, seed, s))
                if progress:
                    progress(rows[-1])
    per_seed = pd.DataFrame(rows)
    return per_seed, summarise(per_seed)


def summarise(per_seed: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (model, test), part in per_seed.groupby(["model", "test"], sort=False):
        out.append({"model": model, "test": test,
                    "train_auroc": part["train_auroc"].mean(), "train_min": part["train_auroc"].min(),
                    "train_max": part["train_auroc"].max(), "test_auroc": part["test_auroc"].mean(),
                    "test_min": part["test_auroc"].min(), "test_max": part["test_auroc"].max(),
                    "verdict": combine(list(part["verdict"])), "seeds": len(part)})
    return pd.DataFrame(out)
