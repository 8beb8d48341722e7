"""What a GPU user runs, on a real CUDA device: every model's bf16 forward against its float32 CPU forward,
packed == per-bag, the data path (bags on the GPU, side-stream copies from pinned memory), and short CLI
runs of every model and task, strategy, re-embedding, --compile, predict, heatmap and certify.

Marked `gpu`: skipped where torch sees no CUDA device (CI). `bash scripts/gpu_check.sh` runs them on the
device machine, with the wheels its image lacks. CI covers the dtype half of these faults on the CPU with
CUDA's autocast lists reproduced (tests/train/test_autocast.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import GPU_TEST_DEVICE, bag_dataset, fit_config, planted_bags, runner
from slidemil import models
from slidemil.cli import app
from slidemil.data.bags import BagCache, BagDataset
from slidemil.data.synthetic import make_feature_cohort, make_outcome_cohort
from slidemil.models.standardize import Scaling
from slidemil.train.trainer import fit, infer

pytestmark = pytest.mark.gpu

CUDA = GPU_TEST_DEVICE        # "cuda"; SLIDEMIL_GPU_TEST_DEVICE=cpu dry-runs this file on the CPU
ON_GPU = CUDA.type == "cuda"
FAST_ARGS = {"otsurv": {"max_iter": 50}}
# bf16 keeps 8 bits of mantissa: a product is exact to ~0.4%, and a model's logits (sums of hundreds of
# products through a few layers, softmax-normalised) to a few percent of their scale
BF16_RTOL, BF16_ATOL = 0.05, 0.05


@pytest.mark.parametrize("name", models.available())
def test_bf16_forward_on_cuda_matches_float32_on_cpu(name):
    torch.manual_seed(0)
    model = models.create(name, in_dim=64, n_outputs=2, **FAST_ARGS.get(name, {})).eval()
    x = torch.randn(2, 500, 64)
    mask = torch.ones(2, 500, dtype=torch.bool)
    mask[1, 300:] = False
    with torch.no_grad():
        ref = model(x, mask)
        model.to(CUDA)
        with torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=ON_GPU):
            out = model(x.to(CUDA), mask.to(CUDA))
    scale = max(1.0, float(ref.logits.abs().max()))
    torch.testing.assert_close(out.logits.float().cpu(), ref.logits, rtol=BF16_RTOL, atol=BF16_ATOL * scale)


@pytest.mark.parametrize("name", [n for n in models.available() if models.info(n).cls.packable])
def test_packed_equals_per_bag_on_cuda(name):
    torch.manual_seed(0)
    model = models.create(name, in_dim=32, n_outputs=2).to(CUDA).eval()
    bags = [torch.randn(n, 32, device=CUDA) for n in (37, 120, 5, 64)]
    with torch.no_grad():
        packed = model.forward_bags(bags, 160).logits
        alone = torch.cat([model(b[None]).logits for b in bags])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_ins_label_disambiguation_stays_on_the_device():
    """The crash of INS on CUDA: a negative bag's confidences were reset with a CPU tensor."""
    from slidemil.models.ins import update_confidence

    conf = torch.full((5, 2), 0.5, device=CUDA)
    out = update_confidence(conf, torch.rand(5, 2, device=CUDA), torch.ones(5, 2, device=CUDA), 0.9, negative_bag=True)
    assert out.device.type == CUDA.type and torch.equal(out[:, 0].cpu(), torch.ones(5))


def test_bags_live_on_the_gpu_and_spill_to_pinned_memory(tmp_path):
    from slidemil.features.store import write_features

    rng = np.random.default_rng(0)
    units = []
    for i in range(4):
        path = tmp_path / f"s{i}.h5"
        write_features(path, rng.normal(size=(100, 32)).astype(np.float32), np.zeros((100, 2), int), {"encoder": "x"},
                       dtype="float16")
        units.append((f"s{i}", [str(path)], i % 2))
    if ON_GPU:
        auto = BagCache.for_run(None, CUDA, "auto")
        assert auto.device == CUDA and auto.spill is not None and auto.spill.pin
    one = 100 * 32 * 2 + 100 * 2 * 8
    cache = BagCache(budget=2.5 * one, device=CUDA, spill=BagCache(pin=ON_GPU))
    ds = BagDataset(units, cache=cache, device=CUDA)
    first = [ds[i].x for i in range(4)]
    assert all(x.device.type == CUDA.type and x.dtype == torch.float32 for x in first)
    assert all(x.device.type == CUDA.type for x, _ in cache.items.values()) and len(cache.items) == 2
    assert all(x.is_pinned() == ON_GPU for x, _ in cache.spill.items.values()) and len(cache.spill.items) == 2
    host = BagDataset(units, cache=False)
    for i in range(4):          # the side-stream copies deliver the same values as a plain read
        assert torch.equal(ds[i].x.cpu(), host[i].x)


