"""Feature-space augmentation (HistAug)."""
