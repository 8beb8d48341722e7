"""Slide encoders: CHIEF's slide branch loads the official checkpoint layout and computes the official
equations; `slidemil embed-slides` writes a feature folder that trains, whose baseline is the linear probe."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_config, runner
from slidemil.cli import app
from slidemil.errors import InputError
from slidemil.features.slide_encoders import create_slide_encoder
from slidemil.features.store import read_features, write_features


def official_chief_state(seed: int = 0) -> dict:
    """A random state dict with every key and shape of hms-dbmi/CHIEF's CHIEF(size_arg="small", n_classes=2)
    checkpoint, heads the slide embedding does not use included."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"attention_net.0.weight": (512, 768), "attention_net.0.bias": (512,),
              "attention_net.3.attention_a.0.weight": (256, 512), "attention_net.3.attention_a.0.bias": (256,),
              "attention_net.3.attention_b.0.weight": (256, 512), "attention_net.3.attention_b.0.bias": (256,),
              "attention_net.3.attention_c.weight": (1, 256), "attention_net.3.attention_c.bias": (1,),
              "classifiers.weight": (2, 512), "classifiers.bias": (2,),
              "instance_classifiers.0.weight": (2, 512), "instance_classifiers.0.bias": (2,),
              "instance_classifiers.1.weight": (2, 512), "instance_classifiers.1.bias": (2,),
              "att_head.fc1.weight": (256, 512), "att_head.fc1.bias": (256,), "att_head.fc2.weight": (1, 256),
              "att_head.fc2.bias": (1,), "text_to_vision.0.weight": (512, 768), "text_to_vision.0.bias": (512,),
              "organ_embedding": (19, 768)}
    return {k: torch.randn(*s, generator=g) * 0.05 for k, s in shapes.items()}


def test_chief_loads_the_official_checkpoint_and_computes_wsi_feature(tmp_path):
    state = official_chief_state()
    torch.save(state, tmp_path / "CHIEF_pretraining.pth")
    model, used = create_slide_encoder("chief", 768, tmp_path / "CHIEF_pretraining.pth")
    x = torch.randn(37, 768)
    # the official forward, written out: h = ReLU(fc(x)); A = c(tanh(a(h)) * sigmoid(b(h)))^T; softmax; A @ h
    s = state
    h = torch.relu(x @ s["attention_net.0.weight"].T + s["attention_net.0.bias"])
    a = torch.tanh(h @ s["attention_net.3.attention_a.0.weight"].T + s["attention_net.3.attention_a.0.bias"])
    b = torch.sigmoid(h @ s["attention_net.3.attention_b.0.weight"].T + s["attention_net.3.attention_b.0.bias"])
    logits = (a * b) @ s["attention_net.3.attention_c.weight"].T + s["attention_net.3.attention_c.bias"]
    wsi_feature = torch.mm(torch.softmax(logits.T, dim=1), h)[0]
    with torch.no_grad():
        ours = model(x)
    assert ours.shape == (512,) and used.endswith("CHIEF_pretraining.pth")
    torch.testing.assert_close(ours, wsi_feature, rtol=1e-5, atol=1e-6)
    # a checkpoint of something else is one error naming the missing tensors
    del state["attention_net.3.attention_c.weight"]
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(InputError, match="does not fit encoder chief.*attention_c.weight"):
        create_slide_encoder("chief", 768, tmp_path / "other.pth")


def test_chief_without_weights_or_with_other_features_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIDEMIL_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(InputError, match="slide encoder chief needs its weights: download CHIEF_pretraining.pth "
                                         "from https://drive.google.com"):
        create_slide_encoder("chief", 768)
    with pytest.raises(InputError, match="takes 768-d ctranspath patch features, not 1024-d"):
        create_slide_encoder("chief", 1024)


def test_embed_slides_writes_a_feature_folder_that_trains_with_its_linear_probe(feature_cohort, tmp_path):
    from slidemil.train.cv import run_cv

    root, table = feature_cohort
    out = tmp_path / "slides_mean"
    res = runner.invoke(app, ["embed-slides", "--features", str(root / "features"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    sid = table["slide_id"].iloc[0]
    emb = read_features(out / f"{sid}.h5")
    assert emb.features.shape == (1, 32) and emb.attrs["encoder"] == "slide:mean"
    np.testing.assert_allclose(emb.features[0], read_features(root / "features" / f"{sid}.h5").features.mean(0),
                               rtol=1e-5)
    # the embeddings are a feature folder: a run on them, whose baseline is the probe (logistic regression)
    run = tmp_path / "probe"
    run_cv(run_config(root, run, features=str(out), model="mean_pool", epochs=5, min_epochs=1, bootstrap=50))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["baseline"]["pooled"]["auroc"]["value"] >= 0.8
    # a rerun keeps the finished files; a corrupt feature file is one failed row, the rest go on
    before = (out / f"{sid}.h5").stat().st_mtime_ns
    bad = tmp_path / "feats"
    bad.mkdir()
    for p in sorted((root / "features").glob("*.h5"))[:3]:
        (bad / p.name).write_bytes(p.read_bytes())
    broken = sorted(bad.glob("*.h5"))[0]
    broken.write_bytes(b"not an h5 file")
    res = runner.invoke(app, ["embed-slides", "--features", str(root / "features"), "--out", str(out)])
    assert res.exit_code == 0 and (out / f"{sid}.h5").stat().st_mtime_ns == before
    assert set(pd.read_csv(out / "embed_slides.csv")["status"]) == {"skipped"}
    res = runner.invoke(app, ["embed-slides", "--features", str(bad), "--out", str(tmp_path / "part")])
    assert res.exit_code == 1 and "1 failed" in res.output
    status = pd.read_csv(tmp_path / "part" / "embed_slides.csv")
    assert dict(zip(status["slide_id"], status["status"])) == {p.stem: "failed" if p == broken else "done"
                                                              for p in sorted(bad.glob("*.h5"))}


def test_embed_slides_refuses_features_of_another_patch_encoder_before_writing(tmp_path):
    feats = tmp_path / "f"
    write_features(feats / "s1.h5", np.random.rand(5, 768).astype(np.float32), np.zeros((5, 2)), {"encoder": "uni_v1"})
    res = runner.invoke(app, ["embed-slides", "--features", str(feats), "--out", str(tmp_path / "o"), "--encoder", "chief"])
    assert res.exit_code == 1 and "features of encoder 'uni_v1'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()
    with h5py.File(feats / "s1.h5") as fh:
        assert fh["features"].shape == (5, 768)
