"""Where data comes from and goes to: URIs (local, s3://), zarr arrays, input volumes (OME-Zarr,
zarr, TIFF), OME-Zarr metadata, network weights files, and the chunk grid with its halos."""
