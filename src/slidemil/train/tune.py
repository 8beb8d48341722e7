"""`--tune`: a small hyper-parameter search per fold, selected on that fold's inner validation split only.

Optuna's TPE sampler (Bergstra et al. 2011; seeded per fold) proposes learning rate, weight decay, instance
dropout, the maximum number of epochs and whether to whiten the features (`SPACE`); the first trial is the
configuration the user asked for, so tuning never starts behind it. Each trial trains on the fold's training
bags exactly as a normal fold does (early stopping and epoch selection on the inner validation split) and
scores the smoothed monitored validation value at the selected epoch. The best trial's model *is* the fold's
model (retraining with the same seed would reproduce it). The test fold is never seen; the winning trial's
validation score is optimistic (it was picked as the best of several on the same bags), which is why the
report shows the test-fold metrics, not it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pandas as pd

log = logging.getLogger(__name__)

# (low, high, log scale) for floats; a list for a categorical choice
SPACE: dict[str, tuple | list] = {
    "lr": (1e-5, 3e-3, True),
    "weight_decay": (1e-6, 1e-1, True),
    "instance_dropout": (0.0, 0.7, False),
    "epochs": [10, 20, 30, 50],
    "standardize": ["shrunk", "auto", "whiten"],     # the input transform (docs/protocol.md)
}


@dataclass
class Tuned:
    model: object          # the best trial's trained model
    result: object         # its FitResult
    settings: dict         # the chosen values of SPACE
    table: pd.DataFrame    # one row per trial: values, validation score, best epoch


def _suggest(trial, name: str, space: dict):
    spec = space[name]
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    low, high, log_scale = spec
    return trial.suggest_float(name, low, high, log=log_scale)


def validation_score(history: pd.DataFrame, best_epoch: int, monitor: str) -> float:
    """The smoothed monitored value at the selected epoch, higher = better (a loss is negated)."""
    row = history[history["epoch"] == best_epoch]
    if row.empty or "val_smoothed" not in row:
        return -math.inf
    value = float(row["val_smoothed"].iloc[0])
    value = -value if monitor == "val_loss" else value
    return value if math.isfinite(value) else -math.inf


def tune_fold(cfg, train_one, trials: int, seed: int) -> Tuned:
    """Run `trials` trials; `train_one(cfg) -> (model, FitResult)` trains one fold's model with `cfg` (the
    same bags, seed and validation split each time)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    start = {name: getattr(cfg, name) for name in SPACE}
    # the configuration given is the first trial: its values join the choices and widen the ranges
    space = {}
    for name, spec in SPACE.items():
        if isinstance(spec, list):
            space[name] = spec + [start[name]] if start[name] not in spec else spec
        else:
            low, high, log_scale = spec
            space[name] = (min(low, start[name]) if not log_scale or start[name] > 0 else low,
                           max(high, start[name]), log_scale)
    study.enqueue_trial(start)
    best: dict = {}

    def objective(trial) -> float:
        settings = {name: _suggest(trial, name, space) for name in space}
        model, result = train_one(cfg.model_copy(update=settings))
        score = validation_score(result.history, result.best_epoch, cfg.monitor)
        trial.set_user_attr("best_epoch", int(result.best_epoch))
        if not best or score > best["score"]:
            best.update(score=score, model=model, result=result, settings=settings)
        log.info("tune trial %d: %s -> validation %.4f", trial.number, settings, score)
        return score if math.isfinite(score) else -1e9

    study.optimize(objective, n_trials=trials)
    table = pd.DataFrame([{"trial": t.number, **t.params, "validation": t.value,
                           "best_epoch": t.user_attrs.get("best_epoch")} for t in study.trials])
    return Tuned(best["model"], best["result"], best["settings"], table)
