"""MambaMIL / LBMamba: the selective scan against its recurrence, reordering, streaming, weight decay."""

from __future__ import annotations

import pytest
import torch

from slidemil import models


def _scan_inputs(b=2, d=6, n=4, L=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(u=r(b, d, L), delta=r(b, d, L), A=-torch.rand(d, n, generator=g) * 2, B=r(b, n, L), C=r(b, n, L),
                D=r(d), z=r(b, d, L), delta_bias=r(d), delta_softplus=True)


def _values_and_grads(scan, inp, names):
    """(y, then the gradient of each input in `names`) for a non-linear loss of scan()'s output."""
    y = scan()
    (y * torch.cos(y)).sum().backward()
    out = (y.detach(), *(inp[k].grad.clone() for k in names))
    for k in names:
        inp[k].grad = None
    return out


@pytest.mark.parametrize("window", [1, 5, 8])
@pytest.mark.parametrize("chunk", [1024, 16, 7, 1])
def test_chunked_scan_matches_the_naive_loop(window, chunk):
    """The chunked scan (L = 53 is a multiple of neither chunk nor window) equals the recurrence run
    one step at a time, values and gradients, to 1e-4."""
    from slidemil.nn.ssm import selective_scan, selective_scan_reference

    inp = _scan_inputs()
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    for k in names:
        inp[k].requires_grad_(True)
    ref = _values_and_grads(lambda: selective_scan_reference(**inp, window=window), inp, names)
    ours = _values_and_grads(lambda: selective_scan(**inp, window=window, chunk=chunk), inp, names)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_linear_scan_gradients_are_exact():
    """The hand-written backward of h_t = a_t h_{t-1} + b_t (a reverse scan) against finite differences,
    in float64, for a, b and the initial state (broadcast over a batch dimension)."""
    from slidemil.nn.ssm import linear_scan

    g = torch.Generator().manual_seed(0)
    a = torch.rand(9, 2, 3, 4, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(9, 2, 3, 4, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(linear_scan, (a, b, h0))


def test_scan_carries_state_between_calls():
    from slidemil.nn.ssm import selective_scan

    inp = _scan_inputs(L=40)
    whole = selective_scan(**inp)
    first = {k: (v[..., :25] if torch.is_tensor(v) and v.dim() == 3 else v) for k, v in inp.items()}
    second = {k: (v[..., 25:] if torch.is_tensor(v) and v.dim() == 3 else v) for k, v in inp.items()}
    y1, h = selective_scan(**first, return_state=True)
    y2 = selective_scan(**second, h0=h)
    torch.testing.assert_close(torch.cat([y1, y2], -1), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 8])
@pytest.mark.parametrize("chunk", [1024, 8])
def test_packed_scan_runs_each_bag_as_if_alone(window, chunk):
    """`segments`: one scan over bags laid end to end equals scanning each bag alone (state reset at each
    bag's start, LBMamba's windows aligned to it; sizes that are not multiples of the window), values and
    gradients; a bag's backward window state still reads its own first position."""
    from slidemil.nn.segments import Segments
    from slidemil.nn.ssm import selective_scan

    sizes = [5, 9, 3, 12, 7, 1]
    inp = _scan_inputs(b=1, L=sum(sizes))
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    for k in names:
        inp[k].requires_grad_(True)

    def alone():
        parts, lo = [], 0
        for n in sizes:
            part = {k: (v[..., lo:lo + n] if torch.is_tensor(v) and v.dim() == 3 else v) for k, v in inp.items()}
            parts.append(selective_scan(**part, window=window))
            lo += n
        return torch.cat(parts, -1)

    packed = _values_and_grads(lambda: selective_scan(**inp, window=window, chunk=chunk, segments=Segments(sizes)),
                               inp, names)
    for a, b in zip(_values_and_grads(alone, inp, names), packed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lbmamba_window_one_is_the_forward_scan():
    from slidemil.nn.ssm import selective_scan, selective_scan_reference

    inp = _scan_inputs()
    plain = selective_scan_reference(**inp, window=0)
    torch.testing.assert_close(selective_scan(**inp, window=1), plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(selective_scan(**inp, window=8), plain, atol=1e-3), "the local backward state is used"
    torch.manual_seed(0)
    lb = models.create("lbmamba", 16, 2, dim=32, window=1).eval()
    torch.manual_seed(0)
    mamba = models.create("lbmamba", 16, 2, dim=32, window=1, n_layers=2).eval()
    x = torch.randn(1, 30, 16)
    torch.testing.assert_close(lb(x).logits, mamba(x).logits)


def test_lbmamba_backward_state_only_looks_inside_its_window():
    """Changing the input at position 20 changes outputs before it only within its window [16, 24)."""
    from slidemil.nn.ssm import selective_scan

    inp = _scan_inputs(b=1)
    base = selective_scan(**inp, window=8)
    inp["u"] = inp["u"].clone()
    inp["u"][..., 20] += 3.0
    changed = (selective_scan(**inp, window=8) - base).abs().amax((0, 1)) > 1e-6
    assert not changed[:16].any() and changed[16:21].all() and changed[21:].all()


def test_sr_mamba_reordering_is_a_permutation_and_its_inverse_restores_order():
    from slidemil.models.mambamil import reorder_index

    for n, rate in [(53, 5), (40, 10), (7, 3), (1, 5)]:
        order, inverse, padded = reorder_index(n, rate)
        assert padded % rate == 0 and padded - n < rate
        assert torch.equal(order.sort().values, torch.arange(padded))
        seq = torch.arange(padded)
        assert torch.equal(seq[order][inverse], seq)
        # column-major reading of the (padded / R) x R row-major matrix: 0, R, 2R, ..., then 1, R+1, ...
        assert order[: padded // rate].tolist() == list(range(0, padded, rate))
        assert order[padded // rate] == 1 if padded > rate else True


def test_mamba_streaming_in_pieces_changes_nothing():
    from slidemil.models.mambamil import MambaBlock

    torch.manual_seed(0)
    for kw in ({"rate": 5}, {"window": 8}):
        block = MambaBlock(16, 4, 4, 2, chunk=1024, **kw).train()
        x = torch.randn(1, 53, 16, requires_grad=True)
        y1 = block(x)
        y1.sum().backward()
        g1, w1 = x.grad.clone(), block.in_proj.weight.grad.clone()
        x.grad, block.in_proj.weight.grad = None, None
        block.chunk = 8
        y2 = block(x)
        y2.sum().backward()
        g2, w2 = x.grad.clone(), block.in_proj.weight.grad.clone()
        torch.testing.assert_close(w1, w2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_mamba_parameters_out_of_weight_decay():
    from slidemil.train.trainer import param_groups

    model = models.create("mambamil", 16, 2, dim=32)
    groups = param_groups(model, 1e-4)
    no_decay = {id(p) for p in groups[1]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in no_decay) == (name.endswith(("A_log", ".D", "dt_proj.bias"))), name


def test_lbmamba_two_layers_carry_context_both_ways_beyond_the_window():
    """Default 2 layers: layer 1 scans backward, so the first instance's encoding depends on the last one
    (32 positions away, far outside the 8-wide window); with no flip (flip_every > layers) it does not."""
    x = torch.randn(40, 16)
    for flip_every, reaches in ((1, True), (4, False)):
        torch.manual_seed(0)
        model = models.create("lbmamba", 16, 2, dim=16, flip_every=flip_every).eval()
        h = model.embed(x).detach().requires_grad_(True)
        (model._encode(h)[0] * torch.randn(16)).sum().backward()    # (a plain sum is flat through the LayerNorm)
        assert h.grad[1].abs().sum() > 1e-6
        assert (h.grad[32:].abs().sum() > 1e-6) == reaches, flip_every


def test_dt_init_follows_mamba_or_the_official_mil_code():
    """dt_init="mamba" (default): softplus(dt bias) log-uniform in [1e-3, 0.1] (Gu & Dao); "mil": the MambaMIL
    code's `initialize_weights` also resets dt_proj (zero bias, so every step size starts at softplus(0) = ln 2)."""
    import math

    import torch.nn.functional as F

    torch.manual_seed(0)
    ours = models.create("mambamil", 16, 2, dim=32).blocks[0].forward_branch.dt_proj
    dt = F.softplus(ours.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6 and dt.std() > 0
    official = models.create("lbmamba", 16, 2, dim=32, dt_init="mil").blocks[0].forward_branch.dt_proj
    torch.testing.assert_close(F.softplus(official.bias), torch.full_like(official.bias, math.log(2)))
    with pytest.raises(ValueError, match="dt_init"):
        models.create("mambamil", 16, 2, dim=32, dt_init="zero")


def test_attention_head_keeps_torch_init_unless_asked_for_the_official_xavier():
    """The official `initialize_weights` makes every Linear Xavier-normal with zero bias; we keep PyTorch's
    default init in the attention pooling head only (`attn_init="torch"`): Xavier's head starts with
    attention logits ~3x wider on the LayerNorm-ed tokens, and memorised a 36-bag cohort (docs/protocol.md)."""
    torch.manual_seed(0)
    ours = models.create("mambamil", 16, 2, dim=64)
    official = models.create("mambamil", 16, 2, dim=64, attn_init="xavier")
    for model in (ours, official):          # everything else is the official Xavier-normal, zero bias
        assert model.embed[0].bias.abs().sum() == 0 and model.classifier.bias.abs().sum() == 0
    v_ours, v_official = ours.attention.VU, official.attention.VU
    assert v_ours.bias.abs().sum() > 0 and v_ours.weight.abs().max() <= 64 ** -0.5       # kaiming-uniform bound
    assert v_official.bias.abs().sum() == 0
    assert abs(v_official.weight.std().item() - (2 / (64 + 128)) ** 0.5) < 0.01          # Xavier-normal std
    tokens = torch.randn(500, 64)                      # unit-scale, as after the LayerNorm
    assert official.attention(tokens).std() > 2 * ours.attention(tokens).std()
    with pytest.raises(ValueError, match="attn_init"):
        models.create("lbmamba", 16, 2, dim=32, attn_init="zero")
