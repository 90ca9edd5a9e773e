"""Pure functions on numpy and torch arrays: normalisation, the network pass, dynamics,
percentiles, statistics, pyramids. No paths, no zarr, no parameters object; bad arguments
raise ValueError in the engine's own terms (the phases turn them into user errors)."""
