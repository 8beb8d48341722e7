"""The three generators of Raff & Holt (NeurIPS 2023, arXiv 2310.17867), Algorithms 1-3, as in the
the authors' notebook: background N(0, 1), poison N(-10, 0.1^2), D = 16 by default.

Each returns (train_bags, train_y, test_bags, test_y) with equal class counts; bags are float32 arrays
[n, D]. `poisoned=False` gives the standard variant of each test, which a correct model must solve.
`min_size` fills every bag with background up to that many instances (the notebook's `min_size=45`).
Two notebook quirks are kept because they define the published tests: the "obvious" positive
instance of Algorithm 1 is unreachable (`randint(0, 1)` is always 0: only N(0, 3^2) positives occur),
and Algorithm 3's training negatives hold exactly one concept copy (`randint(1, 2)` is always 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slidemil.utils.registry import Registry

# name -> generator(n_train, n_test, dim, seed, min_size, poisoned) -> MILTask, in the paper's order
TESTS = Registry("certify test", sort=False)


@dataclass
class MILTask:
    train_bags: list[np.ndarray]
    train_y: np.ndarray
    test_bags: list[np.ndarray]
    test_y: np.ndarray


def _gauss(rng, n, mean, sd, dim):
    return rng.normal(mean, sd, size=(n, dim)).astype(np.float32)


def _finish(rng, parts, dim, min_size, n_background):
    """Concatenate concept parts with background (random count, or filled up to `min_size`), shuffled."""
    concept = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    n_bg = max(0, min_size - len(concept)) if min_size else n_background
    bag = np.concatenate([concept, _gauss(rng, n_bg, 0.0, 1.0, dim)])
    return bag[rng.permutation(len(bag))]


def _split(rng, make, n: int, train: bool):
    bags, ys = [], []
    for label in (0, 1):
        for _ in range(n // 2):
            bags.append(make(rng, label, train))
            ys.append(label)
    order = rng.permutation(len(bags))
    return [bags[i] for i in order], np.asarray(ys)[order]


@TESTS.register("single_concept")
def single_concept(n_train=1000, n_test=500, dim=16, seed=0, min_size=None, poisoned=True) -> MILTask:
    """Algorithm 1. Train: negatives = 1 poison + U{1..9} background; positives = U{1..3} N(0, 3^2)
    + U{1..4} background. Test: the poison moves to the positives; negatives are clean."""
    def make(rng, label, train):
        parts = []
        if label == 1:
            parts.append(_gauss(rng, int(rng.integers(1, 4)), 0.0, 3.0, dim))
            if poisoned and not train:
                parts.append(_gauss(rng, 1, -10.0, 0.1, dim))
            return _finish(rng, parts, dim, min_size, int(rng.integers(1, 5)))
        if poisoned and train:
            parts.append(_gauss(rng, 1, -10.0, 0.1, dim))
        return _finish(rng, parts, dim, min_size, int(rng.integers(1, 10)))

    return _task(make, n_train, n_test, seed)


@TESTS.register("threshold_poison")
def threshold_poison(n_train=1000, n_test=500, dim=16, seed=0, min_size=None, poisoned=True) -> MILTask:
    """Algorithm 2. Positive iff both A ~ N(2, 0.1^2) and B ~ N(3, 0.1^2) occur. Train negatives:
    poison + one of {A, B} + U{1..4} background; positives: U{1..4} A, U{1..4} B, poison with
    probability 1/10. Test: negatives clean; positives carry one poison."""
    def make(rng, label, train):
        parts = []
        if label == 1:
            parts += [_gauss(rng, int(rng.integers(1, 5)), 2.0, 0.1, dim), _gauss(rng, int(rng.integers(1, 5)), 3.0, 0.1, dim)]
            if poisoned and ((train and rng.random() < 0.1) or not train):
                parts.append(_gauss(rng, 1, -10.0, 0.1, dim))
        else:
            parts.append(_gauss(rng, 1, 2.0 if rng.random() < 0.5 else 3.0, 0.1, dim))
            if poisoned and train:
                parts.append(_gauss(rng, 1, -10.0, 0.1, dim))
        return _finish(rng, parts, dim, min_size, int(rng.integers(1, 5)))

    return _task(make, n_train, n_test, seed)


@TESTS.register("false_frequency")
def false_frequency(n_train=1000, n_test=500, dim=16, seed=0, min_size=None, poisoned=True) -> MILTask:
    """Algorithm 3. Positive iff A ~ N(-2, 0.1^2) and B ~ N(2, 0.1^2) co-occur. Train: negatives hold
    one copy of A or B, positives one of each, + U{1..9} background. Test negatives hold 35-39 copies
    of only A or only B (the frequency shift); `poisoned=False` keeps one copy at test time too."""
    def make(rng, label, train):
        if label == 1:
            parts = [_gauss(rng, 1, -2.0, 0.1, dim), _gauss(rng, 1, 2.0, 0.1, dim)]
        else:
            copies = 1 if train or not poisoned else int(rng.integers(35, 40))
            parts = [_gauss(rng, copies, -2.0 if rng.random() < 0.5 else 2.0, 0.1, dim)]
        return _finish(rng, parts, dim, min_size, int(rng.integers(1, 10)))

    return _task(make, n_train, n_test, seed)


def _task(make, n_train, n_test, seed) -> MILTask:
    rng = np.random.default_rng(seed)
    train_bags, train_y = _split(rng, make, n_train, True)
    test_bags, test_y = _split(rng, make, n_test, False)
    return MILTask(train_bags, train_y, test_bags, test_y)

