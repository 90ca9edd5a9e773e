"""Engine: pure functions on numpy arrays. No paths, no stores, no configuration objects."""
