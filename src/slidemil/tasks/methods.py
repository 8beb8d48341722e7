"""`RUN/methods.md`: a draft of the methods and results paragraphs of a paper, written from what the run
recorded (config.yaml and its `slidemil` provenance, each fold's model.json, metrics.json). Every setting
it names is the one the run used and every number is the report's, so the text cannot drift from the
experiment; what the run did not record (the tissue segmentation, a foreign tool's features) is left out,
not guessed. The user edits it into their paper; the report shows it under "Methods (draft)"."""

from __future__ import annotations

from slidemil.evaluate.report import PROTOCOL
from slidemil.rundir import RunDir
from slidemil.tasks.base import Task, _fmt

# how the input transform reads in a methods section (`--standardize`; docs/protocol.md)
STANDARDIZE = {
    "shrunk": "whitened with each training fold's feature covariance shrunk toward its diagonal (shrinkage "
              "estimated as in Schäfer & Strimmer 2005)",
    "whiten": "whitened (ZCA) with each training fold's feature covariance",
    "on": "standardised per dimension with each training fold's mean and SD",
    "auto": "standardised per dimension with each training fold's mean and SD",
}
# metric names as a methods section writes them
METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy",
                "macro_f1": "macro F1", "c_index": "Harrell's C-index", "c_index_uno": "Uno's C-index",
                "td_auc": "time-dependent AUC", "ibs": "integrated Brier score", "pearson_r": "Pearson's r",
                "spearman_r": "Spearman's rho", "r2": "R²", "mae": "mean absolute error",
                "qwk": "quadratic weighted kappa"}
SCHEDULES = {"cosine": "a {warmup}-epoch linear warm-up and cosine decay", "plateau": "halved when the validation "
             "loss stopped improving", "none": "a constant learning rate"}


def methods_sections(run: RunDir, cfg: dict, metrics: dict, task: Task) -> list[tuple[str, str]]:
    """[(title, paragraph)]: data, features, model and training, evaluation, results, software."""
    prov = cfg.get("slidemil") or {}
    folds = run.finished_folds()
    metas = [run.fold_meta(k) for k in folds]
    return [("Data", _data(run, metrics, prov)), ("Features", _features(metas[0], prov)),
            ("Model and training", _model(cfg, metas, prov, task)),
            ("Evaluation", _evaluation(cfg, metrics, task, len(folds))),
            ("Results", _results(cfg, metrics, task, run.externals())), ("Software", _software(prov)),
            ("Caveats the run reported (address them; not text for the paper)", _caveats(metrics))]


def methods_markdown(sections: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"**{title}.** {text}" for title, text in sections if text) + "\n"


def _data(run: RunDir, metrics: dict, prov: dict) -> str:
    # the cohort as trained (a patient-bag run's predictions, and so its metrics, have a row per patient)
    slides, patients = prov.get("n_slides", metrics["n_slides"]), prov.get("n_patients", metrics["n_patients"])
    text = f"The cohort comprised {slides} whole-slide images of {patients} patients"
    preds = run.predictions()
    if "label" in preds.columns:
        per_patient = preds.drop_duplicates(["case_id", "label"])["label"].astype(str).value_counts()
        classes = [str(c) for c in metrics.get("classes") or per_patient.index]
        text += " (" + ", ".join(f"{per_patient.get(c, 0)} {c}" for c in classes) + ")"
    elif "event" in preds.columns:
        events = int(preds.drop_duplicates("case_id")["event"].sum())
        text += f" ({events} with an observed event)"
    left_out = len(run.excluded())
    if left_out:
        text += f"; {left_out} slide(s) of the label table were left out (listed with the reason in excluded.csv)"
    return text + "."


