"""The one registry class behind models, re-embeddings, strategies, encoders and certification tests."""

from __future__ import annotations

import pytest
from torch import nn

from slidemil.certify.generators import TESTS
from slidemil.errors import InputError
from slidemil.features.encoders.registry import ENCODERS
from slidemil.models.reembed import REEMBEDDINGS
from slidemil.models.registry import MODELS
from slidemil.train.strategies import STRATEGIES
from slidemil.utils.registry import Registry, RegistryError


def _toy():
    reg = Registry("widget", skip=("in_dim",))

    @reg.register("linear", paper="P", summary="S")
    class Linear(nn.Module):
        def __init__(self, in_dim: int, width: int = 4, bias: bool = True):
            super().__init__()
            self.layer = nn.Linear(in_dim, width, bias=bias)

    return reg, Linear


def test_register_create_and_argument_listing():
    reg, cls = _toy()
    assert reg.available() == ["linear"] and "linear" in reg
    assert reg.info("linear").paper == "P" and reg.info("linear").cls is cls
    assert reg.info("linear").arguments() == {"width": 4, "bias": True}   # in_dim is slidemil's to fill
    model = reg.create("linear", 3, width=2)
    assert model.layer.out_features == 2


def test_unknown_names_and_arguments_say_what_is_valid():
    reg, _ = _toy()
    with pytest.raises(RegistryError, match=r"unknown widget 'linaer' \(did you mean 'linear'\?\); choose one of linear"):
        reg.info("linaer")
    with pytest.raises(RegistryError, match=r"takes no argument\(s\) widht \(did you mean 'width'\?\); its arguments "
                                            r"are: width=4, bias=True"):
        reg.create("linear", 3, widht=2)
    # slidemil's own arguments are not the user's to set
    with pytest.raises(RegistryError, match="in_dim"):
        reg.check_args("linear", {"in_dim": 5})
    # an input error: the CLI prints it as one line, callers may also catch ValueError
    assert issubclass(RegistryError, InputError) and issubclass(RegistryError, ValueError)


def test_registering_a_name_twice_or_a_wrong_base_is_refused():
    reg, cls = _toy()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("linear", cls)
    with pytest.raises(TypeError, match="must subclass MILModel"):
        MODELS.register("not_a_mil_model", nn.Linear)


def test_every_extensible_thing_uses_the_registry():
    for reg, name in ((MODELS, "abmil"), (REEMBEDDINGS, "rrt"), (STRATEGIES, "mhim"), (ENCODERS, "handcrafted"),
                      (TESTS, "single_concept")):
        assert isinstance(reg, Registry) and name in reg.available()
    # strategies check their arguments like models do (they used to fail later with a TypeError)
    with pytest.raises(RegistryError, match="mask_ratio_h"):
        STRATEGIES.check_args("mhim", {"mask_ratio_hh": 0.1})
    # open-ended families resolve on demand
    assert "timm:resnet18" in ENCODERS and ENCODERS.info("timm:resnet18").obj.dim == 512
    # certification tests keep the paper's order
    assert TESTS.available() == ["single_concept", "threshold_poison", "false_frequency"]
