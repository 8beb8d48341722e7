"""Mutation audit: do the tests fail when the code is wrong? (docs/reliability.md, "Tests that can fail")

Each mutant is one plausible mistake in a place where a wrong number would go unseen (a leak, a metric's
definition, an equation of a paper); the script applies it to the working tree, runs the tests that should
notice, restores the file, and prints KILLED (a test failed), SURVIVED (no test noticed: write one) or BROKEN (an error, not
a failed test: fix the mutant).
Not part of CI (about 30 minutes on 2 cores for all of them); run it in a clone to keep working meanwhile
(`git clone . /tmp/audit && python /tmp/audit/scripts/mutation_audit.py`: it imports the clone's `src`).

    python scripts/mutation_audit.py [--only WORD] [--list]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant('bootstrap resamples rows not patients', 'src/slidemil/evaluate/bootstrap.py',
           '        yield np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])',
           '        yield rng.integers(0, len(groups), len(groups))',
           ('tests/evaluate', 'tests/benchmark')),
    Mutant('holm without step-down max', 'src/slidemil/evaluate/compare.py',
           '        running = max(running, min(1.0, (m - i) * p[j]))',
           '        running = min(1.0, (m - i) * p[j])',
           ('tests/evaluate', 'tests/benchmark')),
    Mutant('holm bonferroni', 'src/slidemil/evaluate/compare.py',
           '        running = max(running, min(1.0, (m - i) * p[j]))',
           '        running = max(running, min(1.0, m * p[j]))',
           ('tests/evaluate', 'tests/benchmark')),
    Mutant('delong no covariance', 'src/slidemil/evaluate/compare.py',
           '    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]',
           '    var = cov[0, 0] + cov[1, 1]',
           ('tests/evaluate', 'tests/benchmark')),
    Mutant('nemenyi without sqrt2', 'src/slidemil/evaluate/compare.py',
           '    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)',
           '    q = stats.studentized_range.ppf(1 - alpha, k, np.inf)',
           ('tests/evaluate', 'tests/benchmark')),
    Mutant('paired bootstrap p one-sided', 'src/slidemil/evaluate/compare.py',
           '    p = min(1.0, 2 * (side + 1) / (len(diffs) + 1))',
           '    p = min(1.0, (side + 1) / (len(diffs) + 1))',
           ('tests/evaluate/test_metrics.py',)),
    Mutant('AP interpolated', 'src/slidemil/evaluate/metrics.py',
           '    return float(np.sum(np.diff(recall, prepend=0.0) * precision))',
           '    return float(np.sum(np.diff(recall, prepend=0.0) * np.maximum.accumulate(precision[::-1])[::-1]))',
           ('tests/evaluate',)),
    Mutant('auroc ordinal ranks', 'src/slidemil/evaluate/metrics.py',
           '    ranks = rankdata(score)\n',
           "    ranks = rankdata(score, method='ordinal')\n",
           ('tests/evaluate',)),
    Mutant('balanced acc over all classes', 'src/slidemil/evaluate/metrics.py',
           '        "balanced_accuracy": float(np.mean(tp[present] / true[present])),',
           '        "balanced_accuracy": float(np.mean(tp[:n_classes] / np.maximum(true[:n_classes], 1))),',
           ('tests/evaluate',)),
    Mutant('qwk linear', 'src/slidemil/evaluate/regression.py',
           'weights="quadratic"',
           'weights="linear"',
           ('tests/evaluate/test_metrics.py',)),
    Mutant('CI alpha swapped', 'src/slidemil/evaluate/bootstrap.py',
           'np.quantile(vals, [alpha / 2, 1 - alpha / 2])',
           'np.quantile(vals, [alpha, 1 - alpha])',
           ('tests/evaluate/test_metrics.py',)),
    Mutant('splits grouped by slide', 'src/slidemil/data/splits.py',
           '    groups = table["case_id"].to_numpy()\n',
           '    groups = table["slide_id"].to_numpy()\n',
           ('tests/data', 'tests/train')),
    Mutant('inner val from whole table', 'src/slidemil/data/splits.py',
           '        role[train_idx[val]] = "val"',
           '        role[train_idx[val]] = "val"\n        role[test_idx[: max(1, len(test_idx) // 5)]] = "val"',
           ('tests/data', 'tests/train')),
    Mutant('uno on test censoring', 'src/slidemil/evaluate/survival.py',
           '    train = _structured(train_time, train_event)\n    # IPCW',
           '    train = _structured(time, event)\n    # IPCW',
           ('tests/evaluate', 'tests/tasks')),
    Mutant('breslow at risk strict', 'src/slidemil/evaluate/survival.py',
           '    at_risk = np.array([w[t >= u].sum() for u in event_times])',
           '    at_risk = np.array([w[t > u].sum() + 1e-9 for u in event_times])',
           ('tests/evaluate', 'tests/tasks')),
    Mutant('ibs default event-iqr', 'src/slidemil/evaluate/survival.py',
           '    if ibs_range == "follow-up":',
           '    if ibs_range == "never":',
           ('tests/evaluate', 'tests/tasks')),
    Mutant('survival_at no S=1 at 0', 'src/slidemil/evaluate/survival.py',
           '    return np.stack([np.interp(times, np.concatenate([[0.0], e]), np.concatenate([[1.0], s]))',
           '    return np.stack([np.interp(times, e, s)',
           ('tests/evaluate', 'tests/tasks')),
    Mutant('scaling fit on train+test', 'src/slidemil/train/cv.py',
           '    fitted = Scaling.fit(parts["train"].raw_bags(),',
           '    fitted = Scaling.fit(__import__(\'itertools\').chain(parts["train"].raw_bags(), parts["test"].raw_bags()),',
           ('tests/train', 'tests/reliability', 'tests/models')),
    Mutant('baseline fit on test too', 'src/slidemil/train/baseline.py',
           '        tr = np.array([i in fit for i in ids])',
           '        tr = np.array([i in fit or i in test for i in ids])',
           ('tests/train', 'tests/reliability', 'tests/tasks', 'tests/evaluate')),
    Mutant('scaling fit on train+val', 'src/slidemil/train/cv.py',
           '    fitted = Scaling.fit(parts["train"].raw_bags(),',
           '    fitted = Scaling.fit(__import__(\'itertools\').chain(parts["train"].raw_bags(), parts["val"].raw_bags()),',
           ('tests/train/test_no_leakage.py',)),
    Mutant('gate dropped', 'src/slidemil/nn/attention.py',
           '            a = self.drop(torch.tanh(v)) * self.drop(torch.sigmoid(u))',
           '            a = self.drop(torch.tanh(v)) + 0 * u',
           ('tests/models', 'tests/nn')),
    Mutant('dsmil no sqrt scale', 'src/slidemil/models/dsmil.py',
           "        att = (q_crit @ q.transpose(1, 2)) / math.sqrt(q.shape[-1])          # [B, C', N]",
           "        att = (q_crit @ q.transpose(1, 2))          # [B, C', N]",
           ('tests/models', 'tests/nn')),
    Mutant('dsmil average default', 'src/slidemil/models/dsmil.py',
           '        score = (s_bag + s_max) / 2 if self.average else s_bag',
           '        score = (s_bag + s_max) / 2',
           ('tests/models', 'tests/nn')),
    Mutant('clam sb pool with mean', 'src/slidemil/models/clam.py',
           '        return self.classifier((a @ h)[:, 0])',
           '        return self.classifier(h.mean(1))',
           ('tests/models', 'tests/nn')),
    Mutant('heatmap oof uses all folds', 'src/slidemil/explain/heatmap.py',
           '        chosen = [(m, meta) for m, meta in self.models if int(meta["fold"]) == fold] if fold is not None else []',
           '        chosen = []',
           ('tests/explain',)),
    Mutant('classification ensemble first fold only', 'src/slidemil/tasks/classification.py',
           '        frame = pd.DataFrame(self._columns(np.mean(per_fold, axis=0), classes))',
           '        frame = pd.DataFrame(self._columns(per_fold[0], classes))',
           ('tests/test_predict.py', 'tests/tasks', 'tests/test_rundir.py')),
    Mutant('survival ensemble raw risk', 'src/slidemil/tasks/survival.py',
           '        risk = np.mean([c["risk_pooled"] for _, c in per_fold], 0)',
           '        risk = np.mean([c["risk"] for _, c in per_fold], 0)',
           ('tests/test_predict.py', 'tests/tasks', 'tests/test_rundir.py')),
    Mutant('patch size floor', 'src/slidemil/slides/patching.py',
           '    size0 = int(round(p.patch_size * downsample))',
           '    size0 = int(p.patch_size * downsample)',
           ('tests/slides', 'tests/test_preprocess.py')),
    Mutant('patch level ignores matching', 'src/slidemil/slides/patching.py',
           '"patch_level": int(matching[0]) if matching else 0,',
           '"patch_level": 0,',
           ('tests/slides', 'tests/test_preprocess.py', 'tests/features')),
    Mutant('cox ties by order', 'src/slidemil/tasks/survival.py',
           '    return -((r - cum[last]) * e).sum() / e.sum()',
           '    return -((r - cum) * e).sum() / e.sum()',
           ('tests/tasks',)),
    Mutant('cox mean over all', 'src/slidemil/tasks/survival.py',
           '    return -((r - cum[last]) * e).sum() / e.sum()',
           '    return -((r - cum[last]) * e).sum() / len(e)',
           ('tests/tasks',)),
    Mutant('nll alpha swapped', 'src/slidemil/tasks/survival.py',
           '    return ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()',
           '    return ((1 - alpha) * (censored + uncensored) + alpha * censored).mean()',
           ('tests/tasks',)),
    Mutant('nll censored uses S_{y-1}', 'src/slidemil/tasks/survival.py',
           '    censored = -(1 - e) * torch.log(s_pad.gather(1, y + 1).clamp_min(EPS))',
           '    censored = -(1 - e) * torch.log(s_pad.gather(1, y).clamp_min(EPS))',
           ('tests/tasks',)),
    Mutant('class weight n/n_c', 'src/slidemil/tasks/classification.py',
           '        weight = torch.tensor(len(targets) / (n_outputs * np.maximum(counts, 1)),',
           '        weight = torch.tensor(len(targets) / (np.maximum(counts, 1)),',
           ('tests/tasks',)),
    Mutant('nll_risk sign', 'src/slidemil/tasks/survival.py',
           '    return -s.sum(1), s',
           '    return s.sum(1), s',
           ('tests/tasks',)),
    Mutant('neighbours include own patient', 'src/slidemil/evaluate/robustness.py',
           '        sim[gid[start:start + block, None] == gid[None, :]] = -np.inf     # self and own patient',
           '        sim[np.arange(start, start + len(sim))[:, None] == np.arange(len(x))[None, :]] = -np.inf',
           ('tests/robustness/test_robustness.py',)),
    Mutant('chance ignores own patient', 'src/slidemil/evaluate/robustness.py',
           '    same_cell = n[li, ci] - own[gi, li, ci]',
           '    same_cell = n[li, ci] - 1',
           ('tests/robustness/test_robustness.py',)),
    Mutant('balanced draws with replacement', 'src/slidemil/evaluate/robustness.py',
           '        chosen = np.concatenate([rng.choice(v, m, replace=False) for v in cells.values()])',
           '        chosen = np.concatenate([v[:m] for v in cells.values()])',
           ('tests/robustness/test_robustness.py',)),
    Mutant('bootstrap over samples', 'src/slidemil/evaluate/robustness.py',
           '        _, gid = np.unique(g, return_inverse=True)\n',
           '        gid = np.arange(len(g))\n',
           ('tests/robustness/test_robustness.py',)),
    Mutant('mhim hard = lowest scores', 'src/slidemil/train/strategies/mhim.py',
           '        order = real[scores[b, real].float().argsort(descending=True)]',
           '        order = real[scores[b, real].float().argsort(descending=False)]',
           ('tests/train',)),
    Mutant('geojson holes filled', 'src/slidemil/slides/tissue.py',
           '                mask[rr, cc] = i == 0  # exterior fills, holes clear',
           '                mask[rr, cc] = True',
           ('tests/slides', 'tests/test_preprocess.py')),
    Mutant('geojson ring no half-pixel', 'src/slidemil/slides/tissue.py',
           '    ring = [[float((x + 0.5) * downsample), float((y + 0.5) * downsample)] for y, x in c]',
           '    ring = [[float(x * downsample), float(y * downsample)] for y, x in c]',
           ('tests/slides', 'tests/test_preprocess.py')),
    Mutant('otsu floor dropped', 'src/slidemil/slides/tissue.py',
           '        thr = max(thr, p.min_saturation)',
           '        thr = thr',
           ('tests/slides', 'tests/test_preprocess.py')),
    Mutant('macenko no target scaling', 'src/slidemil/slides/stain.py',
           '            conc = np.linalg.lstsq(src, _od(tile).T, rcond=None)[0] * (dst_max / src_max)[:, None]',
           '            conc = np.linalg.lstsq(src, _od(tile).T, rcond=None)[0]',
           ('tests/slides',)),
    Mutant('min_tissue ignored', 'src/slidemil/slides/patching.py',
           '    keep = frac >= params.min_tissue',
           '    keep = frac > 0',
           ('tests/slides', 'tests/test_preprocess.py')),
    Mutant('encoder std not applied', 'src/slidemil/features/encoders/registry.py',
           '        return self.backbone((images - self.mean) / self.std)',
           '        return self.backbone(images - self.mean)',
           ('tests/features',)),
    Mutant('hoptimus imagenet stats', 'src/slidemil/features/encoders/foundation.py',
           'HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)',
           'HOPTIMUS_MEAN, HOPTIMUS_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)',
           ('tests/features',)),
    Mutant('selects the worst epoch', 'src/slidemil/train/trainer.py',
           '                if score < best or best_state is None:',
           '                if score > best or best_state is None or best == math.inf:',
           ('tests/train',)),
    Mutant('monitor sign ignored', 'src/slidemil/train/trainer.py',
           '    sign = 1.0 if cfg.monitor == "val_loss" else -1.0    # every task metric is higher-is-better',
           '    sign = 1.0',
           ('tests/train',)),
    Mutant('min_epochs ignored', 'src/slidemil/train/trainer.py',
           '            if select and epoch + 1 >= first:',
           '            if select:',
           ('tests/train',)),
    Mutant('best weights not restored', 'src/slidemil/train/trainer.py',
           '    model.load_state_dict(best_state)\n',
           '    best_state = model.state_dict()\n',
           ('tests/train',)),
    Mutant('grad clip off', 'src/slidemil/train/trainer.py',
           '                if cfg.grad_clip:\n',
           '                if False:\n',
           ('tests/train',)),
    Mutant('binary class:negative not negated', 'src/slidemil/explain/scores.py',
           '            return (il[0, 0] if c == 1 else -il[0, 0]).float().cpu().numpy()',
           '            return il[0, 0].float().cpu().numpy()',
           ('tests/explain/test_paint.py',)),
    Mutant('absolute attention not times n', 'src/slidemil/explain/scores.py',
           '        ratio = np.maximum(scores * len(scores), 1e-12)',
           '        ratio = np.maximum(scores, 1e-12)',
           ('tests/explain',)),
    Mutant('paint sum not mean', 'src/slidemil/explain/paint.py',
           '    field[covered] = total[covered] / count[covered]',
           '    field[covered] = total[covered]',
           ('tests/explain',)),
    Mutant('footprint ignores downsample offset', 'src/slidemil/explain/paint.py',
           '    c1 = np.clip(np.round((coords[:, 0] + size0) / downsample), 0, w).astype(np.int64)',
           '    c1 = np.clip(np.round((coords[:, 0] + size0 / 2) / downsample), 0, w).astype(np.int64)',
           ('tests/explain',)),
    Mutant('percentile ranks ordinal', 'src/slidemil/explain/paint.py',
           '        return (rankdata(scores, method="average") - 1) / max(1, scores.size - 1)',
           '        return (rankdata(scores, method="ordinal") - 1) / max(1, scores.size - 1)',
           ('tests/explain/test_paint.py',)),
    Mutant('regression predict forgets mean', 'src/slidemil/tasks/regression.py',
           '        return np.asarray(logits, float)[:, 0] * state["sd"] + state["mean"]',
           '        return np.asarray(logits, float)[:, 0] * state["sd"]',
           ('tests/tasks/test_ordinal_regression.py',)),
    Mutant('regression ensemble first fold', 'src/slidemil/tasks/regression.py',
           '        frame = pd.DataFrame({"pred": np.mean(per_fold, 0)})',
           '        frame = pd.DataFrame({"pred": per_fold[0]})',
           ('tests/tasks/test_ordinal_regression.py',)),
    Mutant('survival strata ignore events', 'src/slidemil/tasks/survival.py',
           '                strata = events * q + part',
           '                strata = part',
           ('tests/tasks', 'tests/data')),
    Mutant('regression folds not stratified by target', 'src/slidemil/tasks/regression.py',
           '        patients = table.drop_duplicates("case_id")\n        for q in (4, 3, 2, 1):',
           '        patients = table.drop_duplicates("case_id")\n        for q in (1,):',
           ('tests/tasks/test_ordinal_regression.py',)),
    Mutant('leaderboard holm not applied', 'src/slidemil/benchmark/leaderboard.py',
           '            for r, p in zip(task_rows, adjusted):\n                r[f"{key}_holm"] = p',
           '            for r, p in zip(task_rows, adjusted):\n                r[f"{key}_holm"] = r[key]',
           ('tests/benchmark/test_benchmark.py',)),
    Mutant('leaderboard compares with the worst cell', 'src/slidemil/benchmark/leaderboard.py',
           '        best = max(task_cells, key=lambda c: keyed[(c.encoder, c.model, c.seed)])',
           '        best = min(task_cells, key=lambda c: keyed[(c.encoder, c.model, c.seed)])',
           ('tests/benchmark/test_benchmark.py',)),
    Mutant('leaderboard pairs unaligned rows', 'src/slidemil/benchmark/leaderboard.py',
           '            pa = preds[c.name].loc[ref.index, cols].to_numpy(float)',
           '            pa = preds[c.name].sort_index(ascending=False)[cols].to_numpy(float)',
           ('tests/benchmark/test_benchmark.py',)),
]


def run(mutant: Mutant) -> tuple[str, str]:
    """(KILLED | SURVIVED | BROKEN, pytest's last line) for one mutant; the file is restored whatever happens.
    BROKEN: no test failed but pytest stopped on an error (a mutant that crashes is no evidence)."""
    path = ROOT / mutant.file
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return "BROKEN", f"the code to mutate is not found once in {mutant.file}: update this mutant"
    path.write_text(original.replace(mutant.old, mutant.new))
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "2",
                              *mutant.tests], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "src")})   # this tree's code, in a clone too
    finally:
        path.write_text(original)
    lines = res.stdout.strip().splitlines() or res.stderr.strip().splitlines() or [""]
    if res.returncode == 0:
        return "SURVIVED", lines[-1]
    # a test that fails is the evidence; an error (import, collection, a crash in a fixture) is not
    return ("KILLED" if re.search(r"\d+ failed", lines[-1]) else "BROKEN"), lines[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the mutants whose name contains this word")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.only or args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}\t{m.file}")
        return
    killed = 0
    for m in chosen:
        verdict, last = run(m)
        killed += verdict == "KILLED"
        print(f"{verdict:8} {m.name} | {last}", flush=True)
    print(f"{killed} of {len(chosen)} mutants killed")
    sys.exit(0 if killed == len(chosen) else 1)


if __name__ == "__main__":
    main()
