"""The examples in the Python API's docstrings run as written."""

from __future__ import annotations

import doctest

import pytest

import slidemil.features.encoders.registry as encoders
import slidemil.models.registry as models


@pytest.mark.parametrize("module", [models, encoders])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
