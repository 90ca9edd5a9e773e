"""Stores and geometry: URIs, input volumes, zarr arrays, the chunk grid. No phase logic."""
