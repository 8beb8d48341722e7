"""Building blocks: the fast CPU dropout is dropout."""

from __future__ import annotations

import torch


def test_fast_dropout_is_dropout():
    from slidemil.nn.attention import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.25).train()
    x = torch.ones(400, 512)
    y = drop(x)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert abs(y.mean().item() - 1.0) < 0.02
    torch.manual_seed(0)
    assert torch.equal(drop(x), y), "not reproducible under a seed"
    assert torch.equal(drop.eval()(x), x)
