"""A weight-free encoder for offline use: colour, stain and texture statistics of a patch.

Colour: RGB and saturation/value moments. Stain: colour deconvolution into haematoxylin, eosin and
DAB optical densities (Ruifrok & Johnston 2001, the matrix of scikit-image's `rgb2hed`), their
moments, a 4-bin histogram of haematoxylin and the fraction of strongly stained pixels before and
after a 5x5 erosion (nuclear density and nuclear size). Texture: gradient magnitude and Laplacian
at two scales. 32 numbers, computed in torch on the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidemil.features.encoders.registry import EncoderSpec, register_encoder

# rows: haematoxylin, eosin, DAB stain vectors in OD space (skimage.color.hed_from_rgb is its inverse)
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


class HandcraftedFeatures(nn.Module):
    dim = 32

    def __init__(self):
        super().__init__()
        self.register_buffer("hed_from_rgb", _HED_FROM_RGB.clone(), persistent=False)
        sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("kernels", torch.stack([sobel, sobel.T, lap])[:, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] RGB in [0, 1]."""
        x = x.float().clamp(0, 1)
        b = x.shape[0]
        flat = x.flatten(2)
        mx, mn = flat.max(1).values, flat.min(1).values
        sat = (mx - mn) / mx.clamp_min(1e-6)
        od = -torch.log((x * 255 + 1) / 256)                                   # optical density
        hed = torch.einsum("bchw,cd->bdhw", od, self.hed_from_rgb).clamp_min(0).flatten(2)
        h = hed[:, 0]
        h_img = h.view(b, 1, *x.shape[2:])
        eroded = -F.max_pool2d(-h_img, 5, stride=1, padding=2).flatten(1)
        hist = torch.stack([((h >= lo) & (h < hi)).float().mean(1)
                            for lo, hi in ((0.0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 1e9))], 1)
        gray = x.mean(1, keepdim=True)
        tex = []
        for img in (gray, F.avg_pool2d(gray, 2)):
            g = F.conv2d(img, self.kernels, padding=1)
            grad = torch.sqrt(g[:, 0] ** 2 + g[:, 1] ** 2).flatten(1)
            tex += [grad.mean(1), grad.std(1), g[:, 2].abs().flatten(1).mean(1)]
        feats = [flat.mean(2), flat.std(2),                                  # 6 colour moments
                 sat.mean(1, keepdim=True), sat.std(1, keepdim=True), mx.mean(1, keepdim=True),
                 (sat > 0.07).float().mean(1, keepdim=True),                  # tissue fraction
                 hed.mean(2), hed.std(2),                                    # 6 stain moments
                 hist,                                                       # 4
                 torch.stack([(h > 0.5).float().mean(1), (h > 0.8).float().mean(1),
                              (eroded > 0.5).float().mean(1), (eroded > 0.8).float().mean(1)], 1),
                 torch.stack(tex, 1),                                        # 6
                 torch.stack([od.mean((1, 2, 3)), od.flatten(1).std(1)], 1)]
        return torch.cat(feats, 1)


register_encoder(EncoderSpec(
    name="handcrafted", dim=HandcraftedFeatures.dim, builder=HandcraftedFeatures, input_size=224,
    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), mpp=0.5, patch_size=256, needs_weights=False,
    reference="colour, colour-deconvolution stain (Ruifrok & Johnston 2001) and texture statistics"))
