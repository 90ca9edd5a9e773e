"""A 2D image through today's chunked phases, as a one-plane volume: the labels are the engine's
2D masks for any chunking. The multiplex run builds on this (docs/architecture.md, "Multiplex
slides"): each compartment a one-plane run of the same phases."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zseg.engine import multiplex as MX
from zseg.engine.dynamics import compute_masks
from zseg.engine.synth import flows_from_labels, synth_multiplex
from zseg.params import build_params
from zseg.phases.plan import plan
from zseg.run.entry import run_local
from zseg.run.pool import run_all
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


@pytest.fixture(scope="module")
def slide_compartment(tmp_path_factory):
    """Noisy 2D flows (so that Cellpose's flow check removes cells) and a patch table with
    uninformative patches (so that cells are skipped), as a slide run's compartment sees them."""
    root = tmp_path_factory.mktemp("compartment")
    s = synth_multiplex(SHAPE, diameter=18, markers=0, seed=4)
    rng = np.random.default_rng(0)
    f = flows_from_labels(s["cells"]).astype(np.float32)
    f[:2] += rng.normal(0, 2, f[:2].shape).astype(np.float32)
    image = create_array(str(root / "image.zarr"), shape=(1, *SHAPE), chunks=(1, *SHAPE), dtype="uint16")
    image[...] = s["image"][1][None]
    flows = create_array(str(root / "flows.zarr"), shape=(3, *SHAPE), chunks=(3, 64, 64), dtype="float32")
    flows[...] = f  # a slide's own (3, Y, X) flows, read in place
    grid = MX.patch_grid(SHAPE, 32)
    informative = rng.random(len(grid)) > 0.3
    pq.write_table(pa.table({"y_start": grid[:, 0], "x_start": grid[:, 2], "is_informative": informative}),
                   str(root / "patches.parquet"))
    want = compute_masks(f[:2], f[2], niter=120, min_size=15, flow_threshold=0.4,
                         seed_allowed=MX.seed_allowed(SHAPE, 32, informative))
    return {"root": root, "want": want}


@pytest.mark.parametrize("chunk", [(1, *SHAPE), (1, 64, 64), (1, 37, 150)])
def test_a_slide_compartment_gives_cellposes_2d_masks_with_flow_check_and_skipping(slide_compartment, tmp_path, chunk):
    """Flow check (decided once per cell, from boxes of a stats pass), seeds skipped in
    uninformative patches (removed after hole filling) and 2D hole filling: the engine's 2D
    compute_masks bit for bit, for any chunking."""
    root = slide_compartment["root"]
    out = str(tmp_path / "out")
    params = build_params(input=str(root / "image.zarr"), output=out, flows=str(root / "flows.zarr"), diameter=18,
                          niter=120, chunk_shape=chunk, halo=(0, 72, 72))
    run = plan(params, plane={"flow_threshold": 0.4, "patches": str(root / "patches.parquet"), "patch_size": 32})
    run_all(run)
    result = json.loads((tmp_path / "out" / "run.json").read_text())["result"]
    assert result["chunk_exact"] and result["flow_check"]["undecided"] == 0
    labels = np.asarray(open_array(os.path.join(out, "labels.zarr", "0"))[...])[0]
    want = slide_compartment["want"]
    assert result["flow_check"]["removed"] > 0 and result["skipped_cells"] > 0 and want.max() > 20
    np.testing.assert_array_equal(labels, want)
