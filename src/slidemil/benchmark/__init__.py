"""`slidemil benchmark`: grids of encoders x models (x strategies) x tasks x seeds on shared splits,
resumable cell by cell, with a leaderboard and paired comparisons."""
