"""Instance-level pooling: instance_max is the max of the instance logits."""

from __future__ import annotations

import torch

from slidemil import models


def test_instance_max_binary_is_max_of_instance_logits():
    model = models.create("instance_max", in_dim=8, n_outputs=2).eval()
    x = torch.randn(1, 30, 8)
    with torch.no_grad():
        out = model(x)
        inst = model.instance_net(x)[0, :, 0]
    assert torch.allclose(out.logits[0, 1], inst.max())
    assert out.logits[0, 0] == 0
