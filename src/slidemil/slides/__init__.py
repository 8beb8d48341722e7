"""Whole-slide images: readers, tissue segmentation, patching, synthetic slides."""
