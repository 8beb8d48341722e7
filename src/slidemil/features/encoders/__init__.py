"""Patch encoders: `create_encoder(name, weights=None)` and `available_encoders()`."""

from slidemil.features.encoders import foundation, handcrafted  # noqa: F401  (registers the encoders)
from slidemil.features.encoders.registry import EncoderSpec, available_encoders, create_encoder, get_spec

__all__ = ["EncoderSpec", "available_encoders", "create_encoder", "get_spec"]
