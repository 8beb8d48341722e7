"""Re-embedding modules placed between the patch features and any aggregator (`--reembed NAME`).

A re-embedder maps [B, N, E] (with the mask) to [B, N, out_dim]; the aggregator is built for
out_dim. R²T's authors use it this way ("put the rrt_enc before the aggregation module", Tang et al.,
CVPR 2024, Sec. 3.4).
"""

from __future__ import annotations

from slidemil.models.ads import ADS
from slidemil.models.base import MILModel, MILOutput, Wrapped
from slidemil.models.rrt import RRTReembed
from slidemil.nn.masked import full_mask
from slidemil.utils.registry import Registry

REEMBEDDINGS = Registry("re-embedding", skip=("in_dim",))
REEMBEDDINGS.register("rrt", RRTReembed, paper="Tang et al., CVPR 2024 (arXiv 2402.17228)",
                      summary="R²T: projection + regional MSA (EPEG) + cross-region MSA, in front of any aggregator")
REEMBEDDINGS.register("ads", ADS, paper="Tang et al. 2025 (arXiv 2509.20923), PackMIL",
                      summary="PackMIL's attention-driven downsampler: attention shortcut + token MLP; with "
                              "--strategy packmil each training part is downsampled r-fold")


class Reembedded(Wrapped):
    """An aggregator behind a re-embedder: same outputs, instance scores, loss and training hooks as the
    aggregator."""

    def __init__(self, encoder, model: MILModel, in_dim: int):
        super().__init__(model, in_dim)
        self.encoder = encoder
        # both encoders keep to each bag of a pack: R²T runs each bag alone, ADS pools its attention per bag
        self.packable = model.packable and getattr(encoder, "packable", False)
        self.streams = False

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        return self.model(self.encoder(x, mask), mask, coords)

    def forward_packed(self, x, segments) -> MILOutput:
        return self.model.forward_packed(self.encoder.packed(x, segments), segments)
