"""zseg's tests: a package, so that test modules import their helpers (``tests.predict_support``, ``tests.nextflow_text``) by name."""
