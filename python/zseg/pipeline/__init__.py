"""Phases and orchestration: parameters, the run manifest, one module per phase, the runner, the CLI."""
