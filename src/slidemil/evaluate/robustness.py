"""Centre effects in an embedding space: the robustness index, linear probes, a 2-D map.

Robustness index (de Jong, Marcus & Teuwen 2025, "Current pathology foundation models are unrobust to
medical center differences", arXiv 2501.18055): for every sample, its k nearest neighbours by cosine
similarity; SO counts neighbours of the Same biological class from an Other centre, OS neighbours of the
Other class from the Same centre, cumulated over the 1st..k-th neighbour and summed over samples:

    R(k) = sum SO / sum OS                      (the paper's index: biology dominates where R > 1)

PathoROB (Koemen et al. 2025, its official code `robustness_index_utils.py`) reports SO / (SO + OS) =
R / (1 + R) (parity 0.5); slidemil reports both (`value` = R, `normalized`).

Both read against what random embeddings score on the same samples (`chance`): with C classes and S
centres in a balanced design that is (S - 1) / (C - 1), i.e. 1 for the paper's two classes x two centres.
A cohort where classes and centres are confounded (centre A mostly tumour) moves the chance level far
from it: random embeddings read as "clusters by centre". So, as the paper's and PathoROB's datasets are
built, the index is computed on class x centre balanced samples: every (class, centre) cell subsampled
to the same number of patients, `draws` times, the results averaged (centres lacking a class are left
out and named). Neighbours from the sample's own patient are left out (they share class and centre and
say nothing about either), and the CI resamples patients (the official code resamples samples, which
treats a slide's patches as independent).
"""

from __future__ import annotations

import warnings

import numpy as np


def _neighbours(emb: np.ndarray, groups: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """[n, k] indices of each row's k most cosine-similar rows of other groups (exact, in blocks)."""
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    _, gid = np.unique(groups, return_inverse=True)
    out = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), block):
        sim = x[start:start + block] @ x.T
        sim[gid[start:start + block, None] == gid[None, :]] = -np.inf     # self and own patient
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, part, 1), axis=1)
        out[start:start + block] = np.take_along_axis(part, order, 1)
    return out


def balanced_draws(label, centre, groups, draws: int, seed: int) -> tuple[list[np.ndarray], str]:
    """Row indices of `draws` class x centre balanced subsamples (each cell the same number of patients,
    the smallest cell's) and a note on what was left out; [all rows] when the cohort is already balanced
    or cannot be (fewer than two centres holding every class: said in the note)."""
    label, centre, groups = (np.asarray(a) for a in (label, centre, groups))
    first = {g: i for i, g in reversed(list(enumerate(groups)))}
    patients = np.array(list(first))
    p_label, p_centre = label[[first[g] for g in patients]], centre[[first[g] for g in patients]]
    classes = np.unique(label)
    complete = [c for c in np.unique(centre) if set(classes) <= set(p_label[p_centre == c])]
    if len(complete) < 2:
        return [np.arange(len(label))], ("not balanced: fewer than two centres hold every class, so the index "
                                         "reads against its chance level only")
    note = ""
    left_out = sorted(set(np.unique(centre)) - set(complete), key=str)
    if left_out:
        note = f"centres without every class left out: {', '.join(map(str, left_out))}; "
    cells = {(a, c): patients[(p_label == a) & (p_centre == c)] for a in classes for c in complete}
    m = min(len(v) for v in cells.values())
    if all(len(v) == m for v in cells.values()):
        if not left_out:
            return [np.arange(len(label))], "balanced as given"
        draws = 1
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        chosen = np.concatenate([rng.choice(v, m, replace=False) for v in cells.values()])
        out.append(np.flatnonzero(np.isin(groups, chosen)))
    return out, note + f"{m} patient(s) per class x centre cell, {draws} random draw(s) averaged"


def chance_level(label, centre, groups) -> float:
    """R of random neighbours on these samples: sum_i P(SO) / sum_i P(OS), a neighbour drawn uniformly from
    the other patients' samples (from class x centre counts, minus each sample's own patient)."""
    (_, li), (_, ci), (_, gi) = (np.unique(np.asarray(a), return_inverse=True) for a in (label, centre, groups))
    n = np.zeros((li.max() + 1, ci.max() + 1))
    np.add.at(n, (li, ci), 1)
    own = np.zeros((gi.max() + 1, *n.shape))
    np.add.at(own, (gi, li, ci), 1)
    same_cell = n[li, ci] - own[gi, li, ci]
    so = n[li].sum(1) - own[gi, li].sum(1) - same_cell
    os_ = n[:, ci].sum(0) - own[gi, :, ci].sum(1) - same_cell
    others = len(li) - own[gi].sum((1, 2))
    so, os_ = (so / others).sum(), (os_ / others).sum()
    return float(so / os_) if os_ > 0 else float("inf")


def _counts(emb, label, centre, groups, k):
    """Per-sample cumulated SO and OS [n, k] and the four neighbour fractions."""
    nb = _neighbours(np.asarray(emb, np.float32), groups, k)
    same_bio, same_centre = label[nb] == label[:, None], centre[nb] == centre[:, None]
    fractions = {name: float(m.mean()) for name, m in (("SS", same_bio & same_centre), ("SO", same_bio & ~same_centre),
                                                       ("OS", ~same_bio & same_centre), ("OO", ~same_bio & ~same_centre))}
    return np.cumsum(same_bio & ~same_centre, axis=1), np.cumsum(~same_bio & same_centre, axis=1), fractions