def test_training_on_the_gpu_learns_with_either_cache_device():
    train, test = (planted_bags(60, dim=32, seed=s, witness_rate=0.2) for s in (1, 2))
    aurocs = []
    for where in ("cuda", "cpu") if ON_GPU else ("cpu",):
        torch.manual_seed(0)
        model = models.create("abmil", in_dim=32, n_outputs=2)
        ds = bag_dataset(train)
        ds.cache = BagCache.for_run(None, CUDA, where)
        for i, (x, _, _) in enumerate(train):
            ds.cache.put(ds._key(i), (x, None))
        ds.device = CUDA
        fit(model, ds, None, fit_config(epochs=8, lr=1e-3), CUDA, torch.Generator().manual_seed(0))
        probs = infer(model, bag_dataset(test), CUDA).probs[:, 1]
        aurocs.append(roc_auc_score([b[1] for b in test], probs))
    assert min(aurocs) > 0.9, aurocs


def test_the_training_loop_waits_for_the_gpu_once_an_epoch_not_once_a_step():
    """Issue 27, item 3: no host sync per step, so the host queues step k + 1 while the GPU runs step k.
    torch's sync debug mode warns at every synchronising call (.item(), a copy from pageable memory,
    nonzero, ...); 3 epochs of 24 one-bag steps may read the epoch's losses once an epoch, never once a step
    (the fault this catches: a bag's targets or the standardisation copied from pageable memory per step)."""
    import warnings

    bags = planted_bags(24, dim=32, seed=3)
    model = models.create("abmil", in_dim=32, n_outputs=2)
    ds = bag_dataset(bags)
    ds.cache = BagCache.for_run(None, CUDA, "cuda" if ON_GPU else "cpu")
    for i, (x, _, _) in enumerate(bags):
        ds.cache.put(ds._key(i), (x, None))
    ds.device = CUDA
    ds.transform = Scaling.fit([torch.as_tensor(x) for x, _, _ in bags], covariance=True, n_bags=len(bags)).shrunk()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if ON_GPU:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(model, ds, None, fit_config(epochs=3, min_epochs=0), CUDA, torch.Generator().manual_seed(0))
        finally:
            if ON_GPU:
                torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 3 * 4, f"{len(syncs)} host syncs in 3 epochs of 24 steps: {syncs[:3]}"


@pytest.mark.parametrize("name", models.available())
def test_every_strategy_free_model_trains_one_epoch_on_cuda(name):
    torch.manual_seed(0)
    model = models.create(name, in_dim=32, n_outputs=2, **FAST_ARGS.get(name, {}))
    res = fit(model, bag_dataset(planted_bags(8)), bag_dataset(planted_bags(4, seed=1)),
              fit_config(epochs=2, batch_size=2, min_epochs=0), CUDA, torch.Generator().manual_seed(0))
    assert np.isfinite(res.history["train_loss"]).all()


def test_selective_scan_on_cuda_matches_the_reference_in_values_and_gradients():
    """On a GPU the scan's recurrence runs as slidemil's Triton kernel (nn/triton_scan.py)."""
    from slidemil.nn import triton_scan
    from slidemil.nn.ssm import selective_scan, selective_scan_reference

    assert triton_scan.usable(torch.zeros(1, device=CUDA)) == ON_GPU
    torch.manual_seed(0)
    b, d, n, L = 2, 8, 4, 96
    args = [torch.randn(b, d, L), torch.randn(b, d, L).mul(0.5), -torch.rand(d, n).add(0.1), torch.randn(b, n, L),
            torch.randn(b, n, L), torch.randn(d), torch.randn(b, d, L)]
    for window in (1, 4):
        outs, grads = [], []
        for fn, dev in ((selective_scan_reference, "cpu"), (selective_scan, CUDA)):
            leaves = [a.clone().to(dev).requires_grad_() for a in args]
            y = fn(*leaves[:5], D=leaves[5], z=leaves[6], delta_softplus=True, window=window)
            y.pow(2).sum().backward()
            outs.append(y.detach().cpu())
            grads.append([t.grad.cpu() for t in leaves])
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
        for g1, g0 in zip(grads[1], grads[0]):
            torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-3)


