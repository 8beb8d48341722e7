"""The small-cohort protocol: fold-fitted standardisation (saved, applied again at prediction), epoch
selection that is smoothed, never before min_epochs, or off (--select last), the reference baseline on the
same folds, and the small-validation warning."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import bag_dataset, fit_config, planted_bags
from slidemil import models
from slidemil.data.synthetic import make_feature_cohort
from slidemil.features.store import read_features, write_features
from slidemil.models.standardize import TO_DIAGONAL, Scaling


def test_auto_standardisation_fires_only_far_from_unit_scale():
    torch.manual_seed(0)
    unit = torch.randn(500, 16)
    assert not Scaling.fit([unit]).far_from_unit()
    assert Scaling.fit([unit * 100 + 40]).far_from_unit()                   # unscaled descriptors
    outlier = unit.clone()
    outlier[:, 3] *= 500                                                    # one dimension dwarfs the rest
    assert Scaling.fit([outlier]).far_from_unit()
    s = Scaling.fit([unit[:200] * 100 + 40, unit[200:] * 100 + 40])          # several bags, one pass
    z = s(unit * 100 + 40)
    assert z.mean(0).abs().max() < 1e-3 and (z.std(0) - 1).abs().max() < 0.01


def test_whitening_decorrelates_only_features_that_a_few_directions_dominate():
    torch.manual_seed(0)
    iso = torch.randn(4000, 32) + 3.0
    assert Scaling.fit([iso], covariance=True).anisotropy() < 5              # isotropic noise
    strong = torch.randn(4, 32) * 3
    aniso = (torch.randn(4000, 32) * 0.8 + torch.randn(4000, 4) @ strong + 1.0)
    fitted = Scaling.fit(aniso.split(200), covariance=True)   # 20 bags, one at a time (<= 256 rows each: all counted)
    assert fitted.anisotropy() > 100
    white = fitted.whitened()
    z = white(aniso)
    cov = torch.cov(z.T)
    assert z.mean(0).abs().max() < 1e-3 and (cov - torch.eye(32)).abs().max() < 0.05
    assert (fitted(aniso).T.cov() - torch.eye(32)).abs().max() > 0.5         # per-dimension scaling keeps them
    # saved and loaded as a checkpoint does
    state = dict(white.tensors())
    again = Scaling.pop_from(state)
    assert not state and torch.allclose(again(aniso), z)


def test_shrunk_whitening_tames_dominant_directions_without_blowing_up_small_ones():
    """--standardize shrunk: W = ((1 - r) S + r diag S)^(-1/2), r the share of the sample correlations that is
    noise (at least TO_DIAGONAL). Uncorrelated features are just standardised;
    on features four strong directions dominate, those directions fall to about the others' level (as under
    full ZCA), while a near-constant direction's variance grows 1 / r times at most relative to per-dimension
    standardisation (full ZCA blows it up to unit variance)."""
    torch.manual_seed(0)
    iso = torch.randn(8000, 16) * torch.linspace(0.5, 3, 16) + 2.0
    fitted = Scaling.fit(iso.split(250), covariance=True, n_bags=32)       # every row counted (<= 256 per bag)
    # its sample correlations are all noise (Schäfer & Strimmer's estimate): shrunk fully to the diagonal
    assert fitted.to_diagonal == 1.0
    torch.testing.assert_close(fitted.shrunk()(iso), fitted(iso), atol=1e-4, rtol=1e-4)
    strong = torch.randn(4, 32) * 3
    aniso = torch.randn(8000, 32) * 0.8 + torch.randn(8000, 4) @ strong
    aniso[:, 0] = aniso[:, 1] + 0.01 * torch.randn(8000)        # a near-duplicate: a direction of tiny variance
    fitted = Scaling.fit(aniso.split(250), covariance=True, n_bags=32)
    assert fitted.to_diagonal == TO_DIAGONAL                  # well-estimated structure: the floor
    per_dim = torch.linalg.eigvalsh(torch.cov(fitted(aniso).T))
    shrunk = torch.linalg.eigvalsh(torch.cov(fitted.shrunk()(aniso).T))
    full = torch.linalg.eigvalsh(torch.cov(fitted.whitened()(aniso).T))
    assert per_dim[-1] > 5 and shrunk[-1] < 2.5                 # the dominant directions lose their weight
    assert shrunk[0] < 1.2 / TO_DIAGONAL * per_dim[0] and full[0] > 100 * per_dim[0]   # the tiny one is not blown up


@pytest.mark.slow
def test_whitening_lets_attention_find_witnesses_hidden_by_dominant_directions(tmp_path):
    """On features whose spread a few shared directions dominate (as encoders' top components), the
    witnesses' shift hides under that spread: per-dimension standardisation left abmil near chance on
    the docs/protocol.md cohort; --standardize whiten finds them."""
    from conftest import run_config
    from slidemil.data.generators import make_unseen_cohort
    from slidemil.train.cv import run_cv

    root = tmp_path / "cohort"
    make_unseen_cohort(root, signal_type="witness", n_patients=30, dim=64, bag_size=(80, 160), rate=0.08,
                       shift=1.6, seed=1)
    aucs = {}
    for mode in ("on", "whiten"):
        run_cv(run_config(root, tmp_path / mode, model="abmil", epochs=20, lr=2e-4, bootstrap=0, standardize=mode))
        aucs[mode] = json.loads((tmp_path / mode / "metrics.json").read_text())["pooled"]["auroc"]["value"]
    assert aucs["whiten"] >= 0.9 and aucs["whiten"] > aucs["on"] + 0.15, aucs


def _fit(**kw):
    from slidemil.train.trainer import fit

    torch.manual_seed(0)
    bags = planted_bags(16, seed=2)
    model = models.create("mean_pool", 32, 2, hidden_dim=16)
    cfg = fit_config(lr=1e-3, patience=1, **kw)
    return fit(model, bag_dataset(bags[:10]), bag_dataset(bags[10:]), cfg, torch.device("cpu"),
               torch.Generator().manual_seed(0))


def test_selection_never_before_min_epochs_and_select_last_trains_every_epoch():
    res = _fit(epochs=8, min_epochs=5, smooth=3)
    assert res.best_epoch >= 5
    hist = res.history
    # the smoothed value is the trailing mean of the monitored one
    np.testing.assert_allclose(hist["val_smoothed"].iloc[4], hist["val_loss"].iloc[2:5].mean(), rtol=1e-6)
    last = _fit(epochs=6, min_epochs=0, select="last")
    assert last.best_epoch == 6 and len(last.history) == 6                 # no selection, no early stop


def test_the_best_epoch_by_the_monitored_value_is_selected_and_its_weights_returned():
    """`--monitor val_metric` selects the epoch of the highest validation metric (not the lowest: a sign
    mistake picks the worst epoch and still trains), and the model comes back with that epoch's weights:
    its validation loss is the history's at the selected epoch, not the last epoch's."""
    import torch.nn.functional as F

    from slidemil.train.trainer import fit, infer

    torch.manual_seed(0)
    bags = planted_bags(24, seed=2, signal=0.8)                     # weak: the metric rises, then falls
    model = models.create("mean_pool", 32, 2, hidden_dim=16)
    val = bag_dataset(bags[12:])
    cfg = fit_config(lr=3e-3, epochs=12, patience=12, min_epochs=0, smooth=1, monitor="val_metric")
    res = fit(model, bag_dataset(bags[:12]), val, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    hist = res.history
    assert res.best_epoch == int(hist["val_metric"].to_numpy().argmax()) + 1
    assert hist["val_metric"].iloc[res.best_epoch - 1] > hist["val_metric"].min()       # a choice was made
    assert res.best_epoch < len(hist)
    logits = torch.from_numpy(infer(model, val, torch.device("cpu")).logits)
    loss = F.cross_entropy(logits, torch.as_tensor(val.labels()).long()).item()
    assert loss == pytest.approx(hist["val_loss"].iloc[res.best_epoch - 1], rel=1e-5)
    assert loss != pytest.approx(hist["val_loss"].iloc[-1], rel=1e-5)


@pytest.mark.slow
def test_run_standardises_unscaled_features_reports_baseline_and_small_validation(tmp_path):
    from conftest import run_config
    from slidemil.models.checkpoint import load_model
    from slidemil.train.cv import run_cv

    root = tmp_path / "cohort"
    make_feature_cohort(root, n_patients=16, dim=16, bag_size=(20, 40), witness_rate=0.3, signal=3.0, seed=5)
    for path in sorted((root / "features").glob("*.h5")):             # classic-MIL-like unscaled descriptors
        bag = read_features(path)
        write_features(path, bag.features * 80 + 300, bag.coords, {"encoder": "synthetic", "patch_size": 256})
    out = tmp_path / "run"
    run_cv(run_config(root, out, model="mean_pool", folds=2, epochs=4, bootstrap=20))
    meta = json.loads((out / "fold_0" / "model.json").read_text())
    assert meta["standardized"] is True
    model, _ = load_model(out / "fold_0")
    preds = pd.read_csv(out / "fold_0" / "predictions.csv")
    sid = preds["slide_id"].iloc[0]
    with torch.no_grad():
        prob = torch.softmax(model(torch.from_numpy(read_features(root / "features" / f"{sid}.h5").features)[None])
                             .logits, 1)[0, 1]
    assert abs(float(prob) - preds["prob_positive"].iloc[0]) < 1e-5, "the saved standardisation is applied again"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baseline"]["pooled"]["auroc"]["value"] >= 0.8          # mean pooling sees a 30% witness shift
    base = pd.read_csv(out / "baseline_predictions.csv")
    assert set(base["slide_id"]) == set(pd.read_csv(out / "predictions.csv")["slide_id"])
    assert any("validation split has only" in w for w in metrics["warnings"])
    assert "Reference baseline" in (out / "report.html").read_text()


def test_paper_recipe_fills_what_the_user_did_not_give():
    from slidemil.train.config import TrainConfig
    from slidemil.train.recipes import RECIPES

    base = dict(features="f", labels="l", out="o")
    cfg = TrainConfig(**base, model="transmil", recipe="paper", lr=1e-3)
    assert cfg.lr == 1e-3                                                   # the flag wins
    assert (cfg.epochs, cfg.weight_decay, cfg.accum_steps) == (200, 1e-5, 2)  # TransMIL's Camelyon config
    assert TrainConfig(**base, model="transmil").epochs == 30               # default recipe untouched
    mhim = TrainConfig(**base, model="acmil", strategy="mhim", recipe="paper")
    assert mhim.epochs == RECIPES["mhim"].settings["epochs"] and mhim.lr == 2e-4
    again = TrainConfig(**{k: v for k, v in cfg.model_dump().items()})    # a saved config reloads the same
    assert again.identity() == cfg.identity()


def test_paper_recipes_sample_classes_balanced_as_the_official_commands():
    """CLAM's README commands (and the MambaMIL scripts) train with --weighted_sample; a survival run of the
    same model has no classes to balance and leaves it out instead of failing."""
    from slidemil.train.config import TrainConfig

    base = dict(features="f", labels="l", out="o", recipe="paper")
    for model in ("clam_sb", "clam_mb", "abmil", "mambamil", "lbmamba"):
        assert TrainConfig(**base, model=model).balanced_sampling, model
    assert not TrainConfig(**base, model="transmil").balanced_sampling           # TransMIL's config does not
    assert not TrainConfig(**base, model="clam_sb", balanced_sampling=False).balanced_sampling   # a flag wins
    survival = TrainConfig(**base, model="abmil", task="survival")
    assert not survival.balanced_sampling and survival.epochs == 200
    assert not TrainConfig(features="f", labels="l", out="o", model="abmil").balanced_sampling    # default recipe


def test_the_recipe_table_in_docs_is_the_recipes_in_code():
    """docs/models.md's table went stale before (otsurv's Cox and patient bags, ins missing)."""
    from pathlib import Path

    from slidemil.train.recipes import RECIPES

    doc = (Path(__file__).parents[2] / "docs" / "models.md").read_text()
    rows = doc.split("| model / strategy | settings | source |\n|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
    expected = [f"| `{name}` | {', '.join(f'{k}={v}' for k, v in r.settings.items())} | {r.source} |"
                for name, r in RECIPES.items()]
    assert rows.splitlines() == expected


def test_otsurv_paper_recipe_is_the_papers_cox_on_patient_bags():
    """The recipe text said Cox while the run trained NLL on slide bags."""
    from slidemil.train.config import TrainConfig

    base = dict(features="f", labels="l", out="o", task="survival", model="otsurv", recipe="paper")
    cfg = TrainConfig(**base)
    assert (cfg.survival_loss, cfg.bag_unit, cfg.batch_size, cfg.lr) == ("cox", "patient", 16, 1e-4)
    assert TrainConfig(**base, survival_loss="nll").survival_loss == "nll"            # a flag still wins
    assert TrainConfig(**{**base, "recipe": "default"}).survival_loss == "nll"


def test_measured_per_model_defaults_apply_unless_given():
    from slidemil.train.config import TrainConfig

    base = dict(features="f", labels="l", out="o")
    assert TrainConfig(**base, model="dsmil").lr == 5e-3                    # docs/protocol.md: 0.42 -> 0.77
    assert TrainConfig(**base, model="dsmil", lr=1e-4).lr == 1e-4
    assert TrainConfig(**base, model="abmil").lr == 2e-4
    assert TrainConfig(**base, model="mean_pool").lr == 1e-3               # unseen families: 7 -> 12 of 12 cells
    assert TrainConfig(**base, model="ins").lr == 1e-3                     # unseen families: 3 -> 11 of 12 cells
    assert TrainConfig(**base, model="dsmil").instance_dropout == 0.6       # docs/protocol.md: 6 -> 10 of 10 seeds
    assert TrainConfig(**base, model="dsmil", instance_dropout=0).instance_dropout == 0
    assert TrainConfig(**base, model="dsmil", recipe="paper").instance_dropout == 0   # the official default
    assert TrainConfig(**base, model="abmil").instance_dropout == 0
    tm = TrainConfig(**base, model="transmil")                               # 4 -> 8 of 10 seeds
    assert (tm.strategy, tm.instance_dropout) == ("feature_noise", 0.6)
    # never silent: what was applied without being asked is listed (log, model.json, report)
    assert tm.applied_defaults() == {"strategy": "feature_noise", "instance_dropout": 0.6}
    assert TrainConfig(**base, model="transmil", instance_dropout=0.2).applied_defaults() == {"strategy": "feature_noise"}
    assert TrainConfig(**base, model="abmil").applied_defaults() == {}
    assert TrainConfig(**base, model="transmil", strategy="none").strategy is None
    assert TrainConfig(**base, model="transmil", strategy="mhim").strategy == "mhim"
    assert TrainConfig(**base, model="transmil", recipe="paper").strategy is None
    assert TrainConfig(**base, model="transmil", pack_len=256).strategy == "feature_noise"   # it packs
    for clam in ("clam_sb", "clam_mb"):      # CLAM's --weighted_sample; docs/protocol.md: imbalanced 0/3 -> 3/3
        assert TrainConfig(**base, model=clam).balanced_sampling
        assert not TrainConfig(**base, model=clam, balanced_sampling=False).balanced_sampling
        assert not TrainConfig(**base, model=clam, task="survival").balanced_sampling    # no classes to balance
        assert not TrainConfig(**base, model=clam, class_weights="balanced").balanced_sampling   # not twice
    im = TrainConfig(**base, model="instance_max")          # its small-cohort cure is the model's mean warm-up
    assert (im.instance_dropout, im.epochs, im.lr) == (0, 30, 2e-4)


def test_instance_dropout_reaches_the_training_bags_only(feature_cohort, tmp_path):
    from conftest import run_config
    from slidemil.data.bags import BagCache
    from slidemil.data.splits import make_splits
    from slidemil.train.cv import _datasets, load_cohort

    root, _ = feature_cohort
    cfg = run_config(root, tmp_path / "run", instance_dropout=0.5)
    cohort = load_cohort(cfg)
    splits = make_splits(cohort, cfg.folds, cfg.val_fraction, cfg.seed)
    parts, _, _ = _datasets(cfg, cohort, splits[splits["fold"] == 0], 0, BagCache())
    whole = {r: [len(ds._load(i)[0]) for i in range(len(ds))] for r, ds in parts.items()}
    assert [len(parts["train"][i].x) for i in range(len(parts["train"]))] == [n // 2 for n in whole["train"]]
    for r in ("val", "test"):
        assert [len(parts[r][i].x) for i in range(len(parts[r]))] == whole[r]