def _features(meta: dict, prov: dict) -> str:
    enc = meta.get("encoder") or {}
    name = enc.get("encoder")
    if not name:
        return f"Each slide was a bag of {meta.get('in_dim')}-dimensional patch features."
    reference = (prov.get("references") or {}).get("encoder")
    text = f"Patch features were extracted with {name}" + (f" ({reference})" if reference else "")
    if enc.get("patch_size") and enc.get("target_mpp"):
        text += f" from {enc['patch_size']} x {enc['patch_size']} px patches at {_g(enc['target_mpp'])} µm/px"
        if enc.get("overlap"):
            text += f" overlapping by {enc['overlap']} px"
        if enc.get("min_tissue") is not None:
            text += f" with at least {_pct(enc['min_tissue'])} tissue"
    if str(enc.get("stain_norm", "none")) != "none":
        text += f" after {enc['stain_norm']} stain normalisation"
    return text + f" ({meta.get('in_dim')}-dimensional)."


def _model(cfg: dict, metas: list[dict], prov: dict, task: Task) -> str:
    meta, refs = metas[0], prov.get("references") or {}
    built = meta.get("built_with") or (prov.get("arguments") or {})
    bag = "each patient's slides concatenated into one bag" if cfg.get("bag_unit") == "patient" else "one bag per slide"
    text = f"Predictions were made by the {cfg['model']} aggregator{_cite(refs.get('model'), built.get('model_args'))}"
    if cfg.get("reembed"):
        text += f", its instances re-embedded by {cfg['reembed']}{_cite(refs.get('reembed'), built.get('reembed_args'))}"
    text += f", {bag}. "
    if cfg.get("strategy"):
        text += (f"Training used the {cfg['strategy']} strategy"
                 f"{_cite(refs.get('strategy'), built.get('strategy_args'))}. ")
    transform = STANDARDIZE.get(cfg.get("standardize", "off")) if meta.get("standardized") else None
    text += f"Its input features were {transform}. " if transform else "Its input features were used as extracted. "
    schedule = SCHEDULES[cfg.get("scheduler", "cosine")].format(warmup=cfg.get("warmup_epochs", 0))
    bags = cfg.get("batch_size", 1)
    step = "one bag per step" if bags == 1 else f"{bags} bags per step"
    if cfg.get("accum_steps", 1) > 1:
        step += f", gradients accumulated over {cfg['accum_steps']} steps"
    text += (f"It was trained on {task.loss_text()} with AdamW (learning rate {_g(cfg['lr'])}, weight decay "
             f"{_g(cfg['weight_decay'])}, {schedule}), {step}, for at most {cfg['epochs']} epochs")
    extras = [f"{_pct(cfg['instance_dropout'])} of each training bag's instances dropped at random"
              if cfg.get("instance_dropout") else "", f"at most {cfg['max_instances']} instances sampled per bag"
              if cfg.get("max_instances") else "", "bags sampled class-balanced" if cfg.get("balanced_sampling") else "",
              f"gradient norm clipped at {_g(cfg['grad_clip'])}" if cfg.get("grad_clip") else ""]
    extras = [e for e in extras if e]
    text += (" (" + "; ".join(extras) + ")" if extras else "") + ". "
    return text + _selection(cfg, metas, task)


def _selection(cfg: dict, metas: list[dict], task: Task) -> str:
    epochs = sorted(int(m["best_epoch"]) for m in metas if m.get("best_epoch"))
    chosen = (f" (epochs {epochs[0]}-{epochs[-1]} were kept)" if epochs and epochs[0] != epochs[-1]
              else f" (epoch {epochs[0]} in every fold)" if epochs else "")
    if cfg.get("tune"):
        text = (f"Learning rate, weight decay, dropout and epochs were searched in each fold by Optuna's TPE sampler "
                f"({cfg.get('tune_trials')} trials) on an inner validation split of the training patients only. ")
    else:
        text = ""
    if cfg.get("select") == "last" or not cfg.get("val_fraction") and not cfg.get("splits"):
        return text + f"The model of the last epoch was kept{chosen}; no epoch was selected on validation data."
    head = task.metric_names[0]     # what every task's val_metric is
    monitor = "loss" if cfg.get("monitor", "val_loss") == "val_loss" else METRIC_NAMES.get(head, head)
    first = min(cfg.get("min_epochs", 0), cfg["epochs"])
    smooth = cfg.get("smooth", 1)
    return text + (f"The epoch was selected on an inner validation split ({_pct(cfg['val_fraction'])} of each training "
                   f"fold's patients, grouped by patient): the best "
                   + (f"{smooth}-epoch moving average of the " if smooth > 1 else "")
                   + f"validation {monitor}" + (f", not before epoch {first}" if first > 1 else "")
                   + f", with early stopping after {cfg.get('patience')} epochs without improvement{chosen}.")


