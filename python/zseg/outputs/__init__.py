"""The products of a run: ``labels.zarr`` (labels), ``cells.parquet`` (table), ``qc/report.html``
(report) and ``zseg verify`` (verify)."""
