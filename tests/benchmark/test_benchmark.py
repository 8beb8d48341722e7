"""`slidemil benchmark`: a grid resumes after a kill with no finished cell recomputed; the leaderboard, paired
comparisons and ranking; isolated cells measure their own memory; external cohorts, per-site rows and the
robustness section; a bad grid is refused before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from slidemil.benchmark.run import run_benchmark
from slidemil.data.synthetic import make_feature_cohort
from slidemil.errors import InputError

pytestmark = pytest.mark.slow  # trains a grid of models


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """The same 12 patients seen by a strong and a weak encoder."""
    root = tmp_path_factory.mktemp("grid")
    for name, signal_ in (("strong", 2.5), ("weak", 0.3)):
        make_feature_cohort(root / name, n_patients=12, dim=8, bag_size=(10, 20), witness_rate=0.4, signal=signal_,
                            seed=1, n_sites=2, centre_shift=1.0)
    return root


def _grid(root, path, **extra):
    grid = {"labels": str(root / "strong" / "labels.csv"), "task": "classification",
            "features": {"strong": str(root / "strong" / "features"), "weak": str(root / "weak" / "features")},
            "models": ["mean_pool", {"name": "abmil", "args": {"hidden_dim": 16}}], "seeds": [0, 1], "folds": 2,
            "bootstrap": 20, "isolate": False,
            "train": {"epochs": 3, "min_epochs": 1, "patience": 3, "lr": 5e-3}} | extra
    path.write_text(yaml.safe_dump(grid))
    return path


def test_grid_resumes_after_a_kill_without_recomputing_a_cell(encoders, tmp_path):
    grid, out = _grid(encoders, tmp_path / "grid.yaml"), tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "slidemil", "benchmark", str(grid), "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while len(list(out.glob("cells/*/cell.json"))) < 2 and time.time() < deadline and child.poll() is None:
        time.sleep(0.2)
    assert child.poll() is None, "the benchmark ended before it could be killed"
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    finished = {p.parent.name: (p.stat().st_mtime_ns, (p.parent / "run" / "metrics.json").stat().st_mtime_ns)
                for p in out.glob("cells/*/cell.json")}
    assert 2 <= len(finished) < 8 and not (out / "leaderboard.csv").exists()

    result = run_benchmark(grid, out)
    cells = {r["cell"]: r for r in result["cells"]}
    assert len(cells) == 8 and all(r["status"] == "done" for r in cells.values())
    for name, (done_time, metrics_time) in finished.items():     # finished before the kill: not recomputed
        assert (out / "cells" / name / "cell.json").stat().st_mtime_ns == done_time
        assert (out / "cells" / name / "run" / "metrics.json").stat().st_mtime_ns == metrics_time
    # every cell used the task's one splits file
    for name in cells:
        saved = pd.read_csv(out / "cells" / name / "run" / "splits.csv")
        pd.testing.assert_frame_equal(saved, pd.read_csv(out / "splits" / "classification.csv"))

    board = pd.read_csv(out / "leaderboard.csv")
    assert list(board.columns) == ["task", "cohort", "encoder", "model", "strategy", "seed", "metric", "value",
                                   "ci_low", "ci_high", "seconds", "peak_mb"]
    auroc = board[(board["metric"] == "auroc") & (board["cohort"] == "cv")]
    assert len(auroc) == 8 and (auroc["ci_low"] <= auroc["value"]).all() and (auroc["value"] <= auroc["ci_high"]).all()
    by_encoder = auroc.groupby("encoder")["value"].mean()
    assert by_encoder["strong"] > by_encoder["weak"]                # the grid sees which encoder carries signal
    comparisons = pd.read_csv(out / "comparisons.csv")
    assert len(comparisons) == 7 and comparisons["p_delong"].between(0, 1).all()
    assert (comparisons["diff"] <= 1e-12).all()                      # nobody beats the best cell
    # each difference is of the two cells' own pooled AUROCs (the rows paired patient by patient), and the
    # p-values are Holm-adjusted over the task's comparisons
    value = {(r.encoder, r.model, r.seed): r.value for r in auroc.itertuples()}
    best = max(value.values())
    for r in comparisons.itertuples():
        assert r.diff == pytest.approx(value[(r.encoder, r.model, r.seed)] - best, abs=1e-9)
    from slidemil.evaluate.compare import holm
    for key in ("p_bootstrap", "p_delong"):
        np.testing.assert_allclose(comparisons[f"{key}_holm"], holm(comparisons[key]))
        assert (comparisons[f"{key}_holm"] >= comparisons[key] - 1e-12).all()
    assert (comparisons["p_delong_holm"] > comparisons["p_delong"]).any()
    ranking = pd.read_csv(out / "ranking.csv")
    # one task: each configuration's rank is that of its mean AUROC (ties share the average rank: 12 patients
    # of an 8-d cohort can give two models the same AUROC)
    assert len(ranking) == 4 and ranking["mean_rank"].min() <= 1.5
    expected = ranking["classification"].rank(ascending=False, method="average")
    assert np.allclose(ranking["mean_rank"], expected), ranking
    html = (out / "leaderboard.html").read_text()
    assert "Paired comparisons" in html and "data:image/png;base64," in html
    # the comparison's methods paragraph states the grid's design and the leaderboard's own best number
    methods = (out / "methods.md").read_text()
    top = auroc.sort_values("value", ascending=False, kind="stable").iloc[0]
    assert "8 cells (encoders: strong, weak; models: mean_pool, abmil; seeds: 0, 1" in methods
    assert "20 resamples" in methods and "Holm-adjusted" in methods and "optimistic" in methods
    assert f"pooled auroc {top['value']:.3f} (95% CI {top['ci_low']:.3f}-{top['ci_high']:.3f})" in methods

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/cell.json")}
    run_benchmark(grid, out)                                          # a complete grid recomputes nothing
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/cell.json")} == stamps


def test_isolated_cell_external_cohort_sites_and_robustness(encoders, tmp_path):
    grid = _grid(encoders, tmp_path / "grid.yaml", features={"strong": str(encoders / "strong" / "features")},
                 models=["mean_pool"], seeds=[0], isolate=True, site_col="site",
                 external={"other": {"labels": str(encoders / "weak" / "labels.csv"),
                                     "features": {"strong": str(encoders / "weak" / "features")}}},
                 robustness={"k_slide": 3, "k_patch": 10, "patches_per_slide": 8, "bootstrap": 10})
    out = tmp_path / "out"
    result = run_benchmark(grid, out)
    (cell,) = result["cells"]
    assert cell["status"] == "done" and cell["peak_mb"] > 50           # the child's own peak RSS
    board = pd.read_csv(out / "leaderboard.csv")
    assert set(board["cohort"]) == {"cv", "cv:site0", "cv:site1", "other"}
    saved = json.loads((out / "robustness" / "robustness.json").read_text())
    assert set(saved["features"]) == {"strong"}
    page = (out / "leaderboard.html").read_text()
    assert "Robustness to centre differences" in page
    # the table's slide_ri is the paper's R = SO / OS, read against its chance level; the page described it as
    # SO / (SO + OS) in [0, 1] with 1 = biology, so an R below parity (the centre dominates) read as robust
    assert "R = SO / OS" in page and "RI = SO / (SO + OS)" not in page and "slide_ri_chance" in page


def test_bad_grids_are_refused_before_anything_is_written(encoders, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="cell classification__strong__nonexistent__s0: model"):
        run_benchmark(_grid(encoders, tmp_path / "g1.yaml", models=["nonexistent"]), out)
    with pytest.raises(InputError, match="set by the grid itself"):
        run_benchmark(_grid(encoders, tmp_path / "g2.yaml", train={"seed": 3}), out)
    with pytest.raises(InputError, match="appear twice"):
        run_benchmark(_grid(encoders, tmp_path / "g3.yaml", models=["abmil", {"name": "abmil"}]), out)
    assert not out.exists()


def test_torchrun_spreads_cells_over_ranks(encoders, tmp_path):
    grid = _grid(encoders, tmp_path / "grid.yaml", models=["mean_pool"], train={"epochs": 2, "min_epochs": 1})
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "0", "-m", "slidemil", "benchmark", str(grid), "--out", str(out)],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = {json.loads(p.read_text())["cell"]: json.loads(p.read_text())["rank"] for p in out.glob("cells/*/cell.json")}
    assert len(ranks) == 4 and sorted(ranks.values()) == [0, 0, 1, 1]     # cell i on rank i % 2
    assert len(pd.read_csv(out / "leaderboard.csv").query("cohort == 'cv' and metric == 'auroc'")) == 4


def test_several_tasks_rank_over_tasks(encoders, tmp_path):
    table = pd.read_csv(encoders / "strong" / "labels.csv")
    table.assign(grade=table["label"].map({"negative": "low", "positive": "high"})).to_csv(tmp_path / "l.csv", index=False)
    grid = _grid(encoders, tmp_path / "grid.yaml", labels=str(tmp_path / "l.csv"), seeds=[0],
                 features={"strong": str(encoders / "strong" / "features")},
                 tasks={"label": {"task": "classification"},
                        "grade": {"task": "classification", "label_col": "grade"}})
    out = tmp_path / "out"
    run_benchmark(grid, out)
    assert sorted(p.name for p in (out / "splits").glob("*.csv")) == ["grade.csv", "label.csv"]
    board = pd.read_csv(out / "leaderboard.csv")
    assert set(board["task"]) == {"label", "grade"} and len(board.query("cohort == 'cv' and metric == 'auroc'")) == 4
    ranking = pd.read_csv(out / "ranking.csv")
    assert {"label", "grade", "mean_rank"} <= set(ranking.columns) and len(ranking) == 2
    assert "2 task(s)" in (out / "leaderboard.html").read_text()
