"""MambaMIL with SR-Mamba: Yang, Wang & Chen, "MambaMIL: Enhancing Long Sequence Modeling with Sequence
Reordering in Computational Pathology", MICCAI 2024 (arXiv 2403.06800); and with LBMamba's locally
bidirectional scan: Zhang et al., "LBMamba: Locally Bi-directional Mamba", TMLR 2025 (arXiv 2506.15976).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slidemil.models.base import MILModel, MILOutput
from slidemil.models.registry import register
from slidemil.nn.attention import AttentionScorer
from slidemil.nn.blocks import recompute
from slidemil.nn.masked import full_mask, masked_softmax, per_bag
from slidemil.nn.segments import Segments, segment_pool, segment_softmax
from slidemil.nn.ssm import selective_scan


class S6Branch(nn.Module):
    """One selective-SSM path of a Mamba block (Gu & Dao 2023, Sec. 3.4 and Fig. 3): causal depth-wise conv1d + SiLU,
    x_proj -> (dt, B, C), dt_proj with softplus, A = -exp(A_log) (S4D-real init), D skip."""

    # Mamba keeps the SSM's own parameters out of weight decay (Gu & Dao 2023, official `_no_weight_decay`)
    no_weight_decay_names = ("A_log", "D", "dt_proj.bias")

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int, dt_init: str = "mamba",
                 dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner)  # causal: history is prepended
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        if dt_init == "mil":     # the MIL codes' `initialize_weights`: Xavier-normal weight, zero bias
            nn.init.xavier_normal_(self.dt_proj.weight)
            nn.init.zeros_(self.dt_proj.bias)
        elif dt_init == "mamba":  # Gu & Dao: step sizes log-uniform in [dt_min, dt_max]
            nn.init.uniform_(self.dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
            dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(1e-4)
            with torch.no_grad():
                self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus: softplus(b) = dt
        else:
            raise ValueError(f"dt_init must be 'mil' (the MambaMIL code's) or 'mamba' (Gu & Dao's), not {dt_init!r}")
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))

    def _conv(self, history: torch.Tensor, segments: Segments | None) -> torch.Tensor:
        """The causal depth-wise conv of x [B, n, d] given with its d_conv - 1 rows of history first, ->
        [B, d, n]. Packed bags: a tap that would reach into the previous bag reads zero instead, as the
        zero history a bag alone starts from."""
        if segments is None:
            return self.conv1d(history.transpose(1, 2))
        k = self.conv1d.kernel_size[0]
        n = history.shape[1] - (k - 1)
        pos = torch.cat([torch.arange(size, device=history.device) for size in segments.sizes])
        out = self.conv1d.bias
        for i, w in enumerate(self.conv1d.weight[:, 0].unbind(1)):        # tap i reads k - 1 - i rows back
            back = k - 1 - i
            tap = history[:, i:i + n] * w
            out = out + (tap * (pos >= back)[:, None] if back else tap)
        return out.transpose(1, 2)

    def _piece(self, seq, in_proj, context, h, window: int, chunk: int, segments: Segments | None = None):
        """One stretch of the block's input: in_proj, then conv (`context` = the d_conv - 1 rows of x
        before it, the causal conv's history), SSM from state `h`, gating. Returns y, the last state
        and the next piece's context."""
        x, z = in_proj(seq).chunk(2, dim=-1)
        xc = F.silu(self._conv(torch.cat([context, x], 1), segments))     # [B, d_inner, n]
        dt, b, c = self.x_proj(xc.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], -1)
        dt = (dt @ self.dt_proj.weight.T).transpose(1, 2)                  # bias added inside the scan
        y, h = selective_scan(xc, dt, -torch.exp(self.A_log.float()), b.transpose(1, 2), c.transpose(1, 2), self.D,
                              z.transpose(1, 2), self.dt_proj.bias, delta_softplus=True, window=window, chunk=chunk,
                              h0=None if segments is not None else h, return_state=True, segments=segments)
        return y.transpose(1, 2).to(x.dtype), h, torch.cat([context, x], 1)[:, -context.shape[1]:]

    def forward(self, seq: torch.Tensor, in_proj: nn.Linear, window: int, chunk: int,
                segments: Segments | None = None) -> torch.Tensor:
        """seq [B, L, d_model] in scan order -> gated y [B, L, d_inner]. The sequence is streamed in
        pieces of `chunk` rows (conv history and scan state carried over) and, in training, each piece
        is recomputed in backward, in_proj included: memory is O(chunk * d_inner * d_state) plus the
        output, at any L. Packed bags (`segments`, one pack of at most --pack-len rows) run as one piece,
        each bag's conv and scan starting afresh; the scan still bounds its states by `chunk`."""
        d_inner = self.conv1d.in_channels
        h = seq.new_zeros(seq.shape[0], d_inner, self.d_state, dtype=torch.float32)
        context = seq.new_zeros(seq.shape[0], self.conv1d.kernel_size[0] - 1, d_inner)
        if segments is not None:
            return self._piece(seq, in_proj, context, h, window, chunk, segments)[0]
        chunk = max(window, chunk - chunk % max(window, 1))
        checkpointed = self.training and torch.is_grad_enabled() and seq.shape[1] > chunk
        ys = []
        # split, not slicing: a split's backward is one concatenation, while each slice's backward
        # would write a gradient the size of the whole sequence
        for piece in seq.split(chunk, 1):
            args = (piece, in_proj, context, h, window, piece.shape[1])
            y, h, context = recompute(self._piece, *args) if checkpointed else self._piece(*args)
            ys.append(y)
        return torch.cat(ys, 1)


