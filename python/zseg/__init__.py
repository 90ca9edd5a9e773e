"""zseg: Cellpose segmentation of microscopy volumes of any size, identical whatever the chunking.

Layers, from the bottom up (docs/architecture.md); a module imports only from its own layer
and the layers below it, and the import-linter contract in pyproject.toml holds it so:

- ``zseg.engine``     pure functions on arrays (no paths, no zarr, no config); raises ValueError;
- ``zseg.storage``    where data comes from and goes to: URIs, zarr arrays, input volumes,
                      OME-Zarr, network weights, and the chunk grid;
- ``zseg.params``     the run's parameters (one pydantic model);
- ``zseg.workspace``  the run folder: the run context (``run.json``), the stage list, where
                      intermediates live, markers, progress and usage;
- ``zseg.outputs``    the products: ``labels.zarr``, ``cells.parquet``, ``qc/``, ``zseg verify``;
- ``zseg.phases``     one module per phase: read, call the engine, write;
- ``zseg.run``        orchestration: which function runs each stage, the process pool,
                      ``zseg run`` and the one-stage entry point every Nextflow task calls;
- ``zseg.cli``, ``zseg.schema``  the command line and the generated Nextflow schema.
"""

__version__ = "0.1.0"
