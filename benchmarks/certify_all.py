"""Run `slidemil certify` over the whole registry with the default settings and write the table of
docs/certification.md (between the CERTIFY-TABLE markers), with the command and the date.

    python benchmarks/certify_all.py [--seeds 2] [--doc docs/certification.md]
"""

from __future__ import annotations

import argparse
import datetime
import re
import time
from pathlib import Path

import torch

from slidemil.certify.run import CertifySettings, certify


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "certification.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    settings = CertifySettings(seeds=args.seeds)
    per_seed, summary = certify(settings=settings, progress=lambda r: print(
        f"{r['model']:>14} {r['test']:>16} seed {r['seed']}: {r['train_auroc']:.2f} -> {r['test_auroc']:.2f} "
        f"{r['verdict']} ({r['seconds']:.0f}s)", flush=True))
    minutes = (time.perf_counter() - t0) / 60
    tests = list(dict.fromkeys(summary["test"]))
    lines = ["| model | " + " | ".join(tests) + " |", "|---|" + "---|" * len(tests)]
    for model, part in summary.groupby("model", sort=False):
        cells = []
        for t in tests:
            r = part[part["test"] == t].iloc[0]
            cells.append(f"{r.train_auroc:.2f} → {r.test_auroc:.2f} [{r.test_min:.2f}-{r.test_max:.2f}] **{r.verdict}**")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    block = (f"<!-- CERTIFY-TABLE -->\nCommand: `python benchmarks/certify_all.py --seeds {args.seeds}` "
             f"(= `slidemil certify --seeds {args.seeds}`), {datetime.date.today()}, torch {torch.__version__}, "
             f"{minutes:.1f} min on this machine. Cells: train AUROC → test AUROC (mean over seeds) "
             "[test min-max] verdict.\n\n" + "\n".join(lines) + "\n<!-- /CERTIFY-TABLE -->")
    print(block)
    if args.doc.exists():
        text = args.doc.read_text()
        text = re.sub(r"<!-- CERTIFY-TABLE -->.*<!-- /CERTIFY-TABLE -->", lambda _: block, text, flags=re.S)
        args.doc.write_text(text)


if __name__ == "__main__":
    main()
