"""Failures that were tracebacks are one line naming the file or field and the fix (issue 29): edited run
configs, class names that look like TeX, empty site cells, a full disk, a feature file changed during a run,
a hub out of reach, an empty benchmark grid; and the cache budget bounds the process's memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import runner, write_text_file
from slidemil.cli import app
from slidemil.data.bags import BagDataset
from slidemil.data.synthetic import make_feature_cohort
from slidemil.errors import InputError
from slidemil.features.store import write_features

FAST = ["--folds", "2", "--epochs", "2", "--min-epochs", "0", "--bootstrap", "20", "--quiet"]


def _train(root, *extra, labels="labels.csv"):
    return runner.invoke(app, ["train", "--features", str(root / "features"), "--labels", str(root / labels),
                               "--out", str(root / "run"), *FAST, *extra])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    make_feature_cohort(root, n_patients=12, dim=16, bag_size=(10, 20), seed=1)
    assert _train(root).exit_code == 0
    return root


# edit -> (exit code of `evaluate`, of `train --resume`): 0 where the edit does not touch what the verb reads
EDITS = {
    "a tag": (lambda text: text.replace("lr: ", "lr: !!python/object/apply:os.system ['echo owned'] #"), 1, 1),
    "a word for a number": (lambda text: text.replace("lr: ", "lr: banana #"), 0, 1),
    "nothing": (lambda text: "", 1, 1),
    "a list": (lambda text: "- 1\n- 2\n", 1, 1),
    "no slidemil block": (lambda text: text[: text.index("slidemil:")], 1, 0),   # resumes as a run from before it
    "an unknown model": (lambda text: text.replace("model: abmil", "model: nope"), 0, 1),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_run_config_is_one_line_on_evaluate_and_resume(small, tmp_path, edit):
    change, evaluate_code, resume_code = EDITS[edit]
    root = tmp_path / "c"
    shutil.copytree(small, root)
    config = root / "run" / "config.yaml"
    config.write_text(change(config.read_text().replace(str(small), str(root))))   # the copy's own paths
    (root / "run" / "fold_1" / "done.json").unlink()
    evaluated = runner.invoke(app, ["evaluate", str(root / "run")])
    resumed = _train(root, "--resume")
    for res, code in ((evaluated, evaluate_code), (resumed, resume_code)):
        assert res.exit_code == code and "Traceback" not in res.output and "owned" not in res.output, res.output
        if code:
            assert "config.yaml" in res.output and res.output.count("\n") <= 2, res.output


def test_class_names_that_look_like_tex_are_drawn_literally(tmp_path):
    """A class named `$\\frac$` crashed matplotlib's mathtext after training (no metrics, no report)."""
    from slidemil.utils.figures import new_figure, save_figure

    fig, ax = new_figure((3, 3))
    ax.set_title("$\\frac$")
    ax.set_xticks([0, 1], ["$\\frac$", "$x^$"])
    assert save_figure(fig, tmp_path / "f.png").stat().st_size > 0


@pytest.mark.slow
def test_a_run_with_a_tex_like_class_name_gets_its_report(tmp_path):
    make_feature_cohort(tmp_path, n_patients=12, dim=16, bag_size=(10, 20), seed=1)
    table = (tmp_path / "labels.csv").read_text().replace("negative", "$\\frac$")
    (tmp_path / "tex.csv").write_text(table)
    res = _train(tmp_path, labels="tex.csv")
    assert res.exit_code == 0, res.output
    assert "$\\frac$" in (tmp_path / "run" / "report.html").read_text()
    assert (tmp_path / "run" / "plots" / "confusion.png").stat().st_size > 0


def test_empty_site_cells_are_named_by_row(tmp_path):
    from slidemil.data.cohort import read_label_table

    table = write_text_file(tmp_path, "slide_id,label,site\ns1,a,A\ns2,b,\ns3,a,B\ns4,b,\n")
    with pytest.raises(InputError, match=r"site column 'site' is empty in row\(s\) 3, 5"):
        read_label_table(table, site_col="site")


