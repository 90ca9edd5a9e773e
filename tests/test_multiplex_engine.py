"""Tests of the multiplex track's engine: channel names, the membrane composite, the patch table,
the per-compartment cell table and the synthetic multiplex slide."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from zseg.engine import dynamics as D
from zseg.engine import matching as M
from zseg.engine import multiplex as X
from zseg.engine.stats import block_stats, merge_stats
from zseg.engine.synth import MARKER_MAX, synth_multiplex


# --- channel names ------------------------------------------------------------------------------

def test_repeated_channel_names_get_a_suffix():
    assert X.unique_channel_names(["DAPI", "CD3", "DAPI", "Blank", "Blank", "DAPI"]) == [
        "DAPI", "CD3", "DAPI_2", "Blank", "Blank_2", "DAPI_3"]
    # a suffix never takes the name of a real channel
    assert X.unique_channel_names(["DAPI", "DAPI", "DAPI_2"]) == ["DAPI", "DAPI_3", "DAPI_2"]


@given(st.lists(st.sampled_from(["DAPI", "DAPI_2", "Blank", "CD45", "Blank_3", "x"]), max_size=12))
def test_unique_channel_names_are_unique_and_keep_first_occurrences(names):
    out = X.unique_channel_names(names)
    assert len(out) == len(names) and len(set(out)) == len(out)
    for i, n in enumerate(names):
        if n not in names[:i]:
            assert out[i] == n  # the first channel of a name keeps it ...
        else:
            assert out[i].startswith(n + "_")  # ... a repeat gets a suffix


# --- membrane composite -------------------------------------------------------------------------

@given(hnp.arrays(np.uint16, hnp.array_shapes(min_dims=3, max_dims=3, max_side=6)))
def test_combine_channels_is_pixelwise_max_mean_sum(stack):
    np.testing.assert_array_equal(X.combine_channels(stack, "max"), stack.max(axis=0))
    np.testing.assert_allclose(X.combine_channels(stack, "mean"), stack.astype(float).mean(axis=0))
    s = X.combine_channels(stack, "sum")
    assert s.dtype == np.int64  # uint16 channels summed do not overflow
    np.testing.assert_array_equal(s, stack.astype(np.int64).sum(axis=0))


def test_combine_channels_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="unknown combination 'median'"):
        X.combine_channels(np.zeros((2, 3, 3)), "median")
    with pytest.raises(ValueError, match=r"\(C, Y, X\)"):
        X.combine_channels(np.zeros((3, 3)), "max")


# --- informative patches ------------------------------------------------------------------------

@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 16))
def test_the_patch_grid_covers_the_slide_once(h, w, p):
    grid = X.patch_grid((h, w), p)
    seen = np.zeros((h, w), int)
    for y0, y1, x0, x1 in grid:
        assert 0 < y1 - y0 <= p and 0 < x1 - x0 <= p
        seen[y0:y1, x0:x1] += 1
    assert (seen == 1).all()


@st.composite
def slide_and_cut(draw):
    p = draw(st.integers(1, 6))
    h, w = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    nuclear = draw(hnp.arrays(np.uint16, (h, w), elements=st.integers(0, 5)))
    membrane = draw(hnp.arrays(np.float32, (h, w), elements=st.floats(0, 100, width=32)))
    # blocks of whole patches: a random multiple of the patch size per axis
    by, bx = p * draw(st.integers(1, 4)), p * draw(st.integers(1, 4))
    return p, nuclear, membrane, (by, bx)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slide_and_cut())
def test_patch_table_is_direct_numpy_and_does_not_depend_on_the_blocks(case):
    p, nuclear, membrane, (by, bx) = case
    shape = nuclear.shape
    whole = X.patch_stats({"nuclear": nuclear, "membrane": membrane}, origin=(0, 0), slide_shape=shape,
                          patch_size=p)
    parts = []
    for y in range(0, shape[0], by):
        for x in range(0, shape[1], bx):
            sl = (slice(y, y + by), slice(x, x + bx))
            parts.append(X.patch_stats({"nuclear": nuclear[sl], "membrane": membrane[sl]}, origin=(y, x),
                                       slide_shape=shape, patch_size=p))
    cat = {k: np.concatenate([q[k] for q in parts]) for k in whole}
    order = np.lexsort((cat["x_start"], cat["y_start"]))
    for k in whole:
        np.testing.assert_array_equal(cat[k][order], whole[k], err_msg=k)  # bit-identical
    for i, (y0, y1, x0, x1) in enumerate(X.patch_grid(shape, p)):
        v = nuclear[y0:y1, x0:x1].astype(np.float64)
        assert whole["nuclear_mean"][i] == v.mean() and whole["nuclear_std"][i] == v.std()
        assert whole["nuclear_non_zero_fraction"][i] == np.count_nonzero(v) / v.size
        assert whole["membrane_mean"][i] == membrane[y0:y1, x0:x1].astype(np.float64).mean()


def test_a_block_that_cuts_a_patch_is_refused():
    img = np.zeros((10, 10), np.uint8)
    with pytest.raises(ValueError, match="whole patches of 4"):
        X.patch_stats({"nuclear": img[:6]}, origin=(0, 0), slide_shape=(10, 10), patch_size=4)
    with pytest.raises(ValueError, match="whole patches of 4"):
        X.patch_stats({"nuclear": img[2:]}, origin=(2, 0), slide_shape=(10, 10), patch_size=4)
    with pytest.raises(ValueError, match="need the nuclear image"):
        X.patch_stats({"membrane": img}, origin=(0, 0), slide_shape=(10, 10), patch_size=4)
    # the last block may stop at the slide's edge
    got = X.patch_stats({"nuclear": img[8:]}, origin=(8, 0), slide_shape=(10, 10), patch_size=4)
    assert got["y_start"].tolist() == [8, 8, 8] and got["y_stop"].tolist() == [10, 10, 10]


def test_patch_flags_are_the_reference_pipelines_rules():
    stats = {"nuclear_non_zero_fraction": np.array([0.0, 0.04, 0.05, 0.5, 0.5]),
             "nuclear_mean": np.array([0.0, 9.0, 9.0, 0.99, 1.0])}
    f = X.patch_flags(stats)
    assert f["is_empty"].tolist() == [True, True, False, False, False]
    assert f["is_noisy"].tolist() == [True, False, False, True, False]
    assert f["is_informative"].tolist() == [False, False, True, False, True]
    f = X.patch_flags(stats, non_zero_threshold=0.0, mean_threshold=0.0)
    assert f["is_informative"].all()


# --- the synthetic slide and the per-compartment table -------------------------------------------

@pytest.fixture(scope="module")
def slide():
    return synth_multiplex((160, 192), diameter=20, markers=3, seed=4)


def test_the_synthetic_slide_pairs_every_cell_with_its_own_nucleus(slide):
    cells, nuclei = slide["cells"], slide["nuclei"]
    n = int(cells.max())
    assert n > 40 and set(np.unique(cells)) == set(range(n + 1))
    assert set(np.unique(nuclei)) == set(range(n + 1))  # one nucleus per cell, same ID
    assert np.all(nuclei[nuclei > 0] == cells[nuclei > 0])
    interior = (cells != 0) & ~M.inner_boundary(cells)
    assert np.all(interior[nuclei > 0])  # nuclei lie in their cell's interior
    mc, mn = M.match_masks(cells, nuclei)
    assert mc.tolist() == mn.tolist() == list(range(1, n + 1))
    assert slide["image"].shape == (5, 160, 192) and slide["image"].dtype == np.uint16
    assert slide["channel_names"] == ["DAPI", "Membrane", "M1", "M2", "M3"]
    # DAPI is bright on nuclei, Membrane on cell boundaries
    dapi, mem = slide["image"][0].astype(float), slide["image"][1].astype(float)
    assert dapi[nuclei > 0].mean() > 5 * dapi[cells == 0].mean()
    edge = M.inner_boundary(cells)
    assert mem[edge].mean() > 2 * mem[interior & (nuclei == 0)].mean()
    again = synth_multiplex((160, 192), diameter=20, markers=3, seed=4)
    np.testing.assert_array_equal(again["image"], slide["image"])


def _layers(cells, nuclei):
    mc, mn = M.match_masks(cells, nuclei)
    interior = (cells != 0) & ~M.inner_boundary(cells)
    return M.apply_matching(cells, nuclei, interior, mc, mn, np.arange(1, len(mc) + 1))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.integers(7, 200), st.integers(7, 200))
def test_the_table_is_exact_for_any_cut_and_recovers_the_known_means(slide, cy, cx):
    image = slide["image"]
    layers = _layers(slide["cells"], slide["nuclei"])
    h, w = layers[0].shape
    parts = {c: [] for c in X.COMPARTMENTS}
    for y in range(0, h, cy):
        for x in range(0, w, cx):
            sl = (slice(y, y + cy), slice(x, x + cx))
            for comp, layer in zip(X.COMPARTMENTS, layers):
                parts[comp].append(block_stats(layer[sl], image[(slice(None), *sl)], offset=(y, x)))
    merged = {c: merge_stats(p) for c, p in parts.items()}
    table = X.compartment_table(merged, slide["channel_names"], (0.5, 0.5))
    n = int(slide["cells"].max())
    assert table["label"].tolist() == list(range(1, n + 1))
    lv = slide["levels"]
    for m in range(lv.shape[0]):
        assert np.array_equal(table[f"M{m + 1}_nucleus_mean"], lv[m, 1:, 0].astype(float))
        assert np.array_equal(table[f"M{m + 1}_cytoplasm_mean"], lv[m, 1:, 1].astype(float))
    # every column equals direct numpy on the whole slide
    for comp, layer in zip(X.COMPARTMENTS, layers):
        area = np.bincount(layer.ravel(), minlength=n + 1)[1:]
        assert np.array_equal(table[f"area_{comp}"], area)
        for c, name in enumerate(slide["channel_names"]):
            s = np.bincount(layer.ravel(), weights=image[c].ravel().astype(float), minlength=n + 1)[1:]
            assert np.array_equal(table[f"{name}_{comp}_mean"], s / area)
    yy, xx = np.nonzero(layers[0])
    cy_ = np.bincount(layers[0][yy, xx], weights=yy, minlength=n + 1)[1:] / table["area_cell"]
    np.testing.assert_allclose(table["centroid_y"], cy_, rtol=1e-12)
    np.testing.assert_allclose(table["centroid_y_um"], 0.5 * cy_, rtol=1e-12)
    assert (lv < MARKER_MAX).all()


def test_a_cell_without_a_nucleus_has_empty_nucleus_columns():
    cells = np.zeros((8, 8), np.uint32)
    cells[:, :4], cells[:, 4:] = 3, 9
    nucleus = np.zeros_like(cells)
    nucleus[2:5, 1:3] = 3
    cyto = np.where(nucleus > 0, 0, cells)
    image = np.arange(64, dtype=np.uint16).reshape(1, 8, 8)
    parts = {"cell": block_stats(cells, image), "nucleus": block_stats(nucleus, image),
             "cytoplasm": block_stats(cyto, image)}
    t = X.compartment_table(parts, ["DAPI"], (1.0, 1.0))
    assert t["area_nucleus"].tolist() == [6, 0]
    assert np.isnan(t["DAPI_nucleus_mean"][1]) and t["DAPI_cell_mean"][1] == image[0, :, 4:].mean()
    with pytest.raises(ValueError, match="distinct channel names"):
        X.compartment_table(parts, ["DAPI", "DAPI"], (1.0, 1.0))
    parts["nucleus"] = block_stats(np.full_like(cells, 5), image)
    with pytest.raises(ValueError, match="labels that are no cell"):
        X.compartment_table(parts, ["DAPI"], (1.0, 1.0))


# --- skipping uninformative patches ---------------------------------------------------------------

@pytest.fixture(scope="module")
def slide_flows():
    from zseg.engine.synth import flows_from_labels

    s = synth_multiplex((128, 160), diameter=18, markers=0, seed=9)
    f = flows_from_labels(s["cells"])
    full = D.compute_masks(f[:2], f[2], niter=120, min_size=15, flow_threshold=0.4)
    return f, full


def _cells(labels):
    """Each cell as the frozenset of its flat pixel indices."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    ids, starts = np.unique(flat[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    return {frozenset(order[a:b].tolist()) for i, a, b in zip(ids, starts, bounds) if i != 0}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.integers(8, 64), st.data())
