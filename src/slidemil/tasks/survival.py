"""Survival: a discrete-time hazard model (NLL) or Cox partial likelihood; C-indices, time-dependent AUC,
integrated Brier score, Kaplan-Meier curves of training-median risk groups.

Targets are (time, event) per bag, event 1 = observed, 0 = censored. Times and events are patient-level:
a patient's slides must agree, and the metrics are computed on one row per patient (slide risks
averaged).
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidemil.data.cohort import Cohort, drop_empty, numeric_column, row_list, same_per_patient
from slidemil.errors import InputError
from slidemil.evaluate.bootstrap import fold_summary, patient_bootstrap
from slidemil.evaluate.report import outcome_gallery
from slidemil.evaluate.survival import (
    SURVIVAL_METRICS,
    breslow,
    harrell_c,
    ibs_window,
    km_plot,
    survival_at,
    survival_metrics,
    td_auc_curve,
    td_auc_plot,
)
from slidemil.tasks.base import TASKS, Task

log = logging.getLogger(__name__)
EPS = 1e-7
COX_CURVE_POINTS = 20
# the event indicator as clinical tables write it: 1/0, true/false, TCGA's vital_status (Dead/Alive), and
# cBioPortal's coded status columns, whose leading digit is the event (OS_STATUS "1:DECEASED" / "0:LIVING",
# PFS_STATUS "1:PROGRESSION" / "0:CENSORED")
_EVENT_WORDS = {"1": True, "0": False, "1.0": True, "0.0": False, "true": True, "false": False,
                "dead": True, "deceased": True, "alive": False, "living": False}


def _event(value: str):
    """True (event), False (censored) or None (not an event indicator) for one cell, lower-cased."""
    if len(value) > 2 and value[0] in "01" and value[1] == ":":
        return value[0] == "1"
    return _EVENT_WORDS.get(value)


def nll_survival_loss(logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Discrete-time negative log-likelihood (Zadeh & Schmid 2020; Patch-GCN's `nll_loss`).

    hazards h_j = sigmoid(logit_j) = P(T in bin j | T >= bin j); S_j = prod_{k <= j} (1 - h_k), S_{-1} = 1.
    An observed event in bin y costs -[log S_{y-1} + log h_y]; a patient censored in bin y costs -log S_y.
    L = (1 - alpha) (censored + uncensored) + alpha * uncensored, mean over the batch; probabilities are
    clamped at 1e-7 before the logs, as the reference code.
    """
    h = torch.sigmoid(logits.float())
    s = torch.cumprod(1 - h, dim=1)
    s_pad = torch.cat([torch.ones_like(s[:, :1]), s], dim=1)
    y = bins.long().view(-1, 1)
    e = event.float().view(-1, 1)
    uncensored = -e * (torch.log(s_pad.gather(1, y).clamp_min(EPS)) + torch.log(h.gather(1, y).clamp_min(EPS)))
    censored = -(1 - e) * torch.log(s_pad.gather(1, y + 1).clamp_min(EPS))
    return ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()


