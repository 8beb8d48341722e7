"""Shared fixtures and helpers: tiny synthetic cohorts built on the fly (no downloads, no files in the repo).

Expensive artefacts (a trained run, the demo pipeline, processed slides, a HistAug generator) are built
once per session and shared by every test that reads them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image
from typer.testing import CliRunner

import slidemil
from slidemil.data.bags import BagDataset
from slidemil.data.synthetic import make_bag, make_feature_cohort
from slidemil.train.config import TrainConfig

# Under pytest-xdist (`make test` runs one worker per core) each worker computes on one thread, so the
# workers share the cores instead of oversubscribing them.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))

# The tests must test this checkout: a venv shared with another checkout (VENV=...) imports that one's code
# through its editable install, and every test would pass or fail on code that is not the one in front of you.
_SRC = Path(__file__).resolve().parents[1] / "src"
if Path(slidemil.__file__).resolve().parents[1] != _SRC:
    raise pytest.UsageError(f"the tests import slidemil from {Path(slidemil.__file__).parent}, not from this checkout's "
                            f"{_SRC}: run `make install` here (or `pip install --no-deps -e .`), or set PYTHONPATH={_SRC}")

runner = CliRunner()
SLIDE_SIZE = (1536, 2048)


# The device tests/gpu runs on: CUDA; SLIDEMIL_GPU_TEST_DEVICE=cpu dry-runs the same tests on the CPU (their
# logic, before device time is spent on them).
GPU_TEST_DEVICE = torch.device(os.environ.get("SLIDEMIL_GPU_TEST_DEVICE", "cuda"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: where torch sees no GPU (CI, laptops) they are reported as skipped with
    the command that runs them (`bash scripts/gpu_check.sh` on a GPU machine)."""
    if GPU_TEST_DEVICE.type != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `bash scripts/gpu_check.sh` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- helpers ---------------------------------------------------------------------------------------

