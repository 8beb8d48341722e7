"""`TrainConfig`: everything `slidemil train` needs. A YAML file and CLI flags fill the same model;
each field's description and default is the flag's help and default. Names and arguments of models,
re-embeddings and strategies are checked against their registries here, before any folder exists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import ConfigDict, Field, field_validator, model_validator

from slidemil.models.reembed import REEMBEDDINGS
from slidemil.models.registry import MODELS
from slidemil.tasks import TaskConfig
from slidemil.train.recipes import DEFAULTS, default_settings, paper_settings
from slidemil.train.strategies import STRATEGIES


class TrainConfig(TaskConfig):
    """Field names are the YAML keys; `--foo-bar` sets `foo_bar`. The task and label-table fields
    (task, label_col, time_col, ..., class_weights) come from `TaskConfig`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    features: str = Field(description="Folder of per-slide feature files (slidemil/TRIDENT h5, CLAM pt).")
    labels: str = Field(description="Label CSV (slide_id, case_id, and the task's columns).")
    out: str = Field(description="Run folder to write.")
    # label table
    skip_missing: bool = Field(False, description="Leave out slides without features.")
    skip_bad: bool = Field(False, description="Leave out slides whose feature files cannot be trained on "
                                              "(NaN/Inf, empty, wrong shape or dimension); listed in excluded.csv.")
    bag_unit: Literal["slide", "patient"] = Field("slide", description="slide | patient (concatenate a patient's slides).")
    # splits
    folds: int = Field(5, ge=2, description="Number of outer folds.")
    val_fraction: float = Field(0.2, ge=0.0, lt=0.9, description="Inner validation fraction of each training fold.")
    splits: Optional[str] = Field(None, description="Predefined splits.csv (slide_id, fold, role).")
    preserve_site: bool = Field(False, description="Keep each site within one fold.")
    cv: Literal["kfold", "leave-site-out"] = Field(
        "kfold", description="kfold: --folds patient-grouped folds; leave-site-out: one fold per site (--site-col), "
                             "tested on that site after training on the others (--folds is ignored).")
    # model
    model: str = Field("abmil", description="Aggregator name (see `slidemil models`).")
    model_args: dict = Field(default_factory=dict, description="Model argument KEY=VALUE (YAML value); repeatable.")
    reembed: Optional[str] = Field(None, description="Re-embedding module in front of the aggregator (rrt).")
    reembed_args: dict = Field(default_factory=dict, description="Re-embedding argument KEY=VALUE; repeatable.")
    strategy: Optional[str] = Field(None, description="Training strategy around the model (aem, mhim, sc, histaug, "
                                                      "feature_noise, ...; none turns a model's default off).")
    strategy_args: dict = Field(default_factory=dict, description="Strategy argument KEY=VALUE; repeatable.")
    # optimisation
    recipe: Literal["default", "paper"] = Field(
        "default", description="default: slidemil's settings (measured on small cohorts, docs/protocol.md); "
                               "paper: the model's (and strategy's) paper recipe (docs/models.md); given "
                               "flags still win.")
    epochs: int = Field(30, ge=1, description="Maximum epochs per fold.")
    lr: float = Field(2e-4, gt=0, description="Learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    scheduler: Literal["cosine", "plateau", "none"] = Field("cosine", description="cosine | plateau | none.")
    warmup_epochs: int = Field(1, ge=0, description="Linear warm-up epochs before the cosine schedule.")
    patience: int = Field(10, ge=1, description="Early-stopping patience in epochs (of the smoothed value).")
    min_epochs: int = Field(10, ge=0, description="Never stop, nor select an epoch, before this many epochs "
                                                  "(capped at --epochs).")
    smooth: int = Field(5, ge=1, description="Moving-average window (epochs) of the monitored validation value; "
                                             "1 = raw per-epoch values.")
    select: Literal["best", "last"] = Field("best", description="best: the epoch with the best smoothed validation "
                                                                "value; last: train all --epochs, keep the last "
                                                                "(no selection, no early stopping).")
    standardize: Literal["shrunk", "auto", "on", "whiten", "off"] = Field(
        "shrunk", description="Standardise features with statistics of each fold's training bags (saved with the "
                              "model, applied by predict and heatmaps): shrunk = whiten by the covariance shrunk "
                              "toward its diagonal by its correlations' sampling noise, at least 10% (a few "
                              "dominant directions stop hiding the rest; "
                              "docs/protocol.md), whiten = full ZCA, on = per dimension, auto = per dimension "
                              "only far from unit scale (the earlier default), off.")
    monitor: Literal["val_loss", "val_metric", "val_auroc"] = Field(
        "val_loss", description="val_loss | val_metric (the task's: AUROC, C-index, Pearson r, quadratic kappa); "
                                "val_auroc is the classification name of val_metric.")
    batch_size: int = Field(1, ge=1, description="Bags per step, padded with masks.")
    accum_steps: int = Field(1, ge=1, description="Gradient accumulation steps.")
    grad_clip: Optional[float] = Field(None, description="Clip the gradient norm to this value.")
    max_instances: Optional[int] = Field(None, ge=1, description="Random subset of instances per bag, training only.")
    instance_dropout: float = Field(0.0, ge=0, lt=1, description="Drop this fraction of each training bag's "
                                                                 "instances, drawn anew at every access (DSMIL's "
                                                                 "--dropout_patch); never at validation, test or "
                                                                 "prediction.")
    pack_len: Optional[int] = Field(None, ge=1, description="Train on packs: the --batch-size bags of a step laid end "
                                                          "to end in packs of this many instances, pooled per bag "
                                                          "(PackMIL); a longer bag trains on a random subset of this "
                                                          "size. Models that pool per bag only (see `slidemil models`).")
    balanced_sampling: bool = Field(False, description="Sample bags class-balanced.")
    tune: bool = Field(False, description="Search lr, weight decay, instance dropout and epochs per fold (Optuna "
                                          "TPE), selected on the fold's inner validation split only; the test fold "
                                          "never takes part.")
    tune_trials: int = Field(20, ge=1, description="Trials per fold for --tune (the first is the configuration given).")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for splits, initialisation and sampling.")
    ddp: Literal["folds", "data"] = Field(
        "folds", description="Under torchrun: folds = each rank trains whole folds (results as one process); data = "
                             "all ranks train each fold together, each on its share of every step's bags, "
                             "gradients averaged (a step sees ranks x --batch-size bags).")
    # runtime (not part of the experiment's identity: may change on --resume)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    max_instances_infer: Optional[int] = Field(None, ge=1, description="Score bags larger than this chunk by chunk "
                                                                     "at validation and test (models that can: "
                                                                     "abmil, mean_pool; same outputs, less memory).")
    compile: bool = Field(False, description="torch.compile the model's forward (faster steps on a GPU after one "
                                             "compilation per new bag shape; on CPU it needs a C++ compiler).")
    cache_features: bool = Field(True, description="Keep bags in memory between epochs (up to --cache-gb).")
    cache_gb: Optional[float] = Field(None, ge=0, description="Memory for cached bags, shared by all folds (float16 "
                                                            "files stay float16); bags beyond it are read from "
                                                            "disk each time. Default: half the available memory.")
    cache_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where cached bags live when training on a GPU: cuda = on the GPU, up to 60% of its free "
                            "memory (then pinned host memory); cpu = pinned host memory, each bag copied on a side "
                            "stream while the step before runs; auto = cuda on a GPU, cpu otherwise.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples over patients for the CIs.")
    quiet: bool = Field(False, description="No progress bar.")

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("device", "num_workers", "cache_features", "cache_gb", "cache_device", "quiet",
                                                  "out", "max_instances_infer", "compile")

    @field_validator("features", "labels", "out", "splits")
    @classmethod
    def _absolute(cls, value):
        """Input and output paths as absolute paths: config.yaml must name the same files whatever folder
        `evaluate`, `heatmap` or `--resume` later run from ("-": no path, for in-memory training)."""
        if value is None or value == "-":
            return value
        return str(Path(value).expanduser().absolute())

    @field_validator("model", "strategy", "reembed")
    @classmethod
    def _registered(cls, value, info):
        """Names must be in their registry; `--strategy none` turns off a model's default strategy."""
        if info.field_name == "strategy" and value == "none":
            return None
        if value is not None:
            _REGISTRIES[info.field_name].info(value)
        return value

    @model_validator(mode="after")
    def _arguments(self):
        """`*_args` must be arguments the chosen model, re-embedding and strategy take."""
        for field in ("model", "reembed", "strategy"):
            name, args = getattr(self, field), getattr(self, f"{field}_args")
            if name is None and args:
                raise ValueError(f"{field}_args given without --{field}; name the {_REGISTRIES[field].kind} "
                                 f"they belong to")
            if name is not None:
                _REGISTRIES[field].check_args(name, args)
        return self

    @model_validator(mode="after")
    def _packing(self):
        """--pack-len needs a model (and strategy) that keeps its pooling inside each bag of a pack."""
        strategy = STRATEGIES.info(self.strategy).cls if self.strategy else None
        if strategy is not None and getattr(strategy, "needs_packing", False) and not self.pack_len:
            raise ValueError(f"strategy {self.strategy!r} trains on packs: give --pack-len (e.g. 2048)")
        if not self.pack_len:
            return self
        packable = sorted(n for n in MODELS.available() if MODELS.info(n).cls.packable)
        if not MODELS.info(self.model).cls.packable:
            raise ValueError(f"--pack-len: model {self.model!r} cannot keep its attention inside each bag of a pack; "
                             f"packable models: {', '.join(packable)} (or drop --pack-len)")
        if self.reembed and not getattr(REEMBEDDINGS.info(self.reembed).cls, "packable", False):
            raise ValueError(f"--pack-len: re-embedding {self.reembed!r} mixes the whole sequence; drop --reembed or "
                             f"--pack-len (re-embedding ads packs)")
        if strategy is not None and not strategy.supports_packing:
            raise ValueError(f"--pack-len: strategy {self.strategy!r} reads whole bags; drop --strategy or --pack-len "
                             f"(strategy packmil trains on packs)")
        return self

    @model_validator(mode="after")
    def _recipe(self):
        """The recipe's settings for every field the user did not give: the paper's (`--recipe paper`) or
        slidemil's measured per-model defaults."""
        for key, value in self.applied_defaults().items():
            object.__setattr__(self, key, value)
        return self

    @model_validator(mode="after")
    def _fits_task(self):
        """Options that only make sense for some tasks."""
        if self.task != "classification":
            if self.class_weights != "none":
                raise ValueError(f"--class-weights is for classification; task {self.task!r} has no class weights")
            if self.monitor == "val_auroc":
                raise ValueError(f"--monitor val_auroc is for classification; use val_metric for task {self.task!r}")
            if self.strategy in ("sc", "packmil"):
                raise ValueError(f"strategy {self.strategy} mixes or contrasts class labels; it needs --task "
                                 f"classification" + (" (--pack-len alone packs any task)" if self.strategy == "packmil" else ""))
        if self.tune and (self.val_fraction == 0 and not self.splits or self.select == "last"):
            raise ValueError("--tune selects on each fold's inner validation split: keep --val-fraction above 0 "
                             "and --select best")
        if self.tune and self.ddp == "data":
            raise ValueError("--tune trains one trial after another on one process; use --ddp folds")
        if self.cv == "leave-site-out" and not self.site_col:
            raise ValueError("--cv leave-site-out needs --site-col, the label-table column naming each slide's centre")
        if self.balanced_sampling and self.task in ("survival", "regression"):
            raise ValueError(f"--balanced-sampling needs classes; task {self.task!r} has none")
        if self.task == "survival" and self.survival_loss == "cox" and self.batch_size < 2:
            raise ValueError("--survival-loss cox compares the bags of a batch with each other: use --batch-size 2 "
                             "or more (OTSurv trains with 16)")
        return self

    @staticmethod
    def default_overrides(name: str) -> dict:
        """The models whose measured default for this field differs (train/recipes.py, docs/protocol.md)."""
        return {model: settings[name] for model, settings in DEFAULTS.items() if name in settings}

    def identity(self) -> dict:
        """The fields that define the experiment (what --resume must not change)."""
        return {k: v for k, v in self.model_dump().items() if k not in self.RUNTIME_FIELDS}

    def applied_defaults(self) -> dict:
        """The recipe's settings this run took because the user did not give them (slidemil's measured
        per-model defaults, or `--recipe paper`'s): said in the log and the report, never silent."""
        return {k: v for k, v in self._recipe_settings().items() if k not in self.model_fields_set}

    def _recipe_settings(self) -> dict:
        """`--recipe paper`: the paper's settings for this model, strategy and task; else slidemil's measured
        per-model defaults."""
        settings = (paper_settings(self.model, self.strategy, self.task)[0] if self.recipe == "paper"
                    else default_settings(self.model, self.task))
        if self.class_weights != "none":      # the user chose how to balance the classes: not twice
            settings.pop("balanced_sampling", None)
        return settings

    def resolved_arguments(self) -> dict:
        """Every argument the model, re-embedding and strategy are built with, their defaults filled in (as
        JSON values): `model_args` records only what the user gave, so a default changed by a later release
        would otherwise go unnoticed when a run is resumed (config.yaml keeps these under `slidemil`)."""
        out = {}
        for field, registry in _REGISTRIES.items():
            name = getattr(self, field)
            if name is not None:
                args = {**registry.info(name).arguments(), **getattr(self, f"{field}_args")}
                out[f"{field}_args"] = json.loads(json.dumps(args, default=str))
        return out

    def references(self) -> dict:
        """The papers of the model, re-embedding and strategy this run uses, as the registries cite them
        (config.yaml keeps them under `slidemil`, for the methods paragraph of `methods.md`)."""
        return {field: registry.info(getattr(self, field)).paper for field, registry in _REGISTRIES.items()
                if getattr(self, field) is not None}


_REGISTRIES = {"model": MODELS, "reembed": REEMBEDDINGS, "strategy": STRATEGIES}
