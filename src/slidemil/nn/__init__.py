"""Building blocks shared by the MIL models: masked reductions, attention pooling, Nyström attention."""