def cox_loss(log_risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor | None:
    """Negative Cox partial log-likelihood with Breslow's handling of ties, divided by the number of
    events: -(1/d) sum_{i: event} [r_i - log sum_{j: t_j >= t_i} exp(r_j)]. Tied times share one risk
    set that holds all of them (the official OTSurv code sorts and lets the order decide ties). None when
    the batch has no event (it has no partial likelihood)."""
    r, t, e = log_risk.float().view(-1), time.float().view(-1), event.float().view(-1)
    if e.sum() == 0:
        return None
    order = torch.argsort(t, descending=True)
    r, t, e = r[order], t[order], e[order]
    cum = torch.logcumsumexp(r, 0)
    # the risk set of time t_i ends at the last position holding a time equal to t_i
    last = torch.searchsorted(-t, -t, right=True) - 1
    return -((r - cum[last]) * e).sum() / e.sum()


class CoxLoss:
    """`loss(logits, target)` for the trainer; counts the batches without an event (they add nothing)."""

    def __init__(self):
        self.empty_batches = 0

    def __call__(self, logits, target):
        loss = cox_loss(logits[:, 0], target[:, 0], target[:, 1])
        if loss is None:
            self.empty_batches += 1
            return logits.sum() * 0.0
        return loss


def nll_risk(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(risk = -sum_j S_j, S [n, K]) of a discrete-time model's logits."""
    s = np.cumprod(1 - 1 / (1 + np.exp(-np.asarray(logits, float))), axis=1)
    return -s.sum(1), s


@TASKS.register("survival", summary="time-to-event: discrete-time NLL or Cox; C-index, td-AUC, IBS, KM")
class Survival(Task):
    name = "survival"
    label_cols = ("time", "event")
    metric_names = SURVIVAL_METRICS
    monitor_name = "c_index"

    def needed_columns(self) -> dict[str, str]:
        return {self.o.time_col: "--time-col", self.o.event_col: "--event-col"}

    # -- label table --------------------------------------------------------------------------------
    def parse(self, raw, table, path: Path) -> Cohort:
        tcol, ecol = self.o.time_col, self.o.event_col
        table = table.copy()
        table["time"] = raw[tcol].str.strip()
        table["event"] = raw[ecol].str.strip()
        # a row without a follow-up time or event (a patient lost to the clinical table) is left out, warned
        # and listed in excluded.csv, as an unlabelled row of a classification table is
        table = drop_empty(drop_empty(table, "time", path, tcol, numeric=True), "event", path, ecol, numeric=True)
        time = numeric_column(raw, table, path, tcol, "follow-up times")
        event = table["event"].str.lower().map(_event)
        if event.isna().any():
            bad = event.isna()
            shown = ", ".join(repr(v) for v in table.loc[bad, "event"].unique()[:5])
            raise InputError(f"{path}: column {ecol!r} must be 1/true/dead (event observed) or 0/false/alive "
                             f"(censored), or cBioPortal's 1:.../0:...; row(s) {row_list(table.index[bad])} hold {shown}")
        negative = time < 0
        if negative.any():
            raise InputError(f"{path}: column {tcol!r} has negative time(s) in row(s) {row_list(table.index[negative])}; "
                             "times are durations from diagnosis (or study entry) to event or last follow-up")
        zero_event = (time == 0) & event.astype(bool)
        if zero_event.any():
            raise InputError(f"{path}: row(s) {row_list(table.index[zero_event])} have an event at time 0 in column "
                             f"{tcol!r}; an event needs a positive time (check the units, or the start date)")
        table["time"], table["event"] = time.astype(float), event.astype(int)
        same_per_patient(table, ["time", "event"], path, [tcol, ecol])
        if table["event"].sum() == 0:
            raise InputError(f"{path}: column {ecol!r} has no observed event (all 0/false); survival models "
                             "need events to learn from")
        return Cohort(table.reset_index(drop=True), [], str(path), target_cols=("time", "event"),
                      label_cols=("time", "event"))

    strata_text = "stratified by event and follow-up time quantile"

    def strata(self, table, folds) -> np.ndarray:
        """Event x time quantile, per patient; coarser (fewer time quantiles) until every stratum has at
        least `folds` patients, so each test fold holds events and a spread of times."""
        patients = table.drop_duplicates("case_id")
        n_events = int(patients["event"].sum())
        if n_events < folds:
            raise InputError(f"{n_events} patient(s) have an event; {folds}-fold cross-validation needs at least "
                             f"{folds} so that every test fold has one; lower --folds")
        events = patients["event"].to_numpy()
        strata = np.zeros(len(patients), dtype=int)     # too few censored patients: events spread by chance
        for q in (4, 3, 2, 1):
            part = pd.qcut(patients["time"].rank(method="first"), q, labels=False).to_numpy()
            if np.unique(events * q + part, return_counts=True)[1].min() >= folds:
                strata = events * q + part
                break
        return table["case_id"].map(dict(zip(patients["case_id"], strata))).to_numpy()

    def check_splits(self, splits, table) -> None:
        events = dict(zip(table["slide_id"], table["event"]))
        for fold, part in splits.groupby("fold"):
            for role in ("train", "test"):
                ids = part.loc[part["role"] == role, "slide_id"]
                if not any(events.get(s, 0) for s in ids):
                    raise InputError(f"fold {fold}: no patient with an event in its {role} part; survival "
                                     f"{'models cannot learn' if role == 'train' else 'metrics are undefined'} "
                                     "without one. Use fewer --folds, or splits that spread the events")

    # -- training -----------------------------------------------------------------------------------
    def n_outputs(self, cohort) -> int:
        return self.o.bins if self.o.survival_loss == "nll" else 1

    def fit_state(self, train: pd.DataFrame) -> dict:
        """NLL bins from the quantiles of the event times of the fold's *training* patients (Patch-GCN's
        qcut over uncensored patients), the training follow-up and the evaluation times."""
        patients = train.drop_duplicates("case_id")
        times = patients["time"].to_numpy(float)
        event_times = times[patients["event"].to_numpy(bool)]
        state = {"loss": self.o.survival_loss, "follow_up": float(times.max()),
                 "eval_times": [float(t) for t in (self.o.eval_times or np.quantile(event_times, [0.25, 0.5, 0.75]))]}
        if self.o.survival_loss == "nll":
            inner = np.quantile(event_times, np.linspace(0, 1, self.o.bins + 1)[1:-1])
            if len(np.unique(inner)) < len(inner) or len(event_times) < self.o.bins:
                raise InputError(f"the training part of a fold has {len(np.unique(event_times))} distinct event "
                                 f"time(s): too few for --bins {self.o.bins}; lower --bins")
            state["edges"] = [0.0, *map(float, inner), float(times.max())]
        return state

    def loss_text(self) -> str:
        if self.o.survival_loss == "cox":
            return "the negative Cox partial log-likelihood (Breslow's handling of ties)"
        weight = f", uncensored patients up-weighted by alpha = {self.o.alpha_surv:g}" if self.o.alpha_surv else ""
        return (f"the discrete-time negative log-likelihood (Zadeh & Schmid 2020) over {self.o.bins} intervals cut "
                f"at quantiles of each training fold's event times{weight}")

    def loss(self, state, targets, device, n_outputs):
        if state["loss"] == "cox":
            return CoxLoss()
        inner = torch.tensor(state["edges"][1:-1], dtype=torch.float32, device=device)
        alpha = self.o.alpha_surv
        return lambda logits, target: nll_survival_loss(
            logits, torch.bucketize(target[:, 0].float(), inner, right=True), target[:, 1], alpha)

    def val_loss(self, task_loss, logits, targets) -> float:
        if isinstance(task_loss, CoxLoss):   # a partial likelihood ranks bags against each other: all at once
            t = torch.as_tensor(np.asarray(targets), dtype=torch.float32, device=logits.device)
            loss = cox_loss(logits[:, 0], t[:, 0], t[:, 1])
            return float("nan") if loss is None else float(loss)
        return super().val_loss(task_loss, logits, targets)

    def risk(self, state, logits) -> np.ndarray:
        return nll_risk(logits)[0] if state["loss"] == "nll" else np.asarray(logits, float)[:, 0]

    def val_metric(self, state, logits, targets) -> float:
        """Harrell's C-index of the validation bags."""
        t = np.asarray(targets, float)
        return harrell_c(t[:, 0], t[:, 1], self.risk(state, logits))

    uses_training_predictions = True

    def after_fit(self, state, train_logits, train_targets) -> dict:
        """The training predictions' median and spread (the KM cut and the scale for pooling folds) and, for
        Cox, Breslow's baseline cumulative hazard at up to COX_CURVE_POINTS quantiles of the training event
        times, so that S(t | x) = exp(-H0(t) exp(r - c)) exists for the IBS and the curves."""
        risk = self.risk(state, train_logits)
        std = float(np.std(risk))
        state = {**state, "train_risk": {"median": float(np.median(risk)), "std": std if std > 0 else 1.0}}
        if state["loss"] == "cox":
            y = np.asarray(train_targets, float)
            time, event = y[:, 0], y[:, 1].astype(bool)
            ends = np.unique(np.quantile(time[event], np.linspace(0, 1, COX_CURVE_POINTS + 1)[1:]))
            state["breslow"] = {"times": [float(t) for t in ends], "offset": float(np.mean(risk)),
                                "cumhaz": [float(h) for h in breslow(time, event, risk, ends)]}
        return state

    def curve(self, state, logits) -> tuple[np.ndarray, np.ndarray]:
        """(ends [K], S [n, K]): the predicted survival at K times: the NLL bin ends, or Cox's Breslow times."""
        if state["loss"] == "nll":
            return np.asarray(state["edges"][1:], float), nll_risk(logits)[1]
        b = state["breslow"]
        r = np.asarray(logits, float)[:, :1] - b["offset"]
        return np.asarray(b["times"], float), np.exp(-np.asarray(b["cumhaz"])[None, :] * np.exp(r))

    # -- reference baseline -------------------------------------------------------------------------
    has_baseline = True
    baseline_name = "ridge Cox model on mean-pooled features (penalty tuned by patient-grouped inner CV)"

    def baseline_columns(self, x_fit, y_fit, groups, x_test, meta, seed) -> dict:
        """Standardised features; Cox partial likelihood with an L2 penalty (scikit-survival), the penalty
        from 7 values in 1e-2..1e4 by Harrell's C over a patient-grouped inner 3-fold CV; the model's risk
        columns (risk, risk_pooled by the training risks' median and SD, risk_group at that median)."""
        import warnings

        from sklearn.model_selection import GroupKFold
        from sklearn.preprocessing import StandardScaler
        from sksurv.linear_model import CoxPHSurvivalAnalysis
        from sksurv.util import Surv

        y = np.asarray(y_fit, float)
        time, event = y[:, 0], y[:, 1].astype(bool)
        scaler = StandardScaler().fit(x_fit)
        xs, xt = scaler.transform(x_fit), scaler.transform(x_test)

        def cox(alpha, rows):
            with warnings.catch_warnings():       # a ridge Cox on few patients warns about convergence
                warnings.simplefilter("ignore")
                return CoxPHSurvivalAnalysis(alpha=alpha).fit(xs[rows], Surv.from_arrays(event[rows], time[rows]))

        alphas = 10.0 ** np.arange(-2, 5)
        k = min(3, len(set(groups)))
        scores = []
        for alpha in alphas:
            cs = [harrell_c(time[va], event[va], cox(alpha, tr).predict(xs[va]))
                  for tr, va in (GroupKFold(k).split(xs, groups=groups) if k >= 2 else [])
                  if event[tr].any() and event[va].any()]
            scores.append(np.nanmean(cs) if cs else np.nan)
        best = alphas[int(np.nanargmax(scores))] if np.isfinite(scores).any() else 1.0
        model = cox(best, np.arange(len(xs)))
        # the model's own risk columns, the Cox scores playing its logits: pooled and cut by the training risks
        state = self.after_fit({"loss": "cox"}, model.predict(xs)[:, None], y)
        return self.columns(state, model.predict(xt)[:, None], meta)

    # -- predictions --------------------------------------------------------------------------------
    def columns(self, state, logits, meta) -> dict:
        """risk (higher = worse, this fold's scale), risk_pooled ((risk - training median) / training SD:
        comparable across folds), risk_group (high above the training median), and surv_j = S at time
        surv_time_j (NLL: the end of bin j; Cox: the Breslow times; Cox models trained before Breslow lack them)."""
        risk = self.risk(state, logits)
        ref = state["train_risk"]
        cols = {"risk": risk, "risk_pooled": (risk - ref["median"]) / ref["std"],
                "risk_group": np.where(risk > ref["median"], "high", "low").astype(object)}
        if state["loss"] == "nll" or "breslow" in state:
            ends, s = self.curve(state, logits)
            for j in range(s.shape[1]):
                cols[f"surv_{j + 1}"] = s[:, j]
                cols[f"surv_time_{j + 1}"] = np.full(len(s), ends[j])
        return cols

    def ensemble(self, folds) -> pd.DataFrame:
        """risk = mean over folds of risk_pooled (each fold standardised by its own training risks);
        S(t) of every fold at the first fold's evaluation times, averaged."""
        per_fold = [(meta, self.columns(meta["task_state"], logits, meta)) for meta, logits in folds]
        risk = np.mean([c["risk_pooled"] for _, c in per_fold], 0)
        frame = pd.DataFrame({"risk": risk, "risk_group": np.where(risk > 0, "high", "low")})
        state0 = folds[0][0]["task_state"]
        if all(m["task_state"]["loss"] == "nll" or "breslow" in m["task_state"] for m, _ in folds):
            times = np.asarray(state0["eval_times"], float)
            s = np.mean([survival_at(times, *self.curve(m["task_state"], lg)) for m, lg in folds], 0)
            for j, t in enumerate(times):
                frame[f"surv_{j + 1}"], frame[f"surv_time_{j + 1}"] = s[:, j], t
        for meta, cols in per_fold:
            frame[f"fold{meta['fold']}_risk"] = cols["risk"]
        return frame

    # -- evaluation ---------------------------------------------------------------------------------
    def prediction_columns(self, meta) -> list[str]:
        return ["time", "event", "risk"]

    def averaged(self, column) -> bool:
        return column.startswith(("risk", "surv_", "fold")) and column not in ("risk_group", "fold")

    def decide_units(self, rows) -> pd.DataFrame:
        rows["risk_group"] = np.where(rows["risk_pooled" if "risk_pooled" in rows else "risk"] > 0, "high", "low")
        return rows

    def training_rows(self, rows, splits, fold):
        """The patients of fold `fold`'s training part (train + inner validation): the censoring
        distribution of Uno's C, the td-AUC and the IBS of that fold is theirs, never the test fold's."""
        if splits is None:
            return None
        train_cases = set(splits.loc[(splits["fold"] == fold) & (splits["role"] != "test"), "case_id"].astype(str))
        return rows[rows["case_id"].astype(str).isin(train_cases)]

    def usable(self, rows) -> bool:
        return len(rows) >= 2 and rows["event"].astype(bool).any()

    def score(self, rows, train, meta, reasons: dict | None = None) -> dict:
        train = rows if train is None else train
        risk = rows["risk_pooled" if "risk_pooled" in rows else "risk"].to_numpy(float)
        k = sorted(int(c.rsplit("_", 1)[1]) for c in rows.columns if c.startswith("surv_time_"))
        survival = None
        if k:   # every row carries its own curve times (fold models bin differently)
            ends = rows[[f"surv_time_{j}" for j in k]].to_numpy(float)
            surv = rows[[f"surv_{j}" for j in k]].to_numpy(float)
            survival = lambda grid: survival_at(grid, ends, surv)
        return survival_metrics(rows["time"], rows["event"], risk, train["time"], train["event"], meta["eval_times"],
                                tau=meta.get("tau"), survival=survival, ibs_range=meta.get("ibs_window"),
                                reasons=reasons)

    def evaluate(self, preds, splits, meta, n_boot, seed) -> dict:
        """Per fold: each metric with the censoring distribution of that fold's *training* patients (Uno's C,
        td-AUC, IBS: IPCW weights never come from the fold being scored) and, where a metric is NaN, why.
        Pooled: every patient's out-of-fold prediction, censoring from all patients, truncated at the
        shortest training follow-up of the folds, with a patient-bootstrap CI."""
        rows = self.units(preds)
        event_times = rows.loc[rows["event"].astype(bool), "time"].to_numpy(float)
        eval_times = self.o.eval_times or meta.get("eval_times") or list(np.quantile(event_times, [0.25, 0.5, 0.75]))
        window = meta.get("ibs_window") or ibs_window(self.o.ibs_range, rows["time"], rows["event"])
        meta = {**meta, "eval_times": [float(t) for t in eval_times], "ibs_window": [float(w) for w in window]}
        if splits is not None:
            taus = [float(self.training_rows(rows, splits, f)["time"].max()) for f in sorted(splits["fold"].unique())]
            meta["tau"] = min(taus)
        per_fold, nan_reasons = {}, {}
        if "fold" in rows.columns:
            for fold, part in rows.groupby("fold"):
                why = {}
                per_fold[int(fold)] = {**self.score(part, self.training_rows(rows, splits, fold), meta, why),
                                       "n_slides": int(preds["fold"].eq(fold).sum())}
                nan_reasons.update({f"fold {int(fold)} {name}": text for name, text in why.items()})
        why = {}
        self.score(rows, rows, meta, why)
        nan_reasons.update({f"pooled {name}": text for name, text in why.items()})
        pooled = patient_bootstrap(lambda idx: self.score(rows.iloc[idx], rows, meta), rows["case_id"].to_numpy(),
                                   n_boot, seed, usable=lambda idx: self.usable(rows.iloc[idx]))
        return {"task": self.name, **self.unit_counts(preds, rows),
                "bootstrap": {"resamples": n_boot, "unit": "patient"}, "pooled": pooled, "folds": per_fold,
                "fold_summary": fold_summary(per_fold, self.metric_names), "nan_reasons": nan_reasons,
                "eval_times": meta["eval_times"], "tau": meta.get("tau"), "ibs_window": meta["ibs_window"],
                "ibs_range": self.o.ibs_range, "survival_loss": meta.get("loss", self.o.survival_loss),
                "pooling": "each fold's test risks standardised by that fold's training predictions "
                           "(median, SD) before pooling; per-fold metrics are rank-based and unaffected"}

    def gallery(self, preds, meta, folder) -> list:
        """Heatmaps of the highest- and lowest-risk slides, then every other one made."""
        score = "risk_pooled" if "risk_pooled" in preds else "risk"
        return outcome_gallery(preds, score, "risk", folder,
                               lambda r: f"time {r['time']:g}, {'event' if r['event'] else 'censored'}")

    def plots(self, preds, metrics, folder) -> dict:
        rows = self.units(preds)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"km": folder / "km.png"}
        xlabel = f"time (the label table's {self.o.time_col!r}, in its units)"
        p = km_plot(rows["time"], rows["event"], rows["risk_group"] == "high", paths["km"],
                    "Kaplan-Meier by predicted risk (cut: each fold's training median)", xlabel)
        metrics["km"] = {"logrank_p": p, "n_high": int((rows["risk_group"] == "high").sum()),
                         "n_low": int((rows["risk_group"] == "low").sum())}
        risk = rows["risk_pooled" if "risk_pooled" in rows else "risk"]
        times, auc = td_auc_curve(rows["time"], rows["event"], risk, rows["time"], rows["event"], metrics["eval_times"])
        if len(times):
            paths["td_auc"] = folder / "td_auc.png"
            td_auc_plot(times, auc, paths["td_auc"], xlabel)
        return paths

    def methods_notes(self, metrics) -> str:
        window = metrics.get("ibs_window") or [float("nan")] * 2
        chosen = metrics.get("ibs_range")
        over = {"follow-up": "the observed follow-up", "event-iqr": "the inter-quartile range of event times"}.get(
            chosen, f"quantiles {chosen} of the event times")
        return (f"Uno's C was truncated at t = {_g(metrics.get('tau'))}, the time-dependent AUC (cumulative/dynamic) "
                f"averaged over t = {', '.join(_g(t) for t in metrics.get('eval_times', []))}, and the integrated "
                f"Brier score taken over t in [{_g(window[0])}, {_g(window[1])}] ({over}); each fold's test risks "
                "were standardised by that fold's training predictions before pooling.")

    def report_notes(self, metrics) -> str:
        km = metrics.get("km", {})
        window = metrics.get("ibs_window") or [float("nan")] * 2
        text = (f"<p class=note>Survival loss: {html.escape(str(metrics.get('survival_loss')))}. Pooled metrics: "
                f"{html.escape(metrics.get('pooling', ''))}. Kaplan-Meier: {km.get('n_high', '?')} high-risk vs "
                f"{km.get('n_low', '?')} low-risk patients, log-rank p = {km.get('logrank_p', float('nan')):.3g}.</p>"
                "<p class=note><b>What the numbers mean.</b> <i>C-index</i> (Harrell): of the patient pairs whose "
                "order is known (the earlier time is an event), the share the model ranks right; 0.5 is chance. "
                f"<i>Uno's C</i>: the same, weighted by the inverse probability of censoring and truncated at "
                f"t = {_g(metrics.get('tau'))}, so heavy censoring does not bias it. <i>td-AUC</i>: at each time t "
                f"({', '.join(_g(t) for t in metrics.get('eval_times', []))}), how well the risk separates patients "
                f"with an event by t from those event-free after t (cumulative/dynamic AUC), averaged. <i>IBS</i>: "
                f"the integrated Brier score of the predicted survival curves over t in [{_g(window[0])}, "
                f"{_g(window[1])}] (--ibs-range {html.escape(str(metrics.get('ibs_range')))}); lower is better, "
                "0.25 is a constant 50% prediction. Per-fold IPCW weights come from that fold's training "
                "patients.</p>")
        reasons = metrics.get("nan_reasons") or {}
        if reasons:
            text += ("<p class=note><b>Why some values are n/a:</b> "
                     + "; ".join(f"{html.escape(k)}: {html.escape(v)}" for k, v in reasons.items()) + ".</p>")
        return text


def _g(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:g}"
