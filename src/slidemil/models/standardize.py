"""Feature standardisation fitted on a fold's training bags: z = (x - mean) / std per feature dimension, or
whitening z = (x - mean) W with W = V diag(1 / sqrt(lambda + eps)) V^T (ZCA, Bell & Sejnowski 1997; the
covariance's eigenvectors V and eigenvalues lambda, eps a shrinkage of 1% of the median eigenvalue).

Unscaled descriptors (classic MIL benchmarks, some encoders' outlier dimensions) make training losses start
at ~10 and validation losses jump by 10x between epochs; small cohorts cannot average that out. Features
dominated by a few shared directions (a strong anisotropy, as encoders' top principal components) hide
a witness instance's shift under the background's spread along them: per-dimension scaling keeps that,
whitening removes it (docs/protocol.md: abmil 0.59 -> 1.00 on such a cohort). The default, `shrunk`, whitens
by the covariance shrunk toward its diagonal (by the share of its correlations that is sampling noise, at
least 10%), which keeps that gain without full whitening's blow-up of near-constant directions (which moved
heatmaps off the tumour on handcrafted features). The statistics come from the
training bags only (never validation or test), are saved with the fold's weights and applied again by
every consumer of the model (predict, heatmaps, certify) through `Standardized`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from slidemil.models.base import MILModel, MILOutput, Wrapped

KEYS = ("standardize.mean", "standardize.std")
WHITEN_KEY = "standardize.whiten"
COV_ROWS_PER_BAG = 256        # evenly strided rows of each bag estimate the covariance (bounded cost) ...
COV_ROWS = 65536              # ... and of all bags together (D^2 work per row: 0.15 TFLOP at D = 1536)
SHRINK = 0.01                 # eps = SHRINK x median eigenvalue
TO_DIAGONAL = 0.1             # --standardize shrunk: at least 0.9 S + 0.1 diag S (more when S is noisy)
LW_ROWS = 4096                # rows kept (evenly over the bags) to estimate the covariance's sampling noise
UNIT_RANGE = (0.2, 5.0)       # RMS feature value regarded as "near unit scale"
SPREAD_LIMIT = 50.0           # largest / median per-dimension std beyond which dimensions dwarf each other
_ROWS = 4096                  # rows per float64 block when fitting


@dataclass
class Scaling:
    mean: torch.Tensor   # [D] float32
    std: torch.Tensor    # [D] float32, floored so constant dimensions stay finite
    whiten: torch.Tensor | None = None   # [D, D] float32: z = (x - mean) @ whiten, replacing the division by std
    eigen: tuple | None = None           # (eigenvalues ascending [D], eigenvectors [D, D]) of the covariance; not saved
    to_diagonal: float = TO_DIAGONAL     # the shrinkage `shrunk` uses (fit: estimated from the rows)
    # (device, dtype) -> (mean, divisor or whitening matrix) there: moved once, not at every bag (on a GPU a
    # copy from pageable memory waits for the GPU to finish its queue, so a per-bag copy is a host sync)
    _placed: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def fit(cls, bags: Iterable[torch.Tensor], covariance: bool = False, n_bags: int | None = None) -> Scaling:
        """Per-dimension mean and std over every instance of `bags` (float64 sums, one pass, one bag at a
        time); with `covariance`, also the covariance's eigendecomposition from evenly strided rows of each
        bag: up to COV_ROWS_PER_BAG, and COV_ROWS over the `n_bags` bags."""
        n, total, squares = 0, None, None
        m, first, second = 0, None, None          # the covariance's sample: count, sum, sum of x x^T
        per_bag = min(COV_ROWS_PER_BAG, max(16, COV_ROWS // n_bags)) if n_bags else COV_ROWS_PER_BAG
        per_bag_kept = max(1, LW_ROWS // n_bags) if n_bags else 16
        kept = []                                 # a few of those rows, for the covariance's sampling noise
        for bag in bags:
            if covariance:
                rows = bag[::max(1, -(-len(bag) // per_bag))].float().cpu()
                first = rows.double().sum(0) if first is None else first + rows.double().sum(0)
                second = (rows.T @ rows).double() if second is None else second + (rows.T @ rows).double()
                m += len(rows)
                kept.append(rows[::max(1, -(-len(rows) // per_bag_kept))].double())
            for x in bag.split(_ROWS):      # float64 a block of rows at a time: a 40k x 1024 bag would take 650 MB
                x = x.double()
                total = x.sum(0) if total is None else total + x.sum(0)
                squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
                n += len(x)
        mean = total / max(n, 1)
        std = (squares / max(n, 1) - mean * mean).clamp_min(0).sqrt()
        floor = max(float(std.max()) * 1e-6, 1e-8)
        eigen, to_diagonal = None, TO_DIAGONAL
        if covariance:
            centre = first / max(m, 1)
            cov = (second - m * torch.outer(centre, centre)) / max(m - 1, 1)
            eigvals, eigvecs = torch.linalg.eigh(cov)
            eigen = (eigvals.clamp_min(0), eigvecs)
            to_diagonal = max(TO_DIAGONAL, correlation_noise(cov, torch.cat(kept) - centre, m))
        return cls(mean.float().cpu(), std.clamp_min(floor).float().cpu(), eigen=eigen, to_diagonal=to_diagonal)

    def whitened(self) -> Scaling:
        """The same statistics as ZCA whitening (eps = SHRINK x median eigenvalue)."""
        values, vectors = self.eigen
        w = vectors @ torch.diag(1.0 / torch.sqrt(values + SHRINK * values.median().clamp_min(1e-12))) @ vectors.T
        return Scaling(self.mean, self.std, w.float(), self.eigen)

    def shrunk(self) -> Scaling:
        """Whitening by the covariance shrunk toward its diagonal, W = ((1 - r) S + r diag S)^(-1/2) with
        r = `to_diagonal` (the diagonal target of Schäfer & Strimmer 2005; r from `correlation_noise`, at least
        TO_DIAGONAL): uncorrelated features are simply standardised, and the correlation matrix R is taken as
        (1 - r) R + r I. A few dominant shared
        directions (eigenvalues L >> 1 of R) lose their weight, as under full whitening, while a direction of
        tiny variance is scaled up by 1 / sqrt(r) at most relative to per-dimension standardisation instead of
        to unit variance: on features with near-duplicate dimensions (handcrafted descriptors) full whitening
        turns that noise into signal. docs/protocol.md measures r."""
        values, vectors = self.eigen
        cov = (vectors * values) @ vectors.T
        diag = torch.diagonal(cov).clamp_min(float(self.std.min()) ** 2)
        r = self.to_diagonal
        lam, vec = torch.linalg.eigh((1 - r) * cov + r * torch.diag(diag))
        w = vec @ torch.diag(1.0 / torch.sqrt(lam.clamp_min(1e-12))) @ vec.T
        return Scaling(self.mean, self.std, w.float(), self.eigen)

    def anisotropy(self) -> float:
        """Largest over median covariance eigenvalue (1 for isotropic noise; needs fit(covariance=True))."""
        values = self.eigen[0]
        return float(values[-1] / values.median().clamp_min(1e-12))

    def far_from_unit(self) -> bool:
        """True when the features are far from unit scale: RMS value outside UNIT_RANGE, or one dimension's
        spread over SPREAD_LIMIT times the median's."""
        rms = float((self.mean ** 2 + self.std ** 2).mean().sqrt())
        spread = float(self.std.max() / self.std.median())
        return not (UNIT_RANGE[0] <= rms <= UNIT_RANGE[1]) or spread > SPREAD_LIMIT

    def describe(self) -> str:
        rms = float((self.mean ** 2 + self.std ** 2).mean().sqrt())
        text = f"RMS value {rms:.3g}, per-dimension std {float(self.std.min()):.3g}-{float(self.std.max()):.3g}"
        return text + (f", largest / median covariance eigenvalue {self.anisotropy():.3g}" if self.eigen else "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._placed:
            self._placed[key] = tuple(t.to(x.device, x.dtype) for t in (self.mean, self.whiten if self.whiten
                                                                        is not None else self.std))
        mean, scale = self._placed[key]
        return (x - mean) @ scale if self.whiten is not None else (x - mean) / scale

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(zip(KEYS, (self.mean, self.std)))
        if self.whiten is not None:
            out[WHITEN_KEY] = self.whiten
        return out

    @classmethod
    def pop_from(cls, state: dict) -> Scaling | None:
        """The scaling saved in a checkpoint's `state` (removed from it), or None."""
        if KEYS[0] not in state:
            return None
        whiten = state.pop(WHITEN_KEY, None)
        return cls(state.pop(KEYS[0]).float(), state.pop(KEYS[1]).float(),
                   None if whiten is None else whiten.float())


def correlation_noise(cov: torch.Tensor, rows: torch.Tensor, m: int) -> float:
    """Schäfer & Strimmer's (2005) shrinkage intensity toward the diagonal ("target D"), the share of the
    correlations that is sampling noise: sum over i != j of Var(r_ij) / sum of r_ij^2, with Var(r_ij) the
    variance of one centred standardised row's z_i z_j (estimated on `rows`) over the `m` rows `cov` was
    estimated from. Near 1 for uncorrelated features or few rows (whitening by `cov` would whiten noise),
    near 0 when a few strong directions are well estimated."""
    sd = torch.diagonal(cov).clamp_min(1e-24).sqrt()
    corr = cov / torch.outer(sd, sd)
    z = rows / sd
    off = (corr ** 2).sum() - (torch.diagonal(corr) ** 2).sum()
    if len(z) < 2 or off <= 0:
        return 1.0
    # E ||z z^T - corr||^2 over the rows, less its diagonal part E sum_i (z_i^2 - corr_ii)^2
    sq = (z * z).sum(1)
    full = (sq ** 2).mean() - 2 * ((z @ corr) * z).sum(1).mean() + (corr ** 2).sum()
    diag = ((z * z - torch.diagonal(corr)) ** 2).sum(1).mean()
    return float(((full - diag) / m / off).clamp(0.0, 1.0))


class Standardized(Wrapped):
    """A trained model behind its fold's input standardisation (inference only: training standardises the
    bags in the dataset, so strategies see the bare model)."""

    def __init__(self, model: MILModel, scaling: Scaling):
        super().__init__(model)
        self.scaling = scaling

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        return self.model(self.scaling(x), mask, coords)

    def forward_packed(self, x, segments) -> MILOutput:
        return self.model.forward_packed(self.scaling(x), segments)

    def forward_stream(self, chunks) -> MILOutput:
        return self.model.forward_stream(self.scaling(c) for c in chunks)