# --- command-line runs on the GPU -------------------------------------------------------------------------

TASK_FLAGS = {
    "classification": [],
    "survival": ["--task", "survival", "--time-col", "time", "--event-col", "event", "--bins", "2"],
    "survival_cox": ["--task", "survival", "--time-col", "time", "--event-col", "event", "--survival-loss", "cox",
                     "--batch-size", "8"],
    "regression": ["--task", "regression", "--target-col", "target"],
    "ordinal": ["--task", "ordinal", "--classes", "G1,G2,G3"],
}
SHORT = ["--folds", "2", "--epochs", "2", "--min-epochs", "0", "--bootstrap", "20", "--quiet", "--device", CUDA.type]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_cohorts")
    make_feature_cohort(root / "classification", n_patients=16, dim=32, bag_size=(20, 60), seed=1)
    for task in ("survival", "regression", "ordinal"):
        make_outcome_cohort(root / task, task, n_patients=24, dim=32, bag_size=(20, 60), seed=2)
    return root


def _train(root, out, *flags):
    res = runner.invoke(app, ["train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"),
                              "--out", str(out), *SHORT, *flags])
    assert res.exit_code == 0, res.output
    return out


# ins is a classifier only: other tasks are refused with an input error (tests/train/test_autocast.py)
RUNS = [(m, t) for m in models.available() for t in TASK_FLAGS if m != "ins" or t == "classification"]


@pytest.mark.parametrize(("name", "task"), RUNS)
def test_every_model_and_task_trains_from_the_cli_on_cuda(cohorts, tmp_path, name, task):
    root = cohorts / ("survival" if task.startswith("survival") else task)
    args = ["--model-arg", "max_iter=50"] if name == "otsurv" else []
    run = _train(root, tmp_path / "run", "--model", name, *TASK_FLAGS[task], *args)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["pooled"], metrics
    preds = pd.read_csv(run / "predictions.csv")
    assert len(preds) and preds.filter(regex="^(prob_|pred|risk)").notna().all().all()


@pytest.mark.parametrize("flags", [["--strategy", s] for s in ("aem", "mhim", "sc", "feature_noise", "instance_mixup")]
                         + [["--reembed", "rrt"], ["--compile"], ["--pack-len", "256", "--batch-size", "4"],
                            ["--cache-device", "cpu"]])
def test_strategies_reembedding_compile_and_packing_on_cuda(cohorts, tmp_path, flags):
    _train(cohorts / "classification", tmp_path / "run", *flags)


def test_predict_and_certify_on_cuda(cohorts, tmp_path):
    root = cohorts / "classification"
    run = _train(root, tmp_path / "run")
    res = runner.invoke(app, ["predict", str(run), "--features", str(root / "features"), "--out", str(tmp_path / "p.csv"),
                              "--device", CUDA.type])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(list((root / "features").glob("*.h5")))
    res = runner.invoke(app, ["certify", "--models", "abmil,dtfd,ins", "--tests", "single_concept", "--seeds", "1",
                              "--n-train", "200", "--n-test", "100", "--epochs", "4", "--device", CUDA.type, "--json",
                              str(tmp_path / "c.json"), "--quiet"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "c.json").read_text())
    assert rows


def test_the_demo_pipeline_with_heatmaps_on_cuda(tmp_path):
    """Slides -> features -> CV -> heatmaps -> report -> predict, with torch seeing the GPU (`--device auto`:
    on the CPU in a dry run)."""
    from slidemil.demo import run_demo

    out = tmp_path / "demo"
    metrics = run_demo(out, quiet=True, n_patients=8, slide_size=(2048, 3072), bootstrap=20)
    assert metrics["pooled"]["auroc"]["value"] >= 0.9
    assert (out / "run" / "report.html").exists() and list((out / "run").rglob("*.png"))
    preds = pd.read_csv(out / "external_predictions.csv")
    truth = pd.read_csv(out / "external" / "labels.csv").set_index("slide_id")
    assert (preds.set_index("slide_id")["pred"] == truth.loc[preds["slide_id"], "label"].to_numpy()).mean() >= 0.75