def test_skipping_patches_removes_whole_cells_and_changes_no_other(slide_flows, p, data):
    f, full = slide_flows
    shape = full.shape
    n = len(X.patch_grid(shape, p))
    informative = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    allowed = X.seed_allowed(shape, p, informative)
    assert allowed.shape == shape
    for (y0, y1, x0, x1), flag in zip(X.patch_grid(shape, p), informative):
        assert (allowed[y0:y1, x0:x1] == flag).all()
    skipped = D.compute_masks(f[:2], f[2], niter=120, min_size=15, flow_threshold=0.4, seed_allowed=allowed)
    kept, every = _cells(skipped), _cells(full)
    assert kept <= every  # every kept cell is pixel for pixel the cell of the run without skipping
    more = informative | np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    wider = D.compute_masks(f[:2], f[2], niter=120, min_size=15, flow_threshold=0.4,
                            seed_allowed=X.seed_allowed(shape, p, more))
    assert kept <= _cells(wider)  # more informative patches never lose a cell
    if informative.all():
        np.testing.assert_array_equal(skipped, full)
    if not informative.any():
        assert not skipped.any()


def test_seed_allowed_refuses_a_wrong_flag_count():
    with pytest.raises(ValueError, match="one flag per patch"):
        X.seed_allowed((10, 10), 4, np.ones(8, bool))
    with pytest.raises(ValueError, match="seed_allowed"):
        D.compute_masks(np.zeros((2, 8, 8), np.float32), np.ones((8, 8), np.float32), seed_allowed=np.ones((4, 4)))


