"""Instance scores of a bag under a run's fold models: which score `--score` asks for, per fold and as
the ensemble of the within-slide normalised fold scores."""

from __future__ import annotations

import numpy as np
import torch

from slidemil.errors import InputError
from slidemil.explain.paint import normalise


class NoScoresError(InputError):
    """The model or the features cannot give the scores asked for."""


def select_scores(out, score: str, classes: list[str]) -> np.ndarray:
    """One score per instance from a model output, as `--score` asks: attention | logit | class:<name>."""
    if score == "attention":
        s = out.instance_scores
        if s is None:
            raise NoScoresError("this model returns no instance scores")
        return s[0].float().cpu().numpy()
    if score == "logit":
        il = out.extras.get("instance_logits")
        if il is None:
            raise NoScoresError("this model has no instance logits; use --score attention")
        return il[0, -1].float().cpu().numpy() if il.shape[1] in (1, 2) else \
            il[0, int(out.logits[0].argmax())].float().cpu().numpy()
    if score.startswith("class:"):
        name = score[6:]
        if name not in classes:
            raise InputError(f"--score {score}: class {name!r} is not one of {', '.join(classes)}")
        c = classes.index(name)
        per_class = out.extras.get("attention")
        if per_class is not None and per_class.shape[1] == len(classes):
            return per_class[0, c].float().cpu().numpy()
        il = out.extras.get("instance_logits")
        if il is not None and il.shape[1] == len(classes):
            return il[0, c].float().cpu().numpy()
        if il is not None and il.shape[1] == 1 and len(classes) == 2:
            return (il[0, 0] if c == 1 else -il[0, 0]).float().cpu().numpy()
        raise NoScoresError("this model has no per-class instance scores; use --score attention")
    raise InputError(f"--score must be attention, logit or class:<name>, not {score!r}")


ABSOLUTE_OCTAVES = 3     # attention on the absolute scale: 2^-3 .. 2^3 times uniform spans the colours


def absolute(scores: np.ndarray, attention: bool) -> np.ndarray:
    """Scores on one scale for every slide, in [0, 1]: attention as n * a (1 = uniform attention) on a log2
    axis, 1/8x -> 0, 1x -> 0.5, 8x -> 1; logits through a sigmoid (an instance-level probability)."""
    scores = np.asarray(scores, np.float64)
    if attention:
        ratio = np.maximum(scores * len(scores), 1e-12)
        return np.clip((np.log2(ratio) + ABSOLUTE_OCTAVES) / (2 * ABSOLUTE_OCTAVES), 0.0, 1.0)
    return 1.0 / (1.0 + np.exp(-scores))


def scale_label(score: str, how: str, attention: bool) -> str:
    """The colour bar's text: what a colour means, and whether two slides can be compared by it."""
    if how == "absolute":
        what = (f"{score} x patches (1 = uniform; 1/{2 ** ABSOLUTE_OCTAVES}x-{2 ** ABSOLUTE_OCTAVES}x, log scale)"
                if attention else f"sigmoid({score})")
        return f"{what}: the same scale on every slide"
    within = "percentile" if how == "percentile" else "min-max"
    return (f"{score}, {within} within this slide: its top patches are red even on a slide the model calls "
            f"negative; compare slides with --normalise absolute")


@torch.no_grad()
def ensemble_scores(models: list, feats: np.ndarray, score: str, classes: list[str], how: str):
    """(per-fold raw scores [F, N], ensemble of the `how`-normalised fold scores [N], the fold models'
    logits [F, K]); `how` = percentile | minmax (within the slide) | absolute (see `absolute`)."""
    x = torch.from_numpy(feats)[None]
    per_fold, logits = [], []
    for model, _ in models:
        out = model(x)
        per_fold.append(select_scores(out, score, classes))
        logits.append(out.logits.float()[0].numpy())
    per_fold = np.stack(per_fold)
    if how == "absolute":
        ensemble = np.mean([absolute(s, is_distribution(s)) for s in per_fold], 0)
    else:
        ensemble = np.mean([normalise(s, how) for s in per_fold], 0)
    return per_fold, ensemble, np.stack(logits)


def is_distribution(scores: np.ndarray) -> bool:
    """Whether a bag's scores are an attention distribution (non-negative, summing to 1) rather than
    logits: decided from the scores, since `class:<name>` reads attention or logits by model."""
    scores = np.asarray(scores, np.float64)
    return bool(len(scores)) and bool((scores >= 0).all()) and abs(scores.sum() - 1.0) < 1e-3
