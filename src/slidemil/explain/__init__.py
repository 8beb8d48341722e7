"""Explanations: instance scores painted back onto slides, top tiles, QuPath GeoJSON."""
