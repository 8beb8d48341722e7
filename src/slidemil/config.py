"""Typed run configuration. A YAML file and CLI flags fill the same model; flags win."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slidemil.errors import InputError


class TrainConfig(BaseModel):
    """Everything `slidemil train` needs. Field names are the YAML keys; `--foo-bar` sets `foo_bar`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    features: str = Field(description="folder of per-slide feature files (slidemil/TRIDENT h5, CLAM pt)")
    labels: str = Field(description="label CSV")
    out: str = Field(description="run folder")
    # label table
    label_col: str = "label"
    slide_col: str = "slide_id"
    case_col: str = "case_id"
    classes: Optional[list[str]] = None
    site_col: Optional[str] = None
    skip_missing: bool = False
    bag_unit: Literal["slide", "patient"] = "slide"
    # splits
    folds: int = Field(5, ge=2)
    val_fraction: float = Field(0.2, ge=0.0, lt=0.9)
    splits: Optional[str] = None
    preserve_site: bool = False
    # model
    model: str = "abmil"
    model_args: dict = Field(default_factory=dict)
    reembed: Optional[str] = None
    reembed_args: dict = Field(default_factory=dict)
    strategy: Optional[str] = None
    strategy_args: dict = Field(default_factory=dict)
    # optimisation
    epochs: int = Field(30, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    patience: int = Field(10, ge=1)
    min_epochs: int = Field(0, ge=0)
    monitor: Literal["val_loss", "val_auroc"] = "val_loss"
    batch_size: int = Field(1, ge=1)
    accum_steps: int = Field(1, ge=1)
    grad_clip: Optional[float] = None
    max_instances: Optional[int] = Field(None, ge=1)
    class_weights: Literal["none", "balanced"] = "none"
    balanced_sampling: bool = False
    seed: int = 0
    # runtime (not part of the experiment's identity: may change on --resume)
    device: str = "auto"
    num_workers: int = Field(0, ge=0)
    cache_features: bool = True
    bootstrap: int = Field(1000, ge=0)
    quiet: bool = False

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("device", "num_workers", "cache_features", "quiet", "out")

    @field_validator("model", "strategy", "reembed")
    @classmethod
    def _registered(cls, value, info):
        """Names must be in their registry (imported lazily: the registries import modules that import this one)."""
        if value is None:
            return value
        from slidemil.models import available
        from slidemil.models.reembed import REEMBEDDERS
        from slidemil.train.strategies import STRATEGIES

        kind, names = {"model": ("model", available()), "strategy": ("strategy", sorted(STRATEGIES)),
                       "reembed": ("re-embedding", sorted(REEMBEDDERS))}[info.field_name]
        if value not in names:
            raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(names)}")
        return value

    @field_validator("classes", mode="before")
    @classmethod
    def _split_classes(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def identity(self) -> dict:
        """The fields that define the experiment (what --resume must not change)."""
        return {k: v for k, v in self.model_dump().items() if k not in self.RUNTIME_FIELDS}


def load_config(cls: type[BaseModel], path: str | os.PathLike | None, overrides: dict) -> BaseModel:
    """Build `cls` from an optional YAML file, then the non-None `overrides` (CLI flags) on top."""
    data: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise InputError(f"{path}: the top level must be a mapping of option: value")
        data.pop("slidemil", None)  # provenance block written into a run's config.yaml
        data = {k.replace("-", "_"): v for k, v in data.items()}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"invalid configuration{f' in {path}' if path else ''}: {problems}") from None


class PreprocessConfig(BaseModel):
    """Options of `slidemil segment | patch | extract | preprocess` (YAML keys = field names)."""

    model_config = ConfigDict(extra="forbid")

    slides: str
    out: str
    # resolution
    mpp: Optional[float] = Field(None, gt=0, description="level-0 mpp for slides whose metadata lacks it")
    mpp_csv: Optional[str] = None
    backend: Literal["auto", "openslide", "tifffile", "image"] = "auto"
    # segmentation
    seg_mpp: float = Field(8.0, gt=0)
    threshold: str = "otsu"
    min_saturation: float = 0.04
    median: int = 7
    close: int = 4
    min_area_um2: float = 20000.0
    max_hole_um2: float = 10000.0
    filter_pen: bool = True
    tissue_geojson: Optional[str] = None
    coords_dir: Optional[str] = None
    # patching
    target_mpp: Optional[float] = Field(0.5, gt=0)
    magnification: Optional[float] = Field(None, gt=0)
    patch_size: int = Field(256, ge=8)
    overlap: int = Field(0, ge=0)
    min_tissue: float = Field(0.25, ge=0, le=1)
    # extraction
    encoder: str = "handcrafted"
    weights: Optional[str] = None
    download: bool = False
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    device: str = "auto"
    float16: bool = False
    quiet: bool = False

    def options(self):
        from pathlib import Path as _Path

        from slidemil.slides.patching import PatchParams
        from slidemil.slides.pipeline import PipelineOptions
        from slidemil.slides.tissue import TissueParams

        tissue = TissueParams(seg_mpp=self.seg_mpp, threshold=self.threshold, min_saturation=self.min_saturation,
                              median=self.median, close=self.close, min_area_um2=self.min_area_um2,
                              max_hole_um2=self.max_hole_um2, filter_pen=self.filter_pen)
        patches = PatchParams(target_mpp=self.target_mpp, magnification=self.magnification,
                              patch_size=self.patch_size, overlap=self.overlap, min_tissue=self.min_tissue)
        return PipelineOptions(out=_Path(self.out), tissue=tissue, patches=patches, encoder=self.encoder,
                               weights=self.weights, download=self.download, batch_size=self.batch_size,
                               num_workers=self.num_workers, device=self.device, float16=self.float16,
                               backend=self.backend, mpp=self.mpp, mpp_csv=self.mpp_csv,
                               tissue_geojson=self.tissue_geojson, coords_dir=self.coords_dir)
