"""Shared fixtures: tiny synthetic cohorts built on the fly (no downloads, no files in the repo)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidemil.synthetic import make_feature_cohort

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def feature_cohort(tmp_path_factory):
    """24 patients, some with two slides, 32-d features, 20% witness instances in positive bags."""
    root = tmp_path_factory.mktemp("cohort")
    table = make_feature_cohort(root, n_patients=24, dim=32, bag_size=(20, 50), witness_rate=0.2, signal=2.0,
                                seed=3)
    return root, table


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo's whole pipeline on 8 patients of smaller slides (trained run, heatmaps, report)."""
    from slidemil.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    metrics = run_demo(out, quiet=True, n_patients=8, slide_size=(2048, 3072))
    return out, metrics


def planted_bags(n_bags: int, dim: int = 32, n_classes: int = 2, seed: int = 0, witness_rate: float = 0.1,
                 bag_size=(30, 80), signal: float = 2.0):
    """In-memory bags for model-level tests: list of (x [N, D] tensor, label, instance labels)."""
    from slidemil.synthetic import make_bag

    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(1234).normal(size=(n_classes - 1, dim))
    protos = signal * directions / np.linalg.norm(directions, axis=1, keepdims=True) * np.sqrt(dim) / 4
    bags = []
    for i in range(n_bags):
        label = i % n_classes
        x, inst = make_bag(rng, label, protos, int(rng.integers(*bag_size)), witness_rate)
        bags.append((torch.from_numpy(x), label, inst))
    return bags
