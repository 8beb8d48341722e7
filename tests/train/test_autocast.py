"""Every model, task and strategy trains under CUDA's bf16 autocast, reproduced on the CPU (tests/cuda_like.py),
so the dtype faults that crashed dtfd and otsurv on a GPU are caught by CI, which has none; and a bf16
forward stays within a stated tolerance of the float32 one. The same checks run on a real GPU in tests/gpu/."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import bag_dataset, fit_config, planted_bags
from cuda_like import cuda_like, cuda_like_autocast
from slidemil import models
from slidemil.data.bags import BagDataset
from slidemil.errors import InputError
from slidemil.tasks import create_task
from slidemil.train import trainer
from slidemil.train.strategies import STRATEGIES, apply_strategy

pytestmark = pytest.mark.slow  # trains every model for an epoch under every task

# task options (TaskConfig fields) and how many outputs a model has for them
TASKS = {
    "binary": ({"task": "classification"}, 2),
    "multiclass": ({"task": "classification"}, 3),
    "survival_nll": ({"task": "survival", "survival_loss": "nll", "bins": 4}, 4),
    "survival_cox": ({"task": "survival", "survival_loss": "cox"}, 1),
    "regression": ({"task": "regression"}, 1),
    "ordinal": ({"task": "ordinal"}, 2),
}
CLASSIFICATION_ONLY = {"ins"}         # refuses other tasks with an InputError (tested below)
FAST_ARGS = {"otsurv": {"max_iter": 50}}


def _cohort(kind: str, n_outputs: int, n_bags: int = 8):
    """In-memory bags with targets of the task's kind, and the fold state the task fits on them."""
    rng = np.random.default_rng(0)
    n_classes = 3 if kind in ("multiclass", "ordinal") else 2
    bags = planted_bags(n_bags, dim=16, n_classes=n_classes, bag_size=(20, 40))
    xs = [b[0] for b in bags]
    if kind.startswith("survival"):
        times = rng.uniform(1, 10, n_bags)
        events = np.arange(n_bags) % 4 != 3
        ys = [(t, float(e)) for t, e in zip(times, events)]
        table = pd.DataFrame({"case_id": range(n_bags), "time": times, "event": events})
    elif kind == "regression":
        ys = list(rng.normal(size=n_bags))
        table = pd.DataFrame({"case_id": range(n_bags), "target": ys})
    else:
        ys = [b[1] for b in bags]
        table = pd.DataFrame({"case_id": range(n_bags), "label": ys})
    return BagDataset.from_arrays(xs, ys), table


@pytest.mark.parametrize("kind", list(TASKS))
@pytest.mark.parametrize("name", models.available())
def test_every_model_and_task_trains_under_cuda_autocast(name, kind, monkeypatch):
    options, n_outputs = TASKS[kind]
    cfg = fit_config(epochs=1, batch_size=4 if kind == "survival_cox" else 1, **options)
    task = create_task(cfg)
    ds, table = _cohort(kind, n_outputs)
    torch.manual_seed(0)
    model = models.create(name, in_dim=16, n_outputs=n_outputs, **FAST_ARGS.get(name, {}))
    monkeypatch.setattr(trainer, "autocast", cuda_like)
    if name in CLASSIFICATION_ONLY and options["task"] != "classification":
        with pytest.raises(InputError, match="task"):
            trainer.fit(model, ds, None, cfg, torch.device("cpu"), torch.Generator().manual_seed(0), task=task,
                        task_state=task.fit_state(table))
        return
    result = trainer.fit(model, ds, None, cfg, torch.device("cpu"), torch.Generator().manual_seed(0), task=task,
                         task_state=task.fit_state(table))
    assert np.isfinite(result.history["train_loss"]).all()
    low = trainer.infer(model, ds, torch.device("cpu"), keep_scores=True)
    assert low.logits.dtype == np.float32 and np.isfinite(low.logits).all()
    monkeypatch.setattr(trainer, "autocast", lambda device: torch.autocast("cpu", enabled=False))
    full = trainer.infer(model, ds, torch.device("cpu"), keep_scores=True)
    # bf16 keeps 8 bits of mantissa (~0.4% a product); the logits of these small models agree within this
    scale = max(1.0, float(np.abs(full.logits).max()))
    np.testing.assert_allclose(low.logits, full.logits, atol=0.05 * scale, rtol=0.05)


@pytest.mark.parametrize("name", [n for n in models.available() if models.info(n).cls.packable])
def test_every_packable_model_trains_on_packs_under_cuda_autocast(name, monkeypatch):
    """On a GPU a step of several bags trains on packs (trainer.auto_pack_len): the packed path under CUDA's
    autocast (the crash of mambamil/lbmamba on the H200: bf16 projections copied into a float32 buffer)."""
    cfg = fit_config(epochs=1, batch_size=2, pack_len=64)
    torch.manual_seed(0)
    model = models.create(name, in_dim=32, n_outputs=2, **FAST_ARGS.get(name, {}))
    monkeypatch.setattr(trainer, "autocast", cuda_like)
    result = trainer.fit(model, bag_dataset(planted_bags(6)), None, cfg, torch.device("cpu"),
                         torch.Generator().manual_seed(0))
    assert np.isfinite(result.history["train_loss"]).all()


def _strategy_args(name: str) -> dict | None:
    """Arguments each strategy needs here (None: it needs an input this test does not make)."""
    return {"histaug": None}.get(name, {})


@pytest.mark.parametrize("name", STRATEGIES.available())
def test_every_strategy_trains_under_cuda_autocast(name, monkeypatch):
    args = _strategy_args(name)
    if args is None:      # needs a fitted HistAug generator: tests/train/strategies/test_augment.py trains it
        name, args = "feature_noise", {}
    cfg = fit_config(epochs=2, batch_size=2, strategy=name, **({"pack_len": 64} if name == "packmil" else {}))
    torch.manual_seed(0)
    model = apply_strategy(models.create("abmil", in_dim=32, n_outputs=2), name, **args)
    monkeypatch.setattr(trainer, "autocast", cuda_like)
    result = trainer.fit(model, bag_dataset(planted_bags(8)), None, cfg, torch.device("cpu"),
                         torch.Generator().manual_seed(0))
    assert np.isfinite(result.history["train_loss"]).all()


def test_the_emulation_catches_what_only_cuda_autocast_breaks():
    """The fault behind the dtfd/otsurv crashes: softmax of a bf16 tensor written into a bf16 buffer works
    under CPU autocast (softmax stays bf16) and fails under CUDA's (softmax is float32), as here."""
    x = torch.randn(4, 3)
    w = torch.randn(3, 3)

    def write():
        h = x @ w                                    # bf16 under either autocast
        buf = torch.zeros(4, 3, dtype=h.dtype)
        buf[torch.arange(4)] = torch.softmax(h, -1)
        return buf

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert write().dtype == torch.bfloat16
    with cuda_like_autocast(), pytest.raises(RuntimeError, match="Index put requires the source and destination"):
        write()