@pytest.mark.parametrize("flags, says", [
    (["--model", "rrt", "--model-arg", "epeg_k=30"], "epeg_k must be odd"),
    (["--model", "abmilx", "--model-arg", "n_heads=3"], "divisible by n_heads"),
    (["--reembed", "rrt", "--reembed-arg", "epeg_k=4"], "epeg_k must be odd"),
    (["--strategy", "mhim", "--strategy-arg", "mask_ratio=2"], "mask_ratio=2"),
    (["--model-arg", "hidden_dim=-5"], "negative dimension"),      # torch's RuntimeError, was a traceback
])
def test_an_argument_value_the_model_refuses_is_one_line_before_anything_is_written(small, tmp_path, flags, says):
    """Before, the model was first built in fold 0: a traceback, and a run folder a rerun called taken."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--features", str(small / "features"), "--labels", str(small / "labels.csv"),
                              "--out", str(out), *FAST, *flags])
    assert res.exit_code == 1 and says in res.output and flags[-1] in res.output, res.output
    assert "Traceback" not in res.output and not out.exists()


def test_a_full_disk_while_training_is_one_line_and_leaves_no_finished_looking_fold(small, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr("slidemil.models.checkpoint.save_file", full)
    root = tmp_path / "c"
    shutil.copytree(small / "features", root / "features")
    shutil.copy(small / "labels.csv", root / "labels.csv")
    res = _train(root)
    assert res.exit_code == 1 and "no space left on the device" in res.output and "Traceback" not in res.output
    assert not list((root / "run").rglob("done.json")) and not list((root / "run").rglob("model.safetensors"))
    assert not list((root / "run").rglob(".*.tmp-*"))


def test_a_full_disk_while_predicting_leaves_neither_file(small, tmp_path, monkeypatch):
    """predictions.csv and metrics.json are renamed together: a full disk once left the predictions without
    their metrics."""
    import slidemil.utils.io as io

    real = io.json_text

    def full(obj):
        real(obj)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "json_text", full)
    out = tmp_path / "ext" / "p.csv"
    res = runner.invoke(app, ["predict", str(small / "run"), "--features", str(small / "features"), "--out", str(out),
                              "--labels", str(small / "labels.csv")])
    assert res.exit_code == 1 and "no space left on the device" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_a_feature_file_changed_during_a_run_is_one_line(tmp_path):
    path = write_features(tmp_path / "s1.h5", torch.randn(10, 4).numpy(), None, {"encoder": "x"})
    ds = BagDataset([("s1", [str(path)], 0)], cache=False)
    assert ds[0].x.shape == (10, 4)
    path.write_bytes(b"not hdf5 any more")
    with pytest.raises(InputError, match="s1.h5.*could not be read during the run.*--resume"):
        ds[0]


def test_a_hub_out_of_reach_is_one_line(monkeypatch):
    import dataclasses

    from slidemil.features.encoders import create_encoder, registry

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    import time

    spec = dataclasses.replace(registry.get_spec("uni_v1"), builder=offline, extra={})
    monkeypatch.setattr(registry, "get_spec", lambda name: spec)
    monkeypatch.setenv("SLIDEMIL_WEIGHTS", "/nonexistent")
    monkeypatch.setattr(registry, "hub_reachable", lambda *a, **k: True)    # the hub answers, the download fails
    with pytest.raises(InputError) as err:
        create_encoder("uni_v1", download=True)
    assert "--download from the hub (MahmoodLab/UNI) failed" in str(err.value) and "HF_TOKEN" in str(err.value)
    assert str(err.value).count("\n") == 0
    # no network at all: one line at once (it took ~30 s of the hub client's retries)
    monkeypatch.setattr(registry, "hub_reachable", lambda *a, **k: False)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="cannot reach") as err:
        create_encoder("uni_v1", download=True)
    assert time.perf_counter() - t0 < 5 and str(err.value).count("\n") == 0 and "pytorch_model.bin" in str(err.value)


@pytest.mark.parametrize("empty", ["models", "seeds", "features"])
def test_a_benchmark_grid_with_nothing_to_run_exits_1(small, tmp_path, empty):
    grid = {"labels": str(small / "labels.csv"), "features": {"x": str(small / "features")}, "models": ["abmil"],
            "seeds": [0]}
    grid[empty] = {} if empty == "features" else []
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(grid))
    res = runner.invoke(app, ["benchmark", str(path), "--out", str(tmp_path / "b")])
    assert res.exit_code == 1 and empty in res.output and "at least 1" in res.output


def test_predict_with_a_missing_slide_makes_no_output_folder(small, tmp_path):
    """Validate first, write second: the --out folder was made before the slide ids were checked."""
    out = tmp_path / "new" / "deeper" / "p.csv"
    res = runner.invoke(app, ["predict", str(small / "run"), "--features", str(small / "features"),
                              "--out", str(out), "--slide-ids", "nope"])
    assert res.exit_code == 1 and "nope" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    ok = runner.invoke(app, ["predict", str(small / "run"), "--features", str(small / "features"), "--out", str(out)])
    assert ok.exit_code == 0 and out.is_file(), ok.output
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    bad = runner.invoke(app, ["predict", str(small / "run"), "--features", str(small / "features"),
                              "--out", str(blocker / "sub" / "p.csv")])
    assert bad.exit_code == 1 and "cannot write to" in bad.output and "Traceback" not in bad.output


def test_an_unseen_class_in_external_labels_names_no_flag_predict_lacks(small, tmp_path):
    (tmp_path / "ext.csv").write_text((small / "labels.csv").read_text().replace("negative", "benign"))
    res = runner.invoke(app, ["predict", str(small / "run"), "--features", str(small / "features"),
                              "--out", str(tmp_path / "p.csv"), "--labels", str(tmp_path / "ext.csv")])
    assert res.exit_code == 1 and "benign" in res.output and "the classes a trained run predicts" in res.output


# --- memory: the cache budget bounds the process -------------------------------------------------------

@pytest.mark.slow
def test_the_cache_budget_bounds_the_process_not_only_the_cache(tmp_path):
    """--cache-gb B adds at most B to the peak memory of a run without a cache (the constant: the libraries and
    one bag's training step), since the budget also covers the float32 copy of the bag in use. Measured on
    24 bags of 40k x 1024 float16 at B = 0.5: 1962-1993 MB peak (2401 before), 1.67-1.73 GB at B = 0
    (docs/reliability.md). Here 12 bags of 20k x 256 float16 (10 MB each), each run in its own process, one
    epoch of mean pooling (the model does not matter: the bags do)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    (tmp_path / "features").mkdir()
    for i in range(12):
        x = rng.standard_normal((20000, 256), dtype=np.float32)
        write_features(tmp_path / "features" / f"s{i}.h5", x + (i % 2) * 0.3, None, {"encoder": "x"}, dtype="float16")
    pd.DataFrame({"slide_id": [f"s{i}" for i in range(12)], "label": ["a", "b"] * 6}).to_csv(
        tmp_path / "labels.csv", index=False)
    # each peak is the lower of two runs: the noise of a peak (other processes, the allocator) only adds, and
    # one run of `none` 50 MB high under a loaded CI made the cache look as if it held less than it does
    peak = lambda gb: min(_peak_rss_child(tmp_path, gb) for _ in range(2))  # noqa: E731
    everything = peak(1.0)      # the whole cohort (123 MB) cached
    bounded = peak(0.04)
    none = peak(0)
    assert bounded <= none + 40 + 35, (bounded, none)          # B = 40 MB, plus allocator noise
    assert everything >= none + 60, (everything, none)         # and the cache does hold memory when allowed


def _peak_rss_child(root, cache_gb: float) -> float:
    """Peak RSS (MB) of one `slidemil train` child, read by the child itself at exit."""
    out = root / f"run{cache_gb}_{len(list(root.glob('run*')))}"     # a fresh run folder for each call
    # VmHWM, the high-water mark of this process's own memory: getrusage's ru_maxrss carries the forking
    # parent's peak over into the child (a pytest-xdist worker's gigabytes), VmHWM starts afresh at exec
    code = ("import re, runpy, sys; sys.argv = ['slidemil'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('slidemil', run_name='__main__')\n"
            "finally:\n    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "    print('PEAK', int(hwm) / 1024, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, "train", "--features", str(root / "features"), "--labels",
                           str(root / "labels.csv"), "--out", str(out), *FAST, "--epochs", "1", "--model", "mean_pool",
                           "--cache-gb", str(cache_gb)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK ")]
    assert proc.returncode == 0 and peak, proc.stderr[-2000:]
    return float(peak[-1].split()[1])


def test_a_full_disk_stops_preprocess_with_one_line(tmp_path, monkeypatch):
    """Every remaining slide would fail the same way: the batch stops at the first, not after failing all."""
    from slidemil.preprocess import Pipeline

    calls = []

    def full(self, path, sid, stages, progress):
        calls.append(sid)
        raise OSError(28, "No space left on device", str(tmp_path / "out" / f"{sid}.h5"))

    monkeypatch.setattr(Pipeline, "_process", full)
    (tmp_path / "slides").mkdir()
    for sid in ("a", "b", "c"):
        (tmp_path / "slides" / f"{sid}.svs").write_bytes(b"")
    res = runner.invoke(app, ["preprocess", "--slides", str(tmp_path / "slides"), "--out", str(tmp_path / "out"),
                              "--quiet"])
    assert res.exit_code == 1 and "no space left on the device" in res.output and "Traceback" not in res.output
    assert calls == ["a"]
