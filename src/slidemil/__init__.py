"""slidemil: weakly supervised learning on whole-slide images."""

__version__ = "0.1.0"
