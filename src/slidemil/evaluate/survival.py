"""Survival metrics (scikit-survival) and Kaplan-Meier plots (lifelines), on one row per patient.

Harrell's C counts concordant comparable pairs; Uno's C re-weights them by the inverse probability of
censoring (IPCW) estimated on `train`, truncated at `tau`; the cumulative/dynamic AUC asks, at each time
t, whether patients with an event by t got a higher risk than those still event-free; the integrated
Brier score averages the IPCW Brier score of the predicted S(t) over an integration range (discrete-time
models give S(t) directly, Cox models through a Breslow baseline hazard, `breslow`). A metric the sample
cannot support (no comparable pair, times outside the follow-up) is NaN, never an error, and
`survival_metrics` says why in `reasons`.
"""

from __future__ import annotations

import warnings

import numpy as np
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from slidemil.utils.figures import new_figure, save_figure

SURVIVAL_METRICS = ("c_index", "c_index_uno", "td_auc", "ibs")
IBS_POINTS = 50
IBS_RANGES = ("follow-up", "event-iqr")


def _structured(time, event):
    return Surv.from_arrays(np.asarray(event, bool), np.asarray(time, float))


def _quiet(fn, *args, **kwargs) -> float:
    """The metric, or NaN where scikit-survival says the sample cannot support it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args, **kwargs)
        except (ValueError, ZeroDivisionError, IndexError):
            return float("nan")


def harrell_c(time, event, risk) -> float:
    """Harrell's C: the share of comparable pairs (the earlier time is an event) ordered by risk."""
    return float(_quiet(lambda: concordance_index_censored(np.asarray(event, bool), np.asarray(time, float),
                                                           np.asarray(risk, float))[0]))


def usable_times(times, time_test, time_train) -> np.ndarray:
    """The evaluation times inside the test follow-up [min, max) and before the last training time."""
    times = np.asarray(times, float)
    keep = (times >= np.min(time_test)) & (times < np.max(time_test)) & (times < np.max(time_train))
    return np.unique(times[keep])


def survival_at(times, ends, surv) -> np.ndarray:
    """S(t) [n, len(times)] of discrete-time predictions: `surv` [n, K] is S at the bin ends `ends`
    ([K], or [n, K] when rows come from fold models with different bins). S = 1 at t = 0, linear between
    the ends, flat after the last."""
    surv = np.asarray(surv, float)
    ends = np.broadcast_to(np.asarray(ends, float), surv.shape)
    return np.stack([np.interp(times, np.concatenate([[0.0], e]), np.concatenate([[1.0], s]))
                     for e, s in zip(ends, surv)])


def ibs_window(ibs_range: str, time, event) -> tuple[float, float]:
    """The integration range of the IBS in time units. "follow-up" (default): the whole observed follow-up,
    as pycox (Kvamme, Borgan & Scheel, JMLR 2019) and most deep-survival papers integrate; "event-iqr": the
    25th-75th percentile of the event times (slidemil's earlier range; not comparable with the literature);
    "q0,q1": those quantiles of the event times."""
    time, event = np.asarray(time, float), np.asarray(event, bool)
    if ibs_range == "follow-up":
        return float(time.min()), float(time.max())
    q = (0.25, 0.75) if ibs_range == "event-iqr" else tuple(float(v) for v in str(ibs_range).split(","))
    low, high = np.quantile(time[event], q)
    return float(low), float(high)


def breslow(train_time, train_event, train_risk, times) -> np.ndarray:
    """Breslow's baseline cumulative hazard H0 at `times` from a Cox model's training log-risks r:
    H0(t) = sum_{event times t_i <= t} d_i / sum_{j: t_j >= t_i} exp(r_j - c), with c = mean(r) so that
    exp cannot overflow; S(t | r) = exp(-H0(t) exp(r - c)) (Breslow 1972; scikit-survival's
    `BreslowEstimator`, pinned in tests/tasks/test_survival_ipcw_breslow.py)."""
    t, e = np.asarray(train_time, float), np.asarray(train_event, bool)
    w = np.exp(np.asarray(train_risk, float) - np.mean(train_risk))
    event_times = np.unique(t[e])
    at_risk = np.array([w[t >= u].sum() for u in event_times])
    deaths = np.array([(t[e] == u).sum() for u in event_times])
    cumhaz = np.cumsum(deaths / at_risk)
    idx = np.searchsorted(event_times, np.asarray(times, float), side="right") - 1
    return np.where(idx >= 0, cumhaz[np.clip(idx, 0, None)], 0.0)


