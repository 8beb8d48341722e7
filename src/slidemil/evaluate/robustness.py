"""Centre effects in an embedding space: the robustness index, linear probes, a 2-D map.

Robustness index (de Jong et al. 2025, "Current pathology foundation models are unrobust to medical
center differences", arXiv 2501.18055; the same definition as PathoROB): for every sample, its k
nearest neighbours by cosine similarity; SO counts neighbours of the Same biological class from an
Other centre, OS neighbours of the Other class from the Same centre, cumulated over the 1st..k-th
neighbour and summed over samples:

    RI(k) = sum SO / (sum SO + sum OS)

RI near 1: neighbourhoods follow biology across centres; 0.5: biology and centre weigh alike; near 0:
embeddings cluster by centre. Neighbours from the sample's own patient are left out (they share class
and centre and say nothing about either; the paper's slide-level neighbours are other slides too),
and the CI resamples patients (the paper bootstraps samples, which treats a slide's patches as
independent).
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


def robustness_index(emb: np.ndarray, label: np.ndarray, centre: np.ndarray, groups: np.ndarray, k: int,
                     n_boot: int = 200, seed: int = 0) -> dict:
    """RI at k with a patient-bootstrap 95% CI, the RI curve over 1..k, and the neighbour fractions
    (SS, SO, OS, OO of all k-neighbours). `groups` are patients; k is capped at the number of samples
    outside the largest patient."""
    emb, label, centre, groups = (np.asarray(a) for a in (emb, label, centre, groups))
    biggest = np.unique(groups, return_counts=True)[1].max()
    k = int(min(k, len(emb) - biggest))
    if k < 1:
        raise ValueError("too few samples outside one patient for a neighbourhood")
    nb = _neighbours(np.asarray(emb, np.float32), groups, k)
    same_bio, same_centre = label[nb] == label[:, None], centre[nb] == centre[:, None]
    so = np.cumsum(same_bio & ~same_centre, axis=1)          # [n, k]: cumulated over the 1st..j-th neighbour
    os_ = np.cumsum(~same_bio & same_centre, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = so.sum(0) / (so.sum(0) + os_.sum(0))
    _, gid = np.unique(groups, return_inverse=True)
    per_group_so = np.bincount(gid, so[:, -1], minlength=gid.max() + 1)
    per_group_os = np.bincount(gid, os_[:, -1], minlength=gid.max() + 1)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(per_group_so), len(per_group_so))
        s, o = per_group_so[drawn].sum(), per_group_os[drawn].sum()
        if s + o > 0:
            boots.append(s / (s + o))
    low, high = np.quantile(boots, [0.025, 0.975]) if boots else (np.nan, np.nan)
    fractions = {name: float(m.mean()) for name, m in (("SS", same_bio & same_centre), ("SO", same_bio & ~same_centre),
                                                       ("OS", ~same_bio & same_centre), ("OO", ~same_bio & ~same_centre))}
    return {"k": k, "value": float(curve[-1]), "ci_low": float(low), "ci_high": float(high),
            "curve": [float(v) for v in curve], "fractions": fractions, "n_samples": int(len(emb)),
            "n_patients": int(len(per_group_so))}


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