# --- the whole-slide reference chain --------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle():
    from zseg.engine.synth import flows_from_labels

    s = synth_multiplex((144, 176), diameter=20, markers=2, seed=5)
    return s, flows_from_labels(s["cells"]), flows_from_labels(s["nuclei"])


def test_the_reference_chain_finds_the_synthetic_cells_and_measures_its_layers(oracle):
    from cellpose import metrics

    s, f, nf = oracle
    out = X.segment_reference(s["image"], s["channel_names"], compartment="both", flows=f, nuclear_flows=nf,
                              niter=133, pixel_size_um=(0.5, 0.5))
    cells, nuclei, cyto = out["layers"]["cells"], out["layers"]["nuclei"], out["layers"]["cytoplasm"]
    for got, truth in ((cells, s["cells"]), (nuclei, s["nuclei"])):  # oracle flows: every cell found
        assert metrics.average_precision([truth.astype(np.int64)], [got.astype(np.int64)])[0][0][0] == 1.0
    assert not np.any((nuclei != 0) & (nuclei != cells))  # one ID per cell across the layers
    np.testing.assert_array_equal(cyto, np.where(nuclei != 0, 0, cells))
    n = int(s["cells"].max())
    assert out["matching"] == {"cells": {"total": n, "matched": n, "unmatched": 0},
                               "nuclei": {"total": n, "matched": n, "unmatched": 0}, "matched_fraction": 1.0}
    t = out["table"]
    assert t["label"].tolist() == list(range(1, n + 1))  # 1..K in ascending cell label
    for name, layer in (("cell", cells), ("nucleus", nuclei), ("cytoplasm", cyto)):  # numpy on the layers
        area = np.bincount(layer.ravel(), minlength=n + 1)[1:]
        np.testing.assert_array_equal(t[f"area_{name}"], area)
        for c, ch in enumerate(s["channel_names"]):
            total = np.bincount(layer.ravel(), weights=s["image"][c].ravel().astype(np.float64), minlength=n + 1)[1:]
            np.testing.assert_array_equal(t[f"{ch}_{name}_mean"], total / area)
    # the nuclei are the truth's (discs deep inside cells): their marker means are the known levels
    to_truth = {int(a): int(b) for a, b in zip(nuclei[nuclei > 0], s["nuclei"][nuclei > 0])}
    ids = np.array([to_truth[int(v)] for v in t["label"]])
    np.testing.assert_allclose(t["M1_nucleus_mean"], s["levels"][0, ids, 0], rtol=0.02)