def survival_metrics(time, event, risk, train_time, train_event, eval_times, tau: float | None = None,
                     survival=None, ibs_range: tuple[float, float] | None = None,
                     reasons: dict | None = None) -> dict[str, float]:
    """c_index (Harrell), c_index_uno (IPCW on the training part, truncated at `tau`), td_auc (mean
    cumulative/dynamic AUC over the usable `eval_times`), ibs (integrated Brier score over IBS_POINTS times
    spanning `ibs_range` (default: the usable `eval_times`) inside this sample's follow-up, when
    `survival(times) -> S [n, len(times)]` is given). Why a metric is NaN goes into `reasons`."""
    time, event, risk = np.asarray(time, float), np.asarray(event, bool), np.asarray(risk, float)
    train = _structured(train_time, train_event)
    # IPCW needs the training censoring curve at every test time: a test patient followed beyond the last
    # training time is censored there (still event-free at every time the metrics look at; Uno's C is
    # truncated at or before it, the td-AUC and IBS times lie before it)
    limit = float(np.max(train_time))
    tau = limit if tau is None else min(tau, limit)
    test = _structured(np.minimum(time, limit), event & (time <= limit))
    why = {}
    out = {"c_index": harrell_c(time, event, risk)}
    if not np.isfinite(out["c_index"]):
        why["c_index"] = "no comparable pair (needs an event before another patient's follow-up ends)"
    out["c_index_uno"] = _quiet(lambda: float(concordance_index_ipcw(train, test, risk, tau=tau)[0]))
    if not np.isfinite(out["c_index_uno"]):
        why["c_index_uno"] = ("the censoring distribution of the training patients is zero inside the test "
                              "follow-up, or no comparable pair before tau")
    times = usable_times(eval_times, time, train_time)
    out["td_auc"] = _quiet(lambda: float(cumulative_dynamic_auc(train, test, risk, times)[1])) if len(times) else np.nan
    if not len(times):
        why["td_auc"] = (f"no evaluation time ({', '.join(f'{t:g}' for t in np.asarray(eval_times, float))}) lies "
                         f"inside this sample's follow-up [{time.min():g}, {time.max():g}) and before the training "
                         f"follow-up ends ({np.max(train_time):g})")
    elif not np.isfinite(out["td_auc"]):
        why["td_auc"] = "at the evaluation times no patient has an event yet, or none is still event-free"
    out["ibs"] = float("nan")
    if survival is None:
        why["ibs"] = "the model gives no survival function S(t)"
    else:
        low, high = ibs_range if ibs_range is not None else (times.min(), times.max()) if len(times) else (0, 0)
        grid = usable_times(np.linspace(low, high, IBS_POINTS), time, train_time)
        if len(grid) >= 2:
            out["ibs"] = _quiet(lambda: float(integrated_brier_score(train, test, survival(grid), grid)))
        if not np.isfinite(out["ibs"]):
            why["ibs"] = (f"fewer than 2 times of the integration range [{low:g}, {high:g}] lie inside this "
                          f"sample's follow-up and before the training follow-up ends")
    if reasons is not None:
        reasons.update(why)
    return {k: float(out[k]) for k in SURVIVAL_METRICS}


def td_auc_curve(time, event, risk, train_time, train_event, eval_times) -> tuple[np.ndarray, np.ndarray]:
    """(times, AUC at each) for the plot; empty when no time is usable."""
    times = usable_times(eval_times, time, train_time)
    if not len(times):
        return times, times
    auc = _quiet(lambda: cumulative_dynamic_auc(_structured(train_time, train_event), _structured(time, event),
                                                np.asarray(risk, float), times)[0])
    return (times, np.asarray(auc)) if np.ndim(auc) else (times[:0], times[:0])


def km_plot(time, event, high, path, title: str = "Kaplan-Meier by predicted risk", xlabel: str = "time") -> float:
    """Kaplan-Meier curves of the high- and low-risk groups with the log-rank p in the title and the
    numbers at risk under the axis; returns the p-value (NaN when a group is empty)."""
    # lifelines (with autograd) takes ~1.5 s to import: only runs that draw a KM curve pay for it
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    time, event, high = np.asarray(time, float), np.asarray(event, bool), np.asarray(high, bool)
    fig, ax = new_figure((6, 4.8))
    ticks = np.linspace(0, float(np.max(time)), 5)
    at_risk = []
    for name, sel, colour in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if not sel.any():
            continue
        km = KaplanMeierFitter(label=f"{name} (n={int(sel.sum())})").fit(time[sel], event[sel])
        km.plot_survival_function(ax=ax, ci_show=True, color=colour)
        at_risk.append((name, [int((time[sel] >= t).sum()) for t in ticks]))
    p = float("nan")
    if high.any() and (~high).any():
        p = float(logrank_test(time[high], time[~high], event[high], event[~high]).p_value)
    ax.set(xlabel=xlabel, ylabel="survival probability", ylim=(0, 1.02), xticks=ticks,
           title=f"{title}\nlog-rank p = {p:.3g}")
    table = "numbers at risk\n" + "\n".join(f"{name:>9}: " + "  ".join(f"{n:>6d}" for n in counts)
                                            for name, counts in at_risk)
    ax.text(0.0, -0.2, table, transform=ax.transAxes, va="top", family="monospace", fontsize=8)
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    return p


def td_auc_plot(times, auc, path, xlabel: str = "time") -> None:
    fig, ax = new_figure((4.5, 4))
    ax.plot(times, auc, "o-")
    ax.axhline(0.5, color="k", ls="--", lw=0.8)
    ax.set(xlabel=xlabel, ylabel="AUC(t)", ylim=(0, 1.02), title="Time-dependent AUC (cumulative/dynamic)")
    save_figure(fig, path, dpi=110, bbox_inches="tight")
