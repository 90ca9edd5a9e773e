"""One module per phase (plan, percentiles, predict, seeds, number, masks, finalize, and synth for
test data): each stage function reads its inputs, calls the engine and writes its outputs."""