def test_single_compartments_and_unmatched_cells(oracle):
    s, f, nf = oracle
    whole = X.segment_reference(s["image"], s["channel_names"], compartment="whole-cell", flows=f, niter=133)
    assert set(whole["layers"]) == {"cells"} and whole["matching"] is None
    assert "M1_cell_mean" in whole["table"] and "area_nucleus" not in whole["table"]
    nuc = X.segment_reference(s["image"], s["channel_names"], compartment="nuclear", nuclear_flows=nf, niter=133)
    assert set(nuc["layers"]) == {"nuclei"} and "M2_nucleus_mean" in nuc["table"]
    # take the nuclei of five cells away: those cells are unmatched
    gone = np.isin(s["nuclei"], [3, 9, 17, 30, 41])
    nf2 = nf.copy()
    nf2[2][gone] = -6.0
    nf2[:2, gone] = 0.0
    n = int(s["cells"].max())
    for keep in (False, True):
        out = X.segment_reference(s["image"], s["channel_names"], compartment="both", flows=f, nuclear_flows=nf2,
                                  niter=133, keep_unmatched_cells=keep)
        assert out["matching"]["cells"] == {"total": n, "matched": n - 5, "unmatched": 5}
        assert out["matching"]["nuclei"] == {"total": n - 5, "matched": n - 5, "unmatched": 0}
        assert out["matching"]["matched_fraction"] == (n - 5) / n
        t = out["table"]
        assert len(t["label"]) == (n if keep else n - 5)
        assert (t["area_nucleus"] == 0).sum() == (5 if keep else 0)
        if keep:  # an unmatched cell's cytoplasm is the cell
            lonely = t["area_nucleus"] == 0
            np.testing.assert_array_equal(t["area_cytoplasm"][lonely], t["area_cell"][lonely])
            assert np.isnan(t["M1_nucleus_mean"][lonely]).all()


def test_the_reference_chain_refuses_missing_flows(oracle):
    s, f, _ = oracle
    with pytest.raises(ValueError, match="nuclear_flows must be"):
        X.segment_reference(s["image"], s["channel_names"], compartment="both", flows=f)
    with pytest.raises(ValueError, match="compartment 'cells'"):
        X.segment_reference(s["image"], s["channel_names"], compartment="cells", flows=f)
    assert X.matching_summary(0, 0, 0)["matched_fraction"] == 0.0
