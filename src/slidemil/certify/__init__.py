"""Algorithmic unit tests for the standard MIL assumption (Raff & Holt, NeurIPS 2023)."""