def reorder_index(n: int, rate: int, device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """SR-Mamba's sequence reordering (Yang et al., MICCAI 2024, Sec. 2.2): pad n to a multiple of `rate`, view the sequence as an
    (n' / rate) x rate matrix row-major and read it column-major (0, R, 2R, ..., 1, R+1, ...).
    Returns (order, its inverse, padded length)."""
    padded = n + (-n % rate)
    order = torch.arange(padded, device=device).view(-1, rate).T.reshape(-1)
    return order, torch.argsort(order), padded


def reorder_packed(segments: Segments, rate: int, device=None) -> tuple[torch.Tensor, torch.Tensor, Segments]:
    """`reorder_index` for packed bags, each reordered within itself. Returns (for each row of the reordered
    sequence the packed row it reads, T meaning a zero padding row; for each packed row its place in the
    reordered sequence; the reordered bags' padded sizes)."""
    total, reads, places, sizes, start = sum(segments.sizes), [], [], [], 0
    for offset, n in zip(segments.starts, segments.sizes):
        order, inverse, padded = reorder_index(n, rate, device)
        reads.append(torch.where(order < n, order + offset, total))
        places.append(inverse[:n] + start)
        sizes.append(padded)
        start += padded
    return torch.cat(reads), torch.cat(places), Segments(sizes)


def reverse_each(t: torch.Tensor, segments: Segments | None) -> torch.Tensor:
    """t [B, L, ...] with its rows in reverse order, within each packed bag when `segments` is given."""
    if segments is None:
        return t.flip(1)
    starts = torch.tensor(segments.starts, device=t.device)
    ids = segments.ids(t.device)
    # a token at start + k of a bag of n goes to start + n - 1 - k
    return t[:, 2 * starts[ids] + torch.tensor(segments.sizes, device=t.device)[ids] - 1
             - torch.arange(t.shape[1], device=t.device)]


class MambaBlock(nn.Module):
    """Mamba (official defaults: d_state 16, d_conv 4, expand 2, dt_rank ceil(d_model / 16)). `rate` > 0 adds SR-Mamba's
    second branch (own conv1d, x_proj, dt_proj, A_log, D; shared in_proj/out_proj) on the reordered
    in_proj output; `window` > 1 makes each scan locally bidirectional (LBMamba)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, rate: int = 0,
                 window: int = 1, chunk: int = 1024, dt_init: str = "mamba"):
        super().__init__()
        d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
        self.rate, self.window, self.chunk = rate, window, chunk
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.forward_branch = S6Branch(d_inner, d_state, d_conv, dt_rank, dt_init)
        self.reordered_branch = S6Branch(d_inner, d_state, d_conv, dt_rank, dt_init) if rate > 0 else None
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, h: torch.Tensor, segments: Segments | None = None) -> torch.Tensor:   # [B, L, d_model]
        """`segments`: h is one pack of bags (batch of one), each scanned and reordered as if alone."""
        y = self.forward_branch(h, self.in_proj, self.window, self.chunk, segments)
        if self.reordered_branch is not None:
            # reorder the zero-padded sequence; in_proj has no bias, so padding rows of h give the
            # zero in_proj output rows that the official code pads with
            n = h.shape[1]
            if segments is None:
                order, inverse, padded = reorder_index(n, self.rate, h.device)
                seq = F.pad(h, (0, 0, 0, padded - n))[:, order]
                y = y + self.reordered_branch(seq, self.in_proj, self.window, self.chunk)[:, inverse][:, :n]
            else:
                reads, places, padded = reorder_packed(segments, self.rate, h.device)
                seq = F.pad(h, (0, 0, 0, 1))[:, reads]
                y = y + self.reordered_branch(seq, self.in_proj, self.window, self.chunk, padded)[:, places]
        return self.out_proj(y)


class _MambaMILBase(MILModel):
    """x -> Linear(E, 512), GELU, Dropout -> n_layers x [h + block(LN(h))] -> LN -> attention pooling
    (Linear 512->128, tanh, Linear 128->1, softmax) -> Linear(512, C). Each bag's real rows are scanned
    alone (a scan reads every earlier row, so padding must never enter it).

    Initialisation. The official `initialize_weights` makes every Linear Xavier-normal with zero bias. We
    deliberately differ in two places, each switchable back:
    - the attention pooling head keeps PyTorch's default init (`attn_init="torch"`; "xavier" is the
      official). Its scores read LayerNorm-ed (unit-scale) tokens, where Xavier's larger V and w give
      initial attention logits ~3x wider than PyTorch's: the softmax starts peaked on arbitrary instances
      and the model memorises a small cohort by them before it finds the signal. Measured on 36 planted
      training bags (80 validation bags, lr 2e-4): validation AUROC 0.76 with the official init (training
      loss 0.007 after two epochs), 0.92-0.98 with the head's default init; the same happens with no
      Mamba layer at all (0.52 vs 0.99), so the cause is the head, not the scan (docs/protocol.md).
    - the SSM's dt_proj keeps Mamba's step-size init (`dt_init="mamba"`); the official call resets it too
      (zero dt bias, so delta = softplus(0) = 0.69 at init); `dt_init="mil"` reproduces it."""

    scores_note = ("Mamba's scores are attention over tokens that a scan along the patch list has mixed with "
                   "every earlier patch: they show what the pooling read, not where the evidence lies")

    attention_scores = True
    embedding_module = "embed"
    packable = True

    checkpoint_above = 4096
    # on a GPU whole layers are recomputed in backward only above this many instances: below it the memory
    # (~4 GB at 50k) is there, and the recomputation is a second forward of every layer
    gpu_checkpoint_above = 65_536

    def __init__(self, in_dim, n_outputs, dim, dropout, n_layers, blocks: list[nn.Module], flips: list[bool],
                 attn_init: str = "torch"):
        if attn_init not in ("torch", "xavier"):
            raise ValueError(f"attn_init must be 'torch' (PyTorch's default, ours) or 'xavier' (the official code's), "
                             f"not {attn_init!r}")
        super().__init__(in_dim, n_outputs)
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(dropout))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_layers))
        self.blocks = nn.ModuleList(blocks)
        self.flips = flips
        self.norm = nn.LayerNorm(dim)
        self.attention = AttentionScorer(dim, 128, 1, gated=False, w_bias=False)
        self.classifier = nn.Linear(dim, n_outputs)
        kept = ("attention.",) if attn_init == "torch" else ()
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith("dt_proj") and not name.startswith(kept):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _layer(self, h: torch.Tensor, i: int, segments: Segments | None = None) -> torch.Tensor:
        inner = self.norms[i](h)
        if self.flips[i]:
            return h + reverse_each(self.blocks[i](reverse_each(inner, segments), segments), segments)
        return h + self.blocks[i](inner, segments)

    def _encode(self, h: torch.Tensor, segments: Segments | None = None) -> torch.Tensor:
        """[n, dim] rows of one bag, or of a pack of bags (`segments`) -> the encoded rows."""
        h = h[None]
        limit = self.gpu_checkpoint_above if h.is_cuda else self.checkpoint_above
        big = self.training and torch.is_grad_enabled() and h.shape[1] > limit
        for i in range(len(self.blocks)):
            # large bags: keep only each layer's input and recompute the layer in backward (4 GB at 50k)
            h = recompute(self._layer, h, i, segments) if big else self._layer(h, i, segments)
        return self.norm(h)[0]

    def forward(self, x, mask=None, coords=None) -> MILOutput:
        mask = full_mask(x, mask)
        enc = per_bag(self._encode, self.embed(x), mask)
        a = masked_softmax(self.attention(enc)[..., 0], mask)
        z = (a.unsqueeze(1) @ enc)[:, 0]
        return MILOutput(self.classifier(z), a, bag_embedding=z)

    def forward_packed(self, x, segments) -> MILOutput:
        """One pack of bags as one sequence: every scan restarts at each bag's first row (state and conv
        history zero, LBMamba's windows aligned to the bag), SR-Mamba reorders each bag within itself, the
        flipped layers reverse each bag in place, and the attention softmax runs within each bag."""
        enc = self._encode(self.embed(x), segments)                          # [T, dim]
        a = segment_softmax(self.attention(enc)[:, 0], segments)
        z = segment_pool(a, enc, segments)
        return MILOutput(self.classifier(z), a, bag_embedding=z)


@register("mambamil", paper="Yang et al., MICCAI 2024 (arXiv 2403.06800)",
          summary="2 SR-Mamba layers (forward scan + scan of the rate-R reordered sequence) + attention pooling",
          complexity="O(N·d·n_state)")
class MambaMIL(_MambaMILBase):
    """MambaMIL (Yang et al., MICCAI 2024, Sec. 2): SR-Mamba layers, rate R = 5 (the paper's scripts; argparse says 10), dropout 0
    (subtyping scripts). The official non-CUDA SR-Mamba branch is broken; this follows
    the paper / CUDA path: shared in_proj, reorder x and z together, branch outputs summed before
    out_proj. The pure-PyTorch scan runs in chunks of `scan_chunk` positions, each recomputed in backward."""

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 512, dropout: float = 0.0, n_layers: int = 2,
                 rate: int = 5, d_state: int = 16, d_conv: int = 4, expand: int = 2, scan_chunk: int = 1024,
                 dt_init: str = "mamba", attn_init: str = "torch"):
        blocks = [MambaBlock(dim, d_state, d_conv, expand, rate=rate, chunk=scan_chunk, dt_init=dt_init)
                  for _ in range(n_layers)]
        super().__init__(in_dim, n_outputs, dim, dropout, n_layers, blocks, [False] * n_layers, attn_init)


@register("lbmamba", paper="Zhang et al., TMLR 2025 (arXiv 2506.15976), in MambaMIL",
          summary="MambaMIL with locally bidirectional scans (backward state inside windows), "
                  "scan direction alternating by layer",
          complexity="O(N·d·n_state)")
class LBMambaMIL(_MambaMILBase):
    """MambaMIL's network with LBMamba blocks: each scan adds a backward state inside aligned windows of
    `window` positions (8, the authors' validation script); the global scan direction flips every `flip_every`
    layers, so the cost stays one scan per layer. LBVim flips every two of its 24 layers; MambaMIL has two, where
    that would never flip and context beyond a window would only flow forward, so the default flips every layer
    (layer 0 forward, layer 1 backward). window = 1 with flip_every > n_layers is the plain forward Mamba."""

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 512, dropout: float = 0.0, n_layers: int = 2,
                 window: int = 8, flip_every: int = 1, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 scan_chunk: int = 1024, dt_init: str = "mamba", attn_init: str = "torch"):
        blocks = [MambaBlock(dim, d_state, d_conv, expand, window=window, chunk=scan_chunk, dt_init=dt_init)
                  for _ in range(n_layers)]
        flips = [(i // flip_every) % 2 == 1 for i in range(n_layers)]
        super().__init__(in_dim, n_outputs, dim, dropout, n_layers, blocks, flips, attn_init)
