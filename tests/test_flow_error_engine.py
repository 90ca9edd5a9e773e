"""zseg.engine.flow_error against Cellpose's own flow_error, and per cell on crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cellpose import dynamics
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zseg.engine import flow_error as F
from zseg.engine.synth import flows_from_labels, synth_multiplex
from zseg.engine.blocks import label_boxes
from zseg.storage.grid import ChunkGrid


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**6), st.sampled_from([8.0, 14.0, 22.0]))
def test_mask_flows_and_errors_are_cellposes(seed, diameter):
    """Equal to float rounding on cells of irregular shapes.

    Not bit for bit in general: torch sums the nine neighbours in an order that depends on how
    many mask pixels the image has (and on the threads), so Cellpose's own bits for a cell change
    with the image around it; ours are summed in Cellpose's neighbour order, the same for a cell
    in any crop. Where a gradient is exactly zero by symmetry (rectangles), Cellpose's rounding
    noise is normalised to a unit vector and ours stays 0: such cells are not compared here.
    """
    cells = synth_multiplex((96, 128), diameter=diameter, markers=0, seed=seed)["cells"].astype(np.int64)
    flows = np.random.default_rng(seed).normal(0, 3, (2, *cells.shape)).astype(np.float32)
    cp_mu, _ = dynamics.masks_to_flows_gpu(cells, device=torch.device("cpu"))
    _, ext = F.mask_extents(cells)
    niter, f32 = F.diffusion_settings(cells.shape, int(ext.max()))
    assert not f32
    np.testing.assert_allclose(F.mask_flows(cells, niter=niter), cp_mu, rtol=1e-12, atol=1e-14)
    cp_err, _ = dynamics.flow_error(cells, flows, device=torch.device("cpu"))
    labels, err = F.flow_errors(cells, flows, niter=niter)
    assert labels.tolist() == list(range(1, int(cells.max()) + 1))
    np.testing.assert_allclose(err, cp_err, rtol=1e-12, atol=1e-14)


def test_any_label_ids_give_the_same_errors():
    masks = np.zeros((12, 12), np.int64)
    masks[1:6, 1:9], masks[6:11, 2:12], masks[0:4, 9:12] = 1, 2, 3
    flows = np.random.default_rng(0).normal(0, 2, (2, 12, 12)).astype(np.float32)
    _, e1 = F.flow_errors(masks, flows, niter=30)
    ids = np.array([0, 70000, 5, 2**33], np.uint64)
    labels, e2 = F.flow_errors(ids[masks], flows, niter=30)
    assert labels.tolist() == [5, 70000, 2**33]
    np.testing.assert_array_equal(e2, e1[[1, 0, 2]])  # 5 was 2, 70000 was 1, 2**33 was 3
    labels, e3 = F.flow_errors(ids[masks], flows, niter=30, labels=[5, 9])
    assert labels.tolist() == [5] and e3.tolist() == [e1[1]]


def _slide_errors(shape, diameter, seed):
    """Synthetic cells, random network flows, the image's diffusion settings and every cell's error."""
    cells = synth_multiplex(shape, diameter=diameter, markers=0, seed=seed % 50)["cells"]
    flows = np.random.default_rng(seed).normal(0, 3, (2, *cells.shape)).astype(np.float32)
    _, ext = F.mask_extents(cells)
    niter, f32 = F.diffusion_settings(cells.shape, int(ext.max()))
    labels, whole = F.flow_errors(cells, flows, niter=niter, float32=f32)
    return cells, flows, ext, niter, f32, labels, whole


def _check_crop(seed, y0, x0, size) -> int:
    """Errors from a crop equal the whole image's for every cell that, with its 4-neighbours, lies
    in the crop away from its faces inside the image; returns how many cells that was."""
    cells, flows, _, niter, f32, labels, whole = _slide_errors((128, 160), 14, seed)
    sl = (slice(y0, y0 + 2 * size), slice(x0, x0 + 2 * size))
    crop = cells[sl]
    # cells on a crop face inside the image may go on beyond it (the image's edge closes a face)
    faces = [crop[0] if y0 > 0 else [], crop[-1] if sl[0].stop < cells.shape[0] else [],
             crop[:, 0] if x0 > 0 else [], crop[:, -1] if sl[1].stop < cells.shape[1] else []]
    open_ = set(np.unique(np.concatenate([np.asarray(f, np.uint32) for f in faces])).tolist()) - {0}
    # and so may their neighbours' values at their edge: keep cells whose 4-neighbours are closed
    ok = []
    for lab in np.unique(crop[crop > 0]).tolist():
        m = crop == lab
        grown = m.copy()
        grown[1:] |= m[:-1]
        grown[:-1] |= m[1:]
        grown[:, 1:] |= m[:, :-1]
        grown[:, :-1] |= m[:, 1:]
        if not (set(np.unique(crop[grown]).tolist()) & open_):
            ok.append(lab)
    got_l, got = F.flow_errors(crop, flows[(slice(None), *sl)], niter=niter, float32=f32, labels=ok)
    assert got_l.tolist() == sorted(ok)
    np.testing.assert_array_equal(got, whole[np.searchsorted(labels, got_l)])
    return len(ok)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**6), st.integers(0, 60), st.integers(0, 80), st.integers(4, 40))
def test_a_crop_gives_the_error_of_every_cell_it_holds_with_its_neighbours(seed, y0, x0, size):
    """A cell's error depends only on it and the cells touching it, given the image's niter."""
    _check_crop(seed, y0, x0, size)


def test_a_large_crop_decides_many_cells():
    """The property above is not vacuous: a crop of most of the image holds many such cells."""
    assert _check_crop(3, 4, 6, 58) > 10


def test_perfect_flows_have_no_error_and_wrong_flows_a_large_one():
    s = synth_multiplex((64, 64), diameter=16, markers=0, seed=2)
    cells = s["cells"]
    flows = flows_from_labels(cells)[:2]
    _, ext = F.mask_extents(cells)
    niter, _ = F.diffusion_settings(cells.shape, int(ext.max()))
    _, err = F.flow_errors(cells, flows, niter=niter)
    assert err.max() < 1e-6
    _, err = F.flow_errors(cells, -flows, niter=niter)  # every flow points the wrong way
    assert err.min() > 3.9


@pytest.mark.slow
def test_float32_diffusion_above_cellposes_size_limit():
    """Cellpose diffuses in float32 when the padded image passes 4e7 pixels: so do we."""
    shape = (6400, 6400)
    niter, f32 = F.diffusion_settings(shape, 40)
    assert f32 and niter == 80
    assert not F.diffusion_settings((6322, 6322), 40)[1]
    masks = np.zeros(shape, np.int64)
    masks[3:15, 4:20], masks[15:25, 6:18] = 1, 2
    cp_mu, _ = dynamics.masks_to_flows_gpu(masks, device=torch.device("cpu"), niter=niter)
    ours = F.mask_flows(masks[:40, :40], niter=niter, float32=True)
    np.testing.assert_allclose(ours, cp_mu[:, :40, :40], rtol=1e-5, atol=1e-6)
    f64 = F.mask_flows(masks[:40, :40], niter=niter)
    assert np.abs(ours - cp_mu[:, :40, :40]).max() < np.abs(f64 - cp_mu[:, :40, :40]).max()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="2D integer"):
        F.mask_flows(np.zeros((3, 3, 3), int), niter=3)
    with pytest.raises(ValueError, match="must be"):
        F.flow_errors(np.zeros((3, 3), int), np.zeros((3, 3, 3)), niter=3)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**6), st.integers(9, 70), st.integers(9, 70), st.integers(1, 40))
def test_chunks_decide_every_cells_error_once_or_say_they_cannot(seed, cy, cx, halo):
    cells, flows, ext, niter, f32, labels, whole = _slide_errors((96, 112), 12, seed)

    def run(halo):
        got_l, got_e, undecided = [], [], 0
        grid = ChunkGrid(cells.shape, (cy, cx), (halo, halo))
        boxes = label_boxes(cells)  # a run has them from its per-cell statistics
        for i in range(grid.nchunks):
            block = grid.block(i)
            r = F.block_flow_errors(cells[block], flows[(slice(None), *block)], origin=[b.start for b in block],
                                    core=grid.core_in_block(i), slide_shape=cells.shape, niter=niter, float32=f32,
                                    boxes=boxes)
            got_l += r["labels"].tolist()
            got_e += r["errors"].tolist()
            undecided += r["undecided"]
        return got_l, got_e, undecided

    got_l, got_e, undecided = run(halo)
    assert len(set(got_l)) == len(got_l)  # each cell decided by one chunk at most
    assert len(got_l) + undecided == len(labels)  # every cell decided once, or reported
    order = np.argsort(got_l)
    rows = np.searchsorted(labels, np.asarray(got_l, np.uint64)[order])
    np.testing.assert_array_equal(np.asarray(got_e)[order], whole[rows])  # what is decided is exact
    # the image's niter comes from the boxes alone
    assert int(label_boxes(cells).extents().max()) + 2 == int(ext.max())
    # a halo as large as the image decides every cell
    got_l, got_e, undecided = run(max(cells.shape))
    assert undecided == 0 and sorted(got_l) == labels.tolist()


@st.composite
def blocky_masks(draw):
    """Overlapping random rectangles: labels in pieces, touching in every way."""
    h, w = draw(st.integers(4, 30)), draw(st.integers(4, 30))
    masks = np.zeros((h, w), np.uint32)
    for lab in draw(st.lists(st.integers(1, 10**6), min_size=1, max_size=9, unique=True)):
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        masks[y0:y0 + draw(st.integers(1, 12)), x0:x0 + draw(st.integers(1, 12))] = lab
    return masks


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocky_masks(), st.integers(1, 12), st.integers(1, 12), st.integers(0, 10), st.integers(0, 2**16))
def test_chunked_errors_of_labels_in_pieces_are_exact_or_reported(masks, cy, cx, halo, seed):
    flows = np.random.default_rng(seed).normal(0, 3, (2, *masks.shape)).astype(np.float32)
    labels, whole = F.flow_errors(masks, flows, niter=20)
    grid = ChunkGrid(masks.shape, (cy, cx), (halo, halo))
    boxes = label_boxes(masks)
    got, undecided = {}, 0
    for i in range(grid.nchunks):
        block = grid.block(i)
        r = F.block_flow_errors(masks[block], flows[(slice(None), *block)], origin=[b.start for b in block],
                                core=grid.core_in_block(i), slide_shape=masks.shape, niter=20, float32=False,
                                boxes=boxes)
        for lab, e in zip(r["labels"].tolist(), r["errors"].tolist()):
            assert lab not in got
            got[lab] = e
        undecided += r["undecided"]
    assert len(got) + undecided == len(labels)
    for lab, e in got.items():
        assert e == whole[np.searchsorted(labels, lab)]
