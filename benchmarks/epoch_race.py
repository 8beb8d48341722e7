"""The epoch race (issue 13): ABMIL trained for the same epochs on the same h5 features by slidemil (one bag
per step, and packed) and by torchmil's `Trainer` on its own `ProcessedMILDataset`, side by side in one run.

One cohort: bags with sizes log-uniform in [--min-size, --max-size], D = --dim, a planted signal (5% of a
positive bag's instances shifted), written once as float32 h5 (the TRIDENT layout torchmil also reads),
split 80/20 into training and validation bags (stratified). Every contender runs the same gated ABMIL (D -> 512 ReLU,
dropout 0.25, attention 128, linear head), AdamW lr 2e-4 wd 1e-4, no scheduler, batch of one bag (packed:
--batch-size bags in packs of --pack-len), for --epochs epochs, in its own process. Prints, per contender,
seconds per epoch (training + the validation pass; the first epoch, which reads the files, apart), peak RSS,
and the validation AUROC of the last epoch's model (no selection), then the speed ratios to torchmil and to
the `floor`: the same model and optimiser in a bare loop over bags already on the device (plus, on a GPU,
the time one host -> device copy of the whole cohort takes from pinned memory), measured in the same run.

torchmil is never a slidemil dependency: install it for this benchmark only, beside the venv, e.g.
    pip install --target .bench/torchmil --no-deps torchmil tensordict torchmetrics einops lightning-utilities pyvers
    python benchmarks/epoch_race.py --torchmil-site .bench/torchmil [--bags 200 --max-size 50000 --epochs 10]
    python benchmarks/epoch_race.py --device cuda ...    (the race the issue's >= 2x target is about; peak GPU
                                                          memory is printed beside the peak RSS)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONTENDERS = ("floor", "slidemil", "slidemil-packed", "torchmil")


def make_cohort(args) -> None:
    """Bags, label files (slidemil's CSV and torchmil's per-bag h5) and the split, once."""
    import h5py
    import pandas as pd

    from slidemil.features.store import write_features

    if (args.out / "split.json").is_file():
        return
    rng = np.random.default_rng(args.seed)
    sizes = np.exp(rng.uniform(np.log(args.min_size), np.log(args.max_size), args.bags)).astype(int)
    direction = rng.normal(size=args.dim).astype(np.float32)
    direction *= 1.5 / np.linalg.norm(direction) * np.sqrt(args.dim) / 4
    (args.out / "features").mkdir(parents=True, exist_ok=True)
    (args.out / "labels").mkdir(exist_ok=True)
    rows = []
    for i, n in enumerate(sizes):
        sid, label = f"bag{i:03d}", i % 2
        x = rng.normal(size=(n, args.dim)).astype(np.float32)
        if label:
            x[rng.random(n) < 0.05] += direction
        coords = np.stack([np.arange(n) % 512, np.arange(n) // 512], 1) * 256
        write_features(args.out / "features" / f"{sid}.h5", x, coords, {"encoder": "synthetic", "patch_size": 256})
        with h5py.File(args.out / "labels" / f"{sid}.h5", "w") as f:
            f["labels"] = np.float32(label)          # a scalar bag label, as torchmil's datasets hold it
        rows.append({"slide_id": sid, "case_id": sid, "label": ["negative", "positive"][label], "y": label})
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "labels.csv", index=False)
    val = [sid for y in (0, 1) for sid in rng.permutation(table["slide_id"][table["y"] == y])[: args.bags // 10]]
    split = {"train": sorted(set(table["slide_id"]) - set(val)), "val": sorted(val), "instances": int(sizes.sum())}
    (args.out / "split.json").write_text(json.dumps(split))


def run_slidemil(args, packed: bool) -> dict:
    import pandas as pd
    import torch

    import slidemil.models as models
    from slidemil.data.bags import BagCache, BagDataset
    from slidemil.train.config import TrainConfig
    from slidemil.train.trainer import fit, infer

    split = json.loads((args.out / "split.json").read_text())
    table = pd.read_csv(args.out / "labels.csv").set_index("slide_id")
    device = torch.device(args.device)
    cache = BagCache.for_run(None, device, args.cache_device)     # as `slidemil train` builds it

    def dataset(ids):
        return BagDataset([(s, [str(args.out / "features" / f"{s}.h5")], int(table.loc[s, "y"])) for s in ids],
                          cache=cache, device=device)

    train, val = dataset(split["train"]), dataset(split["val"])
    cfg = TrainConfig(features="-", labels="-", out="-", epochs=args.epochs, lr=2e-4, weight_decay=1e-4,
                      scheduler="none", warmup_epochs=0, select="last", seed=args.seed,
                      batch_size=args.batch_size if packed else 1, pack_len=args.pack_len if packed else None)
    torch.manual_seed(args.seed)
    model = models.create("abmil", args.dim, 2)
    res = fit(model, train, val, cfg, device, torch.Generator().manual_seed(args.seed))
    probs = infer(model, val, device).probs[:, 1]
    return {"epoch_seconds": res.history["seconds"].tolist(), "val_auroc": _auroc(val.labels(), probs)}


def run_floor(args) -> dict:
    """The hardware floor of an epoch: the same ABMIL, optimiser and autocast as slidemil's contender, on bags
    already on the device (not timed), in a bare loop with no data pipeline and no host sync until the epoch's
    end. Also times one pass of the cohort's bytes host -> device from pinned memory (the floor when the bags
    cannot stay on the GPU)."""
    import torch
    import torch.nn.functional as F

    import slidemil.models as models
    from slidemil.features.store import read_features
    from slidemil.utils.device import autocast

    split = json.loads((args.out / "split.json").read_text())
    device = torch.device(args.device)
    labels = {sid: int(sid[3:]) % 2 for sid in split["train"] + split["val"]}

    def load(ids):
        return [(torch.from_numpy(read_features(args.out / "features" / f"{s}.h5").features), labels[s]) for s in ids]

    train, val = load(split["train"]), load(split["val"])
    copy_seconds = float("nan")
    if device.type == "cuda":
        pinned = [x.pin_memory() for x, _ in train + val]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        moved = [x.to(device, non_blocking=True) for x in pinned]
        torch.cuda.synchronize()
        copy_seconds = time.perf_counter() - t0
        train = [(x, y) for x, (_, y) in zip(moved[: len(train)], train)]
        val = [(x, y) for x, (_, y) in zip(moved[len(train):], val)]
        del pinned
    torch.manual_seed(args.seed)
    model = models.create("abmil", args.dim, 2).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4, fused=device.type == "cuda")
    targets = {y: torch.tensor([y], device=device) for y in (0, 1)}
    gen = torch.Generator().manual_seed(args.seed)
    seconds, probs = [], []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        for i in torch.randperm(len(train), generator=gen).tolist():
            x, y = train[i]
            with autocast(device):
                loss = F.cross_entropy(model(x[None]).logits.float(), targets[y])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), autocast(device):
            probs = [torch.softmax(model(x[None]).logits.float(), -1)[0, 1] for x, _ in val]
        probs = torch.stack(probs).cpu().numpy()       # the epoch's one host sync
        seconds.append(time.perf_counter() - t0)
    return {"epoch_seconds": seconds, "val_auroc": _auroc(np.array([y for _, y in val]), probs),
            "copy_seconds": copy_seconds}


def run_torchmil(args) -> dict:
    sys.path.insert(0, str(args.torchmil_site))
    import h5py
    import torch
    from torchmil.data import collate_fn
    from torchmil.datasets import ProcessedMILDataset
    from torchmil.models import ABMIL
    from torchmil.utils.trainer import Trainer

    split = json.loads((args.out / "split.json").read_text())

    def read(path, key):   # torchmil's default reader slices with [:], which a scalar label does not allow
        with h5py.File(path, "r") as f:
            return np.asarray(f[key][()])

    def dataset(ids):
        return ProcessedMILDataset(features_path=str(args.out / "features"), labels_path=str(args.out / "labels"),
                                   bag_names=ids, bag_keys=["X", "Y"], file_ext=".h5", read_file_fn=read, verbose=False)

    torch.manual_seed(args.seed)
    model = ABMIL(in_shape=(args.dim,), att_dim=128, gated=True,
                  feat_ext=torch.nn.Sequential(torch.nn.Linear(args.dim, 512), torch.nn.ReLU(), torch.nn.Dropout(0.25)))
    stamps = []

    class Clock:   # torchmil logs the train and the validation metrics of every epoch: time each epoch by them
        def log(self, metrics):
            if any(k.startswith("val/") for k in metrics):
                stamps.append(time.perf_counter())

    g = torch.Generator().manual_seed(args.seed)
    train = torch.utils.data.DataLoader(dataset(split["train"]), batch_size=1, shuffle=True, collate_fn=collate_fn,
                                        generator=g)
    val = torch.utils.data.DataLoader(dataset(split["val"]), batch_size=1, shuffle=False, collate_fn=collate_fn)
    import torchmetrics

    # the Trainer's default metrics are built on the CPU at import time; on a GPU they must be handed over there
    metrics = {"accuracy": torchmetrics.Accuracy(task="binary").to(args.device)}
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4), device=args.device,
                      metrics_dict=metrics, logger=Clock(), disable_pbar=True, verbose=False)
    start = time.perf_counter()
    trainer.train(args.epochs, train, val)
    seconds = np.diff([start] + stamps).tolist()
    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for batch in val:
            probs.append(float(torch.sigmoid(model(batch["X"].float().to(args.device))).reshape(-1)[0]))
            labels.append(int(batch["Y"].reshape(-1)[0]))
    return {"epoch_seconds": seconds, "val_auroc": _auroc(np.array(labels), np.array(probs))}


def _auroc(labels, probs) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, probs))


def child(args) -> None:
    if args.contender == "torchmil":
        out = run_torchmil(args)
    elif args.contender == "floor":
        out = run_floor(args)
    else:
        out = run_slidemil(args, args.contender == "slidemil-packed")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        import torch

        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({"contender": args.contender, **out}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bags", type=int, default=200)
    ap.add_argument("--min-size", type=int, default=1000)
    ap.add_argument("--max-size", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16, help="bags per step of the packed contender")
    ap.add_argument("--pack-len", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]: every contender trains there")
    ap.add_argument("--cache-device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="slidemil's --cache-device (cpu on a GPU: pinned host memory, side-stream copies)")
    ap.add_argument("--torchmil-site", type=Path, default=Path(".bench/torchmil"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/epoch_race"))
    ap.add_argument("--contender", choices=CONTENDERS, default=None)
    ap.add_argument("--only", default=None, help="comma-separated contenders to (re)run; the others' results are "
                                                "read from --out/results.json")
    ap.add_argument("--prepare", action="store_true", help="write the cohort and stop (scripts/gpu_check.sh writes it "
                                                           "while the GPU tests run)")
    args = ap.parse_args()
    if args.contender:
        return child(args)
    make_cohort(args)
    if args.prepare:
        return
    split = json.loads((args.out / "split.json").read_text())
    print(f"cohort: {args.bags} bags ({len(split['train'])} train / {len(split['val'])} val), "
          f"{split['instances']} instances, D = {args.dim}, {args.epochs} epochs, {os.cpu_count()} CPU(s), "
          f"device {args.device}")
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if args.only and results_path.is_file() else {}
    for name in args.only.split(",") if args.only else CONTENDERS:
        if name == "torchmil" and not (args.torchmil_site / "torchmil").is_dir():
            print(f"torchmil: not installed under {args.torchmil_site} (see this script's docstring); skipped")
            continue
        cmd = [sys.executable, __file__, "--contender", name] + _without_only(sys.argv[1:])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{'contender':18s} {'first epoch s':>13s} {'later epochs s':>14s} {'peak RSS MB':>11s} {'val AUROC':>9s}")
    for name in (n for n in CONTENDERS if n in results):
        r = results[name]
        secs = r["epoch_seconds"]
        later = float(np.mean(secs[1:])) if len(secs) > 1 else secs[0]
        r["later_mean"] = later
        gpu = f" {r['peak_gpu_mb']:11.0f} MB GPU" if "peak_gpu_mb" in r else ""
        print(f"{name:18s} {secs[0]:13.1f} {later:14.1f} {r['peak_rss_mb']:11.0f} {r['val_auroc']:9.3f}{gpu}")
    if "floor" in results:
        ref = results["floor"]
        copy = ref.get("copy_seconds", float("nan"))
        if copy == copy:
            print(f"host -> device copy of every bag from pinned memory: {copy:.2f} s (the floor when bags stay "
                  f"in host memory: floor epoch + copy = {ref['later_mean'] + copy:.2f} s)")
        for name in ("slidemil", "slidemil-packed"):
            if name in results:
                print(f"{name} vs the floor: {results[name]['later_mean'] / ref['later_mean']:.2f}x the floor's epoch")
    if "torchmil" in results:
        ref = results["torchmil"]
        for name in ("slidemil", "slidemil-packed"):
            if name in results:
                r = results[name]
                print(f"{name} vs torchmil: {ref['later_mean'] / r['later_mean']:.2f}x faster per epoch, "
                      f"AUROC difference {r['val_auroc'] - ref['val_auroc']:+.3f}")
    results_path.write_text(json.dumps(results, indent=1))


def _without_only(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--only":
            skip = True
        elif not a.startswith("--only="):
            out.append(a)
    return out


if __name__ == "__main__":
    main()
