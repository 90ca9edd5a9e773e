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


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """A ring cell holding a small cell (with background around it) and four cells outside, on
    one plane with exact flows; Cellpose's own 2D masks of those flows, with and without its flow
    check."""
    import torch
    from cellpose import dynamics as CD

    root = tmp_path_factory.mktemp("ring")
    yy, xx = np.mgrid[:64, :80]
    truth = np.zeros((64, 80), np.uint32)
    r = np.hypot(yy - 32, xx - 40)
    truth[(r <= 14) & (r > 8)] = 1
    truth[r <= 4] = 2  # inside the ring's hole
    for i, (cy, cx) in enumerate([(8, 8), (55, 10), (10, 70), (54, 70)]):
        truth[np.hypot(yy - cy, xx - cx) <= 5] = 3 + i
    f = flows_from_labels(truth).astype(np.float32)
    image = create_array(str(root / "image.zarr"), shape=(1, 64, 80), chunks=(1, 64, 80), dtype="uint16")
    image[...] = (truth > 0)[None].astype(np.uint16) * 1000
    flows = create_array(str(root / "flows.zarr"), shape=(3, 64, 80), chunks=(3, 64, 80), dtype="float32")
    flows[...] = f
    volume_flows = create_array(str(root / "flows4.zarr"), shape=(4, 1, 64, 80), chunks=(4, 1, 64, 80),
                                dtype="float32")
    volume_flows[0] = 0  # no dZ on one plane
    volume_flows[1:, 0] = f
    want = {t: CD.resize_and_compute_masks(f[:2], f[2], niter=200, do_3D=False, min_size=15, flow_threshold=t,
                                           device=torch.device("cpu")) for t in (0.0, 0.4)}
    for w in want.values():  # the small cell went into the ring, which is one cell with its hole filled
        assert w.max() == 5 and w[32, 40] == w[32, 28] != 0
    return {"root": root, "want": want, "inner": int((truth == 2).sum())}


@pytest.mark.parametrize("chunk", [(1, 64, 80), (1, 24, 24), (1, 37, 50)])
def test_a_2d_cell_enclosed_by_another_is_filled_over_as_cellpose_does_whatever_the_chunking(ring, tmp_path, chunk):
    """Cellpose's 2D fill takes the cells a hole holds: decided once by the enclosing cell's owner
    (finalize:holes, in 2D), for a one-plane image and for a slide compartment with the flow check;
    Cellpose's own labels (resize_and_compute_masks) for every chunking, IDs 1..N."""
    root = ring["root"]
    for name, flows, plane, threshold in (("image", "flows4.zarr", None, 0.0),
                                          ("slide", "flows.zarr", {"flow_threshold": 0.4}, 0.4)):
        out = str(tmp_path / name)
        params = build_params(input=str(root / "image.zarr"), output=out, flows=str(root / flows), diameter=18,
                              niter=200, chunk_shape=chunk)
        run_all(plan(params, plane=plane))
        result = json.loads((tmp_path / name / "run.json").read_text())["result"]
        assert result["chunk_exact"], result
        assert result["filled_over"] == {"cells": 1, "voxels": ring["inner"]}, name
        labels = np.asarray(open_array(os.path.join(out, "labels.zarr", "0"))[...])[0]
        np.testing.assert_array_equal(labels, ring["want"][threshold], err_msg=name)
