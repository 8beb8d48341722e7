"""TransMIL's training step at N = 50k, slidemil vs torchmil, side by side in one run: seconds per step
and peak RSS rise over the process before the first step (as benchmarks/models.py measures), each
contender in a fresh process, same configuration (D 1024, 512 wide, 8 heads, 256 landmarks, 2 layers).

torchmil is never a slidemil dependency: install it beside the venv for this benchmark only, e.g.
    pip install --target .bench/torchmil --no-deps torchmil tensordict torchmetrics einops lightning-utilities pyvers
    python benchmarks/transmil_memory.py --torchmil-site .bench/torchmil [--sizes 50000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from models import measure, measure_steps  # noqa: E402

DIM = 1024


def torchmil_step(n: int, site: str) -> dict:
    sys.path.insert(0, site)
    import torch
    import torch.nn.functional as F
    from torchmil.models import TransMIL

    torch.manual_seed(0)
    model = TransMIL(in_shape=(DIM,), att_dim=512, n_heads=8, n_landmarks=256, dropout=0.1)
    return measure_steps(model, lambda logit, y: F.binary_cross_entropy_with_logits(logit, y.float()), n, DIM)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--torchmil-site", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50000])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        who, n = args.one[0], int(args.one[1])
        print(json.dumps(measure("transmil", n, DIM) if who == "slidemil" else torchmil_step(n, args.torchmil_site)))
        return
    print("| N | slidemil: s/step, peak rise MB | torchmil: s/step, peak rise MB | memory ratio | time ratio |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        res = {}
        for who in ("slidemil", "torchmil"):
            out = subprocess.run([sys.executable, __file__, "--torchmil-site", args.torchmil_site, "--one", who, str(n)],
                                 capture_output=True, text=True, check=True)
            res[who] = json.loads(out.stdout.strip().splitlines()[-1])
        ours, ref = res["slidemil"], res["torchmil"]
        print(f"| {n:,} | {ours['seconds']:.1f} s, {ours['rise_mb']:.0f} | {ref['seconds']:.1f} s, {ref['rise_mb']:.0f} "
              f"| {ours['rise_mb'] / ref['rise_mb']:.2f} | {ours['seconds'] / ref['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
