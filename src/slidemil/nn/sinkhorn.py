"""Semi-relaxed, curriculum optimal transport by Sinkhorn-Knopp scaling (OTSurv's heterogeneity-aware OT,
adapted there from PPOT's `SemiCurrSinkhornKnopp_stable`).

Patches (rows) must each send exactly 1/N of mass; K prototype columns receive rho/K each, but only
softly (a KL penalty of strength gamma: the column scalings are raised to gamma / (gamma + eps)); a zero-
cost dummy column must absorb exactly 1 - rho, the mass that is not transported yet. Entropic
regularisation eps; when a scaling exceeds 1e8 it is absorbed into the log-domain potentials (u, v).
"""

from __future__ import annotations

import torch


def semi_relaxed_sinkhorn(cost: torch.Tensor, rho: float, epsilon: float = 0.1, gamma: float = 1.0,
                          tol: float = 1e-10, max_iter: int = 1000, keep_dummy: bool = False) -> torch.Tensor:
    """Transport plan [N, K] (or [N, K + 1] with the dummy column when `keep_dummy`), in float64, for a
    cost [N, K]. The iterations stay in the autograd graph, as the official code (cap `max_iter` for
    long bags: memory grows with the iterations run)."""
    cost = cost.double()
    n, k = cost.shape
    expanded = torch.cat([cost, cost.new_zeros(n, 1)], 1)
    u, v = cost.new_zeros(n, 1), cost.new_zeros(k + 1, 1)
    q = torch.exp(-expanded / epsilon)
    pa = cost.new_full((n, 1), 1.0 / n)
    pb = torch.cat([cost.new_full((k, 1), rho / k), cost.new_full((1, 1), 1.0 - rho)])
    fi = gamma / (gamma + epsilon)
    b = cost.new_full((k + 1, 1), 1.0 / (k + 1))
    w = cost.new_ones(k, 1)                                 # exp(v (fi - 1) / eps) on the prototype columns
    last_b, absorbed = b, False
    for _ in range(max_iter):
        a = pa / (q @ b)
        b = pb / (q.t() @ a)
        # KL-relaxed prototype columns; the dummy stays exact (and is 0 at rho = 1: never raised to a power,
        # whose gradient would be infinite there)
        b = torch.cat([b[:-1].pow(fi) * w, b[-1:]])
        err = torch.linalg.vector_norm(b - last_b)
        absorbed = bool(max(a.max(), b.max()) > 1e8)
        if absorbed:                                        # log-domain stabilisation
            u = u + epsilon * torch.log(a)
            v = v + epsilon * torch.log(b + torch.finfo(b.dtype).eps)
            w = w * b[:-1].pow(fi - 1)
            q = torch.exp((u - expanded + v.t()) / epsilon)
            b = torch.ones_like(b)
        last_b = b
        if err <= tol:
            break
    plan = q if absorbed else a * q * b.t()
    return plan if keep_dummy else plan[:, :-1]