def _g(value) -> str:
    """A number as config.yaml holds it (an edited file may hold text: written as it is, not a crash)."""
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


def _pct(value) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) else str(value)


def _cite(paper: str | None, args: dict | None) -> str:
    """" (paper; arg value, ...)", the parts the run recorded."""
    parts = [p for p in (paper, ", ".join(f"{k} {v}" for k, v in (args or {}).items())) if p]
    return f" ({'; '.join(parts)})" if parts else ""


def _evaluation(cfg: dict, metrics: dict, task: Task, n_folds: int) -> str:
    if cfg.get("splits"):
        scheme = f"predefined splits ({n_folds} fold(s))"
    elif cfg.get("cv") == "leave-site-out":
        scheme = f"leave-site-out cross-validation ({n_folds} sites, each the test set once)"
    else:
        scheme = (f"{n_folds}-fold cross-validation, grouped by patient (a patient's slides in one fold)"
                  + (" and by site" if cfg.get("preserve_site") else "") + f" and {task.strata_text}")
    unit = ("one row per patient (a patient's slides averaged)" if metrics.get("unit") == "patient"
            else "one row per slide")
    names = ", ".join(METRIC_NAMES.get(n, n.replace("_", " ")) for n in task.metric_names)
    text = (f"Performance was estimated by {scheme}, seed {cfg.get('seed', 0)}. Each test fold was used only for "
            f"evaluation: epochs and checkpoints were chosen on training patients, {PROTOCOL.get(task.name, '')} "
            f"Metrics ({names}) were computed on the pooled out-of-fold predictions, {unit}, with 95% confidence "
            f"intervals from {metrics['bootstrap']['resamples']} patient-level bootstrap resamples.")
    notes = task.methods_notes(metrics)
    if notes:
        text += f" {notes}"
    if metrics.get("baseline"):
        text += f" As a reference, a {metrics['baseline']['name']} was trained and scored on the same folds."
    return text


def _results(cfg: dict, metrics: dict, task: Task, externals: dict) -> str:
    head = task.metric_names[0]
    spread = (metrics.get("fold_summary") or {}).get(head) or {}
    text = f"{cfg['model']} reached a pooled {task.summary(metrics)}"
    if spread.get("mean") is not None:
        text += f" (per-fold mean {_fmt(spread['mean'])} ± {_fmt(spread.get('std'))} SD)"
    if metrics.get("baseline"):
        text += f", against {task.summary(metrics['baseline'])} for the reference baseline"
    text += "."
    for name, ext in externals.items():     # `slidemil predict --labels`: cohorts no fold saw
        m = ext["metrics"]
        text += (f" On the external cohort {name} ({m['n_patients']} patients, {m['n_slides']} slides; used in neither "
                 f"training nor selection), the mean of the {ext['folds']} fold models reached {task.summary(m)}.")
    return text


def _caveats(metrics: dict) -> str:
    caveats = metrics.get("warnings") or []
    return " ".join(c[0].upper() + c[1:] + ("" if c.endswith(".") else ".") for c in caveats)


def _software(prov: dict) -> str:
    commit = prov.get("git_commit")
    return (f"slidemil {prov.get('version')}" + (f" (git {str(commit)[:12]})" if commit else "")
            + f", PyTorch {prov.get('torch')}, Python {prov.get('python')}; label table sha256 "
            f"{str(prov.get('labels_sha256', ''))[:16]}, features sha256 {str(prov.get('features_sha256', ''))[:16]}"
            ". config.yaml holds every setting: `slidemil train --config config.yaml --out NEW_FOLDER` reruns the "
            "experiment on the same data (the folds are seeded).")

