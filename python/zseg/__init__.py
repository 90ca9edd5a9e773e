"""zseg: Cellpose segmentation of microscopy volumes of any size, identical whatever the chunking.

Layers (the folder says what a module may touch):

- ``zseg.engine``   pure functions on arrays (no paths, no zarr, no config);
- ``zseg.storage``  opening inputs, writing zarr arrays, the chunk grid;
- ``zseg.pipeline`` phases, parameters, the run manifest, the CLI and the local runner.
"""

__version__ = "0.1.0"
