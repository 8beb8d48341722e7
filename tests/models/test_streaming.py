"""`--max-instances-infer`: a bag scored chunk by chunk gives the outputs of the whole bag."""

from __future__ import annotations

import pytest
import torch

import slidemil.models as models
from slidemil.data.bags import BagDataset
from slidemil.models.registry import MODELS
from slidemil.models.standardize import Scaling, Standardized
from slidemil.train.trainer import infer

STREAMING = [n for n in MODELS.available() if MODELS.info(n).cls.streams]


@pytest.mark.parametrize("n_outputs", [2, 3])
@pytest.mark.parametrize("name", STREAMING)
def test_chunked_scoring_equals_the_whole_bag(name, n_outputs):
    assert {"abmil", "mean_pool"} <= set(STREAMING)
    torch.manual_seed(0)
    model = models.create(name, in_dim=16, n_outputs=n_outputs).eval()
    x = torch.randn(1000, 16) * 3                      # large logits: the running maximum must rescale
    x[700:710] += 20                                   # the top instances come late, in a later chunk
    with torch.no_grad():
        whole = model(x[None])
        for chunk in (97, 500, 1000):
            part = model.forward_stream(x.split(chunk))
            torch.testing.assert_close(part.logits, whole.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(part.instance_scores, whole.instance_scores, atol=1e-6, rtol=1e-4)


def test_infer_streams_big_bags_only_and_through_the_standardisation():
    torch.manual_seed(1)
    bags = [torch.randn(n, 8) * 5 + 2 for n in (50, 400, 1200)]
    ds = BagDataset.from_arrays([b.numpy() for b in bags], [0, 1, 0])
    model = Standardized(models.create("abmil", in_dim=8, n_outputs=2), Scaling.fit(bags))
    whole = infer(model, ds, torch.device("cpu"), keep_scores=True)
    calls = []
    original = model.model.forward_stream
    model.model.forward_stream = lambda chunks: calls.append(1) or original(chunks)
    part = infer(model, ds, torch.device("cpu"), keep_scores=True, chunk=300)
    assert len(calls) == 2                                   # the 400 and 1200 instance bags, not the 50
    torch.testing.assert_close(torch.from_numpy(part.logits), torch.from_numpy(whole.logits), atol=1e-5, rtol=1e-5)
    for a, b in zip(part.instance_scores, whole.instance_scores):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-6, rtol=1e-4)
    transmil = models.create("transmil", in_dim=8, n_outputs=2)
    assert not transmil.streams                              # takes the bag whole whatever the chunk