def _ratio(so, os_):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(so, float) / np.asarray(os_, float)


def robustness_index(emb: np.ndarray, label: np.ndarray, centre: np.ndarray, groups: np.ndarray, k: int,
                     n_boot: int = 200, seed: int = 0, balance: bool = True, draws: int = 10) -> dict:
    """R at k (`value`; PathoROB's R / (1 + R) as `normalized`) with a patient-bootstrap 95% CI, random
    embeddings' level on the same samples (`chance`; `normalized_chance`), the R(k) curve, the neighbour
    fractions (SS, SO, OS, OO), and how the samples were balanced (`balance`). `groups` are patients; k is
    capped at the number of samples outside the largest patient."""
    emb, label, centre, groups = (np.asarray(a) for a in (emb, label, centre, groups))
    subsets, note = balanced_draws(label, centre, groups, draws, seed) if balance else ([np.arange(len(emb))], "off")
    biggest = np.unique(groups, return_counts=True)[1].max()
    k = int(min([k] + [len(rows) - biggest for rows in subsets]))
    if k < 1:
        raise ValueError("too few samples outside one patient for a neighbourhood")
    rng = np.random.default_rng(seed)
    values, curves, chances, boots, fractions = [], [], [], [], []
    per_draw = max(1, n_boot // len(subsets)) if n_boot else 0
    for rows in subsets:
        g = groups[rows]
        so, os_, frac = _counts(emb[rows], label[rows], centre[rows], g, k)
        curves.append(_ratio(so.sum(0), os_.sum(0)))
        values.append(curves[-1][-1])
        chances.append(chance_level(label[rows], centre[rows], g))
        fractions.append(frac)
        _, gid = np.unique(g, return_inverse=True)
        p_so = np.bincount(gid, so[:, -1], minlength=gid.max() + 1)
        p_os = np.bincount(gid, os_[:, -1], minlength=gid.max() + 1)
        for _ in range(per_draw):
            drawn = rng.integers(0, len(p_so), len(p_so))
            if p_os[drawn].sum() > 0:
                boots.append(p_so[drawn].sum() / p_os[drawn].sum())
    low, high = np.quantile(boots, [0.025, 0.975]) if boots else (np.nan, np.nan)
    value, chance = float(np.mean(values)), float(np.mean(chances))
    n_used = len(np.unique(np.concatenate(subsets)))
    return {"k": k, "value": value, "ci_low": float(low), "ci_high": float(high), "chance": chance,
            "normalized": _normalized(value), "normalized_chance": _normalized(chance),
            "reading": reading(value, low, high, chance),
            "curve": [float(v) for v in np.mean(curves, 0)],
            "fractions": {name: float(np.mean([f[name] for f in fractions])) for name in fractions[0]},
            "balance": note, "n_samples": int(len(emb)), "n_samples_used": int(n_used),
            "n_patients": int(len(np.unique(groups)))}


def _normalized(r: float) -> float:
    """PathoROB's SO / (SO + OS) from R = SO / OS."""
    return 1.0 if r == np.inf else float(r / (1 + r))


def reading(value, low, high, chance) -> str:
    """How the index reads against random embeddings on the same samples."""
    if np.isnan(value):
        return "undefined: no neighbour is of the same class from another centre or of another class from the same centre"
    if value == np.inf:
        return "biology dominates (no neighbour of another class from the same centre)"
    if np.isfinite(low) and low > chance:
        return "biology dominates (above chance)"
    if np.isfinite(high) and high < chance:
        return "centre dominates (below chance)"
    return "not distinguishable from random embeddings (CI covers chance)"


def linear_probe(x: np.ndarray, target: np.ndarray, groups: np.ndarray, seed: int = 0, folds: int = 5) -> dict:
    """Out-of-fold balanced accuracy of a standardised logistic regression predicting `target` from `x`,
    folds grouped by patient and stratified by `target`; with the chance level (1 / classes). A centre
    probe far above chance means the embedding encodes the centre."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, y = np.unique(np.asarray(target), return_inverse=True)
    n_classes = int(y.max()) + 1
    smallest = min(len(np.unique(groups[y == c])) for c in range(n_classes))
    k = min(folds, smallest)
    if n_classes < 2 or k < 2:
        return {"balanced_accuracy": float("nan"), "chance": 1.0 / max(n_classes, 1), "folds": 0}
    pred = np.empty_like(y)
    for train, test in StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(x, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        pred[test] = model.fit(x[train], y[train]).predict(x[test])
    return {"balanced_accuracy": float(balanced_accuracy_score(y, pred)), "chance": 1.0 / n_classes, "folds": k}


def embed_2d(x: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """(coordinates [n, 2], the method used): UMAP (umap-learn, cosine) when installed and asked for
    (auto|umap), else PCA of the standardised features."""
    if method in ("auto", "umap"):
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise ValueError("--map umap needs umap-learn: pip install 'slidemil[umap]' (or use --map pca)") from None
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reducer = umap.UMAP(n_neighbors=min(15, len(x) - 1), metric="cosine", random_state=seed)
                return reducer.fit_transform(x), "umap"
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    return PCA(2, random_state=seed).fit_transform(StandardScaler().fit_transform(x)), "pca"
