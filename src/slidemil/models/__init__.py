"""MIL aggregators. `create(name, in_dim, n_outputs, **kw)` builds one; `available()` lists them."""

from slidemil.models import (  # noqa: F401  (each module registers its models)
    abmil,
    abmilx,
    acmil,
    clam,
    dsmil,
    dtfd,
    evidence,
    ins,
    mambamil,
    otsurv,
    pooling,
    rrt,
    transmil,
)
from slidemil.models.base import MILModel, MILOutput
from slidemil.models.registry import available, create, info

__all__ = ["MILModel", "MILOutput", "available", "create", "info"]
