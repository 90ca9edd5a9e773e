"""A 2D image through today's chunked phases, as a one-plane volume: the labels are the engine's
2D masks for any chunking. The multiplex run builds on this (docs/architecture.md, "Multiplex
slides"): each compartment a one-plane run of the same phases."""

from __future__ import annotations

import os

import numpy as np
import pytest

from zseg.engine.dynamics import compute_masks
from zseg.engine.synth import flows_from_labels, synth_multiplex
from zseg.params import build_params
from zseg.run.entry import run_local
from zseg.storage.arrays import create_array, open_array

SHAPE = (150, 180)


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    root = tmp_path_factory.mktemp("plane")
    s = synth_multiplex(SHAPE, diameter=18, markers=0, seed=4)
    f = flows_from_labels(s["cells"])  # (3, Y, X) = dY, dX, cellprob
    image = create_array(str(root / "image.zarr"), shape=(1, *SHAPE), chunks=(1, *SHAPE), dtype="uint16")
    image[...] = s["image"][1][None]
    flows = create_array(str(root / "flows.zarr"), shape=(4, 1, *SHAPE), chunks=(4, 1, *SHAPE), dtype="float16")
    flows[0] = 0  # no dZ on one plane
    flows[1:, 0] = f.astype(np.float16)
    return {"root": root, "image": str(root / "image.zarr"), "flows": str(root / "flows.zarr"),
            "dP": f[:2].astype(np.float16).astype(np.float32), "cellprob": f[2].astype(np.float16).astype(np.float32)}


@pytest.mark.parametrize("chunk", [(1, *SHAPE), (1, 64, 64), (1, 37, 150)])
def test_a_plane_through_the_chunked_phases_gives_the_engines_2d_masks(plane, tmp_path, chunk):
    out = str(tmp_path / "out")
    report = run_local(build_params(input=plane["image"], output=out, flows=plane["flows"], diameter=18,
                                    niter=120, chunk_shape=chunk))
    assert report["chunk_exact"]
    labels = np.asarray(open_array(os.path.join(out, "labels.zarr", "0"))[...])[0]
    want = compute_masks(plane["dP"], plane["cellprob"], niter=120, min_size=15)
    assert want.max() > 50
    np.testing.assert_array_equal(labels, want)
