"""MIL aggregators. `create(name, in_dim, n_outputs, **kw)` builds one; `available()` lists them."""

from slidemil.models import abmil, abmilx, acmil, clam, dsmil, dtfd, evidence, mambamil, pooling, rrt, transmil  # noqa: F401
from slidemil.models.base import MILModel, MILOutput
from slidemil.models.registry import available, create, info

__all__ = ["MILModel", "MILOutput", "available", "create", "info"]
