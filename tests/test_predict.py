"""`slidemil predict` reproduces a run's fold predictions and refuses features of another encoder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slidemil.errors import InputError
from slidemil.features.store import write_features
from slidemil.predict import predict

pytestmark = pytest.mark.slow  # trains models or runs the slide pipeline


def test_predict_on_training_cohort_reproduces_fold_predictions(trained):
    root, run = trained
    frame = predict(run, root / "features", device="cpu")
    oof = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str}).set_index("slide_id")
    frame = frame.set_index("slide_id").loc[oof.index]
    for fold in range(3):
        ids = oof.index[oof["fold"] == fold]
        np.testing.assert_allclose(frame.loc[ids, f"fold{fold}_prob_positive"], oof.loc[ids, "prob_positive"], atol=1e-5)
    fold_cols = [f"fold{k}_prob_positive" for k in range(3)]
    np.testing.assert_allclose(frame["prob_positive"], frame[fold_cols].mean(axis=1), atol=1e-6)


def test_predict_refuses_features_of_another_encoder(trained, tmp_path):
    _, run = trained
    write_features(tmp_path / "x.h5", np.zeros((5, 16)), np.zeros((5, 2)), {"encoder": "synthetic"})
    with pytest.raises(InputError, match=r"16-d but the model was trained on 32-d"):
        predict(run, tmp_path, device="cpu")
    (tmp_path / "x.h5").unlink()
    write_features(tmp_path / "y.h5", np.zeros((5, 32)), np.zeros((5, 2)), {"encoder": "uni_v1"})
    with pytest.raises(InputError, match=r"encoder 'uni_v1' but the model expects 'synthetic'"):
        predict(run, tmp_path, device="cpu")