def planted_bags(n_bags: int, dim: int = 32, n_classes: int = 2, seed: int = 0, witness_rate: float = 0.1,
                 bag_size=(30, 80), signal: float = 2.0):
    """In-memory bags for model-level tests: list of (x [N, D] tensor, label, instance labels)."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(1234).normal(size=(n_classes - 1, dim))
    protos = signal * directions / np.linalg.norm(directions, axis=1, keepdims=True) * np.sqrt(dim) / 4
    bags = []
    for i in range(n_bags):
        label = i % n_classes
        x, inst = make_bag(rng, label, protos, int(rng.integers(*bag_size)), witness_rate)
        bags.append((torch.from_numpy(x), label, inst))
    return bags


def bag_dataset(bags) -> BagDataset:
    return BagDataset.from_arrays([b[0] for b in bags], [b[1] for b in bags])


def small_cohort_auroc(name: str, seed: int, epochs: int = 15, lr: float = 2e-4, **model_args) -> float:
    """Test AUROC (100 bags) of `name` trained on 36 bags of the small-cohort kind (64-d, 40-120 instances,
    10% witnesses at signal 1.5: `benchmarks/small_cohort.py`'s cohorts in memory), one bag per step."""
    from sklearn.metrics import roc_auc_score

    from slidemil import models
    from slidemil.train.trainer import fit, infer

    torch.manual_seed(seed)
    train = planted_bags(36, dim=64, seed=10 + seed, signal=1.5, bag_size=(40, 120))
    test = planted_bags(100, dim=64, seed=500 + seed, signal=1.5, bag_size=(40, 120))
    model = models.create(name, in_dim=64, n_outputs=2, **model_args)
    fit(model, bag_dataset(train), None, fit_config(epochs=epochs, lr=lr), torch.device("cpu"),
        torch.Generator().manual_seed(seed))
    probs = infer(model, bag_dataset(test), torch.device("cpu")).probs[:, 1]
    return roc_auc_score([b[1] for b in test], probs)


def fit_config(**kw) -> TrainConfig:
    """Trainer settings for in-memory bags (no run folder)."""
    return TrainConfig(features="-", labels="-", out="-", warmup_epochs=0, **kw)


def run_config(root, out, **kw) -> TrainConfig:
    """A small but real cross-validation run on the `feature_cohort` (100 bootstrap resamples)."""
    base = dict(features=str(root / "features"), labels=str(root / "labels.csv"), out=str(out), folds=3,
                epochs=15, patience=15, lr=1e-3, bootstrap=100, quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def write_text_file(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def label_csv(tmp_path, n_patients=12, slides=2, classes=("neg", "pos")):
    """A label table of `n_patients` with `slides` slides each, classes alternating by patient."""
    rows = ["slide_id,case_id,label"]
    for p in range(n_patients):
        for s in range(slides):
            rows.append(f"p{p}_s{s},p{p},{classes[p % len(classes)]}")
    return write_text_file(tmp_path, "\n".join(rows) + "\n")


def tissue_truth(root, sid, kind):
    """The synthetic slide's true tissue or tumour mask (kind = "tissue" | "tumour")."""
    return np.asarray(Image.open(root / "slides" / f"{sid}_{kind}.png")) > 0


# --- shared artefacts ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def feature_cohort(tmp_path_factory):
    """24 patients, some with two slides, 32-d features, 20% witness instances in positive bags."""
    root = tmp_path_factory.mktemp("cohort")
    table = make_feature_cohort(root, n_patients=24, dim=32, bag_size=(20, 50), witness_rate=0.2, signal=2.0,
                                seed=3)
    return root, table


@pytest.fixture(scope="session")
def multicentre_cohort(tmp_path_factory):
    """Two centres of 12 patients each (both classes at both), 16-d features, 30% witnesses in positive
    bags, and a centre shift (3x the class signal's size, along a direction of each centre's own)."""
    root = tmp_path_factory.mktemp("multicentre")
    table = make_feature_cohort(root, n_patients=24, dim=16, bag_size=(20, 40), witness_rate=0.3, signal=2.0,
                                seed=5, n_sites=2, centre_shift=6.0)
    return root, table


@pytest.fixture(scope="session")
def trained(feature_cohort, tmp_path_factory):
    """One finished 3-fold run on `feature_cohort`, shared by the run, predict and CLI tests."""
    from slidemil.train.cv import run_cv

    root, _ = feature_cohort
    out = tmp_path_factory.mktemp("runs") / "exp1"
    run_cv(run_config(root, out))
    return root, out


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder `build(folder)` fills once per test session: under pytest-xdist the workers share one
    (a file lock in the session's common temp folder; the first worker builds, the others wait and
    reuse it) instead of each building its own copy on the same cores."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo's whole pipeline on 8 patients of smaller slides (trained run, heatmaps, report), built
    once for all workers: tests read it and write their own outputs elsewhere (or, like the survival
    demo, to names no other test reads)."""
    from slidemil.demo import run_demo

    def build(out):
        metrics = run_demo(out, quiet=True, n_patients=8, slide_size=(2048, 3072), bootstrap=100)
        (out / "demo_metrics.json").write_text(json.dumps(metrics))

    out = built_once(tmp_path_factory, "demo", build)
    return out, json.loads((out / "demo_metrics.json").read_text())


@pytest.fixture(scope="session")
def slide_cohort(tmp_path_factory):
    """4 synthetic pyramidal slides with known tissue and tumour masks."""
    from slidemil.slides.synthetic import make_slide_cohort

    root = tmp_path_factory.mktemp("slides")
    make_slide_cohort(root, n_patients=4, slides_per_patient=(1, 1), size=SLIDE_SIZE, seed=5)
    return root


@pytest.fixture(scope="session")
def processed(slide_cohort, tmp_path_factory):
    """`slide_cohort` segmented, patched (128 px) and extracted with the handcrafted encoder."""
    from slidemil.preprocess import Pipeline, PreprocessConfig, slides_in

    out = tmp_path_factory.mktemp("pre")
    cfg = PreprocessConfig(slides=str(slide_cohort / "slides"), out=str(out), quiet=True, patch_size=128)
    status = Pipeline(cfg).run(slides_in(cfg.slides))
    assert (status["status"] == "done").all(), status
    return slide_cohort, out


@pytest.fixture(scope="session")
def generator(demo_run, tmp_path_factory):
    """A small HistAug generator fit with `slidemil histaug fit` on the demo slides (once for all workers)."""
    from slidemil.cli import app

    root, _ = demo_run

    def build(folder):
        res = runner.invoke(app, ["histaug", "fit", "--slides", str(root / "cohort" / "slides"),
                                  "--patches", str(root / "cohort" / "preprocessed" / "patches"),
                                  "--out", str(folder / "gen"), "--encoder", "handcrafted", "--patches-per-slide",
                                  "24", "--augmentations", "3", "--epochs", "30", "--depth", "2", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        assert "held-out cosine similarity" in res.stdout

    return built_once(tmp_path_factory, "histaug", build) / "gen"
